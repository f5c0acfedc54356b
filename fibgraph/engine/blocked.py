"""Complete linkage cut at eps in bounded memory: blocked complete linkage.

Complete linkage cut at ``eps`` (the paper's Algorithm 1 with
``linkage='complete'``) repeatedly merges the two clusters whose largest
pairwise distance is smallest, while it is ``<= eps``; every class of the
result has *diameter* ``<= eps``.  Run plainly it holds all ``m (m - 1) / 2``
distances of the rows at once (and scipy a copy): 2.8 GB for one component of
18,710 rows, whatever the model's size.

Blocked complete linkage keeps that guarantee in ``O(block^2)`` memory:

1. the items are the rows;
2. while more than ``block`` items are left, the items are ordered along a
   direction (the rows' first principal direction in the first round, fixed
   random ones after; an item sits at the mean of its rows' projections) and
   cut into runs of ``block`` items (shifted by half a run every other
   round); inside each run, complete linkage at ``eps`` merges items, the
   distance of two items being the largest distance between their rows
   (complete linkage's own distance between clusters).  The rounds end after
   :data:`MAX_ROUNDS`, or when two rounds in a row merge less than
   :data:`MIN_MERGED` of the items;
3. once at most ``block`` items are left, one complete linkage over all of
   them.

Every class has diameter ``<= eps``, as Algorithm 1's.  With at most
``block`` rows this *is* Algorithm 1 (step 3 on the rows).  Beyond, a merge
across runs is only tried after each run's own merges, so the classes can
differ from the global linkage's (a different greedy order; never a class of
larger diameter).  Memory: ``block x block`` item distances and a chunk of
row distances; the rows are read in place (float32 rows in float64 chunks).
Time: ``O(rounds m^2 K)`` BLAS work.

Example: 4 rows in two tight pairs, runs of 2 items.

>>> import numpy as np
>>> Z = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 0.1], [5.0, 0.1]])
>>> blocked_complete(Z, 0.5, cosine=False, block=2).tolist()
[0, 1, 0, 1]
"""
from __future__ import annotations

import numpy as np

from ..partition import canonical

__all__ = ["blocked_complete"]

#: float64 entries of one chunk of rows read for a product (8 MB)
CHUNK = 1 << 20


def _rows64(Z, idx):
    return np.asarray(Z[idx], dtype=np.float64)


def _direction(Z, rows, iters=12):
    """The first principal direction of ``Z[rows]`` (power iteration on the
    centred rows, read a chunk at a time; a fixed start: deterministic)."""
    K = Z.shape[1]
    step = max(1, CHUNK // max(K, 1))
    mu = np.zeros(K)
    for s in range(0, rows.size, step):
        mu += _rows64(Z, rows[s:s + step]).sum(axis=0)
    mu /= max(rows.size, 1)
    v = np.random.default_rng(0).normal(size=K)
    for _ in range(iters):
        v /= np.linalg.norm(v) or 1.0
        w = np.zeros(K)
        for s in range(0, rows.size, step):
            A = _rows64(Z, rows[s:s + step]) - mu
            w += A.T @ (A @ v)
        if not np.any(w):
            break
        v = w
    return v / (np.linalg.norm(v) or 1.0)


def _projections(Z, rows, v):
    step = max(1, CHUNK // max(Z.shape[1], 1))
    return np.concatenate([_rows64(Z, rows[s:s + step]) @ v for s in range(0, rows.size, step)])


def item_diameters(Z, rows, item, k, cosine):
    """``(k, k)`` largest distance between the rows of two items (``item[i]``:
    the item of ``rows[i]``, in ``0..k-1``), distances as
    :func:`fibgraph.engine.cluster.threshold_clusters` has them: ``|u - v|^2 / 2``
    (``cosine``) or ``|u - v|`` of the given rows.  Memory: ``k^2`` plus one
    chunk of row distances."""
    order = np.argsort(item, kind="stable")
    R, it = rows[order], item[order]
    K = Z.shape[1]
    step = max(1, min(R.size, CHUNK // max(K, 1), 1 << 10))
    D = np.zeros((k, k))
    for a0 in range(0, R.size, step):
        A = _rows64(Z, R[a0:a0 + step])
        sa = np.einsum("ij,ij->i", A, A)
        ia = it[a0:a0 + step]
        a_starts = np.flatnonzero(np.r_[True, ia[1:] != ia[:-1]])
        for b0 in range(a0, R.size, step):
            B = A if b0 == a0 else _rows64(Z, R[b0:b0 + step])
            sb = sa if b0 == a0 else np.einsum("ij,ij->i", B, B)
            ib = it[b0:b0 + step]
            b_starts = np.flatnonzero(np.r_[True, ib[1:] != ib[:-1]])
            G = A @ B.T
            G *= -2.0
            G += sa[:, None]
            G += sb[None, :]
            red = np.maximum.reduceat(np.maximum.reduceat(G, a_starts, axis=0), b_starts, axis=1)
            ra, rb = ia[a_starts], ib[b_starts]
            D[np.ix_(ra, rb)] = np.maximum(D[np.ix_(ra, rb)], red)
    D = np.maximum(D, D.T)
    np.maximum(D, 0.0, out=D)
    np.fill_diagonal(D, 0.0)
    return 0.5 * D if cosine else np.sqrt(D)


def _link(D, eps):
    """Complete linkage of the items of ``D`` cut at ``eps``: 0-based labels
    (``D`` is consumed: only its condensed form is held while linking)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if D.shape[0] == 1:
        return np.zeros(1, dtype=np.int64)
    d = squareform(D, checks=False)
    D.resize(0, refcheck=False)          # the square form's memory goes before scipy copies d
    return fcluster(linkage(d, method="complete"), t=eps, criterion="distance") - 1


#: the most rounds of runs; and the share of the items a round must merge to
#: be followed by another (two rounds in a row below it end the rounds)
MAX_ROUNDS = 12
MIN_MERGED = 0.01


def blocked_complete(Z, eps, cosine, block, rows=None):
    """Labels (0-based, canonical) of ``Z[rows]`` under blocked complete
    linkage cut at ``eps`` (module doc); ``rows``: indices into ``Z`` (all by
    default), read in place."""
    rows = np.arange(Z.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    m = rows.size
    item = np.arange(m)
    k = m
    stalled = 0
    for r in range(MAX_ROUNDS):
        if k <= block:
            break
        # round 0 along the principal direction, then along fixed random ones
        # (and runs shifted by half a run), so that each round pairs other items
        v = _direction(Z, rows) if r == 0 else np.random.default_rng(r).normal(size=Z.shape[1])
        proj = _projections(Z, rows, v)
        centre = np.bincount(item, weights=proj, minlength=k) / np.bincount(item, minlength=k)
        order = np.argsort(centre, kind="stable")
        off = block // 2 if r % 2 else 0
        cuts = np.unique(np.r_[0, np.arange(off or block, k, block), k])
        new = np.empty(k, dtype=np.int64)
        nxt = 0
        for s, e in zip(cuts[:-1], cuts[1:]):
            run = order[s:e]
            pos = np.full(k, -1)
            pos[run] = np.arange(run.size)
            sel = np.flatnonzero(pos[item] >= 0)
            lab = _link(item_diameters(Z, rows[sel], pos[item[sel]], run.size, cosine), eps)
            new[run] = nxt + lab
            nxt += int(lab.max()) + 1
        stalled = stalled + 1 if k - nxt < max(1.0, MIN_MERGED * k) else 0
        item, k = new[item], nxt
        if stalled >= 2:
            break
    if k <= block:
        lab = _link(item_diameters(Z, rows, item, k, cosine), eps)
        item = lab[item]
    return canonical(item)
