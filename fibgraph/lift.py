"""Lifting: the inverse of compression (docs/design.md section 7).

Given a base graph ``B`` (weights ``W_hat[c', c]`` for the edge ``c -> c'``)
and a size ``sizes[c] >= 1`` for every base node, the lift has ``sizes[c]``
copies of every base node ``c``; copy ``i`` of ``c'`` receives from the
copies ``k`` of ``c``:

- canonical lift: ``W[i, k] = W_hat[c', c] / |c|`` (every copy of ``c'`` has
  the same row, a duplicated-rows graph);
- randomised lift (``rng`` given): ``W[i, k] = W_hat[c', c] / |c| + noise``
  where the noise of copy ``i`` over the copies ``k`` of ``c`` sums to zero
  (integer weights: integer noise, so the lift stays exact).  Rows are no
  longer duplicated, but every per-colour sum is kept:
  ``sum_{k in c} W[i, k] = W_hat[c', c]``.

Either way the planted partition (copy -> base node) is in-balanced and
``quotient(lift, planted)`` is the base again.  If the base's own coarsest
in-balanced colouring (refining its initial colours) is discrete, the planted
partition is the coarsest in-balanced colouring of the lift.  Edge types and
vector weights are carried over; initial colours are the base node's.
``direction='out'`` builds an out-balanced lift (the lift of the reversed
base, reversed back).
"""
from __future__ import annotations

import numpy as np

from .graph import Block, WeightedDigraph

__all__ = ["lift"]


def _base_edges(base):
    parts = [b.coo() + (bool(b.exact),) for b in base.blocks]
    if not parts:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 1)), None, True)
    D = max(p[2].shape[1] for p in parts)
    src = np.concatenate([p[0] for p in parts])
    dst = np.concatenate([p[1] for p in parts])
    vals = np.concatenate([np.pad(np.asarray(p[2], np.float64), ((0, 0), (0, D - p[2].shape[1])))
                           for p in parts])
    typed = any(p[3] is not None for p in parts)
    et = (np.concatenate([np.zeros(p[0].size, np.int64) if p[3] is None else p[3] for p in parts])
          if typed else None)
    exact = all(p[4] for p in parts)
    return src, dst, vals, et, exact


def lift(base: WeightedDigraph, sizes, rng=None, direction="in"):
    """Lift ``base`` to ``sizes[c]`` copies of every node ``c``; returns
    ``(graph, planted_labels)``.  ``rng``: a numpy Generator (or seed) for the
    randomised lift; ``None`` gives the canonical lift."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if sizes.size != base.n:
        raise ValueError(f"sizes has {sizes.size} entries for {base.n} base nodes")
    if np.any(sizes < 1):
        raise ValueError("every base node needs at least one copy")
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    src, dst, vals, et, exact = _base_edges(base)
    if direction == "out":
        src, dst = dst, src
    offset = np.concatenate([[0], np.cumsum(sizes)])
    planted = np.repeat(np.arange(base.n, dtype=np.int64), sizes)
    N = int(offset[-1])
    # one group per (base edge, copy i of its target): sizes[src] entries each
    s_t, s_o = sizes[dst], sizes[src]
    e_of_group = np.repeat(np.arange(src.size), s_t)
    i_of_group = offset[dst][e_of_group] + (np.arange(e_of_group.size)
                                            - np.repeat(np.cumsum(s_t) - s_t, s_t))
    g_len = s_o[e_of_group]
    e_of = np.repeat(e_of_group, g_len)
    tgt = np.repeat(i_of_group, g_len)
    pos = np.arange(e_of.size) - np.repeat(np.cumsum(g_len) - g_len, g_len)
    oth = offset[src][e_of] + pos
    W = vals[e_of]                                     # (L, D) base weight
    k = s_o[e_of].astype(np.float64)[:, None]
    D = vals.shape[1]
    if rng is None:
        w = W / k
        lifted_exact = exact and bool(np.all(w == np.round(w)))
    elif exact:
        # integer split: floor share + remainder spread, then zero-sum integer noise
        Wi = np.rint(W).astype(np.int64)
        ki = s_o[e_of].astype(np.int64)[:, None]
        q, r = np.divmod(Wi, ki)
        w = q + (pos[:, None] < r)
        r1 = rng.integers(-2, 3, size=(e_of.size, D))
        nxt = np.arange(e_of.size) + 1                 # cyclic successor inside the group
        last = pos == g_len[np.repeat(np.arange(g_len.size), g_len)] - 1
        nxt[last] -= g_len[np.repeat(np.arange(g_len.size), g_len)][last]
        w = (w + r1 - r1[nxt]).astype(np.float64)
        lifted_exact = True
    else:
        r1 = rng.uniform(-0.5, 0.5, size=(e_of.size, D))
        gid = np.repeat(np.arange(g_len.size), g_len)
        mean = np.zeros((g_len.size, D))
        np.add.at(mean, gid, r1)
        mean /= g_len[:, None]
        w = W / k * (1.0 + r1 - mean[gid])
        lifted_exact = False
    etype = None if et is None else et[e_of]
    if direction == "out":
        tgt, oth = oth, tgt
    nodes = np.arange(N, dtype=np.int64)
    blk = Block(src=nodes, dst=nodes, rows=tgt, cols=oth, values=w, etype=etype,
                exact=lifted_exact, name="lift")
    g = WeightedDigraph(n=N, blocks=[blk] if tgt.size else [],
                        initial=np.asarray(base.initial)[planted],
                        homogeneous=np.asarray(base.homogeneous)[planted])
    return g, planted
