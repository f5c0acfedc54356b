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
- the outputs of ``ConstantOfShape``, ``Expand``, ``Tile`` and ``Range`` whose
  size follows from constants (initializers, Constant nodes, and small integer
  arithmetic on them: Identity, Cast, Concat, Unsqueeze, Squeeze, Reshape,
  Add, Mul), so a tiny model cannot make onnxruntime allocate terabytes in
  the probe; a ``Reshape`` to a constant shape is checked the same way.

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


def _check_targets(graph, consts, label):
    """The outputs whose size constants fix (see the module doc)."""
    for node in graph.node:
        op = node.op_type
        shape, itemsize, dname = None, 1, None
        if op == "ConstantOfShape" and node.input:
            shape = consts.value(node.input[0])
            v = _attr(node, "value")
            itemsize, dname = _itemsize(v.data_type) if isinstance(v, onnx.TensorProto) else _itemsize(1)
        elif op in ("Expand", "Tile") and len(node.input) >= 2:
            target = consts.value(node.input[1])
            if target is None:
                continue
            dt = consts.dtype_of(node.input[0])
            if dt:
                itemsize, dname = _itemsize(dt)
            ind = consts.dims_of(node.input[0]) or []
            ind = [d if isinstance(d, int) and d > 0 else 1 for d in ind]
            target = [int(d) for d in target.reshape(-1)]
            if op == "Expand":
                r = max(len(ind), len(target))
                a = [1] * (r - len(ind)) + ind
                b = [1] * (r - len(target)) + target
                shape = [max(p, q) if min(p, q) > 0 else 0 for p, q in zip(a, b)]
            elif len(target) == len(ind) or not ind:
                shape = [p * q for p, q in zip(ind or [1] * len(target), target)]
        elif op == "Reshape" and len(node.input) >= 2:
            target = consts.value(node.input[1])
            if target is not None:
                shape = [d for d in target.reshape(-1).tolist() if d > 0]
                dt = consts.dtype_of(node.input[0])
                if dt:
                    itemsize, dname = _itemsize(dt)
        elif op == "Range" and len(node.input) >= 3:
            s, lim, d = (consts.scalar(x) for x in node.input[:3])
            if s is not None and lim is not None and d:
                shape = [max(math.ceil((lim - s) / d), 0) if isinstance(lim - s + d, float)
                         else max(-(-(lim - s) // d), 0)]
                dt = consts.dtype_of(node.input[0])
                itemsize, dname = _itemsize(dt) if dt else (8, "int64")
        if shape is not None:
            shape = [int(x) for x in np.asarray(shape).reshape(-1)]
            if all(x >= 0 for x in shape):
                check_elements(f"{label}{_out_what(node)}", shape, itemsize, dname)


def _check_graph(graph, label, base, outer=None):
    for t in graph.initializer:
        _check_tensor(t, f"{label}initializer")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(t, base, label)
    for st in graph.sparse_initializer:
        _check_tensor(st.values, f"{label}sparse initializer values")
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _check_tensor(a.t, f"{label}{node.op_type} tensor")
                if a.t.data_location == onnx.TensorProto.EXTERNAL:
                    _check_external(a.t, base, label)
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
