"""ONNX -> the model's (hyper)graph for any DAG of ops: branches, residual sums,
element-wise products, LayerNorm, attention's stream products, LSTM and GRU.

docs/design.md sections 1 and 6.  Every stream tensor carries a *layout*: an int64
array of node ids over the tensor's axes, where an axis along which the ids
vary is a *unit* axis (channels, features, gate units, heads x head dims) and
an axis of size 1 in the layout is *positional* (batch, time, space: every
unit is treated alike along it).  Layouts are found numerically: the model is
run once in onnxruntime (batch 1) to learn every tensor's concrete shape and
the values of computed shape tensors, and movement ops (Reshape, Transpose,
Gather, Slice, Concat, ...) are applied to the id arrays themselves with the
ONNX reference evaluator, so no op's layout rule is guessed.

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

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from fibgraph.errors import InputError
from fibgraph.graph import Block, WeightedDigraph

from .feeds import describe, input_specs, short_error
from .onnx_load import load_onnx

__all__ = ["DagImport", "import_dag", "probe_model", "sample_feeds", "DAG_OPS"]

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "Softsign",
         "HardSigmoid", "HardSwish", "Clip", "Erf", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt",
         "Reciprocal", "Sign", "ThresholdedRelu", "Celu", "Sin", "Cos", "Floor", "Ceil", "Round",
         "Not", "IsNaN", "Swish", "Softmax", "LogSoftmax", "Hardmax", "LpNormalization"}
ALIAS = {"Identity", "Dropout", "Cast", "CastLike"}
ELEMWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
            "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod"}
MOVE = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Slice", "Split",
        "Concat", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"}
POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
        "Resize", "Upsample", "Pad"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}
LINEAR = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
NORM = {"BatchNormalization", "LayerNormalization", "InstanceNormalization"}
RECURRENT = {"LSTM", "GRU"}
ATTENTION = {"Attention"}
META = {"Shape", "Size"}
DAG_OPS = sorted(UNARY | ALIAS | ELEMWISE | MOVE | POOL | REDUCE | LINEAR | NORM | RECURRENT | ATTENTION | META
                 | {"Constant", "ConstantOfShape"})


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _nodename(node, i):
    return node.name or f"{node.op_type}_{i}"


def _etype(*parts) -> int:
    """A stable 62-bit edge category from a description (op, operand slot, attrs)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


# ------------------------------------------------------------------ probing
def sample_feeds(model, seed=0, sizes=None, specs=None):
    """Inputs for one probe run (:func:`importers.feeds.make_feeds`): batch 1,
    floats standard normal, integers in the range they index (token ids below
    the embedding's rows, masks ones); other unknown dims a sequence of 8 for
    integer inputs and 32 for floats, or all ``sizes`` (tried in turn by
    :func:`probe_model`)."""
    from .feeds import make_feeds

    return make_feeds(model, n=1, seed=seed, size=sizes, specs=specs)


def probe_model(model, feeds=None):
    """Run ``model`` once with every intermediate tensor exposed; returns
    ``(feeds, values)`` with the value of every tensor (initializers included)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for o in node.output:
            if o and o not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4          # a size that does not fit is tried quietly
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"onnxruntime cannot load the model: {short_error(e)}") from None
    names = [o.name for o in sess.get_outputs()]
    if feeds is not None:
        tries = [feeds]
    else:                      # the defaults, then every unknown dim at one size
        specs = input_specs(model)
        tries, seen = [], set()
        for s in (None, 32, 64, 128, 320, 16, 8, 4, 2, 1):
            f = sample_feeds(model, sizes=s, specs=specs)
            key = tuple(v.shape for v in f.values())
            if key not in seen:
                seen.add(key)
                tries.append(f)
    err = None
    for f in tries:
        try:
            out = sess.run(names, f)
            vals = dict(zip(names, out))
            vals.update(f)
            return f, vals
        except Exception as e:  # the size did not fit the model; try the next
            err = e if err is None else err
    why = short_error(err)
    if feeds is not None:
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
        raise InputError(f"the model does not run on the given data ({shapes}): {why}") from None
    fed = "; ".join(f"{k}: {v}" for k, v in describe(tries[0]).items())
    raise InputError(f"cannot run the model once to learn its shapes on made-up inputs ({fed}; "
                     f"other sizes for the unknown dims failed too): {why}; "
                     "give sample inputs with --data (an .npz with one array per input name)") from None


# ------------------------------------------------------------------ records
@dataclass
class Space:
    """A set of nodes made by one op: ``start .. start + n``."""

    name: str
    start: int
    n: int
    kind: str                 # input, linear, factor, norm, stats, reduce, gate, cell, hidden, barrier, const
    node: str = ""            # the ONNX node that made it
    weight: str | None = None  # the weight initializer of a linear op
    level: int = 0

    @property
    def ids(self):
        return np.arange(self.start, self.start + self.n)


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


class _Builder:
    def __init__(self, model, label, feeds=None, probe=None, input_axis="last"):
        self.model = model
        self.input_axis = input_axis
        self.label = label
        g = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for node in g.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = self._constant_value(node)
        self.n_params = int(sum(v.size for v in self.consts.values() if v.dtype.kind == "f"))
        self.feeds, self.values = probe if probe is not None else probe_model(model, feeds)
        for k, v in self.consts.items():
            self.values.setdefault(k, v)
        self.shapes = {k: list(np.shape(v)) for k, v in self.values.items()}
        self.n = 0
        self.spaces = []
        self.space_of = []
        self.init_key = []        # per node: initial class key
        self.keep = []
        self.blocks = []
        self.layout = {}          # stream tensor -> ids
        self.meta = set()
        self.records = []
        self._tagged = 0          # records[:_tagged] carry the index of their ONNX node
        self.node_index = None
        self.barriers = []
        self.ops = []
        self.datameta = set()     # integer tensors computed from integer graph inputs
        self.joins = []           # (ids, ids): nodes that sit at the same positions (element-wise)
        self.computed = set()     # float constants computed from shapes (their value is the probe's)
        self.cyclic = set()
        self.consumers = {}
        for node in g.node:
            for x in node.input:
                if x:
                    self.consumers.setdefault(x, []).append(node)

    def _constant_value(self, node):
        a = _attrs(node)
        if "value" in a:
            return numpy_helper.to_array(a["value"])
        for k in ("value_float", "value_int", "value_floats", "value_ints"):
            if k in a:
                return np.array(a[k])
        raise InputError(f"{self.label}: Constant node {node.name!r} holds no tensor value")

    # ------------------------------------------------------------ nodes
    def new_space(self, n, kind, node="", weight=None, key=None, distinct=False, level=None):
        s = Space(name=f"{node}:{kind}" if node else kind, start=self.n, n=int(n), kind=kind,
                  node=node, weight=weight)
        if level is None:
            level = len(self.spaces) + 1
        s.level = level
        self.spaces.append(s)
        sid = len(self.spaces) - 1
        self.space_of.extend([sid] * s.n)
        if distinct:
            self.init_key.extend([("distinct", s.start + k) for k in range(s.n)])
        else:
            self.init_key.extend([("space", sid, None if key is None else key[k]) for k in range(s.n)])
        self.keep.extend([False] * s.n)
        self.n += s.n
        return s

    def const_node(self, node):
        return self.new_space(1, "const", node, distinct=True, level=0).start

    def dense(self, src, dst, W, name):
        W = np.asarray(W, dtype=np.float64)
        if W.ndim == 2:
            W = W[:, :, None]
        self.blocks.append(Block(src=np.asarray(src), dst=np.asarray(dst), weight=W, name=name))

    def sparse(self, src, dst, values, etype, name):
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if src.size == 0:
            return
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1:
            v = v[:, None]
        et = np.broadcast_to(np.asarray(etype, dtype=np.int64), (src.size,))
        us, cs = np.unique(src, return_inverse=True)
        ud, rs = np.unique(dst, return_inverse=True)
        self.blocks.append(Block(src=us, dst=ud, rows=rs, cols=cs, values=v, etype=et.copy(), name=name))

    def fresh_layout(self, tname, node, distinct=True, kind="barrier", like=None):
        """New distinct nodes for an input or a tensor we cannot follow: the unit
        axis is axis 1 for images (rank 4+) and rank 2; for rank 3 the last axis
        (batch, time, features) or axis 1 (batch, channels, time), whichever
        the importer was asked for (it tries both)."""
        shp = self.shapes.get(tname)
        if shp is None or len(shp) == 0:
            s = self.new_space(1, kind, node, distinct=distinct)
            self.layout[tname] = np.array(s.start).reshape(())
            return s
        ax = 0 if len(shp) == 1 else 1
        if kind == "input" and self.input_axis == "none":
            s = self.new_space(1, kind, node, distinct=distinct)
            self.layout[tname] = np.array(s.start).reshape([1] * len(shp))
            return s
        if len(shp) == 3 and self.input_axis == "last" and kind == "input":
            ax = 2
        if like is not None and like.ndim == len(shp) and len(_unit_axes_of(like)) == 1:
            ax = _unit_axes_of(like)[0]
        n = int(shp[ax])
        s = self.new_space(n, kind, node, distinct=distinct)
        ids = s.ids.reshape([n if k == ax else 1 for k in range(len(shp))])
        self.layout[tname] = ids
        return s

    # ------------------------------------------------------------ walk
    def kind(self, name):
        if not name:
            return "none"
        if name in self.layout:
            return "stream"
        if name in self.meta:
            return "meta"
        if name in self.consts:
            return "const"
        return "unknown"

    def run(self):
        g = self.model.graph
        self.inputs = []
        for vi in g.input:
            if vi.name in self.consts:
                continue
            v = self.values[vi.name]
            if v.dtype.kind != "f":
                self.meta.add(vi.name)     # integer inputs (token ids, sample rates): data, not units
                self.datameta.add(vi.name)
                continue
            self.inputs.append(vi.name)
            self.fresh_layout(vi.name, "", distinct=True, kind="input")
        for i, node in enumerate(g.node):
            self._tag_records()
            self.node_index = i
            if node.op_type == "Constant":
                continue
            name = _nodename(node, i)
            kinds = [self.kind(x) for x in node.input]
            outer = _outer_refs(node)
            if outer:
                # control flow: a barrier, whatever its bodies read from this graph
                why = "control flow (subgraph)"
                self.ops.append((name, node.op_type, self.barrier(node, i, name, why, extra=outer)))
                continue
            if "stream" not in kinds:
                if any(x in self.datameta for x in node.input):
                    try:
                        role = self._from_data(node, i, name, kinds)
                    except _Barrier as b:
                        role = self.barrier(node, i, name, str(b))
                    self.ops.append((name, node.op_type, role))
                    continue
                role = self._const_or_meta(node, kinds)
                self.ops.append((name, node.op_type, role))
                continue
            try:
                role = self.map_node(node, i, name, kinds)
            except _Barrier as b:
                role = self.barrier(node, i, name, str(b))
            self.ops.append((name, node.op_type, role))
        self._tag_records()
        if not self.layout:
            raise InputError(f"{self.label}: no floating-point tensor depends on the model's inputs")
        self.outputs = [o.name for o in g.output]
        for o in self.outputs:
            if o in self.layout:
                self.mark_keep(self.layout[o])
        return self

    def _tag_records(self):
        """New records get ``index``: the position of their node in the graph
        (the writer finds nodes by it; names may be empty or repeated)."""
        for rec in self.records[self._tagged:]:
            rec.setdefault("index", self.node_index)
        self._tagged = len(self.records)

    def _from_data(self, node, i, name, kinds):
        """Ops on integer data inputs: an embedding lookup (Gather from a constant
        float table) makes one node per embedding feature reading a one-hot node
        per table row; other float results are new distinct inputs."""
        out = node.output[0]
        v = self.values.get(out)
        if node.op_type == "Gather" and kinds[0] == "const" and node.input[1] in self.datameta and \
                int(_attrs(node).get("axis", 0)) == 0 and np.asarray(self.consts[node.input[0]]).dtype.kind == "f":
            T = np.asarray(self.consts[node.input[0]], dtype=np.float64)
            if T.ndim != 2:
                raise _Barrier("embedding table of rank != 2")
            vocab = self.new_space(T.shape[0], "input", name + ":vocab", distinct=True, level=0)
            s = self.new_space(T.shape[1], "linear", name, weight=node.input[0])
            self.dense(vocab.ids, s.ids, T.T, node.input[0])
            shape = [1] * len(self.shapes[out])
            shape[-1] = T.shape[1]
            self.layout[out] = s.ids.reshape(shape)
            self.records.append({"kind": "embedding", "node": node.name, "weight": node.input[0],
                                 "space": len(self.spaces) - 1, "output": out})
            return "embedding"
        if v is not None and np.asarray(v).dtype.kind == "f":
            self.fresh_layout(out, name, distinct=True, kind="input")
            return "input"
        for o in node.output:
            if o:
                self.meta.add(o)
                self.datameta.add(o)
        return "data"

    def _const_or_meta(self, node, kinds):
        if node.op_type in META or "meta" in kinds or "unknown" in kinds:
            outs = [o for o in node.output if o]
            vals = [self.values.get(o) for o in outs]
            if node.op_type not in META and vals and all(v is not None and np.asarray(v).dtype.kind == "f"
                                                         for v in vals):
                # a float tensor computed from shapes (zero initial states, a scale
                # from a head size): a constant, its value from the probe
                for o, v in zip(outs, vals):
                    self.consts[o] = np.asarray(v)
                    self.computed.add(o)
                return "constant"
            for o in outs:
                self.meta.add(o)
            return "shape"
        derived = any(x in self.computed for x in node.input)
        for o in node.output:
            if o and o in self.values:
                self.consts[o] = self.values[o]
                if derived:
                    self.computed.add(o)
        return "constant"

    def mark_keep(self, ids):
        ids = np.asarray(ids).reshape(-1)
        ids = ids[ids >= 0]
        for k in np.unique(ids):
            self.keep[k] = True

    def barrier(self, node, i, name, why, extra=()):
        covered = 0
        like = next((self.layout[x] for x in node.input if x in self.layout), None)
        for x in list(node.input) + [x for x in extra if x not in node.input]:
            if x in self.layout:
                self.mark_keep(self.layout[x])
            elif x in self.consts and np.asarray(self.consts[x]).dtype.kind == "f":
                covered += int(np.asarray(self.consts[x]).size)
        for o in node.output:
            if o:
                if o in self.values and np.asarray(self.values[o]).dtype.kind == "f":
                    self.fresh_layout(o, name, distinct=True, kind="barrier", like=like)
                else:
                    self.meta.add(o)
        from .onnx_load import _float_tensors

        inside = []
        for at in node.attribute:                 # weights inside control-flow bodies
            for g in ([at.g] if at.type == onnx.AttributeProto.GRAPH else
                      list(at.graphs) if at.type == onnx.AttributeProto.GRAPHS else []):
                _float_tensors(g, inside)
        covered += sum(k for _, k in inside)
        self.barriers.append({"node": name, "op": node.op_type, "why": why, "params": covered})
        return "barrier"

    # ------------------------------------------------------------ rules
    def map_node(self, node, i, name, kinds):
        op = node.op_type
        a = _attrs(node)
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            raise _Barrier("control flow (subgraph)")
        if op in META:
            for o in node.output:
                self.meta.add(o)
            return "shape"
        out = node.output[0]
        x = node.input[0]
        if op in ALIAS or (op in UNARY and op not in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization")):
            if op == "Dropout" and len(node.output) > 1 and node.output[1] in self.consumers:
                raise _Barrier("Dropout mask is used")
            self.layout[out] = self.layout[x]
            return "activation"
        if op in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization"):
            return self.softmax(node, name, a)
        if op in MOVE:
            return self.move(node, name, kinds)
        if op in POOL:
            return self.pool(node, name, kinds)
        if op in ELEMWISE:
            return self.elementwise(node, name, kinds)
        if op in REDUCE:
            return self.reduce(node, name, a)
        if op in ("MatMul", "Gemm"):
            return self.matmul(node, name, a, kinds)
        if op in ("Conv", "ConvTranspose"):
            return self.conv(node, name, a, kinds)
        if op == "BatchNormalization" or op == "InstanceNormalization":
            return self.channel_norm(node, name, a, kinds)
        if op == "LayerNormalization":
            return self.layernorm(node, name, a, kinds)
        if op in RECURRENT:
            from .onnx_dag_rnn import map_recurrent
            return map_recurrent(self, node, name, a, kinds)
        if op == "Attention":
            return self.attention(node, name, a, kinds)
        raise _Barrier(f"op {op} is not supported")

    # movement: apply the op to the id arrays with the reference evaluator
    def move(self, node, name, kinds):
        from onnx.reference import ReferenceEvaluator

        ins, feeds = [], {}
        for k, x in enumerate(node.input):
            if not x:
                ins.append("")
                continue
            nm = f"i{k}"
            ins.append(nm)
            if kinds[k] == "stream":
                ids = self.layout[x]
                full = self.shapes[x]
                feeds[nm] = np.ascontiguousarray(np.broadcast_to(ids + 1, full)).astype(np.int64)
            else:
                v = self.values.get(x, self.consts.get(x))
                if v is None:
                    raise _Barrier(f"operand {x!r} has no value")
                v = np.asarray(v)
                if k == 0 or (node.op_type == "Concat") or (node.op_type == "Where"):
                    v = np.zeros(v.shape, np.int64)      # data operands that are constants: no node
                feeds[nm] = v
        outs = [f"o{k}" for k in range(len(node.output))]
        sub = onnx.helper.make_node(node.op_type, ins, outs, **_attrs(node))
        gi = [onnx.helper.make_tensor_value_info(nm, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
              for nm, v in feeds.items()]
        go = [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs]
        gm = onnx.helper.make_model(onnx.helper.make_graph([sub], "move", gi, go),
                                    opset_imports=self.model.opset_import)
        try:
            res = ReferenceEvaluator(gm).run(None, feeds)
        except Exception as e:
            raise _Barrier(f"cannot follow units through {node.op_type} ({short_error(e, 200)})")
        for o, r in zip(node.output, res):
            if not o:
                continue
            r = np.asarray(r).astype(np.int64) - 1
            if list(r.shape) != list(self.shapes.get(o, r.shape)):
                raise _Barrier(f"{node.op_type} layout shape mismatch")
            if (r < 0).any():
                if (r >= 0).any():
                    raise _Barrier("mixes constants into the units")
                raise _Barrier("moves no units")
            self.layout[o] = _collapse(r)
        if node.op_type in ("Gather", "Slice", "Split") and len(_unit_axes_of(self.layout[node.input[0]])) > 1:
            self._packed_cut(node)
        return "shape"

    # a packed projection (attention's in_proj: q, k, v as one MatMul) cut into parts
    PACK_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten")

    def _packed_cut(self, node):
        """An output of a Gather/Slice/Split with ONE unit axis, cut from a tensor
        with several (torch's packed in_proj reshaped to (..., 3, d) and Gathered),
        that equals a contiguous slice of an earlier tensor with one unit axis
        (reached back through Reshape/Transpose/Squeeze/Unsqueeze) is recorded
        as ``packed``: the writer reads it as a Slice of that tensor, so q, k and
        v keep their own sizes instead of equal ones.  The equality is checked
        on an integer probe of the source's concrete shape (every position and
        unit labelled), not assumed from the op pattern."""
        from onnx.reference import ReferenceEvaluator

        producer = {o: n for n in self.model.graph.node for o in n.output if o}
        chain, region, t = [node], [], node.input[0]
        for _ in range(16):
            ua = _unit_axes_of(self.layout[t])
            if len(ua) <= 1:
                break
            p = producer.get(t)
            if p is None or p.op_type not in self.PACK_OPS or not p.name or \
                    any(self.kind(x) == "stream" for x in p.input[1:]):
                return
            region.append(t)
            chain.insert(0, p)
            t = p.input[0]
        src = t
        ua = _unit_axes_of(self.layout[src])
        if len(ua) != 1 or len(region) == 0 or not node.name or src not in self.shapes:
            return
        u = ua[0]
        shape = self.shapes[src]
        inits, seen = [], {src}
        for n in chain:
            for x in n.input:
                if x and x not in seen:
                    seen.add(x)
                    v = self.values.get(x, self.consts.get(x))
                    if v is None:
                        return
                    inits.append(onnx.numpy_helper.from_array(np.asarray(v), x))
        outs = [o for o in node.output if o and o in self.layout and len(_unit_axes_of(self.layout[o])) == 1]
        if not outs:
            return
        gi = [onnx.helper.make_tensor_value_info(src, onnx.TensorProto.INT64, None)]
        go = [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs]
        gm = onnx.helper.make_model(onnx.helper.make_graph(list(chain), "packed", gi, go, initializer=inits),
                                    opset_imports=self.model.opset_import)
        P = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        try:
            res = ReferenceEvaluator(gm).run(None, {src: P})
        except Exception:
            return
        for o, Y in zip(outs, res):
            Y = np.asarray(Y)
            if Y.ndim != P.ndim or Y.size == 0 or _unit_axes_of(self.layout[o]) != [u]:
                continue
            a = int(np.unravel_index(int(Y.reshape(-1)[0]), P.shape)[u])
            b = a + Y.shape[u]
            if b > P.shape[u] or not np.array_equal(Y, np.take(P, np.arange(a, b), axis=u)):
                continue
            self.records.append({"kind": "packed", "node": node.name, "output": o, "source": src, "axis": u,
                                 "start": a, "end": b, "region": list(region),
                                 "chain": [n.name for n in chain]})

    def pool(self, node, name, kinds):
        x = node.input[0]
        ids = self.layout[x]
        op = node.op_type
        if op in ("Resize", "Upsample", "Pad"):
            # act on positional axes only: every unit axis must keep its size
            shp_in, shp_out = self.shapes[x], self.shapes[node.output[0]]
            if len(shp_in) != len(shp_out) or any(ids.shape[k] > 1 and shp_in[k] != shp_out[k]
                                                  for k in range(len(shp_in))):
                raise _Barrier(f"{op} changes a unit axis")
            if op == "Pad" and len(node.input) > 2 and node.input[2]:
                c = np.asarray(self.values.get(node.input[2], 0))
                if c.size > 1:
                    raise _Barrier("Pad with a tensor value")
            self.layout[node.output[0]] = ids
            return "pool"
        if ids.ndim < 3 or any(ids.shape[k] > 1 for k in range(ids.ndim) if k != 1):
            raise _Barrier(f"{op} over a tensor whose units are not on axis 1")
        self.layout[node.output[0]] = ids
        if len(node.output) > 1 and node.output[1]:
            self.meta.add(node.output[1])
        return "pool"

    def softmax(self, node, name, a):
        x = node.input[0]
        ids = self.layout[x]
        ax = int(a.get("axis", -1))
        ax = ax + ids.ndim if ax < 0 else ax
        opset = _opset(self.model)
        axes = [ax] if (node.op_type != "LpNormalization" and opset >= 13) or node.op_type == "LpNormalization" \
            else list(range(ax, ids.ndim))
        if all(ids.shape[k] == 1 for k in axes):
            self.layout[node.output[0]] = ids
            return "activation"
        if node.op_type not in ("Softmax", "LogSoftmax"):
            raise _Barrier(f"{node.op_type} over a unit axis")
        if len(axes) != 1:
            raise _Barrier("softmax over several unit axes")
        # out_e = f(x_e, sum_k exp(x_k)): a denominator node per remaining position
        den_ids, den = self._reduce_nodes(ids, axes, "softmax", name, weight="count")
        self.records.append({"kind": "softmax", "node": node.name, "op": node.op_type, "input": x,
                             "output": node.output[0], "axis": axes[0]})
        return self._combine([ids, den_ids], node.output[0], name, ("softmax", node.op_type), kind="norm")

    def _reduce_nodes(self, ids, axes, what, name, weight="mean"):
        """Nodes summarising ``ids`` over ``axes`` (kept as size-1 axes)."""
        moved = np.moveaxis(ids, axes, list(range(ids.ndim - len(axes), ids.ndim)))
        keep_shape = moved.shape[:ids.ndim - len(axes)]
        flat = moved.reshape(int(np.prod(keep_shape)) if keep_shape else 1, -1)
        s = self.new_space(flat.shape[0], "stats" if what != "reduce" else "reduce", name)
        L = flat.shape[1]
        dst = np.repeat(s.ids, L)
        w = np.full(dst.size, 1.0 / L if weight == "mean" else 1.0)
        self.sparse(flat.reshape(-1), dst, w, _etype(what, name if what == "reduce" else ""), f"{name}:{what}")
        out_shape = [1 if k in axes else ids.shape[k] for k in range(ids.ndim)]
        return s.ids.reshape(out_shape), s

    def reduce(self, node, name, a):
        x = node.input[0]
        ids = self.layout[x]
        if len(node.input) > 1 and node.input[1]:
            axes = [int(v) for v in np.asarray(self.values[node.input[1]]).reshape(-1)]
        else:
            axes = list(a.get("axes", [])) or list(range(ids.ndim))
        axes = sorted({k + ids.ndim if k < 0 else k for k in axes})
        keepdims = int(a.get("keepdims", 1))
        unit_axes = [k for k in axes if ids.shape[k] > 1]
        if not unit_axes:
            out = ids if keepdims else np.squeeze(ids, axis=tuple(axes))
            self.layout[node.output[0]] = out
            return "pool"
        op = node.op_type
        kind = {"ReduceMean": "mean", "ReduceSum": "sum"}.get(op, op)
        rid, _ = self._reduce_nodes(ids, axes, "reduce", f"{name}", weight="mean" if op == "ReduceMean" else "count")
        if op in ("ReduceMax", "ReduceMin"):
            # depends on the set of values only; re-key the edges as unit weights of their op
            self.blocks[-1].etype[:] = _etype("reduce", op)
            self.blocks[-1].values[:] = 1.0
        out = rid if keepdims else np.squeeze(rid, axis=tuple(axes))
        self.layout[node.output[0]] = out
        self.records.append({"kind": "reduce", "node": node.name, "op": op, "input": x, "axes": axes,
                             "output": node.output[0], "mode": kind})
        return "reduce"

    def _const_vectors(self, c, out_ids):
        """Per element of ``out_ids``: the constant's values along positional axes."""
        c = np.asarray(c, dtype=np.float64)
        full = np.broadcast_shapes(out_ids.shape, c.shape)
        cb = np.broadcast_to(c, full)
        if len(full) != out_ids.ndim:
            raise _Barrier("constant of higher rank than the stream")
        pos = [k for k in range(len(full)) if out_ids.shape[k] == 1]
        cb = np.moveaxis(cb, pos, list(range(len(full) - len(pos), len(full))))
        unit_shape = [full[k] for k in range(len(full)) if k not in pos]
        return cb.reshape(int(np.prod(unit_shape)) if unit_shape else 1, -1)

    def _combine(self, operand_ids, out, name, tag, consts=(), kind="factor", unit_axes=None):
        """Factor nodes: one per distinct tuple of operand nodes (AND rule), plus
        constant edges; ``consts`` = [(slot, array)] broadcast against the result.
        ``unit_axes`` = {axis: length}: axes the constants alone span (a
        per-sample statistic times a per-unit gamma): one node per position there."""
        shape = np.broadcast_shapes(*[o.shape for o in operand_ids])
        for _, c in consts:
            cs = np.shape(c)
            if len(cs) > len(shape):
                raise _Barrier("constant of higher rank than the stream")
        if unit_axes:
            shape = tuple(unit_axes.get(k, d) for k, d in enumerate(shape))
        cols = [np.broadcast_to(o, shape).reshape(-1) for o in operand_ids]
        keys = np.stack(cols, 1)
        if unit_axes:
            idx = np.indices(shape)
            pos = np.ravel_multi_index([idx[k] for k in sorted(unit_axes)], [shape[k] for k in sorted(unit_axes)])
            keys = np.concatenate([keys, pos.reshape(-1, 1)], 1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        # order new nodes by first occurrence
        first = np.full(uniq.shape[0], keys.shape[0])
        np.minimum.at(first, inv, np.arange(inv.size))
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        s = self.new_space(uniq.shape[0], kind, name)
        out_ids = (s.start + rank[inv]).reshape(shape)
        for slot, col in enumerate(cols):
            src = uniq[order, slot]
            self.sparse(src, s.ids, np.ones(s.n), _etype(tag, slot), f"{name}:in{slot}")
            if operand_ids[slot].shape == tuple(shape):       # aligned, not broadcast
                self.joins.append((operand_ids[slot].reshape(-1), out_ids.reshape(-1)))
        for slot, c in consts:
            vec = self._const_vectors(c, out_ids)           # (#elements, P)
            flat = out_ids.reshape(-1)
            # one vector per node: elements of a node are concatenated in order
            by = np.argsort(flat, kind="stable")
            counts = np.bincount(flat - s.start, minlength=s.n)
            if counts.min() != counts.max():
                raise _Barrier("units of unequal multiplicity meet a constant")
            v = vec[by].reshape(s.n, -1)
            cn = self.const_node(name)
            self.sparse(np.full(s.n, cn), s.ids, v, _etype(tag, "const", slot), f"{name}:const{slot}")
        self.layout[out] = out_ids
        return "factor" if len(operand_ids) > 1 else "per-unit"

    def elementwise(self, node, name, kinds):
        op = node.op_type
        streams = [(k, x) for k, x in enumerate(node.input) if kinds[k] == "stream"]
        consts, infinite = [], []
        for k, x in enumerate(node.input):
            if kinds[k] in ("const", "meta"):
                v = np.asarray(self.values.get(x, self.consts.get(x)))
                if v.dtype.kind == "f" and np.any(np.isnan(v)):
                    raise InputError(f"{self.label}: node {name!r} ({op}): constant {x!r} holds NaN")
                if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                    infinite.append(x)
                    v = np.nan_to_num(v, posinf=1e30, neginf=-1e30)   # a finite stand-in for the signature
                consts.append((k, v))
        ids0 = [self.layout[x] for _, x in streams]
        out_ids_shape = np.broadcast_shapes(*[o.shape for o in ids0])
        # axes only a constant spans (every stream has length 1 there, the output
        # more): the constant brings the units (a per-sample rsqrt(var) times a
        # per-unit gamma, in a LayerNorm written out op by op: magika)
        out_shape = tuple(self.shapes[node.output[0]])
        rank_o = len(out_shape)

        def _aligned(sh):
            sh = tuple(sh)
            return (1,) * (rank_o - len(sh)) + sh

        const_axes = {}
        # only where every stream is one node (a per-sample statistic): where a
        # stream has units, a constant along another axis scales positions
        if len(out_ids_shape) == rank_o and all(o.size == 1 for o in ids0):
            st = [_aligned(self.shapes[x]) for _, x in streams]
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
        if same and scalar and len(self.shapes[node.output[0]]) == len(out_ids_shape):
            self.layout[node.output[0]] = np.broadcast_to(ids0[0], out_ids_shape).copy()
            return "activation"
        # constants that vary only along positional axes of every unit are the same for all units
        if same and len(self.shapes[node.output[0]]) == len(out_ids_shape):
            try:
                uniform = all(np.allclose(self._const_vectors(c, np.broadcast_to(ids0[0], out_ids_shape)),
                                          self._const_vectors(c, np.broadcast_to(ids0[0], out_ids_shape))[:1])
                              for _, c in consts)
            except _Barrier:
                uniform = False
            if uniform:
                self.layout[node.output[0]] = np.broadcast_to(ids0[0], out_ids_shape).copy()
                # the constant still spans the unit axis: the writer cuts it to the kept units
                self.records.append({"kind": "elementwise", "node": node.name, "op": op, "output": node.output[0],
                                     "streams": [x for _, x in streams],
                                     "consts": [node.input[k] for k, _ in consts]})
                return "activation"
        if infinite:   # +-inf that varies per unit is a broken bias or scale, not a mask
            raise InputError(f"{self.label}: node {name!r} ({op}): constant {infinite[0]!r} holds NaN or Inf")
        rank = len(self.shapes[node.output[0]])
        ops_ids = [o.reshape((1,) * (rank - o.ndim) + o.shape) for o in ids0]
        consts = [(k, np.asarray(c).reshape((1,) * max(0, rank - np.ndim(c)) + np.shape(c))) for k, c in consts]
        tag = (op, tuple(sorted(_attrs(node).items())) if op != "Where" else ())
        slots = [k for k, _ in streams]
        role = self._combine(ops_ids, node.output[0], name, (tag, tuple(slots)), consts,
                             kind="factor" if len(streams) > 1 else "per-unit", unit_axes=const_axes)
        self.records.append({"kind": "elementwise", "node": node.name, "op": op, "output": node.output[0],
                             "streams": [x for _, x in streams],
                             "consts": [node.input[k] for k, _ in consts]})
        return role

    # linear ops ---------------------------------------------------------
    def matmul(self, node, name, a, kinds):
        op = node.op_type
        A, B = node.input[0], node.input[1]
        if op == "MatMul" and kinds[0] == "stream" and kinds[1] == "stream":
            return self.stream_matmul(node, name)
        if op == "Gemm":
            if kinds[0] != "stream" or kinds[1] != "const":
                raise _Barrier("Gemm whose weight is not constant")
            if a.get("transA", 0):
                raise _Barrier("Gemm with transA=1")
            Bm = np.asarray(self.consts[B], dtype=np.float64)
            W = float(a.get("alpha", 1.0)) * (Bm if a.get("transB", 0) else Bm.T)      # (N, K)
            xi, x_axis = A, 1
        else:
            if kinds[1] == "const" and kinds[0] == "stream":
                Bm = np.asarray(self.consts[B], dtype=np.float64)
                if Bm.ndim != 2:
                    raise _Barrier("MatMul with a weight of rank != 2")
                W = Bm.T
                xi, x_axis = A, -1
            elif kinds[0] == "const" and kinds[1] == "stream":
                Am = np.asarray(self.consts[A], dtype=np.float64)
                if Am.ndim != 2:
                    raise _Barrier("MatMul with a weight of rank != 2")
                W = Am
                xi, x_axis = B, -2
            else:
                raise _Barrier("MatMul operand is neither a stream nor a constant")
        ids = self.layout[xi]
        if ids.ndim < 2 and x_axis == -2:
            raise _Barrier("MatMul of a constant with a vector")
        ax = x_axis + ids.ndim if x_axis < 0 else x_axis
        other_unit = [k for k in range(ids.ndim) if k != ax and ids.shape[k] > 1]
        if np.any(~np.isfinite(W)):
            raise InputError(f"{self.label}: node {name!r} ({op}): weight {B!r} holds NaN or Inf")
        one_unit = ids.size == 1 and self.shapes[xi][ax] == 1      # one feature: (N, 1) @ W (1, n)
        if ids.shape[ax] == 1 and not one_unit:
            # the weight mixes positions (time, space): the same map for every unit
            self.layout[node.output[0]] = ids
            return "positional"
        if other_unit:
            raise _Barrier(f"{op} over a tensor with units on several axes")
        wname = B if xi == A else A
        s = self.new_space(W.shape[0], "linear", name, weight=wname)
        sid = len(self.spaces) - 1
        col_ids = np.moveaxis(ids, ax, -1).reshape(-1)
        if col_ids.size != W.shape[1]:
            raise _Barrier(f"{op} weight of {W.shape[1]} inputs reads {col_ids.size} positions")
        src, Wd = _dedupe_cols(W[:, :, None], col_ids)
        D = Wd.shape[2]
        self.dense(src, s.ids, Wd, wname)
        bias = None
        if op == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = np.asarray(self.values.get(node.input[2], self.consts.get(node.input[2])), dtype=np.float64)
            if c.size not in (1, W.shape[0]):
                raise _Barrier("Gemm bias does not broadcast per unit")
            if not np.all(np.isfinite(c)):
                raise InputError(f"{self.label}: node {name!r} ({op}): bias {node.input[2]!r} holds NaN or Inf")
            bias = float(a.get("beta", 1.0)) * np.broadcast_to(c.reshape(-1), (W.shape[0],))
            cn = self.const_node(name)
            self.sparse(np.full(s.n, cn), s.ids, bias, _etype("bias"), f"{wname}:bias")
        shape = [1] * len(self.shapes[node.output[0]])
        out_ax = ax if op == "Gemm" else (len(shape) - 1 if x_axis == -1 else len(shape) - 2)
        shape[out_ax] = s.n
        self.layout[node.output[0]] = s.ids.reshape(shape)
        self.records.append({"kind": "linear", "node": node.name, "op": op, "input": xi, "weight": wname,
                             "space": sid, "output": node.output[0], "D": D,
                             "x_axis": x_axis, "attrs": a})
        return "layer"

    def stream_matmul(self, node, name):
        A, B = node.input
        ia, ib = self.layout[A], self.layout[B]
        if ia.ndim < 2 or ib.ndim < 2:
            raise _Barrier("MatMul of vectors")
        r = max(ia.ndim, ib.ndim)
        ia = ia.reshape((1,) * (r - ia.ndim) + ia.shape)
        ib = ib.reshape((1,) * (r - ib.ndim) + ib.shape)
        batch = np.broadcast_shapes(ia.shape[:-2], ib.shape[:-2])
        Ka, Kb = ia.shape[-1], ib.shape[-2]
        ia_b = np.broadcast_to(ia, batch + ia.shape[-2:])
        ib_b = np.broadcast_to(ib, batch + ib.shape[-2:])
        M, N = ia.shape[-2], ib.shape[-1]
        if Ka == 1 and Kb == 1:
            # contraction over a positional axis (attention weights @ V): AND of both
            return self._combine([ia_b[..., :, :1], ib_b[..., :1, :]], node.output[0], name,
                                 ("matmul-pos",), kind="factor")
        K = max(Ka, Kb)
        # factors per (batch, m, k, n): (A[b, m, k], B[b, k, n]); output node per (batch, m, n)
        fa = np.broadcast_to(ia_b[..., :, :, None], batch + (M, K, N))
        fb = np.broadcast_to(ib_b[..., None, :, :], batch + (M, K, N))
        pairs = np.stack([fa.reshape(-1), fb.reshape(-1)], 1)
        uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
        fs = self.new_space(uniq.shape[0], "factor", name)
        et = _etype("matmul-k", name)
        self.sparse(uniq[:, 0], fs.ids, np.ones(fs.n), _etype("matmul-k", 0), f"{name}:a")
        self.sparse(uniq[:, 1], fs.ids, np.ones(fs.n), _etype("matmul-k", 1), f"{name}:b")
        n_out = int(np.prod(batch + (M, N)))
        os_ = self.new_space(n_out, "linear", name)
        out_of = np.broadcast_to(np.arange(n_out).reshape(batch + (M, 1, N)), batch + (M, K, N)).reshape(-1)
        self.sparse(fs.start + inv.reshape(-1), os_.start + out_of, np.ones(out_of.size), et, f"{name}:sum")
        self.joins.append((fa.reshape(-1), fb.reshape(-1)))
        self.joins.append((fa.reshape(-1), fs.start + inv.reshape(-1)))
        self.layout[node.output[0]] = os_.ids.reshape(batch + (M, N))
        self.records.append({"kind": "contract", "node": node.name, "inputs": [A, B], "output": node.output[0],
                             "a_axis": -1, "b_axis": -2})
        return "factor"

    def conv(self, node, name, a, kinds):
        op = node.op_type
        x = node.input[0]
        if kinds[1] != "const":
            raise _Barrier(f"{op} whose weight is not constant")
        ids = self.layout[x]
        if any(ids.shape[k] > 1 for k in range(ids.ndim) if k != 1):
            raise _Barrier(f"{op} over a tensor whose units are not on axis 1")
        W = np.asarray(self.consts[node.input[1]], dtype=np.float64)
        if np.any(~np.isfinite(W)):
            raise InputError(f"{self.label}: node {name!r} ({op}): weight {node.input[1]!r} holds NaN or Inf")
        group = int(a.get("group", 1))
        cin = ids.reshape(-1)
        if op == "ConvTranspose":
            if group != 1:
                raise _Barrier("grouped ConvTranspose")
            Wu = np.moveaxis(W, 0, 1)                       # (C_out, C_in, k...)
        else:
            Wu = W
        c_out = Wu.shape[0]
        K = int(np.prod(Wu.shape[2:]))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.asarray(self.consts.get(node.input[2], self.values.get(node.input[2])),
                              dtype=np.float64).reshape(-1)
            if not np.all(np.isfinite(bias)):
                raise InputError(f"{self.label}: node {name!r} ({op}): bias {node.input[2]!r} holds NaN or Inf")
        if group == 1:
            if cin.size != Wu.shape[1]:
                raise _Barrier(f"{op} weight expects {Wu.shape[1]} channels, the tensor has {cin.size}")
            s = self.new_space(c_out, "linear", name, weight=node.input[1])
            sid = len(self.spaces) - 1
            src, Wd = _dedupe_cols(Wu.reshape(c_out, cin.size, K), cin)
            self.dense(src, s.ids, Wd, node.input[1])
        elif op == "Conv" and group == cin.size and c_out % group == 0 and Wu.shape[1] == 1:
            # depthwise (one input channel per group, any multiplier): a layer
            # whose output channel o reads input channel o // multiplier, as a
            # sparse block; the writer keeps it depthwise where the base allows
            # it (see onnx_dag_out._Writer.grouped_conv)
            s = self.new_space(c_out, "linear", name, weight=node.input[1])
            sid = len(self.spaces) - 1
            gi, go = cin.size // group, c_out // group
            rows = np.repeat(np.arange(c_out), gi)
            cols = (rows // go) * gi + np.tile(np.arange(gi), c_out)
            self.blocks.append(Block(src=cin, dst=s.ids, rows=rows, cols=cols,
                                     values=Wu.reshape(c_out * gi, K), name=node.input[1]))
        else:
            raise _Barrier(f"grouped {op} (group={group})")
        if bias is not None:
            cn = self.const_node(name)
            self.sparse(np.full(s.n, cn), s.ids, bias, _etype("bias"), f"{node.input[1]}:bias")
        shape = [1] * ids.ndim
        shape[1] = c_out
        self.layout[node.output[0]] = s.ids.reshape(shape)
        depthwise = s.kind == "per-unit"
        self.records.append({"kind": "depthwise" if depthwise else "linear", "node": node.name, "op": op,
                             "input": x, "weight": node.input[1], "space": sid, "output": node.output[0],
                             "x_axis": 1, "attrs": a})
        return "per-unit" if depthwise else "layer"

    def attention(self, node, name, a, kinds):
        """The ONNX ``Attention`` op (opset 23): per head ``h``, score_h =
        sum_j q[h, j] k[g(h), j] (factor nodes per pair, AND rule; ``g`` maps q
        heads to kv heads for grouped-query attention), out[h, e] = AND(score_h,
        v[g(h), e]).  A constant mask enters each head's score as constant edges."""
        Q, K, V = node.input[:3]
        if any(kinds[k] != "stream" for k in range(3)):
            raise _Barrier("Attention whose q, k or v is not computed from the input")
        if len(node.input) > 4 and any(node.input[4:]):
            raise _Barrier("Attention with a key/value cache")
        if any(o for o in node.output[1:]):
            raise _Barrier("Attention whose cache or score outputs are used")
        mask = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if mask and kinds[3] == "stream":
            raise _Barrier("Attention with a computed mask")
        iq, ik, iv = (self.layout[x] for x in (Q, K, V))
        four = iq.ndim == 4
        if four:
            if any(t.shape[0] != 1 or t.shape[2] != 1 for t in (iq, ik, iv)):
                raise _Barrier("Attention inputs with units on the batch or sequence axes")
            q, k, v = (np.broadcast_to(t[0, :, 0, :], (self.shapes[x][1], self.shapes[x][3]))
                       for t, x in ((iq, Q), (ik, K), (iv, V)))
        else:
            hq, hkv = int(a.get("q_num_heads", 0)), int(a.get("kv_num_heads", 0))
            if not hq or not hkv or any(t.shape[0] != 1 or t.shape[1] != 1 for t in (iq, ik, iv)):
                raise _Barrier("3-D Attention without head counts, or with units on the sequence axis")
            q, k, v = (np.broadcast_to(t.reshape(-1), (self.shapes[x][2],)).reshape(h, -1)
                       for t, x, h in ((iq, Q, hq), (ik, K, hkv), (iv, V, hkv)))
        Hq, dh = q.shape
        Hkv, dv = v.shape
        if Hq % Hkv or k.shape != (Hkv, dh):
            raise _Barrier("Attention head counts or sizes do not match")
        grp = np.arange(Hq) // (Hq // Hkv)
        kq = k[grp]                                            # (Hq, dh): the k each q head reads
        tag = ("attention", int(a.get("is_causal", 0)), float(a.get("scale", 0.0)), float(a.get("softcap", 0.0)))
        pairs = np.stack([q.reshape(-1), kq.reshape(-1)], 1)
        uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        fs = self.new_space(uniq.shape[0], "factor", name)
        self.sparse(uniq[:, 0], fs.ids, np.ones(fs.n), _etype(tag, "q"), f"{name}:q")
        self.sparse(uniq[:, 1], fs.ids, np.ones(fs.n), _etype(tag, "k"), f"{name}:k")
        sc = self.new_space(Hq, "stats", name)
        self.sparse(fs.start + inv, np.repeat(sc.ids, dh), np.ones(inv.size), _etype(tag, "score"), f"{name}:score")
        if mask:
            mv = np.asarray(self.values[mask], dtype=np.float64)
            mv = np.nan_to_num(mv, posinf=1e30, neginf=-1e30)
            full = np.broadcast_to(mv, (1, Hq) + tuple(self.shapes[mask][-2:])) if mv.ndim >= 2 else None
            if full is None:
                raise _Barrier("Attention mask of rank < 2")
            cn = self.const_node(name)
            self.sparse(np.full(Hq, cn), sc.ids, full.reshape(Hq, -1), _etype(tag, "mask"), f"{name}:mask")
        self.joins.append((q.reshape(-1), kq.reshape(-1)))
        self.joins.append((q.reshape(-1), fs.start + inv))
        tmp = f"{name}:heads-out"
        self._combine([sc.ids.reshape(Hq, 1), v[grp]], tmp, name, tag + ("out",), kind="factor")
        out = self.layout.pop(tmp)
        self.layout[node.output[0]] = out.reshape(1, Hq, 1, dv) if four else out.reshape(1, 1, Hq * dv)
        # heads x head dims as tensors of their own: every head keeps the same size
        self.layout[f"{name}:q-heads"] = np.ascontiguousarray(q)
        self.layout[f"{name}:kv-heads"] = np.ascontiguousarray(k)
        self.layout[f"{name}:v-heads"] = np.ascontiguousarray(v)
        self.records.append({"kind": "attention", "node": node.name, "q": Q, "heads": f"{name}:q-heads",
                             "four": four, "dh": dh})
        return "attention"

    def channel_norm(self, node, name, a, kinds):
        """BatchNormalization / InstanceNormalization: one per-unit node per
        channel (axis 1) reading its channel, with the channel's parameters as a
        constant edge, so that a fiber's channels must share them (the base keeps
        one entry per group; see ``onnx_dag_out._Writer.channel_norm``).

        BatchNormalization with running statistics (inference) is the affine map
        ``mul * x + add`` with ``mul = scale / sqrt(var + epsilon)`` and
        ``add = B - mul * mean``: the edge carries ``(mul, add)``, so channels
        whose raw (scale, B, mean, var) differ but whose maps agree are one
        fiber, and with eps > 0 the maps are clustered (with their layer's
        criterion, DESIGN.md section 5).  In training mode (``training_mode=1``,
        or running-statistics outputs before opset 14) each channel is
        normalised by its own batch statistics, a function of that channel
        alone, so the edge carries ``(scale, B)``; the running-statistics
        outputs must be unused (they would be a second stream).  InstanceNorm:
        per-sample statistics of the channel, the edge carries ``(scale, B)``."""
        x = node.input[0]
        ids = self.layout[x]
        if node.op_type == "BatchNormalization":
            if not int(a.get("spatial", 1)):
                raise _Barrier("BatchNormalization with spatial=0 (parameters per position)")
            extra = [o for o in node.output[1:] if o]
            if any(o in self.consumers or o in {v.name for v in self.model.graph.output} for o in extra):
                raise _Barrier("BatchNormalization whose running statistics are used")
            sc, b, mean, var = (np.asarray(self.values[t], dtype=np.float64).reshape(-1) for t in node.input[1:5])
            training = bool(int(a.get("training_mode", 0)) or (extra and _opset(self.model) < 14))
            if training:
                params = np.stack([sc, b], 1)
            else:
                mul = sc / np.sqrt(var + float(a.get("epsilon", 1e-5)))
                add = b - mul * mean
                params = np.stack([mul, add], 1)
        else:
            training = False
            sc, b = (np.asarray(self.values[t], dtype=np.float64).reshape(-1) for t in node.input[1:3])
            params = np.stack([sc, b], 1)
        if ids.ndim < 2 or any(ids.shape[k] > 1 for k in range(ids.ndim) if k != 1) or ids.shape[1] != params.shape[0]:
            if ids.ndim >= 2 and ids.shape[1] == 1 and np.allclose(params, params[:1]):
                self.layout[node.output[0]] = ids
                return "norm"
            raise _Barrier(f"{node.op_type} over a tensor whose units are not on axis 1")
        shape = [1] * ids.ndim
        shape[1] = params.shape[0]
        s = self.new_space(params.shape[0], "per-unit", name)
        self.sparse(ids.reshape(-1), s.ids, np.ones(s.n), _etype(node.op_type, "x"), f"{name}:x")
        self.joins.append((ids.reshape(-1), s.ids))
        cn = self.const_node(name)
        self.sparse(np.full(s.n, cn), s.ids, params, _etype(node.op_type, "p"), f"{name}:params")
        self.layout[node.output[0]] = s.ids.reshape(shape)
        self.records.append({"kind": "channel_norm", "node": node.name, "op": node.op_type, "input": x,
                             "output": node.output[0], "training": training,
                             "epsilon": float(a.get("epsilon", 1e-5))})
        return "norm"

    def layernorm(self, node, name, a, kinds):
        x = node.input[0]
        ids = self.layout[x]
        ax = int(a.get("axis", -1))
        ax = ax + ids.ndim if ax < 0 else ax
        axes = list(range(ax, ids.ndim))
        gam = np.asarray(self.values[node.input[1]], dtype=np.float64)
        bet = np.asarray(self.values[node.input[2]], dtype=np.float64) if len(node.input) > 2 and node.input[2] \
            else np.zeros_like(gam)
        if any(o for o in node.output[1:]):
            raise _Barrier("LayerNormalization with mean/inv-std outputs")
        if all(ids.shape[k] == 1 for k in axes):
            self.layout[node.output[0]] = ids
            return "norm"
        stat_ids, _ = self._reduce_nodes(ids, axes, "layernorm", name)
        rank = ids.ndim
        g = gam.reshape((1,) * (rank - gam.ndim) + gam.shape)
        b = bet.reshape((1,) * (rank - bet.ndim) + bet.shape)
        role = self._combine([ids, stat_ids], node.output[0], name, ("layernorm", float(a.get("epsilon", 1e-5))),
                             consts=[(1, g), (2, b)], kind="norm")
        self.records.append({"kind": "layernorm", "node": node.name, "input": x, "axes": axes,
                             "output": node.output[0]})
        return role


class _Barrier(Exception):
    pass


def _opset(model):
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 13


def _outer_refs(node):
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
            refs |= {x for x in _outer_refs(n) if x not in local}
            local.update(o for o in n.output if o)
        refs.update(o.name for o in g.output if o.name not in local)
    return refs if graphs else set()


def _unit_axes_of(ids):
    return [k for k in range(ids.ndim) if ids.shape[k] > 1]


def _collapse(r):
    """Shrink every axis along which the ids do not vary to size 1."""
    for k in range(r.ndim):
        if r.shape[k] > 1 and np.all(r == r.take([0], axis=k)):
            r = r.take([0], axis=k)
    return np.ascontiguousarray(r)


def _rank_of(col_ids, uniq):
    """Index in ``uniq`` (ordered by first occurrence) of every entry of ``col_ids``."""
    lookup = {int(u): k for k, u in enumerate(uniq)}
    return np.array([lookup[int(c)] for c in col_ids], dtype=np.int64)


def _dedupe_cols(W, col_ids):
    """(n_out, L, K) weights over positions with node ids -> (src nodes, (n_out, n_src, D*K))."""
    col_ids = np.asarray(col_ids).reshape(-1)
    uniq, first = np.unique(col_ids, return_index=True)
    uniq = uniq[np.argsort(first, kind="stable")]
    if uniq.size == col_ids.size:
        return col_ids, W
    r = _rank_of(col_ids, uniq)
    counts = np.bincount(r)
    if counts.min() != counts.max():
        raise _Barrier("a layer reads units with unequal numbers of positions")
    pos = np.argsort(r, kind="stable")
    return uniq, W[:, pos].reshape(W.shape[0], uniq.size, -1)


def _ties(joins, node_level, space_of, n):
    """Column id per node for joint clustering (-1: none): connected components
    of the joins whose two ends lie in one level (the gates, cell and hidden
    node of one LSTM/GRU unit: a recurrent op's node sets share its cyclic
    level).  A component with two nodes of one node set is left untied."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    tie = np.full(n, -1, dtype=np.int64)
    if not joins or not n:
        return tie
    a = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p, _ in joins])
    b = np.concatenate([np.asarray(q, dtype=np.int64).reshape(-1) for _, q in joins])
    same = (node_level[a] == node_level[b]) & (a != b)
    if not same.any():
        return tie
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
        rec = next((r for r in b.records if r["kind"] == "linear" and r.get("output") == node.output[0]), None)
        return "linear" if rec is not None and rec.get("input") == x and len(streams) == 1 else "block"
    if role == "positional":                   # a constant weight mixing positions: linear
        return "pass"
    if role == "shape" and op in MOVE:
        return "pass"
    if role == "pool":
        if op == "Pad":
            a = _attrs(node)
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
    if role == "per-unit" and op in ("Add", "Sub") and len(streams) == 1:
        return "affine"
    return "block"


def _homogeneous_spaces(b):
    """Node sets whose values reach every consumer through positively
    homogeneous ops only (DESIGN.md section 4): a linear layer (MatMul, Gemm,
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

    capable = {rec["space"] for rec in b.records if rec["kind"] == "linear" and "weight" in rec}
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
    probe = probe_model(model, feeds)
    # where the inputs' units lie is not written in ONNX: try the layouts a
    # model may mean (features last, channels first, no unit axis: a signal
    # whose samples are positions) and keep the one with the fewest barriers
    choices = ["last", "1", "none"]
    b = None
    for choice in choices:
        alt = _Builder(model, label, probe=probe, input_axis=choice).run()   # bad input fails in any layout
        if b is None or len(alt.barriers) < len(b.barriers):
            b = alt
        if not b.barriers:
            break
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
                        kind=kinds, layer_names=[s.name for s in b.spaces], cyclic=cyclic)
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
                     keep=keep, joins=b.joins, inputs=b.inputs, opset=_opset(model), computed=b.computed, outputs=b.outputs, n_params=b.n_params, space_of=space_of)
