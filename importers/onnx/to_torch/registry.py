"""The op table of :class:`OnnxModule`: tensors in and out of ONNX, decoded nodes, and
``op(...)``, the decorator that registers one torch implementation per ONNX op type."""
from __future__ import annotations

import re
import sys

import numpy as np
import onnx
import torch
from fibgraph.errors import InputError
from onnx import TensorProto, helper

from ..load import tensor_value

DTYPES = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool, TensorProto.UINT16: torch.uint16, TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
}
FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def unsupported(op, why=None):
    msg = f"onnx -> torch: op {op} is not supported"
    return InputError(msg + (f" ({why})" if why else ""))


# ------------------------------------------------------------------ tensors
def tensor_from_proto(t):
    if t.data_type not in DTYPES:
        raise InputError(f"onnx -> torch: tensor {t.name!r} has data type "
                         f"{TensorProto.DataType.Name(t.data_type)}, which is not supported")
    arr = tensor_value(t)
    if t.data_type == TensorProto.BFLOAT16:
        return torch.from_numpy(np.asarray(arr, dtype=np.float32).copy()).to(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True)).to(DTYPES[t.data_type])


def write_tensor(t, value):
    """Write ``value`` into TensorProto ``t`` in place (its dims and data type kept)."""
    dt = DTYPES[t.data_type]
    v = value.detach().to("cpu").to(dt).contiguous().reshape(tuple(t.dims))
    raw = (v.view(torch.int16) if dt == torch.bfloat16 else v).numpy()
    if sys.byteorder != "little":  # pragma: no cover
        raw = raw.byteswap()
    for f in ("float_data", "double_data", "int32_data", "int64_data", "uint64_data", "string_data",
              "external_data"):
        t.ClearField(f)
    t.data_location = TensorProto.DEFAULT
    t.raw_data = raw.tobytes()


def sanitize(name):
    s = re.sub(r"\W", "_", name)
    if not s or s[0].isdigit():
        s = "p_" + s
    return s


def ints(t):
    """A shape-like tensor (or None) as a list of Python ints."""
    if t is None:
        return None
    host = getattr(t, "_fib_host", None)          # a static shape value (OnnxModule plans): no device sync
    if host is not None:
        return list(host)
    return [int(v) for v in t.reshape(-1).tolist()]


def axis_index(a, r):
    a = int(a)
    return a + r if a < 0 else a


def prod(xs):
    return int(np.prod([int(v) for v in xs], dtype=np.int64)) if len(xs) else 1


# ------------------------------------------------------------------ op table
class Node:
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
                raise unsupported(self.op, "subgraphs")
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


OPS = {}
CHECKS = {}


def op(*names, check=None):
    def deco(fn):
        for n in names:
            OPS[n] = fn
            if check is not None:
                CHECKS[n] = check
        return fn
    return deco


