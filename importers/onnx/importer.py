"""ONNX -> the model's (hyper)graph for any DAG of ops: branches, residual sums,
element-wise products, LayerNorm, attention's stream products, LSTM and GRU.

docs/design.md sections 1 and 6.  The pipeline: :mod:`.load` reads the file,
:mod:`.probe` runs it once, :class:`.build.Builder` walks it, handing each op
to its rule (:mod:`.rules`, one table), and :func:`import_dag` assembles the
graph; the writer reads the typed records (:mod:`.records`).

Every stream tensor carries a *layout*: an int64 array of node ids over the
tensor's axes, where an axis along which the ids vary is a *unit* axis
(channels, features, gate units, heads x head dims) and an axis of size 1 in the
layout is *positional* (batch, time, space: every unit is treated alike along
it). Layouts are found numerically: the model is run once in onnxruntime (batch
1) to learn every tensor's concrete shape and the values of computed shape
tensors, and movement ops (Reshape, Transpose, Gather, Slice, Concat, ...) are
applied to the id arrays themselves with the ONNX reference evaluator, so no
op's layout rule is guessed.

Nodes and edges (the hypergraph as a :class:`WeightedDigraph`):
- a linear op with a constant weight (MatMul, Gemm, Conv, ConvTranspose) makes
  one node per output unit, a dense block of its weights (vector weights over
  kernels or repeated positions) and a bias edge from a constant node;
- an element-wise op of several streams (residual Add, gates' products, q*k)
  makes one *factor* node per distinct tuple of operand nodes, with one edge
  per operand kept apart by its edge type: the AND rule; per-unit constants
  (bias, BatchNorm, PRelu, LayerNorm's gamma/beta) are edges from a constant
  node, so units of a fiber must share them;
- unary ops, scalar constants and ops along positional axes keep the nodes
  (they act alike on every unit); a cut (Gather/Slice/Split) of q, k or v out
  of a packed projection's (..., 3, d) view is also recorded (``packed``) when
  an integer probe shows it equals a slice of the projection's output;
- a sum over a unit axis (ReduceMean/ReduceSum, LayerNorm's statistics, a
  MatMul of two streams contracting a unit axis) is a node reading all of
  them; max/min reductions likewise (they depend on the set of values only);
- LSTM/GRU ops: gate, cell and hidden nodes per unit and direction, the
  recurrence as edges hidden -> gates inside one *cyclic* level that the
  engine refines to a fixed point; the gates of a unit share its colour;
- anything else is a *barrier*: its inputs keep all their units (like
  outputs), its outputs are new distinct nodes (like inputs); the op, node and
  share of the parameters it covers are reported, the rest is still coloured.

The initial colouring keeps inputs, outputs, barrier ends and constant nodes
distinct and starts every other node set in one class of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import os

import numpy as np
import onnx

from fibgraph.graph import PER_UNIT, WeightedDigraph
from fibgraph.heap import trim
from fibgraph.progress import task

from . import external as _external
from .build import META, Builder, attrs, opset
from .load import load_onnx
from .probe import probe_model
from .records import Kind
from .rules import DAG_OPS, lookup
from .rules.linear import LINEAR
from .rules.movement import MOVE

__all__ = ["DagImport", "import_dag", "DAG_OPS"]


@dataclass
class DagImport:
    """The result of :func:`import_dag`."""

    model: onnx.ModelProto
    graph: WeightedDigraph
    spaces: list
    layouts: dict             # tensor name -> id array (positional axes of size 1)
    shapes: dict              # tensor name -> concrete shape in the probe run
    records: list             # per mapped node: what it is, for the writer
    barriers: list            # (node name, op type, why, params covered)
    ops: list                 # (node name, op type, role)
    consts: dict
    feeds: dict
    keep: np.ndarray          # nodes that must stay distinct (outputs, barrier inputs)
    joins: list
    inputs: list
    outputs: list
    n_params: int = 0
    space_of: np.ndarray = field(default=None)
    opset: int = 13
    computed: set = field(default_factory=set)


def _ties(joins, node_level, space_of, n):
    """Column id per node for joint clustering (-1: none): connected components
    of the joins whose two ends lie in one level (the gates, cell and hidden
    node of one LSTM/GRU unit: a recurrent op's node sets share its cyclic
    level).  A component with two nodes of one node set is left untied."""
    tie = np.full(n, -1, dtype=np.int64)
    if not joins or not n:
        return tie
    a = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p, _ in joins])
    b = np.concatenate([np.asarray(q, dtype=np.int64).reshape(-1) for _, q in joins])
    same = (node_level[a] == node_level[b]) & (a != b)
    if not same.any():
        return tie
    from scipy.sparse import coo_matrix              # only with joins (recurrent units): scipy costs 30 MB
    from scipy.sparse.csgraph import connected_components
    a, b = a[same], b[same]
    _, comp = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(n, n)), directed=False)
    size = np.bincount(comp, minlength=n)
    tied = size[comp] > 1
    # a component holding two nodes of one node set: untied
    m = int(space_of.max()) + 1
    u, cnt = np.unique((comp.astype(np.int64) * m + space_of)[tied], return_counts=True)
    bad = np.unique(u[cnt > 1] // m)
    tied &= ~np.isin(comp, bad)
    tie[tied] = comp[tied]
    return tie


#: unary ops through which a node's value stays positively homogeneous
#: (f(s z) = s f(z) for s > 0): the ReLU family, identities, sign flips
HOMOGENEOUS_UNARY = {"Relu", "LeakyRelu", "Identity", "Dropout", "Neg", "Abs"}
#: pooling and reductions along positional axes: positively homogeneous in the values
HOMOGENEOUS_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
                    "Resize", "Upsample", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}


def _homogeneous_use(b, node, role, x):
    """How ``node`` uses the stream tensor ``x`` for the rescaling merge:
    ``'pass'`` (the values go on through a positively homogeneous op: the same
    nodes, or moved), ``'linear'`` (a linear layer reads them: its columns take
    the scales), ``'affine'`` (a bias add: a node set of its own reading them
    with weight 1 plus a constant, positively homogeneous jointly with that
    constant), ``'ignore'`` (only the shape is read) or ``'block'``."""
    op = node.op_type
    streams = [y for y in node.input if y in b.layout]
    if role in ("shape",) and op in META:
        return "ignore"
    if role == "barrier":
        return "block"
    if role == "layer" and op in LINEAR:
        rec = next((r for r in b.records if r.kind == Kind.LINEAR and r.output == node.output[0]), None)
        return "linear" if rec is not None and rec.input == x and len(streams) == 1 else "block"
    if role == "positional":                   # a constant weight mixing positions: linear
        return "pass"
    if role == "shape" and op in MOVE:
        return "pass"
    if role == "pool":
        if op == "Pad":
            a = attrs(node)
            mode = a.get("mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            value = node.input[2] if len(node.input) > 2 and node.input[2] else None
            v = 0.0 if value is None else float(np.asarray(b.values.get(value, 0)).reshape(-1)[0])
            return "pass" if mode != "constant" or v == 0.0 else "block"
        return "pass" if op in HOMOGENEOUS_POOL else "block"
    if role == "activation":
        if op in HOMOGENEOUS_UNARY:
            return "pass"
        if op in ("Cast", "CastLike"):
            v = b.values.get(node.output[0])
            return "pass" if v is not None and np.asarray(v).dtype.kind == "f" else "block"
        # a constant factor (scalar, or one that varies along positions only): linear
        if op in ("Mul", "Div") and len(streams) == 1 and (op == "Mul" or node.input[0] == x) and \
                all(y == x or y in b.consts for y in node.input):
            return "pass"
        return "block"
    if role == PER_UNIT and op in ("Add", "Sub") and len(streams) == 1:
        return "affine"
    return "block"


def _homogeneous_spaces(b):
    """Node sets whose values reach every consumer through positively
    homogeneous ops only (docs/design.md section 4): a linear layer (MatMul, Gemm,
    Conv with a constant weight; its bias is an edge of its rows) whose values
    go, through ReLU-family activations, pooling, reshapes and constant
    factors, only into linear layers, graph outputs or a bias add (an Add/Sub
    of a per-unit constant, itself a node set: ``z + c`` is positively
    homogeneous jointly with ``c``, so the bias add must be such a set too and
    the rescaling merge divides ``c`` by the scale).  A bias add qualifies when
    every operand node comes from such a set.  Anything else (sigmoid, tanh,
    GELU, a norm, a residual sum, a product, a per-channel scale, BatchNorm,
    a barrier, a reduction over units) blocks.  Returns space indices."""
    roles = [r for _, _, r in b.ops]
    space_of = np.asarray(b.space_of, dtype=np.int64)

    def spaces(t):
        ids = np.asarray(b.layout[t]).reshape(-1)
        return set(np.unique(space_of[ids[ids >= 0]]).tolist())

    capable = {rec.space for rec in b.records if rec.kind == Kind.LINEAR}
    bad, children, parents = set(), {}, {}
    k = 0
    for node in b.model.graph.node:
        if node.op_type == "Constant":
            continue
        role = roles[k] if k < len(roles) else "barrier"
        k += 1
        for x in dict.fromkeys(y for y in node.input if y in b.layout):
            use = _homogeneous_use(b, node, role, x)
            if use in ("pass", "linear", "ignore"):
                continue
            src = spaces(x)
            if use == "affine" and node.output[0] in b.layout:
                tgt = spaces(node.output[0]) - src
                if len(tgt) == 1:
                    t = next(iter(tgt))
                    capable.add(t)
                    parents.setdefault(t, set()).update(src)
                    for s_ in src:
                        children.setdefault(s_, set()).add(t)
                    continue
            bad |= src
    hom = capable - bad
    changed = True
    while changed:
        changed = False
        for s_ in sorted(hom):
            if not children.get(s_, set()) <= hom or not parents.get(s_, set()) <= hom:
                hom.discard(s_)
                changed = True
    return hom


def import_dag(path_or_model, feeds=None, label=None) -> DagImport:
    """Import any ONNX model as a hypergraph (see the module doc)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model, label = path_or_model, label or "model"
    else:
        model, label = load_onnx(path_or_model), str(path_or_model)
    with task(f"probing {os.path.basename(label)} in onnxruntime"):
        probe = probe_model(model, feeds)
    trim()                         # the probe session's weights and arena back to the system
    # where the inputs' units lie is not written in ONNX: try the layouts a
    # model may mean (features last, channels first, no unit axis: a signal
    # whose samples are positions) and keep the one with the fewest barriers
    choices = ["last", "1", "none"]
    b = None
    nn = len(model.graph.node)
    with task("building the hypergraph", total=nn) as advance:
        for k, choice in enumerate(choices):
            builder = Builder(model, label, lookup, probe=probe, input_axis=choice)
            builder.progress = advance
            alt = builder.run()   # bad input fails in any layout
            if b is None or len(alt.barriers) < len(b.barriers):
                b = alt
            if not b.barriers:
                break
            if k + 1 < len(choices):
                advance(0, f"building the hypergraph (input units: axis {choices[k + 1]})", total=(k + 2) * nn)
    n = b.n
    keys = b.init_key
    keep = np.array(b.keep, dtype=bool)
    # initial colours: distinct for inputs/consts/kept nodes, one class per space otherwise
    lab = {}
    initial = np.empty(n, dtype=np.int64)
    for k in range(n):
        key = ("distinct", k) if keep[k] else keys[k]
        initial[k] = lab.setdefault(key, len(lab))
    space_of = np.array(b.space_of, dtype=np.int64)
    # levels: one per space, in creation (topological) order; loops share a level
    lv_of_space = np.array([s.level for s in b.spaces], dtype=np.int64)
    uniq_lv = np.unique(lv_of_space)
    lv_index = {int(v): k for k, v in enumerate(uniq_lv)}
    node_level = np.array([lv_index[int(lv_of_space[s])] for s in space_of], dtype=np.int64) if n else \
        np.zeros(0, np.int64)
    levels = [np.nonzero(node_level == k)[0] for k in range(len(uniq_lv))]
    cyclic = {lv_index[v] for v in b.cyclic if v in lv_index}
    names = [f"level{k}" for k in range(len(uniq_lv))]
    kinds = np.array([b.spaces[s].kind for s in space_of], dtype=object)
    idx = np.concatenate([np.arange(s.n) for s in b.spaces]) if b.spaces else np.zeros(0, np.int64)
    g = WeightedDigraph(n=n, blocks=b.blocks, levels=levels, initial=initial, layer=space_of, index=idx,
                        kind=kinds, layer_names=[s.name for s in b.spaces], cyclic=cyclic,
                        relieve=_external.relieve)      # a big model's mapped weights: resident one level at a time
    g.levels = levels
    # the rescaling merge: node sets that are positively homogeneous up to the next linear layers
    for sid in _homogeneous_spaces(b):
        g.homogeneous[b.spaces[sid].ids] = True
    # with eps > 0 the node sets of a recurrent unit are clustered jointly
    g.tie = _ties(b.joins, node_level, space_of, n)
    # the engine reads per-level names through layer ids; keep one name per level
    g.level_names = names
    return DagImport(model=model, graph=g, spaces=b.spaces, layouts=b.layout, shapes=b.shapes,
                     records=b.records, barriers=b.barriers, ops=b.ops, consts=b.consts, feeds=b.feeds,
                     keep=keep, joins=b.joins, inputs=b.inputs, opset=opset(model), computed=b.computed,
                     outputs=b.outputs, n_params=b.n_params, space_of=space_of)
