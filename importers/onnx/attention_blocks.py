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

from .load import tensor_value

from .attention_trace import (SCALE_OPS, Fail, Graph, candidates, evaluate, needed, nodename, run_path,
                              trace_back, trace_forward)

__all__ = ["AttentionHead", "AttentionBlock", "find_attention", "attention_metrics",
           "projection_weights", "linear_weights"]

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



def projection_weights(proj, G, vals):
    """The projection's weight oriented ``(d_in, d_out)`` (``x @ W``), float64."""
    w = proj["weight"]
    W = tensor_value(G.inits[w]) if w in G.inits else np.asarray(vals[w])
    if W.ndim != 2:
        raise Fail(f"projection weight {w!r} has shape {W.shape}, not 2-D")
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
    return tensor_value(G.inits[t]) if t in G.inits else np.asarray(vals[t])


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
    R = run_path(G, path, P, vals)
    return R % C, R // C, C


def _group_rows(cols, toks, side):
    """Per leading index: the column vector of the operand (…, rows, features);
    every row must hold one token's features, every row the same columns."""
    lead = cols.shape[:-2]
    out = {}
    for idx in np.ndindex(*lead):
        c, t = cols[idx], toks[idx]
        if not (t == t[:, :1]).all():
            raise Fail(f"{side} operand mixes tokens along its feature axis")
        if not (c == c[:1]).all():
            raise Fail(f"{side} operand has different projection columns for different tokens")
        out[idx] = tuple(int(x) for x in c[0])
    return out


def _analyse(G, c, vals, bi):
    notes = []
    A = vals[c["score"].input[0]]
    B = vals[c["score"].input[1]]
    if A.ndim < 2 or B.ndim < 2:
        raise Fail("score MatMul operands are not matrices")
    pq, path_q = c["q"]
    pk, path_k = c["k"]
    qc, qt, Cq = _probe_columns(G, pq, path_q, vals, "Q")
    kc, kt, Ck = _probe_columns(G, pk, path_k, vals, "K")
    if qc.shape != A.shape or kc.shape != B.shape:
        raise Fail(f"probe shapes {qc.shape}, {kc.shape} differ from the operands' {A.shape}, {B.shape}")
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
        raise Fail("projection weight does not match its output width")
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
            raise Fail("Q and K heads differ in width")
        blk.heads.append(AttentionHead(bi, h, qn, kn, list(cq), list(ck), WQ_all[:, list(cq)], WK_all[:, list(ck)],
                                       None if bias_q is None else bias_q[list(cq)],
                                       None if bias_k is None else bias_k[list(ck)]))
    # V and O: best effort, a failure leaves them None with a note
    try:
        if "v" not in c:
            raise Fail(c.get("v_error", "no PV MatMul after the Softmax"))
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
                raise Fail("V columns do not follow the Q/K heads")
        for h, hd in enumerate(blk.heads):
            if h in vcols:
                hd.v_weight, hd.v_columns, hd.WV = vn, list(vcols[h]), WV_all[:, list(vcols[h])]
        if "o" not in c:
            raise Fail(c.get("o_error", "no output projection"))
        po, path_o = c["o"]
        Z = vals[c["pv"].output[0]]
        R = run_path(G, path_o, np.arange(Z.size, dtype=np.int64).reshape(Z.shape), vals)
        X = vals[po["node"].input[0]]
        if R.shape != X.shape:
            raise Fail("output-projection probe shape mismatch")
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
            raise Fail("output-projection inputs mix heads or features")
        rows = {}
        for j in range(R.shape[-1]):
            rows.setdefault(int(H[0, j]), {})[int(F[0, j])] = j
        for h, hd in enumerate(blk.heads):
            if h in rows:
                r = [rows[h][f] for f in sorted(rows[h])]
                hd.o_weight, hd.o_rows, hd.WO = on, r, WO_all[r, :]
    except Fail as e:
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
        from .load import load_onnx

        model = load_onnx(model)
    G = Graph(model)
    problems = []
    fused = sorted({n.op_type for n in G.nodes if n.op_type in FUSED})
    if fused:
        problems.append(f"fused attention op(s) {', '.join(fused)} not analysed (only decomposed attention is)")
    cands = []
    for c in candidates(G):
        label = nodename(c["score"], c["score_index"])
        try:
            c["q"] = trace_back(G, c["score"].input[0], "Q")
            c["k"] = trace_back(G, c["score"].input[1], "K")
        except Fail as e:
            problems.append(f"attention at MatMul {label!r}: {e}")
            continue
        if c["pv"] is not None:
            try:
                c["v"] = trace_back(G, c["pv"].input[1], "V")
            except Fail as e:
                c["v_error"] = str(e)
            try:
                c["o"] = trace_forward(G, c["pv"].output[0])
            except Fail as e:
                c["o_error"] = str(e)
        cands.append(c)
    if not cands:
        return [], problems
    try:
        vals = evaluate(G, needed(G, cands))
    except Fail as e:
        return [], problems + [f"{len(cands)} attention block(s) found but not resolved: {e}"]
    blocks = []
    for c in cands:
        try:
            blocks.append(_analyse(G, c, vals, len(blocks)))
        except Fail as e:
            problems.append(f"attention at MatMul {nodename(c['score'], c['score_index'])!r}: {e}")
        except Exception as e:                          # noqa: BLE001 - an odd graph: report, go on
            problems.append(f"attention at MatMul {nodename(c['score'], c['score_index'])!r}: "
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
    G = Graph(model)
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
