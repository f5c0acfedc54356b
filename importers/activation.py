"""``--metric activation``: quasi-fibers that see the calibration data.

The signature rows the engine clusters hold a unit's incoming weights
``W[i, k]``.  With calibration data every input node ``k`` gets its root mean
square activation ``r_k`` on the data (over samples and, for a conv channel or
a sequence feature, positions), and the rows are clustered on the
*activation-weighted* graph ``W[i, k] r_k`` with the magnitude-aware euclidean
distance.  Two units then lie close when their pre-activation contributions
are close on the data: a column that reads a unit silent on the data (a dead
ReLU) no longer separates two rows, while a column that reads a loud unit
counts for more.  Only the colouring uses the weighted graph; the base is
written from the model's own weights.

Exact fibers stay exact: every ``r_k`` is positive (floored at ``1e-3`` of
the median, so a silent unit still counts a little) and the nodes of one exact
fiber compute the same activation, so ``r`` is constant on every exact fiber and
``sum_{k in c} W[i, k] r_k = r_c sum_{k in c} W[i, k]``: a colouring is balanced
on the weighted graph iff it is on the original (the eps = 0 colouring is the
same; ``tests/tuning/test_activation_metric.py``).  Memory: one value per
node, accumulated tensor by tensor.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

__all__ = ["node_rms", "activation_graph", "FLOOR"]

#: a node's weight is at least this fraction of the median positive RMS
FLOOR = 1e-3


def node_rms(imp, feeds):
    """Root mean square activation per node of ``imp.graph`` on ``feeds`` (1 where
    no tensor gives a node's values: constants, inputs of no layout)."""
    from .repair import intermediates

    # a node carries the value of the LAST tensor that names it (a ReLU aliases
    # its bias add's nodes: what the next layer reads is the activation)
    order = list(feeds) + [o for nd in imp.model.graph.node for o in nd.output]
    names = [t for t in dict.fromkeys(order) if t in imp.layouts]
    vals = intermediates(imp.model, [t for t in names if t not in feeds], feeds)
    vals.update({k: np.asarray(v, dtype=np.float64) for k, v in feeds.items() if k in imp.layouts})
    n = imp.graph.n
    ss, cnt = np.zeros(n), np.zeros(n)
    for t in names:
        v = vals[t]
        L = np.asarray(imp.layouts[t])
        if L.ndim == 0 or v.ndim == 0:
            continue
        try:
            Lb = np.broadcast_to(L.reshape((1,) + L.shape[1:]) if L.ndim == v.ndim else L, v.shape)
        except ValueError:
            continue                      # a layout that does not match the data's shape
        Lb = Lb.reshape(-1)
        ok = (Lb >= 0) & (Lb < n)
        s_t = np.bincount(Lb[ok], weights=np.square(v.reshape(-1)[ok]), minlength=n)
        c_t = np.bincount(Lb[ok], minlength=n)
        hit = c_t > 0
        ss[hit], cnt[hit] = s_t[hit], c_t[hit]
    r = np.ones(n)
    seen = cnt > 0
    r[seen] = np.sqrt(ss[seen] / cnt[seen])
    pos = r[seen & (r > 0)]
    floor = FLOOR * (float(np.median(pos)) if pos.size else 1.0)
    return np.maximum(r, floor)


def activation_graph(graph, r):
    """A copy of ``graph`` whose float edge weights are multiplied by ``r`` of
    their source node (integer-weight blocks are left as they are)."""
    blocks = []
    for b in graph.blocks:
        if b.exact:
            blocks.append(b)
        elif b.dense:
            blocks.append(dataclasses.replace(b, weight=b.weight * r[b.src][None, :, None]))
        else:
            blocks.append(dataclasses.replace(b, values=b.values * r[b.src[b.cols]][:, None]))
    g = copy.copy(graph)
    g.blocks = blocks
    return g
