"""An ONNX graph as a differentiable torch module, and back to ONNX.

For retraining a compressed (or any) ONNX model in torch (the compression
paper's compress-retune, Algorithm 2) without onnx2torch:

    m = OnnxModule(onnx.load("small.onnx"))
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    loss = F.cross_entropy(m(x), y); loss.backward(); opt.step()
    onnx.save(m.to_onnx(), "small_retuned.onnx")

- Every floating initializer of rank >= 1, and every floating ``Constant``
  node tensor of more than one element, is an ``nn.Parameter`` of the same
  shape and dtype, registered under a sanitised unique name
  (``m.onnx_names[param name] -> ONNX name``; ``m.parameter(onnx_name)``).
  Integer / bool tensors and floating scalars are buffers (they follow
  ``.to(device)`` but are not trained).
- ``forward(*inputs, **by_onnx_name)`` runs the nodes in graph order with
  torch ops (exact ONNX semantics for the supported ops, see
  :data:`SUPPORTED_OPS`) and returns the graph outputs (one tensor, or a
  tuple).  Shape-valued tensors (``Shape``, ``Gather`` on shapes, ``Concat``
  of shapes) are small int64 tensors computed on every call, so batch sizes
  other than the export's work.
  ``OnnxModule(model, freeze=names or predicate)`` keeps chosen tensors
  fixed (``requires_grad=False``).
- ``to_onnx()`` returns a copy of the model with every parameter's current
  value written into its initializer / Constant node (dtype preserved); the
  graph is unchanged.
- An op outside :data:`SUPPORTED_OPS` (or a supported op with an attribute
  value this module does not implement) raises
  :class:`fibgraph.errors.InputError` at construction, naming the op.
"""
from __future__ import annotations

import math
import re
import sys
from functools import reduce

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import torch
import torch.nn.functional as F
from torch import nn

from fibgraph.errors import InputError

__all__ = ["OnnxModule", "SUPPORTED_OPS"]

_DTYPES = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool, TensorProto.UINT16: torch.uint16, TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
}
_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _err(op, why=None):
    msg = f"onnx -> torch: op {op} is not supported"
    return InputError(msg + (f" ({why})" if why else ""))


# ------------------------------------------------------------------ tensors
def _tensor_from_proto(t):
    if t.data_type not in _DTYPES:
        raise InputError(f"onnx -> torch: tensor {t.name!r} has data type "
                         f"{TensorProto.DataType.Name(t.data_type)}, which is not supported")
    arr = numpy_helper.to_array(t)
    if t.data_type == TensorProto.BFLOAT16:
        return torch.from_numpy(np.asarray(arr, dtype=np.float32).copy()).to(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True)).to(_DTYPES[t.data_type])


def _write_tensor(t, value):
    """Write ``value`` into TensorProto ``t`` in place (its dims and data type kept)."""
    dt = _DTYPES[t.data_type]
    v = value.detach().to("cpu").to(dt).contiguous().reshape(tuple(t.dims))
    raw = (v.view(torch.int16) if dt == torch.bfloat16 else v).numpy()
    if sys.byteorder != "little":  # pragma: no cover
        raw = raw.byteswap()
    for f in ("float_data", "double_data", "int32_data", "int64_data", "uint64_data", "string_data",
              "external_data"):
        t.ClearField(f)
    t.data_location = TensorProto.DEFAULT
    t.raw_data = raw.tobytes()


def _sanitize(name):
    s = re.sub(r"\W", "_", name)
    if not s or s[0].isdigit():
        s = "p_" + s
    return s


def _ints(t):
    """A shape-like tensor (or None) as a list of Python ints."""
    if t is None:
        return None
    return [int(v) for v in t.reshape(-1).tolist()]


def _ax(a, r):
    a = int(a)
    return a + r if a < 0 else a


def _prod(xs):
    return int(np.prod([int(v) for v in xs], dtype=np.int64)) if len(xs) else 1


# ------------------------------------------------------------------ op table
class _Node:
    """One ONNX node with its attributes decoded (bytes -> str)."""

    def __init__(self, proto, opset):
        self.proto = proto
        self.op = proto.op_type
        self.name = proto.name
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.opset = opset
        self.attrs = {}
        for a in proto.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise _err(self.op, "subgraphs")
            v = helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [s.decode() for s in v]
            self.attrs[a.name] = v

    def get(self, key, default=None):
        return self.attrs.get(key, default)

    def want(self, k):
        """Is output ``k`` present and named?"""
        return len(self.outputs) > k and self.outputs[k] != ""


_OPS = {}
_CHECKS = {}


def _op(*names, check=None):
    def deco(fn):
        for n in names:
            _OPS[n] = fn
            if check is not None:
                _CHECKS[n] = check
        return fn
    return deco


def _unary(name, fn):
    _OPS[name] = lambda n, xs: fn(xs[0])


for _name, _fn in {
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
    "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
    "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus, "Softsign": F.softsign,
    "HardSwish": F.hardswish, "Mish": F.mish, "Not": torch.logical_not, "IsNaN": torch.isnan,
}.items():
    _unary(_name, _fn)


def _div(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a, b):
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "MatMul": torch.matmul,
}.items():
    _OPS[_name] = (lambda f: lambda n, xs: f(xs[0], xs[1]))(_fn)

for _name, _fn in {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}.items():
    _OPS[_name] = (lambda f: lambda n, xs: reduce(f, xs))(_fn)


@_op("Mean")
def _mean(n, xs):
    return reduce(torch.add, xs) / len(xs)


@_op("Mod")
def _mod(n, xs):
    a, b = xs
    if n.get("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@_op("LeakyRelu")
def _leaky(n, xs):
    return F.leaky_relu(xs[0], n.get("alpha", 0.01))


@_op("Elu")
def _elu(n, xs):
    return F.elu(xs[0], n.get("alpha", 1.0))


@_op("Celu")
def _celu(n, xs):
    return F.celu(xs[0], n.get("alpha", 1.0))


@_op("Selu")
def _selu(n, xs):
    a, g = n.get("alpha", 1.67326319217681884765625), n.get("gamma", 1.05070102214813232421875)
    x = xs[0]
    return g * torch.where(x > 0, x, a * (torch.exp(x) - 1))


@_op("ThresholdedRelu")
def _trelu(n, xs):
    x = xs[0]
    return torch.where(x > n.get("alpha", 1.0), x, torch.zeros_like(x))


@_op("PRelu")
def _prelu(n, xs):
    x, s = xs
    return torch.where(x < 0, s * x, x)


@_op("HardSigmoid")
def _hsig(n, xs):
    return torch.clamp(n.get("alpha", 0.2) * xs[0] + n.get("beta", 0.5), 0.0, 1.0)


@_op("Gelu")
def _gelu(n, xs):
    return F.gelu(xs[0], approximate=n.get("approximate", "none"))


def _softmax_like(fn):
    def run(n, xs):
        x = xs[0]
        r = x.dim()
        if n.opset >= 13:
            return fn(x, _ax(n.get("axis", -1), r))
        a = _ax(n.get("axis", 1), r)
        shape = x.shape
        return fn(x.reshape(_prod(shape[:a]), _prod(shape[a:])), 1).reshape(shape)
    return run


_OPS["Softmax"] = _softmax_like(F.softmax)
_OPS["LogSoftmax"] = _softmax_like(F.log_softmax)


@_op("Clip")
def _clip(n, xs):
    x = xs[0]
    if n.opset < 11:
        lo, hi = n.get("min"), n.get("max")
    else:
        lo = xs[1] if len(xs) > 1 else None
        hi = xs[2] if len(xs) > 2 else None
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


@_op("Identity")
def _identity(n, xs):
    return xs[0]


@_op("Dropout")
def _dropout(n, xs):
    x = xs[0]
    if n.want(1):
        return x, torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return x


@_op("Cast")
def _cast(n, xs):
    return xs[0].to(_DTYPES[n.get("to")])


def _check_cast(n):
    if n.get("to") not in _DTYPES:
        raise _err(n.op, f"to={n.get('to')}")


_CHECKS["Cast"] = _check_cast


@_op("CastLike")
def _castlike(n, xs):
    return xs[0].to(xs[1].dtype)


# ------------------------------------------------------------------ shapes
@_op("Reshape")
def _reshape(n, xs):
    x = xs[0]
    shape = _ints(xs[1]) if n.opset >= 5 else list(n.get("shape"))
    if not n.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_op("Transpose")
def _transpose(n, xs):
    x = xs[0]
    perm = n.get("perm")
    if perm is None:
        perm = list(range(x.dim()))[::-1]
    return x.permute(*perm)


@_op("Flatten")
def _flatten(n, xs):
    x = xs[0]
    a = _ax(n.get("axis", 1), x.dim())
    return x.reshape(_prod(x.shape[:a]), _prod(x.shape[a:]))


def _axes_arg(n, xs, k, since):
    """Axes from input ``k`` (opset >= since) or from the attribute."""
    if n.opset >= since:
        return _ints(xs[k]) if len(xs) > k and xs[k] is not None else None
    return n.get("axes")


@_op("Squeeze")
def _squeeze(n, xs):
    x = xs[0]
    axes = _axes_arg(n, xs, 1, 13)
    if axes is None:
        return x.squeeze()
    if not axes:
        return x
    return x.squeeze(tuple(_ax(a, x.dim()) for a in axes))


@_op("Unsqueeze")
def _unsqueeze(n, xs):
    x = xs[0]
    axes = _axes_arg(n, xs, 1, 13)
    r = x.dim() + len(axes)
    for a in sorted(_ax(a, r) for a in axes):
        x = x.unsqueeze(a)
    return x


@_op("Concat")
def _concat(n, xs):
    xs = [x for x in xs if x is not None]
    return torch.cat(xs, _ax(n.get("axis"), xs[0].dim()))


@_op("Split")
def _split(n, xs):
    x = xs[0]
    a = _ax(n.get("axis", 0), x.dim())
    if n.opset >= 13:
        sizes = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else None
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
        a = _ax(a, r)
        d = x.shape[a]
        if st == 0:
            raise InputError("onnx -> torch: Slice with step 0")
        s = s + d if s < 0 else s
        e = e + d if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
            idx[a] = slice(s, e, st)
        else:
            s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
            rev.append((a, list(range(s, e, st))))
    y = x[tuple(idx)]
    for a, ind in rev:
        y = y.index_select(a, torch.tensor(ind, dtype=torch.long, device=x.device))
    return y


@_op("Slice")
def _slice(n, xs):
    x = xs[0]
    if n.opset < 10:
        return _slice_tensor(x, n.get("starts"), n.get("ends"), n.get("axes"), None)
    opt = [_ints(xs[k]) if len(xs) > k else None for k in (3, 4)]
    return _slice_tensor(x, _ints(xs[1]), _ints(xs[2]), opt[0], opt[1])


def _norm_index(i, d):
    i = i.long()
    return torch.where(i < 0, i + d, i)


@_op("Gather")
def _gather(n, xs):
    x, i = xs
    a = _ax(n.get("axis", 0), x.dim())
    i = _norm_index(i.to(x.device), x.shape[a])
    y = x.index_select(a, i.reshape(-1))
    return y.reshape(tuple(x.shape[:a]) + tuple(i.shape) + tuple(x.shape[a + 1:]))


@_op("GatherElements")
def _gather_el(n, xs):
    x, i = xs
    a = _ax(n.get("axis", 0), x.dim())
    return torch.gather(x, a, _norm_index(i.to(x.device), x.shape[a]))


@_op("Expand")
def _expand(n, xs):
    x = xs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(xs[1])))
    return x.expand(shape)


@_op("Tile")
def _tile(n, xs):
    return xs[0].repeat(*_ints(xs[1]))


@_op("Shape")
def _shape(n, xs):
    x = xs[0]
    r = x.dim()
    s = min(max(_ax(n.get("start", 0), r), 0), r)
    e = n.get("end")
    e = r if e is None else min(max(_ax(e, r), 0), r)
    return torch.tensor(list(x.shape[s:e]), dtype=torch.long, device=x.device)


@_op("Size")
def _size(n, xs):
    return torch.tensor(xs[0].numel(), dtype=torch.long, device=xs[0].device)


@_op("ConstantOfShape")
def _cos(n, xs):
    v = n.get("value")
    val = _tensor_from_proto(v).reshape(-1) if v is not None else torch.zeros(1)
    shape = _ints(xs[0])
    return torch.full(shape, val[0].item(), dtype=val.dtype, device=xs[0].device)


@_op("Range")
def _range(n, xs):
    s, l, d = xs
    return torch.arange(s.item(), l.item(), d.item(), dtype=s.dtype, device=s.device)


@_op("Where")
def _where(n, xs):
    c, a, b = xs
    return torch.where(c.bool(), a, b)


@_op("Pad")
def _pad(n, xs):
    x = xs[0]
    r = x.dim()
    mode = n.get("mode", "constant")
    if n.opset < 11:
        pads, val, axes = n.get("pads"), n.get("value", 0.0), None
    else:
        pads = _ints(xs[1])
        val = xs[2].item() if len(xs) > 2 and xs[2] is not None and xs[2].numel() else 0
        axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else None
    axes = list(range(r)) if axes is None else [_ax(a, r) for a in axes]
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
        raise _err(n.op, f"mode {mode} on more than 3 axes")
    lead = tuple(x.shape[:r - na])
    y = F.pad(x.reshape((1, _prod(lead)) + tuple(x.shape[r - na:])), flat, mode=tmode)
    return y.reshape(lead + tuple(y.shape[2:]))


def _check_pad(n):
    if n.get("mode", "constant") not in ("constant", "reflect", "edge", "wrap"):
        raise _err(n.op, f"mode {n.get('mode')}")


_CHECKS["Pad"] = _check_pad


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
        dims = tuple(sorted(_ax(a, x.dim()) for a in axes))
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
    _OPS[_name] = _reduce(_name)


def _arg(fn):
    def run(n, xs):
        x = xs[0]
        a = _ax(n.get("axis", 0), x.dim())
        keep = bool(n.get("keepdims", 1))
        if n.get("select_last_index", 0):
            y = x.shape[a] - 1 - fn(x.flip(a), a, keepdim=keep)
        else:
            y = fn(x, a, keepdim=keep)
        return y.long()
    return run


_OPS["ArgMax"] = _arg(torch.argmax)
_OPS["ArgMin"] = _arg(torch.argmin)


# ------------------------------------------------------------------ linear algebra, norms
@_op("Gemm")
def _gemm(n, xs):
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    if n.get("transA", 0):
        a = a.t()
    if n.get("transB", 0):
        b = b.t()
    alpha, beta = n.get("alpha", 1.0), n.get("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = alpha * y
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else beta * c)
    return y


@_op("Einsum")
def _einsum(n, xs):
    return torch.einsum(n.get("equation").replace(" ", ""), *xs)


@_op("LayerNormalization")
def _layernorm(n, xs):
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    r = x.dim()
    a = _ax(n.get("axis", -1), r)
    eps = n.get("epsilon", 1e-5)
    dims = tuple(range(a, r))
    norm_shape = tuple(x.shape[a:])
    if not n.want(1) and not n.want(2) and tuple(scale.shape) == norm_shape and (
            bias is None or tuple(bias.shape) == norm_shape):
        return F.layer_norm(x, norm_shape, scale, bias, eps)
    xf = x.float() if n.get("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(dims, keepdim=True)
    d = xf - mean
    inv = torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)
    y = (d * inv).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    outs = [y, mean, inv]
    return tuple(outs[:len(n.outputs)]) if len(n.outputs) > 1 else y


@_op("BatchNormalization")
def _batchnorm(n, xs):
    x, scale, b, mean, var = xs[:5]
    shp = (1, -1) + (1,) * (x.dim() - 2)
    eps = n.get("epsilon", 1e-5)
    k = scale / torch.sqrt(var + eps)
    return (x - mean.reshape(shp)) * k.reshape(shp) + b.reshape(shp)


def _check_bn(n):
    if n.get("training_mode", 0):
        raise _err(n.op, "training_mode=1; only inference")
    if any(n.want(k) for k in (1, 2, 3, 4)):
        raise _err(n.op, "running statistics outputs; only inference")


_CHECKS["BatchNormalization"] = _check_bn


# ------------------------------------------------------------------ conv / pool
def _spatial_pads(n, x, kernel, strides, dilations, transpose=False):
    """(begin, end) pads per spatial axis for Conv / pools."""
    nsp = len(kernel)
    auto = n.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nsp):
            d = x.shape[2 + i]
            out = -(-d // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - d, 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
        return begin, end
    if auto == "VALID":
        return [0] * nsp, [0] * nsp
    pads = n.get("pads") or [0] * (2 * nsp)
    return list(pads[:nsp]), list(pads[nsp:])


def _flat_pads(begin, end):
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return flat


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_spatial(n):
    if n.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise _err(n.op, f"auto_pad {n.get('auto_pad')}")
    k = n.get("kernel_shape")
    if k is not None and len(k) not in (1, 2, 3):
        raise _err(n.op, f"{len(k)} spatial axes")


def _conv_args(n, xs, table):
    """x, w, bias, spatial rank, kernel, strides, dilations of a Conv/ConvTranspose."""
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nsp = x.dim() - 2
    if nsp not in table:
        raise _err(n.op, f"{nsp} spatial axes")
    kernel = list(n.get("kernel_shape") or w.shape[2:])
    strides = list(n.get("strides") or [1] * nsp)
    dil = list(n.get("dilations") or [1] * nsp)
    return x, w, b, nsp, kernel, strides, dil


@_op("Conv", check=_check_spatial)
def _conv(n, xs):
    x, w, b, nsp, kernel, strides, dil = _conv_args(n, xs, _CONV)
    begin, end = _spatial_pads(n, x, kernel, strides, dil)
    if begin != end:
        x = F.pad(x, _flat_pads(begin, end))
        begin = [0] * nsp
    return _CONV[nsp](x, w, b, strides, begin, dil, n.get("group", 1))


@_op("ConvTranspose")
def _convt(n, xs):
    x, w, b, nsp, kernel, strides, dil = _conv_args(n, xs, _CONVT)
    opad = list(n.get("output_padding") or [0] * nsp)
    full = [strides[i] * (x.shape[2 + i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nsp)]
    out_shape = n.get("output_shape")
    auto = n.get("auto_pad", "NOTSET")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is None:
            out_shape = [x.shape[2 + i] * strides[i] for i in range(nsp)]
        out_shape = list(out_shape)[-nsp:]
        begin, end = [], []
        for i in range(nsp):
            total = full[i] - out_shape[i]
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
    elif auto == "VALID":
        begin, end = [0] * nsp, [0] * nsp
    else:
        pads = n.get("pads") or [0] * (2 * nsp)
        begin, end = list(pads[:nsp]), list(pads[nsp:])
    y = _CONVT[nsp](x, w, None, strides, 0, 0, n.get("group", 1), dil)
    if any(opad):
        y = F.pad(y, _flat_pads([0] * nsp, opad))
    idx = [slice(None), slice(None)] + [slice(begin[i], y.shape[2 + i] - end[i]) for i in range(nsp)]
    y = y[tuple(idx)]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nsp)
    return y


_CHECKS["ConvTranspose"] = _check_spatial


def _pool_args(n, x):
    kernel = list(n.get("kernel_shape"))
    nsp = len(kernel)
    strides = list(n.get("strides") or [1] * nsp)
    dil = list(n.get("dilations") or [1] * nsp)
    begin, end = _spatial_pads(n, x, kernel, strides, dil)
    return kernel, strides, dil, begin, end


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _check_pool(n):
    _check_spatial(n)
    if n.get("kernel_shape") is None:
        raise _err(n.op, "no kernel_shape")
    if n.op == "MaxPool" and n.want(1):
        raise _err(n.op, "the Indices output")
    if n.op == "AveragePool" and any(d != 1 for d in (n.get("dilations") or [])):
        raise _err(n.op, "dilations")


@_op("MaxPool", check=_check_pool)
def _maxpool(n, xs):
    x = xs[0]
    kernel, strides, dil, begin, end = _pool_args(n, x)
    nsp = len(kernel)
    ceil = bool(n.get("ceil_mode", 0))
    if begin != end or any(2 * p > k for p, k in zip(begin, kernel)):
        x = F.pad(x, _flat_pads(begin, end), value=-math.inf)
        begin = [0] * nsp
    return _MAXPOOL[nsp](x, kernel, strides, begin, dil, ceil_mode=ceil)


@_op("AveragePool", check=_check_pool)
def _avgpool(n, xs):
    x = xs[0]
    kernel, strides, dil, begin, end = _pool_args(n, x)
    nsp = len(kernel)
    ceil = bool(n.get("ceil_mode", 0))
    incl = bool(n.get("count_include_pad", 0))
    pool = _AVGPOOL[nsp]
    if begin == end and all(2 * p <= k for p, k in zip(begin, kernel)):
        return pool(x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=incl)
    flat = _flat_pads(begin, end)
    xp = F.pad(x, flat)
    s = pool(xp, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if incl:
        return s
    ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), flat)
    return s / pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)


@_op("GlobalAveragePool")
def _gap(n, xs):
    x = xs[0]
    return x.mean(tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _gmp(n, xs):
    x = xs[0]
    return torch.amax(x, tuple(range(2, x.dim())), keepdim=True)


# ------------------------------------------------------------------ recurrent
_RNN_ACTS = {   # name -> (uses alpha, uses beta, default alpha, default beta, fn)
    "sigmoid": (0, 0, 0, 0, lambda x, a, b: torch.sigmoid(x)),
    "tanh": (0, 0, 0, 0, lambda x, a, b: torch.tanh(x)),
    "relu": (0, 0, 0, 0, lambda x, a, b: torch.relu(x)),
    "hardsigmoid": (1, 1, 0.2, 0.5, lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0)),
    "leakyrelu": (1, 0, 0.01, 0, lambda x, a, b: F.leaky_relu(x, a)),
    "thresholdedrelu": (1, 0, 1.0, 0, lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x))),
    "scaledtanh": (1, 1, 1.0, 1.0, lambda x, a, b: a * torch.tanh(b * x)),
    "affine": (1, 1, 1.0, 0.0, lambda x, a, b: a * x + b),
    "elu": (1, 0, 1.0, 0, lambda x, a, b: F.elu(x, a)),
    "softsign": (0, 0, 0, 0, lambda x, a, b: F.softsign(x)),
    "softplus": (0, 0, 0, 0, lambda x, a, b: F.softplus(x)),
}
_RNN_DEFAULT = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _rnn_acts(n):
    """Per direction, the list of activation callables (alpha / beta consumed in order)."""
    dirs = 2 if n.get("direction", "forward") == "bidirectional" else 1
    names = n.get("activations")
    base = _RNN_DEFAULT[n.op]
    if not names:
        names = base * dirs
    if len(names) != len(base) * dirs:
        raise _err(n.op, f"{len(names)} activations for {dirs} direction(s)")
    alphas, betas = list(n.get("activation_alpha") or []), list(n.get("activation_beta") or [])
    out = []
    for name in names:
        key = name.lower()
        if key not in _RNN_ACTS:
            raise _err(n.op, f"activation {name}")
        ua, ub, da, db, fn = _RNN_ACTS[key]
        a = alphas.pop(0) if ua and alphas else da
        b = betas.pop(0) if ub and betas else db
        out.append((lambda f, a, b: lambda x: f(x, a, b))(fn, a, b))
    k = len(base)
    return [out[d * k:(d + 1) * k] for d in range(dirs)]


def _check_rnn(n):
    if n.get("direction", "forward") not in ("forward", "reverse", "bidirectional"):
        raise _err(n.op, f"direction {n.get('direction')}")
    if n.get("layout", 0) not in (0, 1):
        raise _err(n.op, f"layout {n.get('layout')}")
    n.acts = _rnn_acts(n)


def _rnn_common(n, xs, n_state):
    """Inputs in layout 0 plus bookkeeping for LSTM / GRU / RNN."""
    xs = list(xs) + [None] * (8 - len(xs))
    X, W, R, B, lens = xs[:5]
    init = xs[5:5 + n_state]
    layout = n.get("layout", 0)
    if layout:
        X = X.transpose(0, 1)
        init = [None if s is None else s.transpose(0, 1) for s in init]
    T, Bsz = X.shape[0], X.shape[1]
    H = n.get("hidden_size") or R.shape[-1]
    direction = n.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    mask = None
    if lens is not None:
        lens = lens.to(X.device).long()
        if bool((lens != T).any()):
            mask = torch.arange(T, device=X.device)[:, None] < lens[None, :]   # [T, B]
    return X, W, R, B, init, T, Bsz, H, dirs, direction, mask, layout, xs


def _rnn_outputs(n, ys, finals, layout):
    """ys: per direction [T, B, H]; finals: list over states of per-direction [B, H]."""
    Y = torch.stack(ys, 1)                                  # [T, dirs, B, H]
    states = [torch.stack(f, 0) for f in finals]            # [dirs, B, H]
    if layout:
        Y = Y.permute(2, 0, 1, 3)
        states = [s.transpose(0, 1) for s in states]
    outs = [Y] + states
    return tuple(outs[:len(n.outputs)]) if len(n.outputs) > 1 else Y


def _step_mask(mask, t, new, old):
    if mask is None:
        return new
    return torch.where(mask[t][:, None], new, old)


def _step(mask, t, h_new, h, out):
    """Output ``out[t]`` of step ``t`` (zero where the sequence has ended) and
    the state after it (held there)."""
    out[t] = h_new if mask is None else torch.where(mask[t][:, None], h_new, torch.zeros_like(h_new))
    return _step_mask(mask, t, h_new, h)


def _time_order(T, rev):
    return range(T - 1, -1, -1) if rev else range(T)


@_op("LSTM", check=_check_rnn)
def _lstm(n, xs):
    X, W, R, B, init, T, Bsz, H, dirs, direction, mask, layout, xs = _rnn_common(n, xs, 2)
    P = xs[7]
    clip = n.get("clip")
    fgate_coupled = bool(n.get("input_forget", 0))
    ys, hs, cs = [], [], []
    cl = (lambda v: v) if clip is None else (lambda v: torch.clamp(v, -clip, clip))
    for d in range(dirs):
        f, g, h_act = n.acts[d]
        rev = direction == "reverse" or d == 1
        gx = X @ W[d].t()
        if B is not None:
            gx = gx + (B[d, :4 * H] + B[d, 4 * H:])
        h = init[0][d] if init[0] is not None else X.new_zeros(Bsz, H)
        c = init[1][d] if init[1] is not None else X.new_zeros(Bsz, H)
        pi = po = pf = None
        if P is not None:
            pi, po, pf = P[d, :H], P[d, H:2 * H], P[d, 2 * H:]
        Rt = R[d].t()
        out = [None] * T
        for t in _time_order(T, rev):
            z = gx[t] + h @ Rt
            zi, zo, zf, zc = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
            if pi is not None:
                zi = zi + pi * c
                zf = zf + pf * c
            i = f(cl(zi))
            ft = 1 - i if fgate_coupled else f(cl(zf))
            c_new = ft * c + i * g(cl(zc))
            if po is not None:
                zo = zo + po * c_new
            h_new = f(cl(zo)) * h_act(c_new)
            h, c = _step(mask, t, h_new, h, out), _step_mask(mask, t, c_new, c)
        ys.append(torch.stack(out, 0))
        hs.append(h)
        cs.append(c)
    return _rnn_outputs(n, ys, [hs, cs], layout)


@_op("GRU", check=_check_rnn)
def _gru(n, xs):
    X, W, R, B, init, T, Bsz, H, dirs, direction, mask, layout, xs = _rnn_common(n, xs, 1)
    clip = n.get("clip")
    lbr = bool(n.get("linear_before_reset", 0))
    cl = (lambda v: v) if clip is None else (lambda v: torch.clamp(v, -clip, clip))
    ys, hs = [], []
    for d in range(dirs):
        f, g = n.acts[d]
        rev = direction == "reverse" or d == 1
        gx = X @ W[d].t()
        if B is not None:
            gx = gx + B[d, :3 * H]
            rb = B[d, 3 * H:]
        else:
            rb = None
        h = init[0][d] if init[0] is not None else X.new_zeros(Bsz, H)
        Rzr, Rh = R[d, :2 * H].t(), R[d, 2 * H:].t()
        out = [None] * T
        for t in _time_order(T, rev):
            hzr = h @ Rzr
            if rb is not None:
                hzr = hzr + rb[:2 * H]
            z = f(cl(gx[t, :, :H] + hzr[:, :H]))
            r = f(cl(gx[t, :, H:2 * H] + hzr[:, H:]))
            if lbr:
                hh = h @ Rh
                if rb is not None:
                    hh = hh + rb[2 * H:]
                hh = r * hh
            else:
                hh = (r * h) @ Rh
                if rb is not None:
                    hh = hh + rb[2 * H:]
            ht = g(cl(gx[t, :, 2 * H:] + hh))
            h_new = (1 - z) * ht + z * h
            h = _step(mask, t, h_new, h, out)
        ys.append(torch.stack(out, 0))
        hs.append(h)
    return _rnn_outputs(n, ys, [hs], layout)


@_op("RNN", check=_check_rnn)
def _rnn(n, xs):
    X, W, R, B, init, T, Bsz, H, dirs, direction, mask, layout, xs = _rnn_common(n, xs, 1)
    clip = n.get("clip")
    cl = (lambda v: v) if clip is None else (lambda v: torch.clamp(v, -clip, clip))
    ys, hs = [], []
    for d in range(dirs):
        (f,) = n.acts[d]
        rev = direction == "reverse" or d == 1
        gx = X @ W[d].t()
        if B is not None:
            gx = gx + (B[d, :H] + B[d, H:])
        h = init[0][d] if init[0] is not None else X.new_zeros(Bsz, H)
        Rt = R[d].t()
        out = [None] * T
        for t in _time_order(T, rev):
            h_new = f(cl(gx[t] + h @ Rt))
            h = _step(mask, t, h_new, h, out)
        ys.append(torch.stack(out, 0))
        hs.append(h)
    return _rnn_outputs(n, ys, [hs], layout)


# ------------------------------------------------------------------ attention (opset 23)
def _check_attention(n):
    if n.get("qk_matmul_output_mode", 0) not in (0, 1, 2, 3):
        raise _err(n.op, f"qk_matmul_output_mode {n.get('qk_matmul_output_mode')}")
    if len(n.inputs) > 6 and n.inputs[6]:
        raise _err(n.op, "nonpad_kv_seqlen")


@_op("Attention", check=_check_attention)
def _attention(n, xs):
    xs = list(xs) + [None] * (6 - len(xs))
    q, k, v, mask, past_k, past_v = xs[:6]
    three_d = q.dim() == 3
    if three_d:
        qh, kvh = n.get("q_num_heads"), n.get("kv_num_heads")
        if not qh or not kvh:
            raise InputError("onnx -> torch: Attention with 3-D inputs needs q_num_heads and kv_num_heads")
        Bq, Sq = q.shape[0], q.shape[1]
        q = q.reshape(Bq, Sq, qh, -1).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], kvh, -1).transpose(1, 2)
        v = v.reshape(v.shape[0], v.shape[1], kvh, -1).transpose(1, 2)
    if past_k is not None:
        k = torch.cat([past_k, k], 2)
    if past_v is not None:
        v = torch.cat([past_v, v], 2)
    present_k, present_v = k, v
    nq, nkv = q.shape[1], k.shape[1]
    if nq != nkv:
        k = k.repeat_interleave(nq // nkv, 1)
        v = v.repeat_interleave(nq // nkv, 1)
    hd = q.shape[-1]
    scale = n.get("scale")
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    qk0 = s
    cap = n.get("softcap", 0.0)
    if cap and cap > 0:
        s = cap * torch.tanh(s / cap)
    qk1 = s
    Sq, Skv = s.shape[-2], s.shape[-1]
    bias = None
    if n.get("is_causal", 0):
        off = past_k.shape[2] if past_k is not None else 0
        keep = torch.ones(Sq, Skv, dtype=torch.bool, device=s.device).tril(off)
        bias = torch.zeros(Sq, Skv, dtype=s.dtype, device=s.device).masked_fill(~keep, -math.inf)
    if mask is not None:
        if mask.shape[-1] < Skv:
            padv = False if mask.dtype == torch.bool else -math.inf
            mask = F.pad(mask, (0, Skv - mask.shape[-1]), value=padv)
        if mask.dtype == torch.bool:
            mb = torch.zeros(mask.shape, dtype=s.dtype, device=s.device).masked_fill(~mask, -math.inf)
        else:
            mb = mask.to(s.dtype)
        bias = mb if bias is None else bias + mb
    if bias is not None:
        s = s + bias
    qk2 = s
    p = torch.softmax(s, -1)
    if bias is not None:       # a fully masked row gives zeros, not NaN
        dead = torch.isneginf(bias.amax(-1, keepdim=True))
        if bool(dead.any()):
            p = torch.where(dead, torch.zeros_like(p), p)
    y = p @ v
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    outs = [y, present_k, present_v, [qk0, qk1, qk2, p][n.get("qk_matmul_output_mode", 0)]]
    return tuple(outs[:len(n.outputs)]) if len(n.outputs) > 1 else y


SUPPORTED_OPS = frozenset(_OPS) | {"Constant"}


# ------------------------------------------------------------------ the module
def _constant_value(node):
    """(tensor, is a floating TensorProto 'value' of size > 1 or floats list) of a Constant node."""
    for a in node.attribute:
        if a.name == "value":
            return _tensor_from_proto(a.t), "value"
        if a.name == "value_float":
            return torch.tensor(a.f, dtype=torch.float32), None
        if a.name == "value_floats":
            return torch.tensor(list(a.floats), dtype=torch.float32), "value_floats"
        if a.name == "value_int":
            return torch.tensor(a.i, dtype=torch.int64), None
        if a.name == "value_ints":
            return torch.tensor(list(a.ints), dtype=torch.int64), None
    raise _err("Constant", "only value, value_float(s), value_int(s)")


class OnnxModule(nn.Module):
    """Run an ONNX graph (default domain, opsets 7-23) as a differentiable torch module."""

    def __init__(self, model: onnx.ModelProto, freeze=None):
        """``freeze``: ONNX names (an iterable) or a predicate ``name -> bool`` of
        floating tensors that stay parameters but with ``requires_grad=False``
        (e.g. a compressed base's multiplicity constants); they are still
        written back by :meth:`to_onnx`."""
        super().__init__()
        if freeze is None:
            frozen = lambda name: False  # noqa: E731
        elif callable(freeze):
            frozen = freeze
        else:
            names = set(freeze)
            frozen = names.__contains__
        if not isinstance(model, onnx.ModelProto):
            raise InputError("onnx -> torch: expected an onnx.ModelProto")
        self._model = onnx.ModelProto()
        self._model.CopyFrom(model)
        g = self._model.graph
        self.opset = next((o.version for o in self._model.opset_import if o.domain in ("", "ai.onnx")), 13)
        bad = sorted({(nd.op_type if nd.domain in ("", "ai.onnx") else f"{nd.domain}.{nd.op_type}")
                      for nd in g.node if nd.domain not in ("", "ai.onnx") or nd.op_type not in SUPPORTED_OPS})
        if bad:
            raise _err(", ".join(bad))
        self.onnx_names = {}          # parameter / buffer attribute name -> ONNX name
        self._value_attr = {}         # ONNX name -> attribute name (parameters and buffers)
        self._where = {}              # parameter attribute -> ("init", index) | ("const", node index, attr)
        taken = set()

        def register(onnx_name, tensor, trainable, where=None):
            base = _sanitize(onnx_name)
            attr, k = base, 1
            while attr in taken or hasattr(self, attr):
                k += 1
                attr = f"{base}_{k}"
            taken.add(attr)
            if trainable:
                self.register_parameter(attr, nn.Parameter(tensor, requires_grad=not frozen(onnx_name)))
                self._where[attr] = where
            else:
                self.register_buffer(attr, tensor)
            self.onnx_names[attr] = onnx_name
            self._value_attr[onnx_name] = attr

        for i, t in enumerate(g.initializer):
            v = _tensor_from_proto(t)
            register(t.name, v, t.data_type in _FLOATS and v.dim() >= 1, ("init", i))
        self._nodes = []
        for i, nd in enumerate(g.node):
            if nd.op_type == "Constant":
                v, attr = _constant_value(nd)
                trainable = attr is not None and v.is_floating_point() and v.numel() > 1
                register(nd.output[0], v, trainable, ("const", i, attr))
                continue
            node = _Node(nd, self.opset)
            check = _CHECKS.get(node.op)
            if check is not None:
                check(node)
            self._nodes.append(node)
        inits = {t.name for t in g.initializer}
        self.input_names = [vi.name for vi in g.input if vi.name not in inits]
        self.output_names = [vi.name for vi in g.output]

    # -------------------------------------------------------------- API
    def parameter(self, onnx_name):
        """The parameter (or buffer) holding the ONNX tensor ``onnx_name``."""
        return getattr(self, self._value_attr[onnx_name])

    def n_params(self):
        """Number of trainable parameter values."""
        return int(sum(p.numel() for p in self.parameters() if p.requires_grad))

    def forward(self, *inputs, **named):
        if len(inputs) > len(self.input_names):
            raise InputError(f"onnx -> torch: {len(inputs)} inputs given, the graph has {len(self.input_names)}")
        env = {}
        for onnx_name, attr in self._value_attr.items():
            env[onnx_name] = getattr(self, attr)
        for name, x in zip(self.input_names, inputs):
            env[name] = x
        for name, x in named.items():
            if name not in self.input_names:
                raise InputError(f"onnx -> torch: no graph input named {name!r}")
            if name in env and name in self.input_names[:len(inputs)]:
                raise InputError(f"onnx -> torch: input {name!r} given twice")
            env[name] = x
        missing = [nm for nm in self.input_names if nm not in env]
        if missing:
            raise InputError(f"onnx -> torch: missing graph input(s) {', '.join(missing)}")
        for name in self.input_names:
            x = env[name]
            if not isinstance(x, torch.Tensor):
                env[name] = torch.as_tensor(np.asarray(x))
        for node in self._nodes:
            xs = [env[nm] if nm else None for nm in node.inputs]
            while xs and xs[-1] is None:
                xs.pop()
            ys = _OPS[node.op](node, xs)
            if isinstance(ys, (tuple, list)):
                for nm, y in zip(node.outputs, ys):
                    if nm:
                        env[nm] = y
            else:
                env[node.outputs[0]] = ys
        outs = tuple(env[nm] for nm in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the model with the current parameter values written back."""
        m = onnx.ModelProto()
        m.CopyFrom(self._model)
        g = m.graph
        for attr, where in self._where.items():
            p = getattr(self, attr)
            if where[0] == "init":
                _write_tensor(g.initializer[where[1]], p)
                continue
            node = g.node[where[1]]
            for a in node.attribute:
                if a.name != where[2]:
                    continue
                if where[2] == "value":
                    _write_tensor(a.t, p)
                else:
                    del a.floats[:]
                    a.floats.extend(float(v) for v in p.detach().cpu().double().reshape(-1).tolist())
        return m

    def extra_repr(self):
        return f"opset={self.opset}, nodes={len(self._nodes)}, params={self.n_params()}"
