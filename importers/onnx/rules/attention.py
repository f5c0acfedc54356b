"""The ONNX ``Attention`` op (opset 23) as factor nodes per (q, k) pair, score
nodes per head and output factors per (score, v) pair."""
from __future__ import annotations

from fibgraph.graph import FACTOR

import numpy as np

from ..build import Barrier, etype
from ..records import AttentionRecord
from .registry import rule

ATTENTION = {"Attention"}


@rule(*sorted(ATTENTION))
def attention(b, node, name, a, kinds):
    """The ONNX ``Attention`` op (opset 23): per head ``h``, score_h =
    sum_j q[h, j] k[g(h), j] (factor nodes per pair, AND rule; ``g`` maps q
    heads to kv heads for grouped-query attention), out[h, e] = AND(score_h,
    v[g(h), e]).  A constant mask enters each head's score as constant edges."""
    Q, K, V = node.input[:3]
    if any(kinds[k] != "stream" for k in range(3)):
        raise Barrier("Attention whose q, k or v is not computed from the input")
    if len(node.input) > 4 and any(node.input[4:]):
        raise Barrier("Attention with a key/value cache")
    if any(o for o in node.output[1:]):
        raise Barrier("Attention whose cache or score outputs are used")
    mask = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if mask and kinds[3] == "stream":
        raise Barrier("Attention with a computed mask")
    iq, ik, iv = (b.layout[x] for x in (Q, K, V))
    four = iq.ndim == 4
    if four:
        if any(t.shape[0] != 1 or t.shape[2] != 1 for t in (iq, ik, iv)):
            raise Barrier("Attention inputs with units on the batch or sequence axes")
        q, k, v = (np.broadcast_to(t[0, :, 0, :], (b.shapes[x][1], b.shapes[x][3]))
                   for t, x in ((iq, Q), (ik, K), (iv, V)))
    else:
        hq, hkv = int(a.get("q_num_heads", 0)), int(a.get("kv_num_heads", 0))
        if not hq or not hkv or any(t.shape[0] != 1 or t.shape[1] != 1 for t in (iq, ik, iv)):
            raise Barrier("3-D Attention without head counts, or with units on the sequence axis")
        q, k, v = (np.broadcast_to(t.reshape(-1), (b.shapes[x][2],)).reshape(h, -1)
                   for t, x, h in ((iq, Q, hq), (ik, K, hkv), (iv, V, hkv)))
    Hq, dh = q.shape
    Hkv, dv = v.shape
    if Hq % Hkv or k.shape != (Hkv, dh):
        raise Barrier("Attention head counts or sizes do not match")
    grp = np.arange(Hq) // (Hq // Hkv)
    kq = k[grp]                                            # (Hq, dh): the k each q head reads
    tag = ("attention", int(a.get("is_causal", 0)), float(a.get("scale", 0.0)), float(a.get("softcap", 0.0)))
    pairs = np.stack([q.reshape(-1), kq.reshape(-1)], 1)
    uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    fs = b.new_space(uniq.shape[0], FACTOR, name)
    b.sparse(uniq[:, 0], fs.ids, np.ones(fs.n), etype(tag, "q"), f"{name}:q")
    b.sparse(uniq[:, 1], fs.ids, np.ones(fs.n), etype(tag, "k"), f"{name}:k")
    sc = b.new_space(Hq, "stats", name)
    b.sparse(fs.start + inv, np.repeat(sc.ids, dh), np.ones(inv.size), etype(tag, "score"), f"{name}:score")
    if mask:
        mv = np.asarray(b.values[mask], dtype=np.float64)
        mv = np.nan_to_num(mv, posinf=1e30, neginf=-1e30)
        full = np.broadcast_to(mv, (1, Hq) + tuple(b.shapes[mask][-2:])) if mv.ndim >= 2 else None
        if full is None:
            raise Barrier("Attention mask of rank < 2")
        cn = b.const_node(name)
        b.sparse(np.full(Hq, cn), sc.ids, full.reshape(Hq, -1), etype(tag, "mask"), f"{name}:mask")
    b.joins.append((q.reshape(-1), kq.reshape(-1)))
    b.joins.append((q.reshape(-1), fs.start + inv))
    tmp = f"{name}:heads-out"
    b.combine([sc.ids.reshape(Hq, 1), v[grp]], tmp, name, tag + ("out",), kind=FACTOR)
    out = b.layout.pop(tmp)
    b.layout[node.output[0]] = out.reshape(1, Hq, 1, dv) if four else out.reshape(1, 1, Hq * dv)
    # heads x head dims as tensors of their own: every head keeps the same size
    b.layout[f"{name}:q-heads"] = np.ascontiguousarray(q)
    b.layout[f"{name}:kv-heads"] = np.ascontiguousarray(k)
    b.layout[f"{name}:v-heads"] = np.ascontiguousarray(v)
    b.records.append(AttentionRecord(node=node.name, q=Q, heads=f"{name}:q-heads", four=four, dh=dh))
    return "attention"
