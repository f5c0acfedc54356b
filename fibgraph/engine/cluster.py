"""Threshold agglomerative clustering of signature rows (quasi-fibrations).

The paper's Algorithm 1 clusters the rows of a layer's aggregated weight
matrix with agglomerative clustering cut at distance ``eps``.  Done plainly
that builds the full ``n x n`` distance matrix.  Here the same partition is
computed by first finding the connected components of the ``eps``-neighbour
graph (blockwise BLAS products, memory ``O(block * n)``): every complete- or
average-linkage cluster cut at ``eps`` lies inside one component (a merge at
height <= eps needs at least one pair at distance <= eps), so scipy's linkage
run per component gives exactly the partition of the global run.  A
component of more than :func:`exact_linkage_rows` rows (4,096: the exact
linkage's distances and scipy's copy are 8 m^2 bytes) is clustered under
complete linkage by blocked complete linkage (:mod:`fibgraph.engine.blocked`:
bounded memory, every class still of diameter <= eps, possibly finer);
``FIBGRAPH_EXACT_LINKAGE_ROWS`` asks for the exact, quadratic one.

Distances (both dimensionless, range [0, 2]):
- ``cosine``: ``1 - <u, v> / (|u| |v|)``; rows that differ by a positive
  factor are at distance 0.  All-zero rows form a class of their own.
- ``euclidean``: ``|u - v| / max_k |x_k|`` (rows scaled by the largest row norm
  of the layer): 0 only for equal rows, so it is magnitude-aware.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from ..errors import InputError
from ..lazy import lazy_module
from ..limits import LINKAGE_ENV, linkage_rows_env
from ..pages import drop_mapped, read
from ..partition import canonical
from .blocked import blocked_complete
from .signatures import F32_ROWS_MIN, col_chunks

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = ["threshold_clusters", "joint_rows", "algorithm1", "prepare_rows", "METRICS", "LINKAGES"]

METRICS = ("cosine", "euclidean")
LINKAGES = ("complete", "average")


def pdist(X, metric):
    """``scipy.spatial.distance.pdist``, imported on first use: scipy.spatial and
    scipy.cluster (with scipy.linalg and scipy.special under them) are 15 MB of
    resident memory that an exact colouring never needs."""
    from scipy.spatial.distance import pdist as _pdist
    return _pdist(X, metric)


def linkage(d, method):
    """``scipy.cluster.hierarchy.linkage``, imported on first use (see :func:`pdist`)."""
    from scipy.cluster.hierarchy import linkage as _linkage
    return _linkage(d, method=method)


def fcluster(link, t, criterion):
    """``scipy.cluster.hierarchy.fcluster``, imported on first use (see :func:`pdist`)."""
    from scipy.cluster.hierarchy import fcluster as _fcluster
    return _fcluster(link, t=t, criterion=criterion)


def prepare_rows(X, metric, overwrite=False):
    """Rows scaled for ``metric``: unit rows (cosine) or rows over the largest norm.

    Returns ``(Y, norms, zero_mask)``.  ``overwrite``: ``X`` (a float64 array
    the caller owns and no longer needs) is scaled in place, no copy.
    """
    X = X.toarray() if sp.issparse(X) else _rows(X)
    norms, div = _divisor(X, metric)
    zero = norms <= 0
    if overwrite and X.flags.writeable and X.flags.owndata:
        X /= div
        return X, norms, zero
    if X.dtype == np.float32:
        return np.divide(X, div, dtype=np.float32), norms, zero
    return X / div, norms, zero


def _divisor(X, metric, scale=None):
    """``(norms, div)``: the rows' norms and what :func:`prepare_rows` divides
    them by: each row's norm (cosine; zero rows by 1), or the largest norm, or
    ``scale`` where given (euclidean; 0 counts as 1).  ``norms`` is None when
    ``scale`` made them unneeded."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    if scale is not None and metric == "euclidean":
        return None, (scale if scale > 0 else 1.0)
    norms = row_norms(X)
    if metric == "cosine":
        return norms, np.where(norms <= 0, 1.0, norms)[:, None]
    return norms, (norms.max() if norms.size and norms.max() > 0 else 1.0)


def _rows(X):
    """``X`` as float64 rows, or as it is when it is big float32 rows (kept
    float32 to halve their memory; every product on them accumulates in
    float64: :func:`row_norms`, :func:`_gram`)."""
    X = np.asarray(X)
    if X.dtype == np.float32 and X.size >= F32_ROWS_MIN:
        return X
    return np.asarray(X, dtype=np.float64)


#: entries of one float64 column chunk of float32 rows
_F64_CHUNK = 1 << 20


def row_norms(X):
    """Euclidean norms of the rows of ``X`` in float64 (float32 rows read in
    float64 column chunks), without an ``|X|^2`` temporary."""
    if X.dtype == np.float64:
        return np.sqrt(np.einsum("ij,ij->i", X, X))
    sq = np.zeros(X.shape[0])
    for k0, k1 in col_chunks(X.shape[0], X.shape[1], _F64_CHUNK):
        c = read(X[:, k0:k1])             # a mapped weight's pages go back chunk by chunk
        sq += np.einsum("ij,ij->i", c, c)
    return np.sqrt(sq)


def _gram(Z, s, e):
    """``Z[s:e] @ Z[s:].T`` in float64 (float32 rows: in float64 column chunks)."""
    if Z.dtype == np.float64:
        return Z[s:e] @ Z[s:].T
    G = np.zeros((e - s, Z.shape[0] - s))
    for k0, k1 in col_chunks(Z.shape[0] - s, Z.shape[1], _F64_CHUNK):
        c = read(Z[s:, k0:k1])
        G += c[:e - s] @ c.T
    return G


def _sq_dists(Z, sq, s, e):
    """``|z_i - z_j|^2`` of rows ``s..e-1`` against rows ``s..`` of ``Z`` (``sq``:
    the rows' squared norms) from one BLAS Gram product, in ``sq``'s dtype
    (float32 rows with float64 ``sq``: a float64 product, :func:`_gram`)."""
    G = Z[s:e] @ Z[s:].T if sq.dtype == np.float32 else _gram(Z, s, e)
    G *= -2.0
    G += sq[s:e, None]
    G += sq[None, s:]
    return G


def _neighbour_components(Y, radius, unit=False, block_elems=1 << 18):
    """Connected components of the graph joining rows at euclidean distance <= radius.

    Only the upper triangle of the Gram matrix is computed, in float32 blocks
    (twice the BLAS speed); the threshold gets a margin far above float32
    rounding (rows have norm <= 1), so components can only grow, which keeps
    the per-component linkage exact.  ``unit``: rows have norm 1, so
    ``|u - v|^2 = 2 - 2 <u, v>`` and the Gram matrix is thresholded directly.
    """
    n = Y.shape[0]
    Y32 = np.ascontiguousarray(Y, dtype=np.float32)
    sq = np.einsum("ij,ij->i", Y32, Y32)
    bs = max(1, min(n, block_elems // max(n, 1)))
    r2 = radius * radius + 1e-4
    gmin = np.float32(1.0 - r2 / 2.0)
    # memory O(block_elems + n): the pairs found are folded into the labels
    # whenever more than ``block_elems`` of them are held, never all at once
    lab = np.arange(n)
    held, rows, cols = 0, [], []

    def fold():
        nonlocal lab, held, rows, cols
        if not rows:
            return
        r = lab[np.concatenate(rows)]
        c = lab[np.concatenate(cols)]
        rows, cols, held = [], [], 0
        cross = r != c
        if cross.any():
            g = sp.coo_matrix((np.ones(int(cross.sum()), dtype=np.int8), (r[cross], c[cross])), shape=(n, n))
            lab = sp.csgraph.connected_components(g, directed=False)[1][lab]

    for s in range(0, n, bs):
        e = min(n, s + bs)
        if unit:
            i, j = np.nonzero(Y32[s:e] @ Y32[s:].T >= gmin)
        else:
            i, j = np.nonzero(_sq_dists(Y32, sq, s, e) <= np.float32(r2))
        keep = i + s != j + s
        rows.append(i[keep] + s)              # int64 already: no second copy
        cols.append(j[keep] + s)
        held += int(keep.sum())
        if held > block_elems or held >= n:
            fold()
            if lab.size and np.all(lab == lab[0]):     # one component: nothing left to join
                return lab
    fold()
    return lab


#: below this many multiply-adds a condensed distance matrix comes from
#: ``pdist``; above it from BLAS Gram products (many times faster on wide rows)
GRAM_MIN_WORK = 1 << 22


def _condensed(Z, cosine, scale=None):
    """Condensed distances of the rows of ``Z`` in the order ``pdist`` gives them:
    ``|u - v|^2 / 2`` (``cosine``) or ``|u - v|``; ``scale``: of the rows
    ``scale[i] * Z[i]`` (prepared rows without their scaled copy).

    Large inputs use ``|u|^2 + |v|^2 - 2 <u, v>`` from blockwise BLAS products
    (float64; clipped at 0, so equal rows are at distance 0 up to ~1e-16 of the
    rows' squared norm), the scale applied to each product block, never to the
    rows; small ones ``scipy.spatial.distance.pdist``.
    """
    m, K = Z.shape
    if m * m * K < 2 * GRAM_MIN_WORK:
        if scale is not None:
            Z = np.asarray(Z, dtype=np.float64) * scale[:, None]
        d = pdist(Z, "euclidean")
        return 0.5 * d * d if cosine else d
    if Z.dtype not in (np.float32, np.float64):
        Z = np.asarray(Z, dtype=np.float64)
    norms = row_norms(Z)
    if scale is not None:
        norms = norms * scale
    sq = norms ** 2
    out = np.empty(m * (m - 1) // 2)
    bs = max(1, _CONDENSED_BLOCK // m)
    pos = 0
    for s in range(0, m - 1, bs):
        e = min(m - 1, s + bs)
        G = _gram(Z, s, e)
        G *= -2.0
        if scale is not None:
            G *= scale[s:e, None]
            G *= scale[None, s:]
        G += sq[s:e, None]
        G += sq[None, s:]
        np.maximum(G, 0.0, out=G)
        upper = np.arange(s, m)[None, :] > np.arange(s, e)[:, None]
        vals = G[upper]                            # row-major: pdist's order
        del G
        if cosine:
            vals *= 0.5
        else:
            np.sqrt(vals, out=vals)
        out[pos:pos + vals.size] = vals
        pos += vals.size
    return out


#: entries of one block of Gram products in :func:`_condensed` (8 MB of float64)
_CONDENSED_BLOCK = 1 << 20


def _digest(Z, scale=None):
    """A digest of the rows of ``Z`` (and ``scale``) read in place: a transposed
    view is hashed through its transpose, anything else a few rows at a time."""
    h = hashlib.sha1(f"{Z.shape}{Z.dtype.str}".encode())
    if Z.flags.f_contiguous and not Z.flags.c_contiguous:
        h.update(b"F")
        Z = Z.T
    if Z.flags.c_contiguous:             # row blocks of about 1M entries, read in place
        for k0, k1 in col_chunks(Z.shape[1], Z.shape[0], 1 << 20):
            h.update(Z[k0:k1].data)
            drop_mapped(Z[k0:k1])         # a mapped weight's pages go back block by block
    else:
        for k0, k1 in col_chunks(Z.shape[1], Z.shape[0], 1 << 20):
            h.update(np.ascontiguousarray(Z[k0:k1]).data)
    if scale is not None:
        h.update(np.ascontiguousarray(scale, dtype=np.float64).data)
    return h.hexdigest()


#: rows up to which a large clustering computes its whole dendrogram at once
#: (condensed distances: m^2 / 2 doubles, 67 MB at 4096) and keeps it, so that
#: another eps on the same rows (the next step of an eps search) is one cut
FULL_LINKAGE_ROWS = 4096
_DENDROGRAMS = OrderedDict()      # (rows digest, shape, metric, method) -> linkage matrix
_DENDROGRAMS_KEPT = 64


def _whole_dendrogram(Z, eps, linkage_method, metric, scale=None):
    """Labels (0-based) of ``Z``'s rows cut at ``eps`` from the whole dendrogram,
    remembered by the rows' digest, or None where the neighbour components are
    the better way (few rows, little work, or too many rows for m^2 memory).
    ``scale``: of the rows ``scale[i] * Z[i]`` (:func:`_condensed`).

    This is Algorithm 1 itself (one linkage on all rows); the per-component
    path gives the same partition."""
    m, K = Z.shape
    if m <= 2 or m > FULL_LINKAGE_ROWS or m * m * K < 2 * GRAM_MIN_WORK:
        return None
    key = (_digest(Z, scale), metric, linkage_method)
    link = _DENDROGRAMS.get(key)
    if link is None:
        link = linkage(_condensed(Z, cosine=(metric == "cosine"), scale=scale), method=linkage_method)
        _DENDROGRAMS[key] = link
        while len(_DENDROGRAMS) > _DENDROGRAMS_KEPT:
            _DENDROGRAMS.popitem(last=False)
    else:
        _DENDROGRAMS.move_to_end(key)
    return fcluster(link, t=eps, criterion="distance") - 1


#: the most rows one eps-neighbourhood component may hold for average linkage:
#: it needs their condensed distance matrix (m^2 / 2 doubles: 1.5 GiB at 20,000)
MAX_LINKAGE_ROWS = 20_000
#: the most rows of one component that complete linkage clusters exactly (its
#: condensed distances and scipy's copy: 8 m^2 bytes, 134 MB at 4,096); a
#: larger component is clustered by blocked complete linkage in runs of half
#: as many items (bounded memory, every class still of diameter <= eps:
#: :mod:`fibgraph.engine.blocked`).
#: The environment variable ``FIBGRAPH_EXACT_LINKAGE_ROWS`` raises it (the
#: quadratic exact linkage on request)
EXACT_LINKAGE_ROWS = 4096


def exact_linkage_rows(method="complete") -> int:
    """The most rows of one component linked exactly: ``FIBGRAPH_EXACT_LINKAGE_ROWS``
    when set (:func:`fibgraph.limits.linkage_rows_env`), else
    :data:`EXACT_LINKAGE_ROWS` (complete linkage; beyond it, blocked) or
    :data:`MAX_LINKAGE_ROWS` (average linkage; beyond it, an error)."""
    n = linkage_rows_env()
    if n is not None:
        return n
    return EXACT_LINKAGE_ROWS if method == "complete" else MAX_LINKAGE_ROWS


def threshold_clusters(X, eps, linkage_method="average", metric="cosine", prepared=False, overwrite=False,
                       stats=None):
    """Flat clusters of the rows of ``X`` cut at distance ``eps``.

    Equal to ``fcluster(linkage(pdist(rows), method), eps, 'distance')`` (the
    paper's Algorithm 1) but computed per connected component of the
    ``eps``-neighbour graph.  Returns canonical labels.

    ``prepared``: the rows are already scaled for ``metric`` (e.g. the
    concatenation of several node sets' prepared rows over ``sqrt(sets)``, see
    :func:`joint_rows`); the distance is then ``|u - v|`` (euclidean) or
    ``|u - v|^2 / 2`` (cosine) on the given rows.  ``overwrite``: ``X`` may be
    scaled in place (:func:`prepare_rows`).  A component of more than
    :func:`exact_linkage_rows` rows under complete linkage is clustered by
    :func:`fibgraph.engine.blocked.blocked_complete`; ``stats`` (a dict, optional)
    then gets ``blocked_rows``, the largest such component.
    """
    if linkage_method not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage_method!r}; choose from {LINKAGES}")
    if prepared:
        Y = _rows(X)
        norms = row_norms(Y)
        zero = norms <= 0
    else:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
        Y = X.toarray() if sp.issparse(X) else np.asarray(X)
        norms = row_norms(Y)
        zero = norms <= 0
    n = Y.shape[0]
    labels = np.full(n, -1, dtype=np.int64)
    nz = np.flatnonzero(~zero) if metric == "cosine" else np.arange(n)
    if metric == "cosine" and zero.any():
        labels[zero] = 0  # all-zero rows: one class
    if nz.size:
        scale = None
        if not prepared:    # the whole dendrogram scales its products, not the rows: no scaled copy
            top = norms.max() if norms.size and norms.max() > 0 else 1.0
            scale = 1.0 / norms[nz] if metric == "cosine" else np.full(nz.size, 1.0 / top)
        whole = _whole_dendrogram(Y if nz.size == n else Y[nz], eps, linkage_method, metric, scale=scale)
        if whole is not None:
            labels[nz] = whole + (1 if (metric == "cosine" and zero.any()) else 0)
            return canonical(labels)
        if not prepared:
            Y = prepare_rows(Y, metric, overwrite=overwrite)[0]
        Z = Y if nz.size == n else Y[nz]
        # cosine distance d = |u - v|^2 / 2 on unit rows
        radius = np.sqrt(2.0 * eps) if metric == "cosine" else eps
        comp = _neighbour_components(Z, radius, unit=(metric == "cosine" and not prepared))
        out = np.empty(nz.size, dtype=np.int64)
        order = np.argsort(comp, kind="stable")
        bounds = np.flatnonzero(np.diff(comp[order])) + 1
        nxt = 0
        limit = exact_linkage_rows(linkage_method)
        for members in np.split(order, bounds):
            if members.size == 1:
                out[members] = nxt
                nxt += 1
                continue
            if members.size > limit and linkage_method == "complete":
                # bounded memory, every class still of diameter <= eps
                sub = blocked_complete(Z, eps, metric == "cosine", max(2, limit // 2), rows=members)
                if stats is not None:
                    stats["blocked_rows"] = max(stats.get("blocked_rows", 0), int(members.size))
                out[members] = nxt + sub
                nxt += int(sub.max()) + 1
                continue
            if members.size > limit:
                raise InputError(f"eps {eps:g}: {members.size:,} rows lie within one another's eps-neighbourhood; "
                                 f"{linkage_method} linkage on them needs {members.size ** 2 * 4 / 2 ** 30:.1f} GiB "
                                 f"(limit {limit:,} rows, {LINKAGE_ENV}): use a smaller eps, or complete "
                                 f"linkage (bounded memory)")
            # one component holding every row: members is arange (stable sort), no copy
            d = _condensed(Z if members.size == Z.shape[0] else Z[members], cosine=(metric == "cosine"))
            if members.size == 2:  # one pair: merged iff its distance is within eps
                lab = np.array([1, 1]) if d[0] <= eps else np.array([1, 2])
            else:
                lab = fcluster(linkage(d, method=linkage_method), t=eps, criterion="distance")
            out[members] = nxt + lab - 1
            nxt += int(lab.max())
        labels[nz] = out + (1 if (metric == "cosine" and zero.any()) else 0)
    return canonical(labels)


def joint_rows(blocks, metric, scales=None, widths=None):
    """Rows of tied items (e.g. the columns gate i / f / g / o, cell, hidden of
    an LSTM's units): each block (one node set's rows, one row per item) is
    prepared for ``metric`` on its own, then the blocks are concatenated and
    divided by ``sqrt(len(blocks))``.  On these rows the euclidean distance is
    the root mean square of the per-set distances and ``|u - v|^2 / 2`` the
    mean of the per-set cosine distances, so eps keeps its meaning (one block:
    the plain rows).  ``scales`` (euclidean only, one per block): divide block
    ``s`` by ``scales[s]`` instead of its own largest row norm (e.g. the
    largest norm over the whole layer).  Stored float32 once the rows reach
    :data:`F32_ROWS_MIN` entries (every product on them is float64).

    ``blocks`` may be a generator; with ``widths`` (the blocks' column
    counts) each block is scaled straight into its columns of the result, a
    few rows at a time, before the next is made: the result and one block are
    all that is ever held (an LSTM layer's joint rows are 75 MB; made block by
    block and concatenated they took twice that).  Use with
    ``threshold_clusters(..., prepared=True)``.

    >>> joint_rows([np.array([[3.0, 4.0], [0.0, 1.0]]), np.array([[2.0], [2.0]])], "cosine").round(3).tolist()
    [[0.424, 0.566, 0.707], [0.0, 0.707, 0.707]]
    """
    if widths is None:         # held together, then concatenated (small rows: the least work)
        ys = [prepare_rows(b, metric)[0] if scales is None or metric != "euclidean" else
              np.asarray(b.toarray() if sp.issparse(b) else b, dtype=np.float64) / _divisor(b, metric, scales[i])[1]
              for i, b in enumerate(blocks)]
        if not ys:
            return np.zeros((0, 0))
        out = np.concatenate(ys, axis=1)
        out /= np.sqrt(len(ys))
        return out.astype(np.float32) if out.size >= F32_ROWS_MIN else out
    widths = [int(w) for w in widths]
    if not widths:
        return np.zeros((0, 0))
    root, out, k, made = np.sqrt(len(widths)), None, 0, 0
    for i, b in enumerate(blocks):
        made += 1
        if i >= len(widths):
            raise ValueError(f"joint_rows: more blocks than the {len(widths)} widths given")
        b = b.toarray() if sp.issparse(b) else _rows(b)
        if b.shape[1] != widths[i]:
            raise ValueError(f"joint_rows: block {i} has {b.shape[1]} columns, not {widths[i]}")
        if out is None:
            dt = np.float32 if b.shape[0] * sum(widths) >= F32_ROWS_MIN else np.float64
            out = np.empty((b.shape[0], sum(widths)), dtype=dt)
        div = _divisor(b, metric, None if scales is None else scales[i])[1]
        step = max(1, _F64_CHUNK // max(b.shape[1], 1))
        for r in range(0, b.shape[0], step):
            y = np.asarray(b[r:r + step], dtype=np.float64) / (div[r:r + step] if np.ndim(div) else div)
            y /= root
            out[r:r + step, k:k + b.shape[1]] = y
        k += b.shape[1]
        del b
    if made != len(widths):
        raise ValueError(f"joint_rows: {made} blocks for {len(widths)} widths")
    return out


def algorithm1(X, eps, linkage_method="average", metric="cosine"):
    """Reference: the paper's Algorithm 1 for one layer, plainly (full distance
    matrix).  Under cosine, all-zero rows (no direction: ``pdist`` gives NaN)
    are one class of their own, as in :func:`threshold_clusters`; merged into
    a nonzero row's class they would be given its nonzero base row."""
    Y, norms, zero = prepare_rows(X, metric)
    if Y.shape[0] < 2:
        return np.zeros(Y.shape[0], dtype=np.int64)
    lab = np.zeros(Y.shape[0], dtype=np.int64)
    keep = np.flatnonzero(~zero) if metric == "cosine" else np.arange(Y.shape[0])
    if keep.size == 1:
        lab[keep] = 1
    elif keep.size:
        d = pdist(Y[keep], "cosine" if metric == "cosine" else "euclidean")
        lab[keep] = fcluster(linkage(d, method=linkage_method), t=eps, criterion="distance")
    return canonical(lab)
