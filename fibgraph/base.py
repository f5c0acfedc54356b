"""The base graph: the quotient of a graph by an in-balanced colouring.

For fiber ``c'`` of the destination nodes and colour ``c`` of the sources
(docs/design.md section 5)::

    W_hat[c', c] = (1/|c'|) * sum_{i in c'} sum_{k in c} W[i, k]
    b_hat[c']    = (1/|c'|) * sum_{i in c'} b[i]

The bias is the MEAN over the fiber (the papers print the sum, which is wrong
for nonzero biases).  The next layer sees fiber ``c'`` through the SUM of its
columns.  With the rescaling merge every node carries a scale ``s`` (its
activation is ``s`` times its base node's), so ``W[i, k]`` enters as
``s_k W[i, k] / s_i``.  For an exact fibration the mean equals every member's
sum, so the base computes the same function.
"""
from __future__ import annotations

import numpy as np

from .graph import Block, WeightedDigraph
from .partition import canonical, class_sizes
from .lazy import lazy_module

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = ["aggregate", "quotient"]


def _indicator(labels, weights=None):
    labels = np.asarray(labels, dtype=np.int64)
    w = np.ones(labels.size) if weights is None else np.asarray(weights, dtype=np.float64)
    return sp.csr_matrix((w, (labels, np.arange(labels.size))), shape=(labels.max() + 1, labels.size))


def aggregate(W, row_labels, col_labels, row_scales=None, col_scales=None):
    """Base weight tensor of a dense block ``W[n_dst, n_src, D]`` (see module doc)."""
    W = np.asarray(W, dtype=np.float64)
    squeeze = W.ndim == 2
    if squeeze:
        W = W[:, :, None]
    n_t, n_o, D = W.shape
    rs = np.ones(n_t) if row_scales is None else np.asarray(row_scales, dtype=np.float64)
    cs = np.ones(n_o) if col_scales is None else np.asarray(col_scales, dtype=np.float64)
    R = _indicator(row_labels, 1.0 / rs)                          # (C', n_t)
    sizes = class_sizes(row_labels).astype(np.float64)
    C = _indicator(col_labels, cs)                                # (C, n_o)
    W2 = W.transpose(2, 0, 1)                                     # (D, n_t, n_o)
    out = np.stack([(R @ (C @ W2[d].T).T) for d in range(D)], axis=2)   # (C', C, D)
    out /= sizes[:, None, None]
    return out[:, :, 0] if squeeze else out


def quotient(graph: WeightedDigraph, labels, scales=None) -> WeightedDigraph:
    """The base graph of ``graph`` under the in-balanced colouring ``labels``.

    One node per colour; a block ``src -> dst`` becomes a block between the
    colours of its nodes, with weights by :func:`aggregate`.  Colours are base
    node ids (canonical order).
    """
    labels = canonical(labels)
    n_base = int(labels.max()) + 1 if labels.size else 0
    s = np.ones(graph.n) if scales is None else np.asarray(scales, dtype=np.float64)
    sizes = class_sizes(labels).astype(np.float64)
    rep = np.full(n_base, graph.n, dtype=np.int64)
    np.minimum.at(rep, labels, np.arange(graph.n))
    blocks = []
    for b in graph.blocks:
        if b.dense:
            dl, cl = labels[b.dst], labels[b.src]
            du, dinv = np.unique(dl, return_inverse=True)
            cu, cinv = np.unique(cl, return_inverse=True)
            Wb = aggregate(b.weight, dinv, cinv, s[b.dst], s[b.src])
            # a class may straddle this block's dst set only if balanced: use global sizes
            Wb *= (np.bincount(dinv) / sizes[du])[:, None, None]
            blocks.append(Block(src=cu, dst=du, weight=Wb, exact=b.exact, name=b.name))
        else:
            src, dst = b.src[b.cols], b.dst[b.rows]
            v = b.values * (s[src] / s[dst])[:, None]
            bl, cl = labels[dst], labels[src]
            D = v.shape[1]
            et = np.zeros(src.size, np.int64) if b.etype is None else b.etype
            key = np.stack([bl, cl, et], 1)
            uk, inv = np.unique(key, axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            vals = np.zeros((uk.shape[0], D))
            np.add.at(vals, inv, v)
            vals /= sizes[uk[:, 0]][:, None]
            nodes = np.arange(n_base)
            blocks.append(Block(src=nodes, dst=nodes, rows=uk[:, 0], cols=uk[:, 1], values=vals,
                                etype=None if b.etype is None else uk[:, 2], exact=b.exact,
                                name=b.name))
    return WeightedDigraph(
        n=n_base, blocks=blocks, initial=graph.initial[rep],
        layer=graph.layer[rep], index=np.arange(n_base), kind=graph.kind[rep],
        layer_names=graph.layer_names,
        node_ids=None if graph.node_ids is None else [graph.node_ids[r] for r in rep],
        homogeneous=graph.homogeneous[rep],
        levels=None if graph.levels is None else [np.unique(labels[np.asarray(lv, np.int64)]) for lv in graph.levels],
    )
