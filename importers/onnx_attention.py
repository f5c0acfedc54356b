"""Attention blocks of an ONNX graph, found from the graph alone (no module names).

An attention block is recognised by its data flow:

    S = MatMul(Q, K^T)           both operands computed from the input (no constant)
    S -> [Mul/Div by a scale, Add/Where of a mask, Cast, Reshape] -> Softmax -> P
    P -> [Cast, Dropout, Where, Reshape] -> MatMul(P, V)   V computed

Each operand (Q side, K side, V side) is traced back through shape ops
(Reshape, Transpose, Squeeze, Unsqueeze, Gather, Slice, Split, Flatten,
Expand, Tile, Identity, Cast) and element-wise Mul/Div by a scalar or Add/Sub of a
constant bias, to the MatMul or Gemm with a constant weight that produced it
(the projection).  The output of ``MatMul(P, V)`` is traced forward in the same
way to the output projection (W_O).

Which weight column lands where is found numerically, not by pattern: the
chain of shape ops is evaluated in numpy on an integer *probe* holding, at each
element of the projection's output, its flat index.  At every position of the
score MatMul's Q operand the probe then says which projection column (and which
token) it came from; the distinct column sets over the operand's leading
(batch, head) axes are the heads.  The packed ``in_proj`` weight of torch's
``nn.MultiheadAttention`` (both the TorchScript and the dynamo exporter split it
with Reshape / Unsqueeze / Transpose / Squeeze / Gather) needs no special case,
nor does ``K^T`` (the score MatMul contracts Q's last axis with the K operand's
second-to-last axis) or a scale applied to q and k separately.

Concrete shapes and the values of computed shape tensors come from running
the model once (onnxruntime, else ``onnx.reference``) on a made-up input, with
the tensors the probes need added as graph outputs.  Weights are returned
oriented ``(d_in, d_out)`` (``x @ W``): ``W_Q``, ``W_K`` ``(d_model, d_k)``,
``W_V`` ``(d_model, d_v)``, ``W_O`` ``(d_v, d_out)`` per head.  Unsupported
(reported in ``problems``, one line each): fused attention ops (ONNX
``Attention``, ``com.microsoft`` contrib ops), Einsum attention, rotary position
embeddings (an Add of two computed tensors on the Q/K side), weights applied as
batched ``(heads, d, d_k)`` tensors.  Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


__all__ = ["AttentionHead", "AttentionBlock", "find_attention", "attention_metrics",
           "projection_weights", "linear_weights"]

# ops a probe passes through unchanged in meaning (only the layout changes)
SHAPE_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Flatten",
             "Expand", "Tile", "Identity", "Cast"}
SCALE_OPS = {"Mul", "Div"}
BIAS_OPS = {"Add", "Sub"}
# between the score MatMul and the Softmax, and between the Softmax and the PV MatMul
SCORE_PATH = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity", "Reshape"}
PROB_PATH = {"Cast", "Identity", "Dropout", "Where", "Reshape"}
FUSED = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
         "DecoderMaskedMultiHeadAttention", "SparseAttention"}


@dataclass
class AttentionHead:
    """One head: projection slices oriented ``(d_in, d_out)``; ``*_columns`` are
    the columns of the projection weight (as oriented) the head uses, in the
    order of the head's features; ``o_rows`` the rows of ``W_O``."""

    block: int
    head: int
    q_weight: str
    k_weight: str
    q_columns: list
    k_columns: list
    WQ: np.ndarray
    WK: np.ndarray
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    v_weight: str | None = None
    v_columns: list | None = None
    WV: np.ndarray | None = None
    o_weight: str | None = None
    o_rows: list | None = None
    WO: np.ndarray | None = None

    @property
    def name(self):
        base = self.q_weight if self.q_weight == self.k_weight else f"{self.q_weight}+{self.k_weight}"
        return f"{base} head {self.head}"


@dataclass
class AttentionBlock:
    index: int
    score_node: str
    softmax_node: str
    pv_node: str | None
    heads: list = field(default_factory=list)
    q_scale: float = 1.0          # scalar factors applied to q, k and to the scores
    k_scale: float = 1.0
    score_scale: float = 1.0
    masked: bool = False          # something is added to the scores before the Softmax
    notes: list = field(default_factory=list)

    @property
    def scale(self):
        return self.q_scale * self.k_scale * self.score_scale


# ------------------------------------------------------------------ graph helpers
def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _nodename(node, i):
    return node.name or f"#{i} {node.op_type}"


class _Graph:
    def __init__(self, model):
        if model.functions:
            try:
                model = onnx.inliner.inline_local_functions(model)
            except Exception:                                   # pragma: no cover - old onnx
                pass
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = [v for v in g.input if v.name not in self.inits]
        self.producer, self.consumers = {}, {}
        for i, n in enumerate(self.nodes):
            for k, o in enumerate(n.output):
                if o:
                    self.producer[o] = (i, k)
            for k, t in enumerate(n.input):
                if t:
                    self.consumers.setdefault(t, []).append((i, k))
        # data-dependent: depends on the values of a graph input (Shape / Size only on its shape)
        self.dyn = {v.name for v in self.inputs}
        for n in self.nodes:
            if n.op_type in ("Shape", "Size"):
                continue
            if any(t in self.dyn for t in n.input if t):
                self.dyn.update(o for o in n.output if o)

    def is_dyn(self, t):
        return t in self.dyn

    def node_of(self, t):
        p = self.producer.get(t)
        return (None, None, None) if p is None else (self.nodes[p[0]], p[0], p[1])

    def const_name(self, t):
        """A readable name for a constant weight tensor: the initializer itself, or
        the one float initializer it is computed from (Transpose(W), Cast(W)...)."""
        if t in self.inits:
            return t
        seen, stack, found = set(), [t], []
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            if x in self.inits:
                if self.inits[x].data_type in (1, 10, 11, 16) and len(self.inits[x].dims) >= 2:
                    found.append(x)
                continue
            n, _, _ = self.node_of(x)
            if n is not None:
                stack.extend(i for i in n.input if i)
        return found[0] if len(found) == 1 else t


# ------------------------------------------------------------ structural search
class _Fail(Exception):
    pass


def _trace_back(G, t, side):
    """Path from a constant-weight projection to tensor ``t``: (proj, path) with
    proj = dict(node, index, data_in, weight, kind) and path a list of
    (node, data_input_index, output_index) in forward order."""
    path = []
    for _ in range(64):
        n, i, k = G.node_of(t)
        if n is None:
            raise _Fail(f"{side} side reaches graph input {t!r} without a projection")
        op = n.op_type
        dins = [j for j, x in enumerate(n.input) if x and G.is_dyn(x)]
        if op == "MatMul":
            if len(dins) == 1 and dins[0] == 0:
                return {"node": n, "index": i, "data": n.input[0], "weight": n.input[1], "kind": "MatMul"}, path[::-1]
            if len(dins) == 1:
                raise _Fail(f"{side} side: MatMul {_nodename(n, i)!r} has its constant as the first operand")
            raise _Fail(f"{side} side: MatMul {_nodename(n, i)!r} of two computed tensors, no projection")
        if op == "Gemm":
            a = _attrs(n)
            if dins == [0] and not a.get("transA", 0):
                return {"node": n, "index": i, "data": n.input[0], "weight": n.input[1], "kind": "Gemm",
                        "transB": bool(a.get("transB", 0)), "alpha": float(a.get("alpha", 1.0)),
                        "bias": n.input[2] if len(n.input) > 2 and n.input[2] else None}, path[::-1]
            raise _Fail(f"{side} side: Gemm {_nodename(n, i)!r} is not x @ W with a constant W")
        if op in SHAPE_OPS:
            if dins != [0]:
                raise _Fail(f"{side} side: {op} {_nodename(n, i)!r} with computed indices or shape")
            path.append((n, 0, k))
            t = n.input[0]
            continue
        if op in SCALE_OPS or op in BIAS_OPS:
            if len(dins) != 1 or len(n.input) != 2 or (op in ("Div", "Sub") and dins[0] != 0):
                why = " (rotary position embedding?)" if len(dins) == 2 else ""
                raise _Fail(f"{side} side: {op} {_nodename(n, i)!r} of two computed tensors{why}")
            path.append((n, dins[0], k))
            t = n.input[dins[0]]
            continue
        raise _Fail(f"{side} side: stopped at {op} {_nodename(n, i)!r} (not a projection or shape op)")
    raise _Fail(f"{side} side: path too long")


def _trace_forward(G, t):
    """Forward from the PV output through shape ops to the output projection."""
    path = []
    for _ in range(64):
        cons = G.consumers.get(t, [])
        if len(cons) != 1:
            raise _Fail(f"attention output {t!r} has {len(cons)} consumers")
        i, k = cons[0]
        n = G.nodes[i]
        op = n.op_type
        if op == "MatMul" and k == 0 and not G.is_dyn(n.input[1]):
            return {"node": n, "index": i, "weight": n.input[1], "kind": "MatMul"}, path
        if op == "Gemm" and k == 0 and not G.is_dyn(n.input[1]) and not _attrs(n).get("transA", 0):
            return {"node": n, "index": i, "weight": n.input[1], "kind": "Gemm",
                    "transB": bool(_attrs(n).get("transB", 0))}, path
        if op in SHAPE_OPS and k == 0 and len(n.output) == 1:
            path.append((n, 0, 0))
            t = n.output[0]
            continue
        raise _Fail(f"attention output reaches {op} {_nodename(n, i)!r}, not an output projection")
    raise _Fail("attention output: path too long")


def _forward_to(G, t, allowed, target, max_depth=8):
    """First node of type ``target`` reachable from ``t`` through ``allowed`` ops:
    (node, index, input slot, ops passed [(node, index, slot)])."""
    frontier = [(t, [])]
    for _ in range(max_depth):
        nxt = []
        for x, via in frontier:
            for i, k in G.consumers.get(x, []):
                n = G.nodes[i]
                if n.op_type == target:
                    return n, i, k, via
                if n.op_type in allowed and n.output:
                    nxt.append((n.output[0], via + [(n, i, k)]))
        frontier = nxt
    return None


def _candidates(G):
    """Structural candidates: dicts with the score / softmax / PV nodes."""
    out = []
    for i, n in enumerate(G.nodes):
        if n.op_type != "MatMul" or len(n.input) != 2 or not all(G.is_dyn(x) for x in n.input):
            continue
        hit = _forward_to(G, n.output[0], SCORE_PATH, "Softmax")
        if hit is None:
            continue
        sm, si, _, via = hit
        pv = _forward_to(G, sm.output[0], PROB_PATH, "MatMul")
        if pv is not None and (pv[2] != 0 or not G.is_dyn(pv[0].input[1])):
            pv = None
        out.append({"score": n, "score_index": i, "softmax": sm, "softmax_index": si, "score_via": via,
                    "pv": pv[0] if pv else None, "pv_index": pv[1] if pv else None})
    return out


# ------------------------------------------------------------------------ probes
def _ints(v):
    return [int(x) for x in np.asarray(v).reshape(-1)]


def _axes(node, vals, G, slot=1):
    a = _attrs(node)
    if "axes" in a:
        return list(a["axes"])
    if len(node.input) > slot and node.input[slot]:
        return _ints(vals[node.input[slot]])
    return None


def _simulate(G, node, slot, out_k, P, vals):
    """Apply ``node`` to the probe ``P`` (its input ``slot``); other inputs from ``vals``."""
    op = node.op_type
    a = _attrs(node)
    if op in ("Identity", "Cast", "Dropout"):
        return P
    if op in SCALE_OPS or op in BIAS_OPS:
        other = vals[node.input[1 - slot]]
        return np.broadcast_to(P, np.broadcast_shapes(P.shape, np.shape(other)))
    if op == "Reshape":
        shape = _ints(vals[node.input[1]])
        if not a.get("allowzero", 0):
            shape = [P.shape[j] if s == 0 else s for j, s in enumerate(shape)]
        return P.reshape(shape)
    if op == "Transpose":
        return np.transpose(P, a.get("perm", list(range(P.ndim))[::-1]))
    if op == "Squeeze":
        ax = _axes(node, vals, G)
        if ax is None:
            return np.squeeze(P)
        return np.squeeze(P, axis=tuple(x % P.ndim for x in ax))
    if op == "Unsqueeze":
        ax = _axes(node, vals, G)
        r = P.ndim + len(ax)
        for x in sorted(x % r for x in ax):
            P = np.expand_dims(P, x)
        return P
    if op == "Gather":
        return np.take(P, np.asarray(vals[node.input[1]]).astype(np.int64), axis=a.get("axis", 0))
    if op == "Slice":
        if G.opset < 10 and "starts" in a:
            starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
        else:
            starts, ends = _ints(vals[node.input[1]]), _ints(vals[node.input[2]])
            axes = _ints(vals[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
            steps = _ints(vals[node.input[4]]) if len(node.input) > 4 and node.input[4] else None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        sl = [slice(None)] * P.ndim
        for s, e, x, st in zip(starts, ends, axes, steps):
            sl[x % P.ndim] = slice(s, e, st)
        return P[tuple(sl)]
    if op == "Split":
        ax = a.get("axis", 0) % P.ndim
        if len(node.input) > 1 and node.input[1]:
            sizes = _ints(vals[node.input[1]])
        elif "split" in a:
            sizes = list(a["split"])
        else:
            m = a.get("num_outputs", len(node.output))
            step = -(-P.shape[ax] // m)
            sizes = [min(step, P.shape[ax] - step * j) for j in range(m)]
        return np.split(P, np.cumsum(sizes)[:-1], axis=ax)[out_k]
    if op == "Flatten":
        ax = a.get("axis", 1) % (P.ndim + 1) if P.ndim else 0
        return P.reshape(int(np.prod(P.shape[:ax])), -1)
    if op == "Tile":
        return np.tile(P, _ints(vals[node.input[1]]))
    if op == "Expand":
        return np.broadcast_to(P, np.broadcast_shapes(P.shape, tuple(_ints(vals[node.input[1]]))))
    raise _Fail(f"cannot evaluate {op} on a probe")


def _run_path(G, path, P, vals):
    for node, slot, k in path:
        P = _simulate(G, node, slot, k, P, vals)
    return P


def _needed(G, cands):
    """Every tensor the probes need (values or shapes)."""
    need = set()
    for c in cands:
        for side in ("q", "k", "v"):
            if side not in c:
                continue
            proj, path = c[side]
            need.add(proj["node"].output[0])
            need.update(x for x in proj["node"].input if x)
            for n, _, _ in path:
                need.update(x for x in n.input if x)
                need.update(x for x in n.output if x)
        if "o" in c:
            proj, path = c["o"]
            need.update(x for x in proj["node"].input if x)
            for n, _, _ in path:
                need.update(x for x in n.input if x)
        for n, _, _ in c["score_via"]:
            need.update(x for x in n.input if x)
        need.update(c["score"].input)
        need.update(c["score"].output)
        if c["pv"] is not None:
            need.update(c["pv"].input)
            need.update(c["pv"].output)
    return {t for t in need if t not in G.inits}


_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
       10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _feeds(G, dim, rng):
    feeds = {}
    for v in G.inputs:
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            raise _Fail(f"input {v.name!r} is not a tensor")
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dim for d in tt.shape.dim]
        dt = _NP.get(tt.elem_type)
        if dt is None:
            raise _Fail(f"input {v.name!r} has an unsupported element type {tt.elem_type}")
        if np.issubdtype(dt, np.floating):
            feeds[v.name] = rng.standard_normal(shape).astype(dt)
        else:
            feeds[v.name] = np.ones(shape, dtype=dt)
    return feeds


class _Values(dict):
    """Computed values, falling back to the initializers."""

    def __init__(self, G, d):
        super().__init__(d)
        self.G = G

    def __missing__(self, k):
        if k in self.G.inits:
            v = numpy_helper.to_array(self.G.inits[k])
            self[k] = v
            return v
        raise KeyError(k)


def _evaluate(G, names):
    """Values of ``names`` on a made-up input (onnxruntime, else onnx.reference)."""
    names = sorted(set(names) - {v.name for v in G.inputs})
    m = onnx.ModelProto()
    m.CopyFrom(G.model)
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    rng = np.random.default_rng(0)
    errors = []
    for dim in (2, 1, 3):
        feeds = _feeds(G, dim, rng)
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 3
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return _Values(G, {**feeds, **dict(zip(names, sess.run(names, feeds)))})
        except Exception as e:                          # noqa: BLE001 - try the reference evaluator
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        if m.ByteSize() > 200 * 2 ** 20:              # the reference evaluator would take ages
            continue
        try:
            from onnx.reference import ReferenceEvaluator

            return _Values(G, {**feeds, **dict(zip(names, ReferenceEvaluator(m).run(names, feeds)))})
        except Exception as e:                          # noqa: BLE001
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    from .feeds import short_error

    raise _Fail(f"cannot run the model on a made-up input to learn its shapes ({short_error(errors[0])})")


def projection_weights(proj, G, vals):
    """The projection's weight oriented ``(d_in, d_out)`` (``x @ W``), float64."""
    w = proj["weight"]
    W = numpy_helper.to_array(G.inits[w]) if w in G.inits else np.asarray(vals[w])
    if W.ndim != 2:
        raise _Fail(f"projection weight {w!r} has shape {W.shape}, not 2-D")
    if proj.get("transB"):
        W = W.T
    return W.astype(np.float64)


def _scalar(v):
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return float(v[0]) if v.size and np.all(v == v[0]) else None


def _side_scale(G, path, vals, notes, side):
    s = 1.0
    for n, slot, _ in path:
        if n.op_type in SCALE_OPS:
            c = _scalar(_value(G, n.input[1 - slot], vals))
            if c is None:
                notes.append(f"{side} side: non-scalar {n.op_type} by a constant ignored")
                continue
            s = s * c if n.op_type == "Mul" else s / c
    return s


def _value(G, t, vals):
    return numpy_helper.to_array(G.inits[t]) if t in G.inits else np.asarray(vals[t])


def _side_bias(G, proj, path, vals, C):
    """Bias vector (length C) added right after the projection, if any."""
    if proj.get("bias"):
        b = np.asarray(_value(G, proj["bias"], vals), dtype=np.float64)
        if b.size == C:
            return b.reshape(-1)
    for n, slot, _ in path:
        if n.op_type == "Add":
            b = np.asarray(_value(G, n.input[1 - slot], vals), dtype=np.float64)
            return b.reshape(-1) if b.size == C else None
        if n.op_type not in ("Identity", "Cast"):
            return None
    return None


def _probe_columns(G, proj, path, vals, side):
    """(columns, tokens) of the operand: for each element, the projection column
    and the flat token index (position among the projection output's rows)."""
    Y = vals[proj["node"].output[0]]
    C = Y.shape[-1]
    P = np.arange(Y.size, dtype=np.int64).reshape(Y.shape)
    R = _run_path(G, path, P, vals)
    return R % C, R // C, C


def _group_rows(cols, toks, side):
    """Per leading index: the column vector of the operand (…, rows, features);
    every row must hold one token's features, every row the same columns."""
    lead = cols.shape[:-2]
    out = {}
    for idx in np.ndindex(*lead):
        c, t = cols[idx], toks[idx]
        if not (t == t[:, :1]).all():
            raise _Fail(f"{side} operand mixes tokens along its feature axis")
        if not (c == c[:1]).all():
            raise _Fail(f"{side} operand has different projection columns for different tokens")
        out[idx] = tuple(int(x) for x in c[0])
    return out


def _analyse(G, c, vals, bi):
    notes = []
    A = vals[c["score"].input[0]]
    B = vals[c["score"].input[1]]
    if A.ndim < 2 or B.ndim < 2:
        raise _Fail("score MatMul operands are not matrices")
    pq, path_q = c["q"]
    pk, path_k = c["k"]
    qc, qt, Cq = _probe_columns(G, pq, path_q, vals, "Q")
    kc, kt, Ck = _probe_columns(G, pk, path_k, vals, "K")
    if qc.shape != A.shape or kc.shape != B.shape:
        raise _Fail(f"probe shapes {qc.shape}, {kc.shape} differ from the operands' {A.shape}, {B.shape}")
    kc, kt = np.swapaxes(kc, -1, -2), np.swapaxes(kt, -1, -2)        # (…, S_k, d_k)
    lead = np.broadcast_shapes(qc.shape[:-2], kc.shape[:-2])
    bq = lambda X: np.broadcast_to(X, lead + X.shape[-2:])          # noqa: E731
    gq = _group_rows(bq(qc), bq(qt), "Q")
    gk = _group_rows(bq(kc), bq(kt), "K")
    heads, where = [], {}
    for idx in np.ndindex(*lead):
        key = (gq[idx], gk[idx])
        if key not in where:
            where[key] = len(heads)
            heads.append(key)
    head_of = {idx: where[(gq[idx], gk[idx])] for idx in np.ndindex(*lead)}
    WQ_all = projection_weights(pq, G, vals)
    WK_all = projection_weights(pk, G, vals)
    if WQ_all.shape[1] != Cq or WK_all.shape[1] != Ck:
        raise _Fail("projection weight does not match its output width")
    bias_q = _side_bias(G, pq, path_q, vals, Cq)
    bias_k = _side_bias(G, pk, path_k, vals, Ck)
    blk = AttentionBlock(bi, c["score"].name or c["score"].output[0], c["softmax"].name or c["softmax"].output[0],
                         (c["pv"].name or c["pv"].output[0]) if c["pv"] is not None else None)
    blk.q_scale = _side_scale(G, path_q, vals, notes, "Q") * (pq.get("alpha", 1.0))
    blk.k_scale = _side_scale(G, path_k, vals, notes, "K") * (pk.get("alpha", 1.0))
    for n, _, slot in c["score_via"]:
        other = [x for j, x in enumerate(n.input) if j != slot and x]
        if n.op_type in SCALE_OPS and len(other) == 1 and not G.is_dyn(other[0]):
            s = _scalar(_value(G, other[0], vals))
            if s is None:
                notes.append(f"scores: non-scalar {n.op_type} ignored")
            else:
                blk.score_scale *= s if n.op_type == "Mul" else 1.0 / s
        elif n.op_type in ("Add", "Sub", "Where"):
            blk.masked = True
    qn, kn = G.const_name(pq["weight"]), G.const_name(pk["weight"])
    for h, (cq, ck) in enumerate(heads):
        if len(cq) != len(ck):
            raise _Fail("Q and K heads differ in width")
        blk.heads.append(AttentionHead(bi, h, qn, kn, list(cq), list(ck), WQ_all[:, list(cq)], WK_all[:, list(ck)],
                                       None if bias_q is None else bias_q[list(cq)],
                                       None if bias_k is None else bias_k[list(ck)]))
    # V and O: best effort, a failure leaves them None with a note
    try:
        if "v" not in c:
            raise _Fail(c.get("v_error", "no PV MatMul after the Softmax"))
        pv_, path_v = c["v"]
        vc, vt, _ = _probe_columns(G, pv_, path_v, vals, "V")
        Pm = vals[c["pv"].input[0]]
        leadv = np.broadcast_shapes(Pm.shape[:-2], vc.shape[:-2])
        gv = _group_rows(np.broadcast_to(vc, leadv + vc.shape[-2:]), np.broadcast_to(vt, leadv + vt.shape[-2:]), "V")
        WV_all = projection_weights(pv_, G, vals)
        vn = G.const_name(pv_["weight"])
        lead_map = _lead_map(leadv, lead)
        vcols = {}
        for idx, cols in gv.items():
            h = head_of.get(lead_map(idx))
            if h is None or vcols.setdefault(h, cols) != cols:
                raise _Fail("V columns do not follow the Q/K heads")
        for h, hd in enumerate(blk.heads):
            if h in vcols:
                hd.v_weight, hd.v_columns, hd.WV = vn, list(vcols[h]), WV_all[:, list(vcols[h])]
        if "o" not in c:
            raise _Fail(c.get("o_error", "no output projection"))
        po, path_o = c["o"]
        Z = vals[c["pv"].output[0]]
        R = _run_path(G, path_o, np.arange(Z.size, dtype=np.int64).reshape(Z.shape), vals)
        X = vals[po["node"].input[0]]
        if R.shape != X.shape:
            raise _Fail("output-projection probe shape mismatch")
        WO_all = projection_weights(po, G, vals)
        on = G.const_name(po["weight"])
        zlead = Z.shape[:-2]
        zmap = _lead_map(zlead, lead)
        head_arr = np.full(zlead, -1, dtype=np.int64)
        for idx in np.ndindex(*zlead):
            head_arr[idx] = head_of.get(zmap(idx), -1)
        coords = np.unravel_index(R, Z.shape)
        H = head_arr[coords[:-2]].reshape(-1, R.shape[-1])
        F = coords[-1].reshape(-1, R.shape[-1])
        if (H < 0).any() or (H != H[:1]).any() or (F != F[:1]).any():
            raise _Fail("output-projection inputs mix heads or features")
        rows = {}
        for j in range(R.shape[-1]):
            rows.setdefault(int(H[0, j]), {})[int(F[0, j])] = j
        for h, hd in enumerate(blk.heads):
            if h in rows:
                r = [rows[h][f] for f in sorted(rows[h])]
                hd.o_weight, hd.o_rows, hd.WO = on, r, WO_all[r, :]
    except _Fail as e:
        notes.append(f"V/O not recovered: {e}")
    blk.notes = notes
    return blk


def _lead_map(src, dst):
    """Map an index over broadcast-compatible leading shape ``src`` to ``dst``."""
    def f(idx):
        idx = tuple(idx)
        if len(idx) < len(dst):
            idx = (0,) * (len(dst) - len(idx)) + idx
        idx = idx[len(idx) - len(dst):]
        return tuple(0 if d == 1 else i for i, d in zip(idx, dst))
    return f


# ------------------------------------------------------------------ public API
def find_attention(model):
    """Attention blocks of ``model`` (an ``onnx.ModelProto`` or a path).

    Returns ``(blocks, problems)``: a list of :class:`AttentionBlock` (one
    :class:`AttentionHead` per head, with ``WQ``/``WK`` and, where traced, ``WV``/
    ``WO``) and a list of one-line strings for candidate blocks (or fused
    attention ops) that could not be resolved.  A model without attention gives
    ``([], [])`` without being run.
    """
    if not isinstance(model, onnx.ModelProto):
        from .onnx_load import load_onnx

        model = load_onnx(model)
    G = _Graph(model)
    problems = []
    fused = sorted({n.op_type for n in G.nodes if n.op_type in FUSED})
    if fused:
        problems.append(f"fused attention op(s) {', '.join(fused)} not analysed (only decomposed attention is)")
    cands = []
    for c in _candidates(G):
        label = _nodename(c["score"], c["score_index"])
        try:
            c["q"] = _trace_back(G, c["score"].input[0], "Q")
            c["k"] = _trace_back(G, c["score"].input[1], "K")
        except _Fail as e:
            problems.append(f"attention at MatMul {label!r}: {e}")
            continue
        if c["pv"] is not None:
            try:
                c["v"] = _trace_back(G, c["pv"].input[1], "V")
            except _Fail as e:
                c["v_error"] = str(e)
            try:
                c["o"] = _trace_forward(G, c["pv"].output[0])
            except _Fail as e:
                c["o_error"] = str(e)
        cands.append(c)
    if not cands:
        return [], problems
    try:
        vals = _evaluate(G, _needed(G, cands))
    except _Fail as e:
        return [], problems + [f"{len(cands)} attention block(s) found but not resolved: {e}"]
    blocks = []
    for c in cands:
        try:
            blocks.append(_analyse(G, c, vals, len(blocks)))
        except _Fail as e:
            problems.append(f"attention at MatMul {_nodename(c['score'], c['score_index'])!r}: {e}")
        except Exception as e:                          # noqa: BLE001 - an odd graph: report, go on
            problems.append(f"attention at MatMul {_nodename(c['score'], c['score_index'])!r}: "
                            f"not resolved ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return blocks, problems


def attention_metrics(model, thresholds, relative=True, warn_threshold=0.1, warn_fraction=0.25):
    """Double-rotation rows, one per head, for the attention blocks of ``model``.

    Returns ``{"attention": rows, "summary": {...}, "warnings": [...],
    "weights": set of projection weight names covered}``; each row has
    ``layer`` (weight name + head), ``metric`` ("double rotation"), ``n``
    (d_k), ``n_dos`` / ``n_dosb`` per threshold, min / median Delta, and the
    columns of the packed weight it uses.
    """
    from fibgraph.symmetry_metrics import double_rotation_deltas

    thresholds = tuple(float(t) for t in thresholds)
    blocks, problems = find_attention(model)
    rows, warnings, covered = [], list(problems), set()
    keys = [f"{t:g}" for t in thresholds]
    wk = f"{float(warn_threshold):g}"
    seen = {}
    for blk in blocks:
        for hd in blk.heads:
            seen.setdefault(hd.name, set()).add(blk.index)
    for blk in blocks:
        for hd in blk.heads:
            d = double_rotation_deltas(hd.WQ, hd.WK, relative=relative)
            n = int(d.size)
            name = hd.name if len(seen[hd.name]) == 1 else f"{hd.name} (block {blk.index})"
            rec = {"layer": name, "metric": "double rotation", "source": "graph", "block": blk.index,
                   "head": hd.head, "heads": 1, "block_heads": len(blk.heads), "q": hd.q_weight, "k": hd.k_weight,
                   "shape": list(hd.WQ.shape), "n": n, "relative": bool(relative),
                   "n_dos": {k: int((d < t).sum()) for k, t in zip(keys, thresholds)},
                   "n_dosb": {k: n - int((d < t).sum()) for k, t in zip(keys, thresholds)},
                   "min_delta": float(d.min()) if n else None, "median_delta": float(np.median(d)) if n else None,
                   "q_columns": hd.q_columns, "k_columns": hd.k_columns,
                   "v": hd.v_weight, "v_columns": hd.v_columns, "o": hd.o_weight, "o_rows": hd.o_rows,
                   "score_node": blk.score_node, "scale": blk.scale, "masked": blk.masked}
            rows.append(rec)
            covered.update({hd.q_weight, hd.k_weight})
            frac = float((d < warn_threshold).sum()) / n if n else 0.0
            if frac >= warn_fraction:
                warnings.append(f"{name}: {int((d < warn_threshold).sum())} of {n} directions are "
                                f"double-rotation symmetric (Delta < {wk})")
        for note in blk.notes:
            warnings.append(f"attention block {blk.index} ({blk.score_node}): {note}")
    summary = {"blocks": len(blocks), "heads": len(rows), "directions": int(sum(r["n"] for r in rows)),
               "n_dos": {k: int(sum(r["n_dos"][k] for r in rows)) for k in keys}}
    return {"attention": rows, "summary": summary, "warnings": warnings, "weights": covered}


def linear_weights(model):
    """Names of the constant weights of MatMul / Gemm / Conv nodes, in graph order."""
    G = _Graph(model)
    out = []
    for n in G.nodes:
        if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1:
            dyn = [G.is_dyn(x) for x in n.input[:2]]
            if dyn.count(True) == 1:
                w = n.input[dyn.index(False)]
                name = G.const_name(w)
                if name not in out:
                    out.append(name)
    return out
