"""Constant folding for the probe: the values of nodes that compute from
constants alone, made with numpy instead of returned by onnxruntime.

A node *folds* when every input it reads is an initializer, a ``Constant``
or the output of another folding node, and its op is one of a few that move
or retype data (``Identity``, ``Slice``, ``Concat``, ``Split``, ``Unsqueeze``,
``Squeeze``, ``Reshape``, ``Flatten``, ``Transpose``, ``Cast``, ``Gather``).
Exporters leave such chains on the weights: the dynamo exporter reorders an
LSTM's or GRU's gate blocks with ``Slice`` x 4 + ``Concat`` + ``Unsqueeze``
per weight and transposes a tied token table; the legacy one ties weights
with ``Identity``.  The probe (:func:`fibgraph.importers.onnx.probe.probe_model`)
does not ask onnxruntime for these values, which would return a copy of every
weight at every step of the chain; they are made here instead:

- a view where numpy makes one (``Identity``, ``Slice``, ``Reshape``,
  ``Transpose``, ...): a weight of a big model stays a view of its mapped file;
- a new array otherwise (``Concat``, ``Cast``, ``Gather``); one of 1 MB or
  more computed from a mapped weight is written a block at a time to an
  unlinked temporary file and read back as a read-only map, so its pages go
  back like the model's own (:mod:`fibgraph.pages`).

Semantics are ONNX's (negative axes and indices, ``Slice``'s clamping,
``Reshape``'s 0 and -1).  A node numpy cannot fold after all (a bad index)
is evaluated by ``onnx.reference``; one that fails there too is an input
error, as onnxruntime's would have been.

Example
-------
>>> import numpy as np, onnx
>>> from onnx import helper, numpy_helper
>>> W = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
>>> st = numpy_helper.from_array(np.array([2], np.int64), "st")
>>> node = helper.make_node("Slice", ["W", "st", "en"], ["Ws"])
>>> en = numpy_helper.from_array(np.array([4], np.int64), "en")
>>> g = helper.make_graph([node], "g", [], [], initializer=[W, st, en])
>>> m = helper.make_model(g)
>>> sorted(folded_outputs(m))
['Ws']
>>> fold_constants(m)["Ws"].tolist()
[[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
"""
from __future__ import annotations

import mmap
import tempfile

import numpy as np
import onnx

from fibgraph.errors import InputError
from fibgraph.pages import blocks, drop_mapped, drop_pages, mapped_in

from . import external
from .load import attrs, ints, outer_refs, tensor_value

__all__ = ["FOLDS", "folded_outputs", "fold_constants", "constant_value", "cut", "feedable", "to_file", "slice_bounds"]

SPILL_BYTES = 1 << 20           # a new array at least this big, made from a mapped weight, goes to a file
_CASTS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
          onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
          onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def _axis(a, rank):
    a = int(a)
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"axis {a} out of range for rank {rank}")
    return a + rank if a < 0 else a


def _arg(xs, k, at, name):
    """Input ``k`` (opset 13 style) or attribute ``name`` (older opsets)."""
    if len(xs) > k and xs[k] is not None:
        return ints(xs[k])
    return None if name not in at else ints(at[name])


# ------------------------------------------------------------------ the ops
def _slice(xs, at):
    x = xs[0]
    starts, ends = _arg(xs, 1, at, "starts"), _arg(xs, 2, at, "ends")
    axes = _arg(xs, 3, at, "axes") or list(range(len(starts)))
    steps = _arg(xs, 4, at, "steps") or [1] * len(starts)
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.ndim)
        if st == 0:
            raise ValueError("Slice step 0")
        s, e = slice_bounds(s, e, st, x.shape[a])
        idx[a] = slice(s, None if e < 0 else e, st)
    return [x[tuple(idx)]]


def slice_bounds(start, end, step, n):
    """ONNX ``Slice``'s ``start`` and ``end`` on an axis of ``n`` (negative ones
    counted from the end, then clamped: to ``[0, n]`` for a positive step, to
    ``[0, n - 1]`` and ``[-1, n - 1]`` for a negative one, where ``end`` = -1
    means "through index 0"); ``range(start, end, step)`` are the indices taken."""
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        return min(max(start, 0), n), min(max(end, 0), n)
    return min(max(start, 0), n - 1), min(max(end, -1), n - 1)


def _concat(xs, at):
    axis = _axis(at["axis"], xs[0].ndim)
    parts = [x for x in xs if x is not None]
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    dtype = np.result_type(*parts)
    if _spills(parts, shape, dtype):
        def chunks():
            if axis == 0:
                for p in parts:
                    yield from blocks(p)
            else:                       # interleaved along a later axis: output rows a block at a time
                step = max(1, (1 << 19) // max(1, int(np.prod(shape[1:]))))
                for r in range(0, shape[0], step):
                    yield np.concatenate([p[r:r + step] for p in parts], axis=axis)
                    for p in parts:
                        drop_mapped(p[r:r + step])
        return [_to_file(chunks(), shape, dtype)]
    return [np.concatenate(parts, axis=axis)]


def _split(xs, at, n_out):
    x = xs[0]
    axis = _axis(at.get("axis", 0), x.ndim)
    sizes = _arg(xs, 1, at, "split")
    if sizes is None:
        n = x.shape[axis]
        k = int(at.get("num_outputs", n_out))
        each = -(-n // k)
        sizes = [min(each, n - each * j) for j in range(k)]
    cuts = np.cumsum([0] + sizes)
    if cuts[-1] != x.shape[axis]:
        raise ValueError("Split sizes do not add up to the axis")
    return [x[(slice(None),) * axis + (slice(int(a), int(b)),)] for a, b in zip(cuts[:-1], cuts[1:])]


def _unsqueeze(xs, at):
    x = xs[0]
    axes = _arg(xs, 1, at, "axes")
    rank = x.ndim + len(axes)
    shape, it = [], iter(x.shape)
    axes = {_axis(a, rank) for a in axes}
    for k in range(rank):
        shape.append(1 if k in axes else next(it))
    return [x.reshape(shape)]


def _squeeze(xs, at):
    x = xs[0]
    axes = _arg(xs, 1, at, "axes")
    if axes is None:
        return [x.reshape([n for n in x.shape if n != 1])]
    axes = {_axis(a, x.ndim) for a in axes}
    if any(x.shape[a] != 1 for a in axes):
        raise ValueError("Squeeze of an axis that is not 1")
    return [x.reshape([n for k, n in enumerate(x.shape) if k not in axes])]


def _reshape(xs, at):
    x, shape = xs[0], ints(xs[1])
    if not at.get("allowzero", 0):
        shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(xs, at):
    x = xs[0]
    axis = _axis(at.get("axis", 1), x.ndim + 1)
    return [x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)]


def _transpose(xs, at):
    x = xs[0]
    return [x.transpose(at.get("perm", list(range(x.ndim))[::-1]))]


def _cast(xs, at):
    x = xs[0]
    dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(at["to"])))
    if x.dtype == dt:
        return [x]
    if _spills([x], x.shape, dt):
        return [_to_file((np.asarray(b, dtype=dt) for b in blocks(x)), x.shape, dt)]
    return [x.astype(dt)]


def _gather(xs, at):
    x, idx = xs[0], np.asarray(xs[1]).astype(np.int64)
    axis = _axis(at.get("axis", 0), x.ndim)
    n = x.shape[axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise ValueError("Gather index out of range")
    return [np.take(x, np.where(idx < 0, idx + n, idx), axis=axis)]


FOLDS = {"Identity": lambda xs, at: [xs[0]], "Slice": _slice, "Concat": _concat, "Unsqueeze": _unsqueeze,
         "Squeeze": _squeeze, "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose,
         "Cast": _cast, "Gather": _gather}
"""op type -> ``fold(inputs, attributes) -> outputs`` (``Split`` has its own call)."""


# ------------------------------------------------------------------ spilling
def _spills(parts, shape, dtype):
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return nbytes >= SPILL_BYTES and any(mapped_in(p) is not None for p in parts if p.size)


def _to_file(chunks, shape, dtype):
    """The C-order bytes of ``chunks`` (each a block of the result's rows; a
    mapped one's pages handed back after it is written) in an unlinked
    temporary file, as a read-only mapped array of ``shape``."""
    with tempfile.TemporaryFile(prefix="fibgraph-fold-") as f:
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=dtype).data)
            drop_mapped(c)
        f.flush()
        if f.tell() == 0:
            return np.zeros(shape, dtype)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)     # the map keeps the unlinked file
    external.adopt(mm)                   # its pages go back with the model's
    return np.frombuffer(mm, dtype=dtype).reshape(shape)


def to_file(v):
    """``v`` (an array of rank >= 1) in an unlinked temporary file, mapped back
    read-only, written a block of rows at a time (a strided view of a mapped
    weight: its pages handed back after each block): the result's pages are
    read again only where it is read, and go back like the model's (a big
    probe value, a transposed table fed to a session)."""
    v = np.asarray(v)
    where = None if v.flags.c_contiguous else mapped_in(v)

    def chunks():
        step = max(1, (1 << 21) // max(1, int(np.prod(v.shape[1:], dtype=np.int64))))
        for r in range(0, v.shape[0], step):
            yield np.ascontiguousarray(v[r:r + step])
            if where is not None:
                drop_pages(*where)          # a strided block reads the whole span
    return _to_file(chunks(), v.shape, v.dtype)


def feedable(v):
    """``v`` as a C-contiguous array onnxruntime reads in place: ``v`` itself,
    or a copy; one of 1 MB or more of a mapped weight (a transposed table)
    goes to a temporary file (:func:`to_file`)."""
    v = np.asarray(v)
    if v.flags.c_contiguous:
        return v
    if not _spills([v], v.shape, v.dtype):
        return np.ascontiguousarray(v)
    return to_file(v)


# ------------------------------------------------------------------ the walk
def _folds(node):
    if node.domain not in ("", "ai.onnx") or outer_refs(node):
        return False
    if node.op_type == "Constant":
        return any(a.name in _CONSTANT_KEYS for a in node.attribute)
    if node.op_type == "Cast":
        return int(attrs(node).get("to", 0)) in _CASTS
    return bool(node.input) and (node.op_type in FOLDS or node.op_type == "Split")


def folded_outputs(model):
    """The outputs of ``model``'s nodes that fold (see the module doc), in graph
    order.  A node on anything else (a graph input, an op that does not fold
    such as ``Mul`` or ``ConstantOfShape``) is the probe's, and so is all that
    depends on it; so is a node with a graph output."""
    g = model.graph
    const = {t.name for t in g.initializer}
    graph_outs = {o.name for o in g.output}
    out = []
    for node in g.node:
        names = [o for o in node.output if o]
        if _folds(node) and all(not x or x in const for x in node.input) and not graph_outs.intersection(names):
            const.update(names)
            out += names
    return out


def _reference(node, xs):
    """One node by ``onnx.reference`` (what numpy here does not fold)."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{k}" if x is not None else "" for k, x in enumerate(xs)]
    n = onnx.helper.make_node(node.op_type, names, [f"out{k}" for k in range(len(node.output))],
                              domain=node.domain)
    n.attribute.extend(node.attribute)
    feeds = {nm: np.asarray(x) for nm, x in zip(names, xs) if nm}
    return ReferenceEvaluator(n).run(None, feeds)


def fold_constants(model):
    """``{name: value}`` of every output of :func:`folded_outputs`."""
    todo = set(folded_outputs(model))
    values = {}
    if not todo:
        return values
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if not todo.intersection(node.output):
            continue
        if node.op_type == "Constant":
            values[node.output[0]] = constant_value(node)
            continue
        xs = [None if not x else values[x] if x in values else tensor_value(inits[x]) for x in node.input]
        at = attrs(node)
        try:
            res = _split(xs, at, len(node.output)) if node.op_type == "Split" else FOLDS[node.op_type](xs, at)
        except Exception:
            try:
                res = _reference(node, xs)
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise InputError(f"node {node.name or node.op_type!r} ({node.op_type}) on constants cannot be "
                                 f"computed: {why}") from None
        for o, v in zip(node.output, res):
            if o:
                values[o] = v
    return values


_CONSTANT_KEYS = ("value", "value_float", "value_int", "value_floats", "value_ints")


def constant_value(node):
    """The value of a ``Constant`` node (a tensor or a float/int (list) attribute)."""
    for a in node.attribute:
        if a.name == "value":
            return tensor_value(a.t)
        if a.name in _CONSTANT_KEYS:
            return np.array(onnx.helper.get_attribute_value(a))
    raise InputError(f"Constant node {node.name!r} holds no tensor value")


def cut(model, folded):
    """``model`` (a copy) without the nodes that fold: every folded value a
    remaining node reads is a graph input instead, the initializers only
    folded nodes read are dropped.  Returns ``(model, feeds)``: the inputs
    made of folded values, each as :func:`feedable`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep = [n for n in g.node if not (n.output and all(not o or o in folded for o in n.output))]
    used = {o.name for o in g.output}
    for n in keep:
        used.update(x for x in n.input if x)
        used.update(outer_refs(n))
    fed = [x for x in dict.fromkeys(x for n in keep for x in list(n.input) + sorted(outer_refs(n)))
           if x in folded]
    if len(keep) < len(g.node):
        del g.node[:]
        g.node.extend(keep)
        inits = [t for t in g.initializer if t.name in used]
        if len(inits) < len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(inits)
    for x in fed:
        v = folded[x]
        g.input.append(onnx.helper.make_tensor_value_info(x, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                                          list(v.shape)))
    return m, {x: feedable(folded[x]) for x in fed}
