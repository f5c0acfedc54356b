"""Structural checks of an ONNX model, made once at load (before any probe
run, before anything is written): a model that breaks one of them is bad
input, :class:`~fibgraph.errors.InputError` with one line naming the
tensor, node or attribute, never an internal error later.

Checked: every name is UTF-8 text; the default-domain opset is one
onnxruntime runs (7 to the newest ``onnx`` knows); every tensor (initializers,
Constant and other tensor attributes, in subgraphs too) has a numeric data
type, non-negative dims, no ``segment`` and as much data as its dims declare;
graph inputs and outputs have known element types;
node names (but Constants') are unique per graph; nodes are in topological order, read only
names that exist and produce each name once; attributes have the type the
operator's schema gives them.  :func:`external_data_files` lists the files a
model's external data lives in, for the CLI's same-path check.
"""
from __future__ import annotations

import math
import os

import onnx
from onnx import TensorProto

from fibgraph.errors import InputError

__all__ = ["validate_model", "external_data_files", "MIN_OPSET"]

MIN_OPSET = 7        # onnxruntime supports the default domain from opset 7 (ONNX 1.2) on

_DTYPES = {v: k for k, v in TensorProto.DataType.items()}
_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4}
for _n in ("FLOAT4E2M1",):
    if hasattr(TensorProto, _n):
        _BITS[getattr(TensorProto, _n)] = 4
for _n in ("INT2", "UINT2"):
    if hasattr(TensorProto, _n):
        _BITS[getattr(TensorProto, _n)] = 2
_SKIP_SIZE = {getattr(TensorProto, n) for n in ("FLOAT6E2M3", "FLOAT6E3M2") if hasattr(TensorProto, n)}
_ATTR_NAMES = {v: k for k, v in onnx.AttributeProto.AttributeType.items()}


class _Bad(Exception):
    pass


def _text(s, what):
    """A string field of the protobuf: upb hands back bytes when it is not UTF-8."""
    if not isinstance(s, str):
        raise _Bad(f"{what} {s!r} is not UTF-8 text")
    return s


def _itemsize(dt):
    if dt in _BITS:
        return None
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(dt).itemsize
    except Exception:
        return None


def _check_tensor(t, where):
    name = _text(t.name, f"{where}: a tensor name")
    label = f"{where}: tensor {name!r}"
    dt = t.data_type
    if dt == TensorProto.UNDEFINED:
        raise _Bad(f"{label} has no data type (UNDEFINED)")
    if dt not in _DTYPES:
        raise _Bad(f"{label} has an unknown data type ({dt})")
    if dt == TensorProto.STRING:
        raise _Bad(f"{label} holds strings; fibgraph reads numeric tensors only")
    if t.HasField("segment"):
        raise _Bad(f"{label} is stored in segments, which are not supported")
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise _Bad(f"{label} has negative dims {dims}")
    if t.data_location == TensorProto.EXTERNAL:
        return
    n = math.prod(dims)
    if dt in _SKIP_SIZE:
        return
    if t.HasField("raw_data"):
        bits = _BITS.get(dt)
        want = (n * bits + 7) // 8 if bits else n * _itemsize(dt)
        got = len(t.raw_data)
        if got != want:
            raise _Bad(f"{label}: dims {dims} ({dt_name(dt)}) need {want} bytes of data, it holds {got}")
        return
    if dt in _BITS:
        return
    field = onnx.helper.tensor_dtype_to_field(dt)
    got = len(getattr(t, field))
    want = 2 * n if dt in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else n
    if got != want:
        raise _Bad(f"{label}: dims {dims} ({dt_name(dt)}) need {want} values, it holds {got}")


def dt_name(dt):
    return _DTYPES.get(dt, str(dt))


def _check_value_info(vi, where, kind):
    name = _text(vi.name, f"{where}: a graph {kind} name")
    if not vi.type.HasField("tensor_type"):
        return name
    tt = vi.type.tensor_type
    if tt.elem_type not in _DTYPES or tt.elem_type == TensorProto.UNDEFINED and kind == "input":
        raise _Bad(f"{where}: graph {kind} {name!r} has an unknown element type ({tt.elem_type})")
    for d in tt.shape.dim:          # a negative dim_value: some exporters' "unknown" (-1), left alone
        if d.HasField("dim_param"):
            _text(d.dim_param, f"{where}: a dim name of {kind} {name!r}")
    return name


def _node_label(node, k):
    return f"node {node.name!r} ({node.op_type})" if node.name else f"node #{k} ({node.op_type})"


def _check_graph(g, opsets, outer, where):
    """Check graph ``g``; ``outer``: names visible from enclosing graphs."""
    _text(g.name, f"{where}: the graph name")
    defined = set(outer)
    own = set()
    for vi in g.input:
        own.add(_check_value_info(vi, where, "input"))
    for t in g.initializer:
        _check_tensor(t, where)
        own.add(t.name)
    for st in g.sparse_initializer:
        own.add(_text(st.values.name, f"{where}: a sparse initializer name"))
    defined |= own
    produced = set(own)
    producers = {}
    for k, node in enumerate(g.node):
        op = _text(node.op_type, f"{where}: an op type")
        dom = _text(node.domain, f"{where}: an op domain")
        nm = _text(node.name, f"{where}: a node name")
        label = _node_label(node, k)
        for x in node.input:
            _text(x, f"{where}: an input name of {label}")
        for x in node.output:
            _text(x, f"{where}: an output name of {label}")
        if nm and not (op == "Constant" and not dom):   # Constants become initializers (as in onnxruntime)
            if nm in producers:
                raise _Bad(f"{where}: two nodes are named {nm!r}")
            producers[nm] = k
    later = {}
    for k, node in enumerate(g.node):
        for o in node.output:
            if o:
                later.setdefault(o, k)
    for k, node in enumerate(g.node):
        label = _node_label(node, k)
        for x in node.input:
            if x and x not in defined:
                if x in later:
                    raise _Bad(f"{where}: nodes are not in topological order: {label} reads {x!r} "
                               f"before {_node_label(g.node[later[x]], later[x])} produces it")
                raise _Bad(f"{where}: {label} reads {x!r}, which no input, initializer or node provides")
        _check_attributes(node, label, opsets, defined, where)
        for o in node.output:
            if not o:
                continue
            if o in produced:
                raise _Bad(f"{where}: {o!r} is produced twice ({label} and before it)")
            produced.add(o)
            defined.add(o)
    for vi in g.output:
        name = _check_value_info(vi, where, "output")
        if name not in defined:
            raise _Bad(f"{where}: graph output {name!r} is produced by no node, input or initializer")
    for vi in g.value_info:
        _text(vi.name, f"{where}: a value_info name")


def _check_attributes(node, label, opsets, visible, where):
    schema = None
    dom = node.domain or ""
    version = opsets.get("" if dom == "ai.onnx" else dom)
    if version is not None:
        try:
            schema = onnx.defs.get_schema(node.op_type, version, dom)
        except Exception:
            schema = None           # an op the importer does not know: it says so itself
    for a in node.attribute:
        an = _text(a.name, f"{where}: an attribute name of {label}")
        if a.ref_attr_name:
            continue
        if a.type == onnx.AttributeProto.UNDEFINED:
            raise _Bad(f"{where}: {label}: attribute {an!r} has no type")
        if schema is not None and an in schema.attributes:
            want = int(schema.attributes[an].type)
            if want != a.type:
                raise _Bad(f"{where}: {label}: attribute {an!r} is {_ATTR_NAMES.get(a.type, a.type)}, "
                           f"{node.op_type} needs {_ATTR_NAMES.get(want, want)}")
        if a.type == onnx.AttributeProto.STRING:
            # bytes by definition; decoding is what every reader does with them
            pass
        elif a.type == onnx.AttributeProto.TENSOR:
            _check_tensor(a.t, f"{where}: {label}")
        elif a.type == onnx.AttributeProto.TENSORS:
            for t in a.tensors:
                _check_tensor(t, f"{where}: {label}")
        elif a.type == onnx.AttributeProto.GRAPH:
            _check_graph(a.g, opsets, visible, f"{where}: {label}.{an}")
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                _check_graph(g, opsets, visible, f"{where}: {label}.{an}")


def validate_model(model: onnx.ModelProto, path) -> None:
    """Raise :class:`InputError` ("PATH: what is wrong") when ``model`` breaks a
    structural rule (see the module doc); return None otherwise."""
    from fibgraph.fileio import show

    where = show(path)
    try:
        opsets = {}
        for imp in model.opset_import:
            dom = _text(imp.domain, f"{where}: an opset domain")
            opsets["" if dom == "ai.onnx" else dom] = int(imp.version)
        v = opsets.get("")
        newest = onnx.defs.onnx_opset_version()
        if v is not None and not MIN_OPSET <= v <= newest:
            raise _Bad(f"{where}: opset {v} of the default domain is not supported "
                       f"(supported: {MIN_OPSET} to {newest}, the newest the installed onnx knows)")
        for msg, what in ((model, "the model's"), (model.graph, "the graph's")):
            for fd, val in msg.ListFields():      # producer, domain, doc strings: written back as they are
                if fd.type == fd.TYPE_STRING and isinstance(val, bytes):
                    raise _Bad(f"{where}: {what} {fd.name} {val!r} is not UTF-8 text")
        for kv in model.metadata_props:
            _text(kv.key, f"{where}: a metadata key")
            _text(kv.value, f"{where}: a metadata value")
        _check_graph(model.graph, opsets, set(), where)
    except _Bad as e:
        raise InputError(str(e)) from None
    except RecursionError:
        raise InputError(f"{where}: subgraphs nested too deeply") from None


def _holds(mm, key, step=64 << 20):
    """Whether the map ``mm`` holds ``key``, scanned ``step`` bytes at a time,
    each span's pages handed back once searched (a model of several GB is
    never resident as a whole)."""
    from .external import drop_pages

    n = len(mm)
    for a in range(0, n, step):
        hit = mm.find(key, a, min(n, a + step + len(key) - 1)) >= 0
        drop_pages(mm, a, min(step, n - a))
        if hit:
            return True
    return False


def external_data_files(path) -> list:
    """Absolute paths of the files the external-data tensors of the ONNX model
    at ``path`` name (initializers and tensor attributes, in subgraphs too);
    [] for a file that is not an ONNX model or has no external data.  Cheap
    when there is none: the file is parsed only when it holds the key
    ``location``."""
    import mmap

    from fibgraph.fileio import check_regular, read_input

    try:
        with open(check_regular(path), "rb") as f:      # searched on a map: a big model is not read in
            if os.fstat(f.fileno()).st_size == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if not _holds(mm, b"location"):
                    return []
        data = read_input(path)
    except (InputError, OSError, ValueError):
        return []
    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        return []
    base = os.path.dirname(os.path.abspath(path))
    out = []
    from .external import all_tensors

    try:
        for t in all_tensors(model.graph):
            if t.data_location != TensorProto.EXTERNAL:
                continue
            for kv in t.external_data:
                if kv.key == "location" and isinstance(kv.value, str) and kv.value and "\x00" not in kv.value:
                    p = os.path.join(base, kv.value)
                    if p not in out:
                        out.append(p)
    except RecursionError:
        return out
    return out
