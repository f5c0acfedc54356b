"""Loading an ONNX file safely: clear errors, in-folder external data only."""
from __future__ import annotations

import os

import numpy as np
import onnx

from fibgraph.errors import InputError
from fibgraph.fileio import read_input

from .limits import check_model, check_model_file
from .validate import validate_model

__all__ = ["load_onnx", "attrs", "ints", "tensor_value", "float_tensors", "graph_float_tensors", "outer_refs", "FLOAT_TYPES"]


def _external_location(t):
    for kv in t.external_data:
        if kv.key == "location":
            return kv.value
    return None


def load_onnx(path) -> onnx.ModelProto:
    """Read an ONNX model; raise :class:`InputError` with one clear line on bad input.

    External-data tensors must lie inside the model's folder (a path that
    leaves it is refused, never read).
    """
    from . import external

    path = os.fspath(path)
    check_model_file(path)
    model, read = None, False
    if os.path.isfile(path) and os.path.getsize(path) >= external.LEAN_BYTES:
        try:                               # a big model: its weights stay in the file (external.open_lean)
            model = external.open_lean(path)
        except Exception:
            raise InputError(f"{path}: not an ONNX model (cannot parse the protobuf; truncated or another format)") \
                from None
    if model is None:
        read = True
        data = read_input(path)
        if not data:
            raise InputError(f"{path}: empty file, not an ONNX model")
        try:
            model = onnx.load_model_from_string(data)
        except Exception:
            raise InputError(f"{path}: not an ONNX model (cannot parse the protobuf; truncated or another format)") \
                from None
        del data
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        raise InputError(f"{path}: not an ONNX model (no graph; truncated or another format)")
    base = os.path.dirname(os.path.abspath(path))
    lean = not read
    ext = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in ext:
        loc = _external_location(t)
        if loc is None:
            raise InputError(f"{path}: tensor {t.name!r} is external but names no location")
        if not isinstance(loc, str) or "\x00" in loc:
            raise InputError(f"{path}: tensor {t.name!r} has an external data location {loc!r} "
                             "that is not a file name (not UTF-8, or a NUL byte)")
        full = os.path.realpath(os.path.join(base, loc))
        if os.path.isabs(loc) or os.path.commonpath([full, os.path.realpath(base)]) != os.path.realpath(base):
            raise InputError(f"{path}: tensor {t.name!r} has external data {loc!r} outside the model's folder; refused")
        if not os.path.isfile(full):
            raise InputError(f"{path}: external data file {loc!r} of tensor {t.name!r} is missing")
    check_model(model, base, label=path)
    if ext and (lean or sum(os.path.getsize(os.path.join(base, f)) for f in
                            {_external_location(t) for t in ext}) >= external.LEAN_BYTES):
        validate_model(model, path)
        return external.absolutize(model, base)     # big external data: read in place, never loaded
    if ext:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, base)
        except Exception as e:
            raise InputError(f"{path}: cannot load external data ({e})") from None
    validate_model(model, path)
    return model


def _all_tensors(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def attrs(node):
    """A node's attributes as ``{name: value}``."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def ints(v):
    """An attribute's or a tensor's values as a list of Python ints."""
    return [int(x) for x in np.asarray(v).reshape(-1)]


def tensor_value(t) -> np.ndarray:
    """A tensor's value; the weights of a big model as read-only views of their file (:mod:`.external`)."""
    from .external import tensor_array

    return tensor_array(t)


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


def float_tensors(model):
    """(name, element count) of every floating-point initializer and Constant
    tensor, inside control-flow bodies (If/Loop/Scan subgraphs) too."""
    out = []
    graph_float_tensors(model.graph, out)
    return out


def graph_float_tensors(graph, out):
    """Append (name, element count) of the float tensors of ``graph`` (and its subgraphs) to ``out``."""
    for t in graph.initializer:
        if t.data_type in FLOAT_TYPES:
            out.append((t.name, int(np.prod(t.dims)) if len(t.dims) else 1))
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in FLOAT_TYPES:
                    out.append((node.output[0], int(np.prod(a.t.dims)) if len(a.t.dims) else 1))
                elif a.name == "value_floats":
                    out.append((node.output[0], len(a.floats)))
                elif a.name == "value_float":
                    out.append((node.output[0], 1))
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                graph_float_tensors(a.g, out)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    graph_float_tensors(g, out)


def outer_refs(node):
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the outer graph;
    an empty set for a node without subgraphs."""
    graphs = []
    for at in node.attribute:
        if at.type == onnx.AttributeProto.GRAPH:
            graphs.append(at.g)
        elif at.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(at.graphs)
    refs = set()
    for g in graphs:
        local = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            for x in n.input:
                if x and x not in local:
                    refs.add(x)
            refs |= {x for x in outer_refs(n) if x not in local}
            local.update(o for o in n.output if o)
        refs.update(o.name for o in g.output if o.name not in local)
    return refs if graphs else set()
