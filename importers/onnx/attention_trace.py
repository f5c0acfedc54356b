"""The graph side of attention detection (:mod:`fibgraph.importers.onnx.attention_blocks`):
the graph's producers and consumers, the structural search for score
MatMul -> Softmax -> PV MatMul candidates, tracing operands back to their
projections and forward to the output projection, and one run of the model
for the concrete shapes and shape values the integer probes need."""
from __future__ import annotations

import numpy as np
import onnx

from . import external
from .load import attrs, ints, tensor_value

__all__ = ["Graph", "Fail", "nodename", "trace_back", "trace_forward", "candidates", "run_path", "needed",
           "evaluate", "SHAPE_OPS", "SCALE_OPS", "BIAS_OPS", "SCORE_PATH", "PROB_PATH"]

# ops a probe passes through unchanged in meaning (only the layout changes)
SHAPE_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Flatten",
             "Expand", "Tile", "Identity", "Cast"}
SCALE_OPS = {"Mul", "Div"}
BIAS_OPS = {"Add", "Sub"}
# between the score MatMul and the Softmax, and between the Softmax and the PV MatMul
SCORE_PATH = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity", "Reshape"}
PROB_PATH = {"Cast", "Identity", "Dropout", "Where", "Reshape"}


# ------------------------------------------------------------------ graph helpers
def nodename(node, i):
    return node.name or f"#{i} {node.op_type}"


class Graph:
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
class Fail(Exception):
    pass


def trace_back(G, t, side):
    """Path from a constant-weight projection to tensor ``t``: (proj, path) with
    proj = dict(node, index, data_in, weight, kind) and path a list of
    (node, data_input_index, output_index) in forward order."""
    path = []
    for _ in range(64):
        n, i, k = G.node_of(t)
        if n is None:
            raise Fail(f"{side} side reaches graph input {t!r} without a projection")
        op = n.op_type
        dins = [j for j, x in enumerate(n.input) if x and G.is_dyn(x)]
        if op == "MatMul":
            if len(dins) == 1 and dins[0] == 0:
                return {"node": n, "index": i, "data": n.input[0], "weight": n.input[1], "kind": "MatMul"}, path[::-1]
            if len(dins) == 1:
                raise Fail(f"{side} side: MatMul {nodename(n, i)!r} has its constant as the first operand")
            raise Fail(f"{side} side: MatMul {nodename(n, i)!r} of two computed tensors, no projection")
        if op == "Gemm":
            a = attrs(n)
            if dins == [0] and not a.get("transA", 0):
                return {"node": n, "index": i, "data": n.input[0], "weight": n.input[1], "kind": "Gemm",
                        "transB": bool(a.get("transB", 0)), "alpha": float(a.get("alpha", 1.0)),
                        "bias": n.input[2] if len(n.input) > 2 and n.input[2] else None}, path[::-1]
            raise Fail(f"{side} side: Gemm {nodename(n, i)!r} is not x @ W with a constant W")
        if op in SHAPE_OPS:
            if dins != [0]:
                raise Fail(f"{side} side: {op} {nodename(n, i)!r} with computed indices or shape")
            path.append((n, 0, k))
            t = n.input[0]
            continue
        if op in SCALE_OPS or op in BIAS_OPS:
            if len(dins) != 1 or len(n.input) != 2 or (op in ("Div", "Sub") and dins[0] != 0):
                why = " (rotary position embedding?)" if len(dins) == 2 else ""
                raise Fail(f"{side} side: {op} {nodename(n, i)!r} of two computed tensors{why}")
            path.append((n, dins[0], k))
            t = n.input[dins[0]]
            continue
        raise Fail(f"{side} side: stopped at {op} {nodename(n, i)!r} (not a projection or shape op)")
    raise Fail(f"{side} side: path too long")


def trace_forward(G, t):
    """Forward from the PV output through shape ops to the output projection."""
    path = []
    for _ in range(64):
        cons = G.consumers.get(t, [])
        if len(cons) != 1:
            raise Fail(f"attention output {t!r} has {len(cons)} consumers")
        i, k = cons[0]
        n = G.nodes[i]
        op = n.op_type
        if op == "MatMul" and k == 0 and not G.is_dyn(n.input[1]):
            return {"node": n, "index": i, "weight": n.input[1], "kind": "MatMul"}, path
        if op == "Gemm" and k == 0 and not G.is_dyn(n.input[1]) and not attrs(n).get("transA", 0):
            return {"node": n, "index": i, "weight": n.input[1], "kind": "Gemm",
                    "transB": bool(attrs(n).get("transB", 0))}, path
        if op in SHAPE_OPS and k == 0 and len(n.output) == 1:
            path.append((n, 0, 0))
            t = n.output[0]
            continue
        raise Fail(f"attention output reaches {op} {nodename(n, i)!r}, not an output projection")
    raise Fail("attention output: path too long")


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


def candidates(G):
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
def _axes(node, vals, G, slot=1):
    a = attrs(node)
    if "axes" in a:
        return list(a["axes"])
    if len(node.input) > slot and node.input[slot]:
        return ints(vals[node.input[slot]])
    return None


def _simulate(G, node, slot, out_k, P, vals):
    """Apply ``node`` to the probe ``P`` (its input ``slot``); other inputs from ``vals``."""
    op = node.op_type
    a = attrs(node)
    if op in ("Identity", "Cast", "Dropout"):
        return P
    if op in SCALE_OPS or op in BIAS_OPS:
        other = vals[node.input[1 - slot]]
        return np.broadcast_to(P, np.broadcast_shapes(P.shape, np.shape(other)))
    if op == "Reshape":
        shape = ints(vals[node.input[1]])
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
            starts, ends = ints(vals[node.input[1]]), ints(vals[node.input[2]])
            axes = ints(vals[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
            steps = ints(vals[node.input[4]]) if len(node.input) > 4 and node.input[4] else None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        sl = [slice(None)] * P.ndim
        for s, e, x, st in zip(starts, ends, axes, steps):
            sl[x % P.ndim] = slice(s, e, st)
        return P[tuple(sl)]
    if op == "Split":
        ax = a.get("axis", 0) % P.ndim
        if len(node.input) > 1 and node.input[1]:
            sizes = ints(vals[node.input[1]])
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
        return np.tile(P, ints(vals[node.input[1]]))
    if op == "Expand":
        return np.broadcast_to(P, np.broadcast_shapes(P.shape, tuple(ints(vals[node.input[1]]))))
    raise Fail(f"cannot evaluate {op} on a probe")


def run_path(G, path, P, vals):
    for node, slot, k in path:
        P = _simulate(G, node, slot, k, P, vals)
    return P


def needed(G, cands):
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
            raise Fail(f"input {v.name!r} is not a tensor")
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dim for d in tt.shape.dim]
        dt = _NP.get(tt.elem_type)
        if dt is None:
            raise Fail(f"input {v.name!r} has an unsupported element type {tt.elem_type}")
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
            v = tensor_value(self.G.inits[k])
            self[k] = v
            return v
        raise KeyError(k)


def evaluate(G, names):
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
            so.log_severity_level = 4      # its errors come back as exceptions
            sess = external.session(m, so)           # a big model's weights read in place
            return _Values(G, {**feeds, **dict(zip(names, sess.run(names, feeds)))})
        except Exception as e:                          # noqa: BLE001 - try the reference evaluator
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        if m.ByteSize() > 200 * 2 ** 20 or external.is_lean(m):   # the reference evaluator would take ages
            continue
        try:
            from onnx.reference import ReferenceEvaluator

            return _Values(G, {**feeds, **dict(zip(names, ReferenceEvaluator(m).run(names, feeds)))})
        except Exception as e:                          # noqa: BLE001
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    from .feeds import short_error

    raise Fail(f"cannot run the model on a made-up input to learn its shapes ({short_error(errors[0])})")
