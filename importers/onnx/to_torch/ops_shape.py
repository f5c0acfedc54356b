"""Shape and movement ops (Reshape, Transpose, Slice, Gather, Pad, ...) and reductions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fibgraph.errors import InputError

from ..fold import slice_bounds
from .registry import (
    CHECKS,
    OPS,
    axis_index,
    ints,
    op,
    prod,
    tensor_from_proto,
    unsupported,
)


# ------------------------------------------------------------------ shapes
@op("Reshape")
def _reshape(n, xs):
    x = xs[0]
    shape = ints(xs[1]) if n.opset >= 5 else list(n.get("shape"))
    if not n.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Transpose")
def _transpose(n, xs):
    x = xs[0]
    perm = n.get("perm")
    if perm is None:
        perm = list(range(x.dim()))[::-1]
    return x.permute(*perm)


@op("Flatten")
def _flatten(n, xs):
    x = xs[0]
    a = axis_index(n.get("axis", 1), x.dim())
    return x.reshape(prod(x.shape[:a]), prod(x.shape[a:]))


def _axes_arg(n, xs, k, since):
    """Axes from input ``k`` (opset >= since) or from the attribute."""
    if n.opset >= since:
        return ints(xs[k]) if len(xs) > k and xs[k] is not None else None
    return n.get("axes")


@op("Squeeze")
def _squeeze(n, xs):
    x = xs[0]
    axes = _axes_arg(n, xs, 1, 13)
    if axes is None:
        return x.squeeze()
    if not axes:
        return x
    return x.squeeze(tuple(axis_index(a, x.dim()) for a in axes))


@op("Unsqueeze")
def _unsqueeze(n, xs):
    x = xs[0]
    axes = _axes_arg(n, xs, 1, 13)
    r = x.dim() + len(axes)
    for a in sorted(axis_index(a, r) for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Concat")
def _concat(n, xs):
    xs = [x for x in xs if x is not None]
    return torch.cat(xs, axis_index(n.get("axis"), xs[0].dim()))


@op("Split")
def _split(n, xs):
    x = xs[0]
    a = axis_index(n.get("axis", 0), x.dim())
    if n.opset >= 13:
        sizes = ints(xs[1]) if len(xs) > 1 and xs[1] is not None else None
    else:
        sizes = n.get("split")
    k = len(n.outputs)
    if not sizes:
        k = n.get("num_outputs", k)
        d = x.shape[a]
        c = -(-d // k)
        sizes = [c] * (d // c) + ([d - c * (d // c)] if d % c else [])
    return tuple(torch.split(x, list(sizes), a))


def _slice_tensor(x, starts, ends, axes, steps):
    r = x.dim()
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    idx = [slice(None)] * r
    rev = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = axis_index(a, r)
        if st == 0:
            raise InputError("onnx -> torch: Slice with step 0")
        s, e = slice_bounds(s, e, st, x.shape[a])
        if st > 0:
            idx[a] = slice(s, e, st)
        else:
            rev.append((a, list(range(s, e, st))))
    y = x[tuple(idx)]
    for a, ind in rev:
        y = y.index_select(a, torch.tensor(ind, dtype=torch.long, device=x.device))
    return y


@op("Slice")
def _slice(n, xs):
    x = xs[0]
    if n.opset < 10:
        return _slice_tensor(x, n.get("starts"), n.get("ends"), n.get("axes"), None)
    opt = [ints(xs[k]) if len(xs) > k else None for k in (3, 4)]
    return _slice_tensor(x, ints(xs[1]), ints(xs[2]), opt[0], opt[1])


def _norm_index(i, d):
    i = i.long()
    return torch.where(i < 0, i + d, i)


@op("Gather")
def _gather(n, xs):
    x, i = xs
    a = axis_index(n.get("axis", 0), x.dim())
    i = _norm_index(i.to(x.device), x.shape[a])
    y = x.index_select(a, i.reshape(-1))
    return y.reshape(tuple(x.shape[:a]) + tuple(i.shape) + tuple(x.shape[a + 1:]))


@op("GatherElements")
def _gather_el(n, xs):
    x, i = xs
    a = axis_index(n.get("axis", 0), x.dim())
    return torch.gather(x, a, _norm_index(i.to(x.device), x.shape[a]))


@op("Expand")
def _expand(n, xs):
    x = xs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(ints(xs[1])))
    return x.expand(shape)


@op("Tile")
def _tile(n, xs):
    return xs[0].repeat(*ints(xs[1]))


@op("Shape")
def _shape(n, xs):
    x = xs[0]
    r = x.dim()
    s = min(max(axis_index(n.get("start", 0), r), 0), r)
    e = n.get("end")
    e = r if e is None else min(max(axis_index(e, r), 0), r)
    return torch.tensor(list(x.shape[s:e]), dtype=torch.long, device=x.device)


@op("Size")
def _size(n, xs):
    return torch.tensor(xs[0].numel(), dtype=torch.long, device=xs[0].device)


@op("ConstantOfShape")
def _cos(n, xs):
    v = n.get("value")
    val = tensor_from_proto(v).reshape(-1) if v is not None else torch.zeros(1)
    shape = ints(xs[0])
    return torch.full(shape, val[0].item(), dtype=val.dtype, device=xs[0].device)


@op("Range")
def _range(n, xs):
    s, l, d = xs
    return torch.arange(s.item(), l.item(), d.item(), dtype=s.dtype, device=s.device)


@op("Where")
def _where(n, xs):
    c, a, b = xs
    return torch.where(c.bool(), a, b)


@op("Trilu")
def _trilu(n, xs):
    """The upper (``upper=1``, default) or lower triangle of the last two axes,
    shifted by the optional diagonal ``k``."""
    k = int(xs[1].item()) if len(xs) > 1 and xs[1] is not None and xs[1].numel() else 0
    return torch.triu(xs[0], k) if n.get("upper", 1) else torch.tril(xs[0], k)


@op("Pad")
def _pad(n, xs):
    x = xs[0]
    r = x.dim()
    mode = n.get("mode", "constant")
    if n.opset < 11:
        pads, val, axes = n.get("pads"), n.get("value", 0.0), None
    else:
        pads = ints(xs[1])
        val = xs[2].item() if len(xs) > 2 and xs[2] is not None and xs[2].numel() else 0
        axes = ints(xs[3]) if len(xs) > 3 and xs[3] is not None else None
    axes = list(range(r)) if axes is None else [axis_index(a, r) for a in axes]
    k = len(axes)
    begin, end = dict(zip(axes, pads[:k])), dict(zip(axes, pads[k:]))
    flat = []
    for a in range(r - 1, -1, -1):
        flat += [begin.get(a, 0), end.get(a, 0)]
    while flat and flat[-1] == 0 and flat[-2] == 0:     # F.pad takes the last axes only
        flat = flat[:-2]
    if not flat:
        return x
    if mode == "constant":
        return F.pad(x, flat, value=val)
    tmode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    na = len(flat) // 2
    if na > 3:
        raise unsupported(n.op, f"mode {mode} on more than 3 axes")
    lead = tuple(x.shape[:r - na])
    y = F.pad(x.reshape((1, prod(lead)) + tuple(x.shape[r - na:])), flat, mode=tmode)
    return y.reshape(lead + tuple(y.shape[2:]))


def _check_pad(n):
    if n.get("mode", "constant") not in ("constant", "reflect", "edge", "wrap"):
        raise unsupported(n.op, f"mode {n.get('mode')}")


CHECKS["Pad"] = _check_pad


# ------------------------------------------------------------------ reductions
def _reduce(kind):
    def run(n, xs):
        x = xs[0]
        since = 13 if kind == "ReduceSum" else 18
        axes = _axes_arg(n, xs, 1, since)
        keep = bool(n.get("keepdims", 1))
        if not axes:
            if n.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        if x.dim() == 0:
            return _reduce_fn(kind, x.reshape(1), (0,), False)
        dims = tuple(sorted(axis_index(a, x.dim()) for a in axes))
        return _reduce_fn(kind, x, dims, keep)
    return run


def _reduce_fn(kind, x, dims, keep):
    if kind == "ReduceMean":
        return x.mean(dims, keepdim=keep)
    if kind == "ReduceSum":
        return x.sum(dims, keepdim=keep)
    if kind == "ReduceMax":
        return torch.amax(x, dims, keepdim=keep)
    if kind == "ReduceMin":
        return torch.amin(x, dims, keepdim=keep)
    if kind == "ReduceProd":
        for d in sorted(dims, reverse=True):
            x = x.prod(d, keepdim=keep)
        return x
    if kind == "ReduceL1":
        return x.abs().sum(dims, keepdim=keep)
    if kind == "ReduceL2":
        return (x * x).sum(dims, keepdim=keep).sqrt()
    if kind == "ReduceSumSquare":
        return (x * x).sum(dims, keepdim=keep)
    if kind == "ReduceLogSum":
        return x.sum(dims, keepdim=keep).log()
    if kind == "ReduceLogSumExp":
        return torch.logsumexp(x, dims, keepdim=keep)
    raise AssertionError(kind)  # pragma: no cover


for _name in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"):
    OPS[_name] = _reduce(_name)


def _arg(fn):
    def run(n, xs):
        x = xs[0]
        a = axis_index(n.get("axis", 0), x.dim())
        keep = bool(n.get("keepdims", 1))
        if n.get("select_last_index", 0):
            y = x.shape[a] - 1 - fn(x.flip(a), a, keepdim=keep)
        else:
            y = fn(x, a, keepdim=keep)
        return y.long()
    return run


OPS["ArgMax"] = _arg(torch.argmax)
OPS["ArgMin"] = _arg(torch.argmin)


