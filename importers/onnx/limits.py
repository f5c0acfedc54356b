"""Sizes an ONNX model implies, checked before anything is allocated or run.

:func:`check_model` reads only dims, data types and small integer constants
(never a weight's data) and refuses, against the memory limit of
:mod:`fibgraph.limits`:

- a model file larger than the limit;
- an initializer, sparse initializer or Constant (also inside If/Loop/Scan
  bodies) whose declared dims need more than the limit (one tensor: the bytes
  of all of them are in the files, whose sizes are checked);
- external data that claims more bytes than its file holds (``offset +
  length``, or ``offset`` + the dims' size when ``length`` is missing), or a
  ``length`` other than the dims' size;
- a graph input whose fixed dims need more than the limit (symbolic dims count
  as 1 here; the feeds check their concrete sizes in
  :func:`fibgraph.importers.onnx.feeds.make_feeds`);
- the outputs of ``ConstantOfShape``, ``Expand``, ``Tile``, ``Range``,
  ``Resize``/``Upsample``, ``Pad``, ``OneHot``, ``RandomNormal``/``RandomUniform``
  whose size follows from constants (initializers, Constant nodes, and small
  integer arithmetic on them: Identity, Cast, Concat, Unsqueeze, Squeeze,
  Reshape, Add, Mul; unknown input dims count as 1, a lower bound), so a tiny
  model cannot make onnxruntime allocate terabytes in the probe; a
  ``Reshape`` to a constant shape is checked the same way;
- sparse tensors by their dense dims (they are made dense when loaded).

Unreadable structure (unknown data types, negative dims) is left to the
loader's own checks: this pass only refuses what is too large.
"""
from __future__ import annotations

import math
import os

import numpy as np
import onnx
from onnx import numpy_helper

from fibgraph.errors import InputError
from fibgraph.limits import check_bytes, check_elements

__all__ = ["check_model", "check_model_file", "tensor_size"]

_PACKED = {getattr(onnx.TensorProto, k) for k in ("STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
           if hasattr(onnx.TensorProto, k)}       # no whole bytes per element
_SMALL = 4096                     # constants folded here: shape-like integer tensors only
_FOLD = {"Identity", "Cast", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Add", "Mul"}


def _itemsize(data_type):
    try:
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
        return (1 if dt.hasobject else dt.itemsize), dt.name if not dt.hasobject else "string"
    except Exception:
        return 1, None


def tensor_size(t):
    """``(dims, itemsize, dtype name)`` a TensorProto declares (from its dims
    only; None for dims that are negative)."""
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        return None, 1, None
    size, name = _itemsize(t.data_type)
    return dims, size, name


def check_model_file(path):
    """A model file larger than the limit is refused before it is read."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return                      # the reader says what is wrong
    check_bytes(f"{path}: the model file", size)


def _subgraphs(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            try:
                return onnx.helper.get_attribute_value(a)
            except Exception:
                return default
    return default


def _check_tensor(t, what):
    dims, size, name = tensor_size(t)
    if dims is not None:
        check_elements(f"{what} {t.name!r}", dims, size, name)


def _check_sparse(st, what):
    """A sparse tensor is made dense (onnxruntime, numpy_helper): its dense dims count."""
    _check_tensor(st.values, f"{what} values")
    if all(d >= 0 for d in st.dims):
        size, name = _itemsize(st.values.data_type)
        check_elements(f"{what} {st.values.name!r} (dense)", list(st.dims), size, name)


def _external_info(t):
    info = {kv.key: kv.value for kv in t.external_data}
    return info.get("location"), info.get("offset"), info.get("length")


def _check_external(t, base, label):
    loc, off, length = _external_info(t)
    if loc is None or base is None:
        return
    full = os.path.join(base, loc)
    try:
        have = os.stat(full).st_size
    except (OSError, ValueError):
        return                      # missing or unreadable: the loader says so
    try:
        off = int(off) if off is not None else 0
        length = int(length) if length is not None else None
    except ValueError:
        raise InputError(f"{label}tensor {t.name!r}: external data offset/length are not integers") from None
    if off < 0 or (length is not None and length < 0):
        raise InputError(f"{label}tensor {t.name!r}: negative external data offset or length")
    dims, size, _ = tensor_size(t)
    declared = math.prod(dims) * size if dims is not None and t.data_type not in _PACKED else None
    need = length if length is not None else (declared or 0)
    if off + need > have:
        claim = f"{need} bytes at offset {off}" + ("" if length is not None else " (from its dims)")
        raise InputError(f"{label}tensor {t.name!r}: external data claims {claim} of {loc!r}, "
                         f"which holds only {have} bytes")
    if length is not None and declared is not None and length != declared:
        raise InputError(f"{label}tensor {t.name!r}: external data length {length} bytes does not match "
                         f"its dims {dims} ({declared} bytes)")
    if length is None and declared is not None and have - off != declared:
        # without a length onnx reads to the end of the file
        raise InputError(f"{label}tensor {t.name!r}: external data has no length, and the rest of {loc!r} "
                         f"after offset {off} ({have - off} bytes) does not match its dims {dims} "
                         f"({declared} bytes)")


class _Consts:
    """Small integer constants of a graph (and the graphs around it), folded on demand."""

    def __init__(self, graph, outer=None):
        self.outer = outer
        self.tensors = {t.name: t for t in graph.initializer}
        self.prod = {}
        self.dtype = {t.name: t.data_type for t in graph.initializer}
        self.dims = {t.name: tensor_size(t)[0] for t in graph.initializer}
        for vi in graph.input:
            tt = vi.type.tensor_type
            if vi.name not in self.tensors and tt.elem_type:
                self.dtype[vi.name] = tt.elem_type
                if tt.HasField("shape"):
                    self.dims[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                          for d in tt.shape.dim]
        for n in graph.node:
            for o in n.output:
                if o:
                    self.prod[o] = n
            if n.op_type == "Constant" and n.output:
                v = _attr(n, "value")
                if isinstance(v, onnx.TensorProto):
                    self.tensors[n.output[0]] = v
                    self.dtype[n.output[0]] = v.data_type
                    self.dims[n.output[0]] = tensor_size(v)[0]
        self.cache = {}

    def dims_of(self, name):
        if name in self.dims:
            return self.dims[name]
        return self.outer.dims_of(name) if self.outer else None

    def dtype_of(self, name):
        if name in self.dtype:
            return self.dtype[name]
        return self.outer.dtype_of(name) if self.outer else None

    def scalar(self, name):
        """A constant scalar (integer or float) ``name`` holds, or None."""
        v = self.value(name)
        if v is not None:
            return int(v.reshape(-1)[0]) if v.size == 1 else None
        t = self.tensors.get(name)
        if t is None:
            return self.outer.scalar(name) if self.outer is not None and name not in self.dtype else None
        dims, _, _ = tensor_size(t)
        if dims is None or math.prod(dims) != 1 or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        try:
            x = float(numpy_helper.to_array(t).reshape(-1)[0])
        except Exception:
            return None
        return x if math.isfinite(x) else None

    def floats(self, name):
        """A small constant float array ``name`` holds (Resize scales), or None."""
        t = self.tensors.get(name)
        if t is None:
            return self.outer.floats(name) if self.outer is not None and name not in self.dtype else None
        dims, _, _ = tensor_size(t)
        if dims is None or math.prod(dims) > _SMALL or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(t).astype(np.float64)
        except Exception:
            return None

    def value(self, name, depth=0):
        """The value of ``name`` when it is a small integer constant, else None."""
        if not name or depth > 32:
            return None
        if name in self.cache:
            return self.cache[name]
        self.cache[name] = None                  # cycles (bad order) stop here
        v = None
        try:
            v = self._value(name, depth)
        except Exception:                        # malformed: not a constant we can fold
            v = None
        if v is not None and (v.dtype.kind not in "iu" or v.size > _SMALL):
            v = None
        self.cache[name] = v
        return v

    def _value(self, name, depth):
        t = self.tensors.get(name)
        if t is not None:
            dims, _, _ = tensor_size(t)
            if dims is None or math.prod(dims) > _SMALL or t.data_location == onnx.TensorProto.EXTERNAL:
                return None
            if t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                return None
            return numpy_helper.to_array(t).astype(np.int64)
        n = self.prod.get(name)
        if n is None:
            if self.outer is not None and name not in self.dtype:
                return self.outer.value(name, depth + 1)
            return None
        if n.op_type == "Constant":
            ints = _attr(n, "value_ints")
            if ints is not None:
                return np.array(ints, np.int64)
            i = _attr(n, "value_int")
            return None if i is None else np.array(i, np.int64)
        if n.op_type not in _FOLD:
            return None
        ins = [self.value(x, depth + 1) for x in n.input]
        if not ins or ins[0] is None:
            return None
        x = ins[0]
        op = n.op_type
        if op in ("Identity", "Cast"):
            return x
        if op == "Concat":
            if any(v is None for v in ins):
                return None
            return np.concatenate([v.reshape(-1) for v in ins])
        if op in ("Unsqueeze", "Squeeze", "Reshape"):
            return x.reshape(-1) if x.ndim <= 1 else None
        if len(ins) == 2 and ins[1] is not None:
            return (x + ins[1]) if op == "Add" else (x * ins[1])
        return None


def _out_what(node, k=0):
    out = node.output[k] if len(node.output) > k and node.output[k] else "?"
    return f"{node.op_type} output {out!r}" + (f" (node {node.name!r})" if node.name else "")


def _known_dims(consts, name):
    """The dims of ``name`` where known, unknown ones as 1 (a lower bound); [] if unknown."""
    return [d if isinstance(d, int) and d > 0 else 1 for d in (consts.dims_of(name) or [])]


def _dtype(consts, name, default=(1, None)):
    dt = consts.dtype_of(name)
    return _itemsize(dt) if dt else default


def _constant_of_shape(node, consts):
    v = _attr(node, "value")
    return consts.value(node.input[0]), *(_itemsize(v.data_type if isinstance(v, onnx.TensorProto) else 1))


def _expand_tile(node, consts):
    target = consts.value(node.input[1])
    if target is None:
        return None
    ind, target = _known_dims(consts, node.input[0]), [int(d) for d in target.reshape(-1)]
    if node.op_type == "Expand":
        r = max(len(ind), len(target))
        a, b = [1] * (r - len(ind)) + ind, [1] * (r - len(target)) + target
        shape = [max(p, q) if min(p, q) > 0 else 0 for p, q in zip(a, b)]
    elif len(target) == len(ind) or not ind:
        shape = [p * q for p, q in zip(ind or [1] * len(target), target)]
    else:
        return None
    return shape, *_dtype(consts, node.input[0])


def _reshape(node, consts):
    target = consts.value(node.input[1])
    if target is None:
        return None
    return [d for d in target.reshape(-1).tolist() if d > 0], *_dtype(consts, node.input[0])


def _range(node, consts):
    s, lim, d = (consts.scalar(x) for x in node.input[:3])
    if s is None or lim is None or not d:
        return None
    n = math.ceil((lim - s) / d) if isinstance(lim - s + d, float) else -(-(lim - s) // d)
    return [max(n, 0)], *_dtype(consts, node.input[0], (8, "int64"))


def _resize(node, consts):
    """Resize/Upsample: constant ``sizes``, or constant ``scales`` times the known input dims."""
    ins = list(node.input)
    if len(ins) >= 4 and consts.value(ins[3]) is not None:
        return consts.value(ins[3]).reshape(-1).tolist(), *_dtype(consts, ins[0])
    scales = _attr(node, "scales") if node.op_type == "Upsample" and len(ins) < 2 else None
    if scales is None:
        k = 2 if node.op_type == "Resize" else 1
        scales = consts.floats(ins[k]) if len(ins) > k else None
    if scales is None:
        return None
    scales = [float(x) for x in np.asarray(scales).reshape(-1)]
    ind = _known_dims(consts, ins[0]) or [1] * len(scales)
    if len(ind) != len(scales) or not all(math.isfinite(x) and x >= 0 for x in scales):
        return None
    return [math.floor(d * x) for d, x in zip(ind, scales)], *_dtype(consts, ins[0])


def _pad(node, consts):
    pads = consts.value(node.input[1]) if len(node.input) >= 2 else None
    pads = pads.reshape(-1).tolist() if pads is not None else _attr(node, "pads")
    ind = _known_dims(consts, node.input[0])
    if not pads or len(pads) % 2 or (ind and len(pads) != 2 * len(ind)):
        return None
    r = len(pads) // 2
    ind = ind or [1] * r
    return [max(ind[i] + int(pads[i]) + int(pads[i + r]), 0) for i in range(r)], *_dtype(consts, node.input[0])


def _one_hot(node, consts):
    depth = consts.scalar(node.input[1]) if len(node.input) >= 2 else None
    if depth is None:
        return None
    values = _dtype(consts, node.input[2]) if len(node.input) > 2 else (1, None)
    return _known_dims(consts, node.input[0]) + [max(int(depth), 0)], *values


def _random(node, consts):
    shape = _attr(node, "shape")
    if shape is None:
        return None
    return list(shape), *_itemsize(_attr(node, "dtype", onnx.TensorProto.FLOAT))


# op type -> (the inputs it needs, the function giving (shape, itemsize, dtype name) or None)
_TARGETS = {"ConstantOfShape": (1, _constant_of_shape), "Expand": (2, _expand_tile), "Tile": (2, _expand_tile),
            "Reshape": (2, _reshape), "Range": (3, _range), "Resize": (1, _resize), "Upsample": (1, _resize),
            "Pad": (1, _pad), "OneHot": (2, _one_hot), "RandomNormal": (0, _random),
            "RandomUniform": (0, _random)}


def _check_targets(graph, consts, label):
    """The outputs whose size constants fix (see the module doc)."""
    for node in graph.node:
        need, fn = _TARGETS.get(node.op_type, (None, None))
        if fn is None or len(node.input) < need:
            continue
        try:
            got = fn(node, consts)
        except Exception:                        # malformed attributes: not ours to judge
            got = None
        if got is None or got[0] is None:
            continue
        shape = [int(x) for x in np.asarray(got[0]).reshape(-1)]
        if all(x >= 0 for x in shape):
            check_elements(f"{label}{_out_what(node)}", shape, got[1], got[2])


def _check_graph(graph, label, base, outer=None):
    for t in graph.initializer:
        _check_tensor(t, f"{label}initializer")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(t, base, label)
    for st in graph.sparse_initializer:
        _check_sparse(st, f"{label}sparse initializer")
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _check_tensor(a.t, f"{label}{node.op_type} tensor")
                if a.t.data_location == onnx.TensorProto.EXTERNAL:
                    _check_external(a.t, base, label)
            elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                _check_sparse(a.sparse_tensor, f"{label}{node.op_type} sparse tensor")
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    _check_tensor(t, f"{label}{node.op_type} tensor")
    consts = _Consts(graph, outer)
    _check_targets(graph, consts, label)
    for node in graph.node:
        for g in _subgraphs(node):
            _check_graph(g, label, base, consts)


def _check_inputs(graph, label):
    inits = {t.name for t in graph.initializer}
    for vi in graph.input:
        tt = vi.type.tensor_type
        if vi.name in inits or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        size, name = _itemsize(tt.elem_type)
        check_elements(f"{label}graph input {vi.name!r}", dims, size, name)


def check_model(model, base=None, label=""):
    """Refuse ``model`` when a size it declares or fixes by constants is over
    the memory limit (see the module doc).  ``base``: the folder its external
    data lives in (their lengths are checked against the files)."""
    label = f"{label}: " if label else ""
    _check_graph(model.graph, label, base)
    _check_inputs(model.graph, label)
