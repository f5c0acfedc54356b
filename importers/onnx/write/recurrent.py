"""Writer rule for LSTM / GRU ops (docs/design.md section 5): ``hidden_size``
= number of hidden groups, gate blocks compressed with the hidden grouping
(rows: the mean), ``R`` by rows and columns (columns: the sum over the
hidden group), ``W``'s columns by the input's grouping; constant initial
states by the mean over the group.
"""
from __future__ import annotations

import numpy as np

from ..records import Kind
from .axis import Axis, two_sided
from .registry import writes


@writes(Kind.RECURRENT)
def recurrent(w, rec):
    """LSTM/GRU: per direction, gate blocks of W, R, B (and peepholes) by the
    hidden grouping (rows: mean; R's columns: sum), W's columns by the
    input's; ``hidden_size`` = the kept count (equal in both directions)."""
    _, node = w.node(rec)
    H, dirs = rec.H, rec.dirs
    axes = [Axis(w.imp.spaces[s].ids.reshape(1, H), w.gid, w.kept, w.prune) for s in rec.hidden]
    ax_x = w.axis(rec.input)
    if all(a.identity for a in axes) and ax_x.identity:
        return
    Hh = axes[0].L_hat
    if any(a.L_hat != Hh for a in axes):
        raise RuntimeError("directions of a recurrent op keep different numbers of units")
    G = 4 if rec.op == "LSTM" else 3
    Cx = ax_x.sum_matrix()

    def blocks(M, nb, cols):
        # per direction and gate block: rows by the mean, columns (W, R) by
        # ``cols``; float64 one block chunk at a time (:func:`.axis.two_sided`),
        # no float64 copy of the whole weight; dry (a parameter count): the shape
        Cs = [cols(d) for d in range(dirs)]
        shape = (dirs, nb * Hh) + ((Cs[0].shape[0],) if Cs[0] is not None else ())
        if w.dry:
            return np.broadcast_to(np.zeros((), M.dtype), shape)
        out = np.empty(shape, dtype=M.dtype)
        for d, C in enumerate(Cs):
            Rm = axes[d].mean_matrix()
            for g in range(nb):
                blk = M[d, g * H:(g + 1) * H]
                out[d, g * Hh:(g + 1) * Hh] = two_sided(Rm, blk, C, M.dtype) if C is not None \
                    else Rm @ np.asarray(blk, dtype=np.float64)
        return out

    W = w.value(node.input[1])
    R = w.value(node.input[2])
    w.put(node, 1, blocks(W, G, lambda d: Cx), W)
    w.put(node, 2, blocks(R, G, lambda d: axes[d].sum_matrix()), R)
    if len(node.input) > 3 and node.input[3]:
        B = w.value(node.input[3])
        w.put(node, 3, blocks(B, 2 * G, lambda d: None), B)
    for slot in (5, 6):
        if len(node.input) > slot and node.input[slot]:
            if node.input[slot] in w.imp.layouts:
                continue              # a state input: its units are kept distinct
            v = w.imp.consts.get(node.input[slot])
            if v is None or node.input[slot] in w.imp.computed:
                node.input[slot] = ""     # computed zeros (checked by the importer): the default
                continue
            v64 = np.moveaxis(v.astype(np.float64), rec.layout, 0)     # (dirs, batch, H)
            vh = np.stack([v64[d] @ axes[d].mean_matrix().T for d in range(dirs)])
            w.put(node, slot, np.moveaxis(vh, 0, rec.layout), v)
    if len(node.input) > 7 and node.input[7]:
        P = w.value(node.input[7])
        w.put(node, 7, blocks(P, 3, lambda d: None), P)
    for at in node.attribute:
        if at.name == "hidden_size":
            at.i = Hh
