"""The ONNX ``LSTM`` and ``GRU`` ops as hypergraph pieces (docs/design.md section 6).

Per direction and hidden unit ``j``: one node per gate (LSTM: i, o, f, c in
ONNX's order; GRU: z, r, h), a cell node (LSTM) and a hidden node.  Edges:
gate <- inputs (rows of ``W``), gate <- hidden (rows of ``R``, the
recurrence), gate <- bias; cell <- (i, f, g, cell) and hidden <- (o, cell) as
AND factors with distinct edge types (GRU: hidden <- (z, n, hidden), with the
reset product r * (R_h h + Rb_h) or R_h (r * h) as its own factor nodes).
All of one direction's nodes form one *cyclic* level, refined to a fixed point:
the hidden partition is the colouring's fixed point, and the gates of unit
``j`` are forced into the hidden unit's class by the AND factors, so the base
keeps the same number of units per gate.

The input must carry its ``input_size`` units on the feature axis, and a
streamed initial state its ``hidden_size`` units on the hidden axis: anything
else (a layout the importer tries that puts the model input's units on
another axis, one node from a barrier's output) makes the op a barrier.
"""
from __future__ import annotations

from fibgraph.graph import FACTOR

import numpy as np

from ..build import Barrier, as_float, dedupe_cols, etype
from ..records import RecurrentRecord
from .registry import rule

__all__ = ["map_recurrent", "RECURRENT"]

RECURRENT = {"LSTM", "GRU"}


def _val(b, name):
    if not name:
        return None
    v = b.values.get(name, b.consts.get(name))
    return None if v is None else np.asarray(v)


@rule(*sorted(RECURRENT))
def map_recurrent(b, node, name, a, kinds):
    op = node.op_type
    ins = list(node.input) + [""] * (8 - len(node.input))
    X, Wn, Rn, Bn = ins[0], ins[1], ins[2], ins[3]
    if kinds[1] != "const" or kinds[2] != "const" or (Bn and kinds[3] != "const"):
        raise Barrier(f"{op} whose weights are not constant")
    layout = int(a.get("layout", 0))
    H = int(a["hidden_size"])
    G = 4 if op == "LSTM" else 3
    W = as_float(_val(b, Wn))          # as stored (a float32 view of the file): the engine sums in float64
    R = as_float(_val(b, Rn))
    dirs = W.shape[0]
    Bv = _val(b, Bn).astype(np.float64) if Bn else np.zeros((dirs, 2 * G * H))
    if op == "LSTM" and a.get("input_forget", 0):
        raise Barrier("LSTM with input_forget=1")
    xid = b.layout[X]
    if xid.ndim != 3 or xid.shape[0] != 1 or xid.shape[1] != 1:
        raise Barrier(f"{op} input whose units are not on the feature axis")
    if W.ndim != 3 or R.shape != (dirs, G * H, H) or W.shape[1] != G * H:
        raise Barrier(f"{op} weights of shapes {W.shape}, {R.shape} for hidden_size {H}")
    if xid.shape[2] != W.shape[2]:
        # the feature axis is positional here (one node: a layout that puts the
        # model input's units elsewhere, a barrier's output); the op weighs each
        # feature on its own, so it cannot act alike along that axis
        raise Barrier(f"{op} input has {xid.shape[2]} unit(s) on its feature axis, not {W.shape[2]}")
    xcols = xid.reshape(-1)
    h0n, c0n = ins[5], (ins[6] if op == "LSTM" else "")
    Pn = ins[7] if op == "LSTM" else ""
    P = _val(b, Pn).astype(np.float64) if Pn else None
    tag = (op, str(a.get("activations", "")), str(a.get("activation_alpha", "")),
           str(a.get("activation_beta", "")), float(a.get("clip", 0) or 0),
           int(a.get("linear_before_reset", 0)))
    level = len(b.spaces) + 1
    b.cyclic.add(level)
    hid, cell = [], []
    first_space = len(b.spaces)

    def state_edges(tname, dst_ids, d, what):
        if not tname:
            return
        if tname in b.layout:
            sid = b.layout[tname]                # (dirs, batch, H) or (batch, dirs, H)
            want = (dirs, 1, H) if layout == 0 else (1, dirs, H)
            if sid.ndim != 3 or sid.shape[2] != H or any(s not in (1, w) for s, w in zip(sid.shape, want)):
                raise Barrier(f"{op} initial state {tname!r} whose units are not on its hidden axis")
            sid = np.broadcast_to(sid, want)
            src = sid[d, 0] if layout == 0 else sid[0, d]
            b.sparse(src, dst_ids, np.ones(H), etype(tag, what), f"{name}:{what}{d}")
        else:
            v = _val(b, tname)
            if v is None:
                raise Barrier(f"{op} initial state {tname!r} has no value")
            v = v.astype(np.float64)
            if (tname not in b.consts or tname in b.computed) and np.any(v != 0):
                raise Barrier(f"{op} initial state {tname!r} is computed and not zero")
            v = v[d] if layout == 0 else v[:, d]          # (batch, H)
            if np.any(v != 0):
                cn = b.const_node(name)
                b.sparse(np.full(H, cn), dst_ids, v.T, etype(tag, what + "c"), f"{name}:{what}{d}")

    for d in range(dirs):
        gates = [b.new_space(H, "gate", f"{name}:d{d}g{k}", level=level) for k in range(G)]
        h = b.new_space(H, "hidden", f"{name}:d{d}h", level=level)
        hid.append(h)
        for gs in gates:
            b.joins.append((gs.ids, h.ids))
        wb = Bv[d, :G * H] + (Bv[d, G * H:] if op == "LSTM" else 0)
        for k, gs in enumerate(gates):
            rows = slice(k * H, (k + 1) * H)
            src, Wd = dedupe_cols(W[d, rows][:, :, None], xcols)
            b.dense(src, gs.ids, Wd, f"{Wn}:d{d}g{k}")
            cn = b.const_node(name)
            if op == "LSTM":
                b.dense(h.ids, gs.ids, R[d, rows], f"{Rn}:d{d}g{k}")
                b.sparse(np.full(H, cn), gs.ids, wb[rows], etype(tag, "bias", k), f"{Bn}:d{d}g{k}")
            elif k < 2:   # GRU z, r
                b.dense(h.ids, gs.ids, R[d, rows], f"{Rn}:d{d}g{k}")
                b.sparse(np.full(H, cn), gs.ids, wb[rows] + Bv[d, G * H:][rows], etype(tag, "bias", k),
                         f"{Bn}:d{d}g{k}")
        if op == "LSTM":
            gi, go, gf, gc = gates
            c = b.new_space(H, "cell", f"{name}:d{d}c", level=level)
            cell.append(c)
            b.joins.append((c.ids, h.ids))
            for slot, src in enumerate((gi, gf, gc, c)):
                b.sparse(src.ids, c.ids, np.ones(H), etype(tag, "cell", slot), f"{name}:cell{d}:{slot}")
            for slot, src in enumerate((go, c)):
                b.sparse(src.ids, h.ids, np.ones(H), etype(tag, "hid", slot), f"{name}:hid{d}:{slot}")
            if P is not None:
                for k, gs in zip(range(3), (gi, go, gf)):
                    b.sparse(c.ids, gs.ids, P[d, k * H:(k + 1) * H], etype(tag, "peep", k), f"{Pn}:d{d}p{k}")
            state_edges(c0n, c.ids, d, "c0")
        else:
            gz, gr, gn = gates
            rows = slice(2 * H, 3 * H)
            Rh, Wbh, Rbh = R[d, rows], Bv[d, :G * H][rows], Bv[d, G * H:][rows]
            cn = b.const_node(name)
            if int(a.get("linear_before_reset", 0)):
                q = b.new_space(H, "gate", f"{name}:d{d}q", level=level)
                b.dense(h.ids, q.ids, Rh, f"{Rn}:d{d}g2")
                b.sparse(np.full(H, cn), q.ids, Rbh, etype(tag, "rbias"), f"{Bn}:d{d}rb")
                rq = b.new_space(H, FACTOR, f"{name}:d{d}rq", level=level)
                b.joins += [(q.ids, h.ids), (rq.ids, h.ids)]
                for slot, src in enumerate((gr, q)):
                    b.sparse(src.ids, rq.ids, np.ones(H), etype(tag, "rq", slot), f"{name}:rq{d}:{slot}")
                b.sparse(rq.ids, gn.ids, np.ones(H), etype(tag, "n-rq"), f"{name}:nrq{d}")
                b.sparse(np.full(H, cn), gn.ids, Wbh, etype(tag, "bias", 2), f"{Bn}:d{d}g2")
            else:
                rh = b.new_space(H, FACTOR, f"{name}:d{d}rh", level=level)
                b.joins.append((rh.ids, h.ids))
                for slot, src in enumerate((gr, h)):
                    b.sparse(src.ids, rh.ids, np.ones(H), etype(tag, "rh", slot), f"{name}:rh{d}:{slot}")
                b.dense(rh.ids, gn.ids, Rh, f"{Rn}:d{d}g2")
                b.sparse(np.full(H, cn), gn.ids, Wbh + Rbh, etype(tag, "bias", 2), f"{Bn}:d{d}g2")
            for slot, src in enumerate((gz, gn, h)):
                b.sparse(src.ids, h.ids, np.ones(H), etype(tag, "hid", slot), f"{name}:hid{d}:{slot}")
        state_edges(h0n, h.ids, d, "h0")
    hid_ids = np.stack([s.ids for s in hid])          # (dirs, H)
    outs = list(node.output) + [""] * 3
    if outs[0]:
        b.layout[outs[0]] = hid_ids.reshape(1, dirs, 1, H) if layout == 0 else hid_ids.reshape(1, 1, dirs, H)
    if outs[1]:
        b.layout[outs[1]] = hid_ids.reshape(dirs, 1, H) if layout == 0 else hid_ids.reshape(1, dirs, H)
    if op == "LSTM" and outs[2]:
        cell_ids = np.stack([s.ids for s in cell])
        b.layout[outs[2]] = cell_ids.reshape(dirs, 1, H) if layout == 0 else cell_ids.reshape(1, dirs, H)
    # the report's entries: W (and R, B) of this op, fibers = hidden units of direction 0
    b.spaces[first_space + G].weight = Wn
    b.records.append(RecurrentRecord(node=node.name, op=op, input=X, W=Wn, R=Rn, B=Bn, P=Pn, h0=h0n, c0=c0n,
                                     spaces=list(range(first_space, len(b.spaces))),
                                     hidden=[b.spaces.index(s) for s in hid], dirs=dirs, H=H, layout=layout,
                                     outputs=list(node.output)))
    return "recurrent"
