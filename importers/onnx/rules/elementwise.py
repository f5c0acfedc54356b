"""Element-wise rules: unary ops and aliases keep the nodes; an element-wise op
of several streams makes one factor node per distinct tuple of operand nodes
(the AND rule, :meth:`Builder.combine`), per-unit constants are edges from a
constant node; Softmax/LogSoftmax over a unit axis reads a denominator node."""
from __future__ import annotations

import numpy as np

from fibgraph.errors import InputError
from fibgraph.graph import FACTOR, NORM, PER_UNIT

from ..build import Barrier, attrs, opset
from ..records import ElementwiseRecord, SoftmaxRecord
from .registry import rule

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "Softsign",
         "HardSigmoid", "HardSwish", "Clip", "Erf", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt",
         "Reciprocal", "Sign", "ThresholdedRelu", "Celu", "Sin", "Cos", "Floor", "Ceil", "Round",
         "Not", "IsNaN", "Swish"}
ALIAS = {"Identity", "Dropout", "Cast", "CastLike"}
#: normalisations over an axis: the same nodes along positional axes, a denominator over a unit axis
SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax", "LpNormalization"}
ELEMWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
            "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod"}


@rule(*sorted(UNARY | ALIAS))
def unary(b, node, name, a, kinds):
    """The same nodes: the op acts alike on every unit."""
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] in b.consumers:
        raise Barrier("Dropout mask is used")
    b.layout[node.output[0]] = b.layout[node.input[0]]
    return "activation"


@rule(*sorted(SOFTMAX))
def softmax(b, node, name, a, kinds):
    """Along positional axes the same nodes; over a unit axis a denominator node per position."""
    x = node.input[0]
    ids = b.layout[x]
    ax = int(a.get("axis", -1))
    ax = ax + ids.ndim if ax < 0 else ax
    version = opset(b.model)
    axes = [ax] if (node.op_type != "LpNormalization" and version >= 13) or node.op_type == "LpNormalization" \
        else list(range(ax, ids.ndim))
    if all(ids.shape[k] == 1 for k in axes):
        b.layout[node.output[0]] = ids
        return "activation"
    if node.op_type not in ("Softmax", "LogSoftmax"):
        raise Barrier(f"{node.op_type} over a unit axis")
    if len(axes) != 1:
        raise Barrier("softmax over several unit axes")
    # out_e = f(x_e, sum_k exp(x_k)): a denominator node per remaining position
    den_ids, den = b.reduce_nodes(ids, axes, "softmax", name, weight="count")
    b.records.append(SoftmaxRecord(node=node.name, op=node.op_type, input=x, output=node.output[0], axis=axes[0]))
    return b.combine([ids, den_ids], node.output[0], name, ("softmax", node.op_type), kind=NORM)


@rule(*sorted(ELEMWISE))
def elementwise(b, node, name, a, kinds):
    """Streams and constants combined element-wise: factor / per-unit nodes (the AND rule)."""
    op = node.op_type
    streams = [(k, x) for k, x in enumerate(node.input) if kinds[k] == "stream"]
    consts, infinite = [], []
    for k, x in enumerate(node.input):
        if kinds[k] in ("const", "meta"):
            v = np.asarray(b.values.get(x, b.consts.get(x)))
            if v.dtype.kind == "f" and np.any(np.isnan(v)):
                raise InputError(f"{b.label}: node {name!r} ({op}): constant {x!r} holds NaN")
            if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                infinite.append(x)
                v = np.nan_to_num(v, posinf=1e30, neginf=-1e30)   # a finite stand-in for the signature
            consts.append((k, v))
    ids0 = [b.layout[x] for _, x in streams]
    out_ids_shape = np.broadcast_shapes(*[o.shape for o in ids0])
    # axes only a constant spans (every stream has length 1 there, the output
    # more): the constant brings the units (a per-sample rsqrt(var) times a
    # per-unit gamma, in a LayerNorm written out op by op: magika)
    out_shape = tuple(b.shapes[node.output[0]])
    rank_o = len(out_shape)

    def _aligned(sh):
        sh = tuple(sh)
        return (1,) * (rank_o - len(sh)) + sh

    const_axes = {}
    # only where every stream is one node (a per-sample statistic): where a
    # stream has units, a constant along another axis scales positions
    if len(out_ids_shape) == rank_o and all(o.size == 1 for o in ids0):
        st = [_aligned(b.shapes[x]) for _, x in streams]
        for k in range(rank_o):
            if out_shape[k] > 1 and all(sh[k] == 1 for sh in st) and out_ids_shape[k] == 1:
                for _, c in consts:
                    ca = np.asarray(c).reshape(_aligned(np.shape(c))) if np.ndim(c) <= rank_o else None
                    if ca is not None and ca.shape[k] > 1 and not np.allclose(ca, np.take(ca, [0], axis=k)):
                        const_axes[k] = out_shape[k]
                        break
    same = all(np.array_equal(np.broadcast_to(ids0[0], out_ids_shape), np.broadcast_to(o, out_ids_shape))
               for o in ids0)
    scalar = all(np.asarray(c).size == 1 for _, c in consts)
    # other streams that are one node (a scalar computed at run time) act on every unit alike
    unit_streams = [o for o in ids0 if o.size > 1]
    if not same and len(unit_streams) == 1 and all(o.size == 1 for o in ids0 if o is not unit_streams[0]):
        same = unit_streams[0].shape == out_ids_shape
    if same:
        ids0 = [unit_streams[0]] if unit_streams else ids0[:1]
    if const_axes:
        same = False
    if same and scalar and len(b.shapes[node.output[0]]) == len(out_ids_shape):
        b.layout[node.output[0]] = np.broadcast_to(ids0[0], out_ids_shape).copy()
        return "activation"
    # constants that vary only along positional axes of every unit are the same for all units
    if same and len(b.shapes[node.output[0]]) == len(out_ids_shape):
        try:
            uniform = all(np.allclose(b.const_vectors(c, np.broadcast_to(ids0[0], out_ids_shape)),
                                      b.const_vectors(c, np.broadcast_to(ids0[0], out_ids_shape))[:1])
                          for _, c in consts)
        except Barrier:
            uniform = False
        if uniform:
            b.layout[node.output[0]] = np.broadcast_to(ids0[0], out_ids_shape).copy()
            # the constant still spans the unit axis: the writer cuts it to the kept units
            b.records.append(ElementwiseRecord(node=node.name, op=op, output=node.output[0],
                                               streams=[x for _, x in streams],
                                               consts=[node.input[k] for k, _ in consts]))
            return "activation"
    if infinite:   # +-inf that varies per unit is a broken bias or scale, not a mask
        raise InputError(f"{b.label}: node {name!r} ({op}): constant {infinite[0]!r} holds NaN or Inf")
    rank = len(b.shapes[node.output[0]])
    ops_ids = [o.reshape((1,) * (rank - o.ndim) + o.shape) for o in ids0]
    consts = [(k, np.asarray(c).reshape((1,) * max(0, rank - np.ndim(c)) + np.shape(c))) for k, c in consts]
    tag = (op, tuple(sorted(attrs(node).items())) if op != "Where" else ())
    slots = [k for k, _ in streams]
    role = b.combine(ops_ids, node.output[0], name, (tag, tuple(slots)), consts,
                     kind=FACTOR if len(streams) > 1 else PER_UNIT, unit_axes=const_axes)
    b.records.append(ElementwiseRecord(node=node.name, op=op, output=node.output[0],
                                       streams=[x for _, x in streams],
                                       consts=[node.input[k] for k, _ in consts]))
    return role
