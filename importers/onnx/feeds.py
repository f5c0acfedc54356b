"""Made-up inputs for running a model once (the hypergraph probe, ``--verify``).

A float input is drawn standard normal.  An integer input is drawn in the range
the model can read it in, found from what it indexes (through Cast, Unsqueeze,
Reshape and the like):

- the indices of a ``Gather`` over a constant table (an embedding: token,
  position and type ids): uniform in ``[0, rows)``; over a computed tensor whose
  size shape inference knows: uniform below that size;
- the indices of a ``OneHot`` with a constant depth, or one side of an ``Equal``
  against a constant (a one-hot made by comparison with an iota): below the depth;
- an attention mask (an input named like ``*mask*``, or a tensor only read by
  the ops of a mask: ``1 - m``, ``m * x``, ``Where(m, ...)``, comparisons): ones;
- a scalar the model tests with ``Equal`` against a constant (a sample rate):
  that constant;
- bytes (``uint8``/``int8``) otherwise: their whole range; other integers: ``[0, 2)``.

Booleans are a mask (all true) by name or use, random bits otherwise.
Unknown dims: the batch axis (first) is ``n``; another dim of an integer input
(a sequence of token ids) is ``SEQ`` = 8; of a float input ``size`` (32 unless
given).  Inputs that share a symbolic dim get the same size.

:func:`input_specs` reads the model once, :func:`make_feeds` draws, and
:func:`describe` says what was fed, per input, for the reports.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from .load import tensor_value

from fibgraph.limits import check_elements

__all__ = ["SEQ", "SIZE", "Drawn", "InputSpec", "describe", "input_specs", "make_feeds", "short_error"]

SEQ = 8            # default length of a symbolic sequence dim of an integer input
SIZE = 32          # default size of another symbolic dim (a float input's)
SMALL = 2          # the range of an integer input nothing bounds

# ops an index passes through unchanged in value (their data input is input 0)
_PASS = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten", "Expand", "Transpose", "Tile",
         "Slice", "CastLike"}
# ops that read a mask: 1 - m, m * x, Where(m, ...), comparisons, logic
_MASK_OPS = {"Sub", "Mul", "Where", "Not", "Equal", "And", "Or", "Less", "Greater", "LessOrEqual",
             "GreaterOrEqual"}
# ops whose data input (0) keeps its values (a selection of them)
_SELECT = {"Gather", "GatherElements", "GatherND"}
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)


@dataclass
class InputSpec:
    """How to draw one graph input."""

    name: str
    dtype: np.dtype
    dims: list                      # per axis: an int, a symbolic name, or None
    kind: str                       # normal, uniform, ones, bits, value
    high: int = 0                   # uniform: values in [0, high); value: the value
    why: str = ""                   # what bounded it
    uses: list = field(default_factory=list)


class Drawn(dict):
    """Feeds made by :func:`make_feeds` (a plain dict is the user's)."""

    specs: dict = None
    given: set = frozenset()        # inputs kept from the user's data


_SRC = re.compile(r"(?:/[\w.+-]+)+\.(?:h|hpp|cc|cpp|c):\d+\s*")       # onnxruntime's source locations


def short_error(e, limit=500):
    """An error message on one line: its first line, without onnxruntime's
    source file locations, whole when it fits ``limit`` characters, else cut
    at a word boundary; an ellipsis says something was left out.  Never mid-word."""
    lines = [_SRC.sub("", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    s = lines[0] if lines else type(e).__name__
    more = len(lines) > 1
    if len(s) > limit:
        cut = s[:limit + 1]
        sp = cut.rfind(" ")
        s = (cut[:sp] if sp > 0 else s[:limit]).rstrip(" ,;:")
        more = True
    return s + " ..." if more else s


# ------------------------------------------------------------------ reading
def _consts(model):
    g = model.graph
    out = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _const_array(name, consts, prod, depth=0):
    """The value of ``name`` when it is a constant (or an Identity/Cast of one)."""
    if name in consts:
        try:
            return tensor_value(consts[name])
        except Exception:
            return None
    n = prod.get(name)
    if n is not None and n.op_type in ("Identity", "Cast") and depth < 8 and n.input:
        return _const_array(n.input[0], consts, prod, depth + 1)
    return None


def _const_dims(name, consts, prod, depth=0):
    if name in consts:
        return list(consts[name].dims)
    n = prod.get(name)
    if n is not None and n.op_type in ("Identity", "Cast") and depth < 8 and n.input:
        return _const_dims(n.input[0], consts, prod, depth + 1)
    return None


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _inferred_dims(model):
    """Static dims of every tensor shape inference knows (inputs as declared)."""
    try:
        inf = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    out = {}
    for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
    return out


def _reach(name, cons):
    """The tensors ``name`` reaches through value-preserving ops, and the
    (node, input position) of every other use."""
    seen, stack, uses = {name}, [name], []
    while stack:
        t = stack.pop()
        for node in cons.get(t, ()):
            k = list(node.input).index(t)
            if (node.op_type in _PASS or node.op_type in _SELECT) and k == 0 or node.op_type == "Concat":
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        stack.append(o)
            elif node.op_type not in ("Shape", "Size"):
                uses.append((node, k, t))
    return uses


def _bound(uses, consts, prod, dims_of):
    """The smallest range an index use allows, and why; None when nothing bounds it."""
    best = None
    for node, k, t in uses:
        hi, why = None, ""
        op = node.op_type
        if op == "Gather" and k == 1:
            data = node.input[0]
            ax = int(_attr(node, "axis", 0))
            d = _const_dims(data, consts, prod)
            if d is not None and d:
                hi, why = int(d[ax]), f"the rows of {data!r}"
            else:
                d = dims_of.get(data)
                if d and -len(d) <= ax < len(d) and d[ax]:
                    hi, why = int(d[ax]), f"axis {ax} of {data!r}"
        elif op == "GatherElements" and k == 1:
            d = _const_dims(node.input[0], consts, prod) or dims_of.get(node.input[0])
            ax = int(_attr(node, "axis", 0))
            if d and -len(d) <= ax < len(d) and d[ax]:
                hi, why = int(d[ax]), f"axis {ax} of {node.input[0]!r}"
        elif op == "OneHot" and k == 0:
            depth = _const_array(node.input[1], consts, prod)
            if depth is not None and depth.size == 1:
                hi, why = int(depth.reshape(-1)[0]), f"the depth of OneHot {node.name or node.output[0]!r}"
        elif op == "Equal":
            other = _const_array(node.input[1 - k], consts, prod)
            if other is not None and other.size > 1 and other.dtype.kind in "iu" and other.min() >= 0:
                hi, why = int(other.max()) + 1, f"compared with {node.input[1 - k]!r}"
        if hi is not None and hi > 0 and (best is None or hi < best[0]):
            best = (hi, why)
    return best


def _tested_value(uses, consts, prod):
    """A value the model tests the input for (``Equal`` with a constant scalar:
    a sample rate, a mode flag), or None."""
    for node, k, t in uses:
        if node.op_type == "Equal":
            other = _const_array(node.input[1 - k], consts, prod)
            if other is not None and other.size == 1 and other.dtype.kind in "iu":
                return int(other.reshape(-1)[0]), f"compared with {node.input[1 - k]!r}"
    return None


def input_specs(model) -> dict:
    """``{input name: InputSpec}`` for every graph input that is not an initializer."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    consts = _consts(model)
    prod = {o: n for n in g.node for o in n.output}
    cons = {}
    for n in g.node:
        for x in set(n.input):
            if x:
                cons.setdefault(x, []).append(n)
    dims_of = None
    specs = {}
    for vi in g.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = []
        for d in t.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        try:
            dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        except Exception:
            dt = np.dtype(np.float32)
        sp = InputSpec(vi.name, dt, dims, "normal")
        if dt.kind in "iub":
            uses = _reach(vi.name, cons)
            sp.uses = sorted({n.op_type for n, _, _ in uses})
            if dt.kind != "b":
                if dims_of is None and any(n.op_type in ("Gather", "GatherElements") for n, _, _ in uses):
                    dims_of = _inferred_dims(model)
                b = _bound(uses, consts, prod, dims_of or {})
            else:
                b = None
            named = bool(_MASK_NAME.search(vi.name))
            used = bool(uses) and len(dims) > 0 and all(
                n.op_type in _MASK_OPS and (n.op_type != "Where" or k == 0) for n, k, _ in uses)
            tested = _tested_value(uses, consts, prod) if b is None and dt.kind in "iu" else None
            if b is not None:
                sp.kind, sp.high, sp.why = "uniform", b[0], b[1]
            elif tested is not None and not named:
                sp.kind, sp.high, sp.why = "value", tested[0], tested[1]
            elif named or used and (dt.kind == "b" or dt.itemsize > 1):
                sp.kind, sp.why = "ones", "a mask"
            elif dt.kind == "b":
                sp.kind, sp.why = "bits", "a boolean"
            elif dt.itemsize == 1:
                sp.kind, sp.high, sp.why = "uniform", int(np.iinfo(dt).max) + 1, "bytes"
            else:
                sp.kind, sp.high, sp.why = "uniform", SMALL, "nothing bounds it"
        specs[vi.name] = sp
    return specs


# ------------------------------------------------------------------ drawing
def _shapes(specs, n, size):
    """Concrete shapes: batch ``n``; a named dim shared by inputs gets one size
    (integer inputs' sequence length first)."""
    named = {}
    order = sorted(specs.values(), key=lambda s: s.dtype.kind == "f")     # integer inputs first
    out = {}
    for sp in order:
        shape = []
        for k, d in enumerate(sp.dims):
            if isinstance(d, int):
                shape.append(d)
                continue
            if k == 0:
                v = n
            elif size is not None:
                v = size
            else:
                v = SEQ if sp.dtype.kind != "f" else SIZE
            if d:
                v = named.setdefault(d, v)
            shape.append(int(v))
        out[sp.name] = tuple(shape)
    return out


def _draw(sp, shape, rng):
    if sp.kind == "normal":
        return rng.standard_normal(shape).astype(sp.dtype)
    if sp.kind == "ones":
        return np.ones(shape, dtype=sp.dtype)
    if sp.kind == "bits":
        return rng.integers(0, 2, size=shape).astype(sp.dtype)
    if sp.kind == "value":
        return np.full(shape, sp.high, dtype=sp.dtype)
    return rng.integers(0, sp.high, size=shape).astype(sp.dtype)


def make_feeds(model, n=1, seed=0, size=None, shapes=None, specs=None) -> Drawn:
    """One array per graph input: batch ``n`` (unknown first dims), other
    unknown dims as in the module doc (all ``size`` when given), or the exact
    ``shapes`` ({name: shape}) when given; values as :func:`input_specs` says."""
    specs = input_specs(model) if specs is None else specs
    rng = np.random.default_rng(seed)
    shp = _shapes(specs, n, size)
    if shapes:
        shp.update({k: tuple(int(x) for x in v) for k, v in shapes.items() if k in shp})
    for name, sp in specs.items():             # every size checked before anything is drawn
        check_elements(f"graph input {name!r}", shp[name], sp.dtype.itemsize, sp.dtype.name)
    out = Drawn()
    out.specs = specs
    for name, sp in specs.items():             # graph order
        out[name] = _draw(sp, shp[name], rng)
    return out


def _say(sp, shape=None):
    if sp.kind == "normal":
        s = "normal(0,1)"
    elif sp.kind == "ones":
        s = "ones"
    elif sp.kind == "bits":
        s = "random bits"
    elif sp.kind == "value":
        s = f"{sp.dtype.name} {sp.high}"
    else:
        s = f"{sp.dtype.name} uniform in [0, {sp.high})"
    if shape is not None:
        s += f", shape {list(shape)}"
    return s + (f" ({sp.why})" if sp.kind in ("uniform", "value") and sp.why else "")


def describe(feeds, specs=None, given=()) -> dict:
    """``{input name: what was fed}`` for drawn feeds (a :class:`Drawn`, or
    ``specs`` given); the inputs in ``given`` were the user's."""
    specs = specs or getattr(feeds, "specs", None) or {}
    out = {}
    for k, v in feeds.items():
        sp = specs.get(k)
        if sp is None or k in given:
            out[k] = f"given, shape {list(np.shape(v))}"
        else:
            out[k] = _say(sp, np.shape(v))
    return out
