"""Signatures and the exact split (docs/design.md section 3).

Definitions.  A colouring ``c`` of the nodes is *in-balanced* (a fibration's
fibers) iff for every two nodes ``i ~ j`` and every colour ``a``::

    sum_{k: c(k) = a} W[i, k] == sum_{k: c(k) = a} W[j, k]

(weights are vectors, edge categories are kept apart, bias edges come from a
constant node of its own colour).  *Out-balanced* (opfibration) is the same on
outgoing weights; *balanced both ways* is the strict covering.  The
*signature* of a node is the vector of these per-colour sums: one entry per
key ``(colour of the other end, weight component, edge type)``, each other
end's weight multiplied by its scale (the rescaling merge, see
:mod:`fibgraph.engine.tolerance`).

:func:`split_exact` gives each node of a level the new colour ``(old colour,
signature)`` under :class:`~fibgraph.engine.criteria.Exact`.  Each signature
entry is compared with tolerance ``rtol * max(max|entry|, max|weight|)`` over
the level (0 for integer weights); values are grouped by sorting and
splitting at gaps larger than the tolerance (a chain of groups spanning more
than the tolerance is cut at the grid ``floor(value / tol)``, so that
chaining cannot merge values far apart), then rows are hashed (two
independent 64-bit hashes, :mod:`fibgraph.hashing`) and numbered with
:func:`fibgraph.engine.sparse.group_rows`.  Graphs whose blocks are all
sparse take the fast path :func:`fibgraph.engine.sparse.sparse_hash` (one
sparse product per round); dense blocks are hashed per column here (large
blocks probed on a few columns first).

:func:`signature_matrix` gives the signature rows themselves, with aligned
columns, for the tolerance split.

Example: two nodes fed by equal weights from one colour share a signature,
a third fed twice as much does not::

    >>> import numpy as np
    >>> from fibgraph.graph import WeightedDigraph
    >>> g = WeightedDigraph.from_edges([0, 0, 0], [1, 2, 3], [1.0, 1.0, 2.0])
    >>> split_exact(g, np.arange(4), ["in"], np.array([0, 1, 1, 1]), np.ones(4), 1e-5)
    array([0, 1, 1, 2])
"""
from __future__ import annotations

import numpy as np

from ..graph import WeightedDigraph
from ..hashing import GOLD, M1, M2, mix
from ..pages import blocks, drop_mapped, read
from .rowparts import F32_ROWS_MIN, RowParts, sparse_rows, sparse_width
from .sparse import group_rows, group_sorted, hash_entries, quantise, sparse_hash, value_labels
from ..lazy import lazy_module

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = ["split_exact", "signature_matrix", "dense_rows", "dense_width"]


def _key(colour, d, etype=None):
    k = mix(mix(np.asarray(colour, dtype=np.int64).astype(np.uint64)) + np.asarray(d, dtype=np.uint64))
    if etype is not None:
        k = mix(k ^ mix(np.asarray(etype, dtype=np.int64).astype(np.uint64) + M1))
    return k



# ------------------------------------------------------- signature parts
def _parts(graph: WeightedDigraph, nodes_mask, direction, colours, scales):
    """Per-block aggregated signatures of the target nodes in ``nodes_mask``.

    Yields dicts: dense parts ``{targets, A (n_t, K), keys (K,)}`` and sparse
    parts ``{t, key, v}`` (global target ids, one entry per (target, key)).
    """
    for b in graph.blocks:
        if direction == "in":
            targets, others = b.dst, b.src
        else:
            targets, others = b.src, b.dst
        sel = nodes_mask[targets]
        if not sel.any():
            continue
        if b.dense:
            if not sel.all():
                raise ValueError(f"block {b.name!r} straddles a level")
            W = b.weight if direction == "in" else b.weight.transpose(1, 0, 2)
            n_t, n_o, D = W.shape
            uc, inv = np.unique(colours[others], return_inverse=True)
            s = scales[others]
            if uc.size == n_o and np.all(s == 1):
                # every other end has a colour of its own: the signature is W
                # itself (a view, float32 as stored), its columns keyed in place
                A = W[:, :, 0] if D == 1 else W.reshape(n_t, n_o * D)
                keys = _key(np.repeat(colours[others], D), np.tile(np.arange(D), n_o))
                yield {"targets": targets, "A": A, "keys": keys, "exact": b.exact}
                continue
            # columns sorted by colour, then one segmented sum (float64), in
            # row chunks so that no float64 copy of the whole block is made;
            # a big float32 weight's sums are stored float32 (as its unmerged
            # rows are: half the memory, rounding far below any tolerance)
            order = np.argsort(inv, kind="stable")
            starts = np.flatnonzero(np.r_[True, inv[order][1:] != inv[order][:-1]])
            so = None if np.all(s == 1) else s[order][None, :, None]
            big32 = W.dtype == np.float32 and n_t * uc.size * D >= F32_ROWS_MIN
            A = np.empty((n_t, uc.size, D), dtype=np.float32 if big32 else np.float64)
            step = max(1, _CHUNK // max(n_o * D, 1))
            # one pair of chunk buffers reused: a fresh chunk per step is fresh
            # pages to fault in whenever the heap has just been trimmed
            b_in = np.empty((min(step, n_t), n_o, D), dtype=W.dtype)
            b64 = b_in if W.dtype == np.float64 else np.empty(b_in.shape)
            for r0 in range(0, n_t, step):
                c = W[r0:r0 + step]
                n = c.shape[0]
                np.take(c, order, axis=1, out=b_in[:n], mode="clip")
                drop_mapped(c)
                if b64 is not b_in:
                    b64[:n] = b_in[:n]
                if so is not None:
                    b64[:n] *= so
                if A.dtype == np.float64:
                    np.add.reduceat(b64[:n], starts, axis=1, out=A[r0:r0 + step])
                else:
                    A[r0:r0 + step] = np.add.reduceat(b64[:n], starts, axis=1)
            del b_in, b64
            keys = _key(np.repeat(uc, D), np.tile(np.arange(D), uc.size))
            yield {"targets": targets, "A": A.reshape(n_t, uc.size * D), "keys": keys,
                   "exact": b.exact}
        else:
            r, c = (b.rows, b.cols) if direction == "in" else (b.cols, b.rows)
            t = targets[r]
            keep = sel[r]
            t, o = t[keep], others[c[keep]]
            v = b.values[keep] * scales[o][:, None]
            D = v.shape[1]
            et = None if b.etype is None else np.repeat(b.etype[keep], D)
            key = _key(np.repeat(colours[o], D), np.tile(np.arange(D), o.size), et)
            yield {"t": np.repeat(t, D), "key": key, "v": v.reshape(-1), "exact": b.exact}


def _dense_to_sparse(p):
    n_t, K = p["A"].shape
    return {"t": np.repeat(p["targets"], K), "key": np.tile(p["keys"], n_t),
            "v": p["A"].reshape(-1), "exact": p["exact"]}


def _sum_sparse(parts):
    """Concatenate sparse parts and add entries with the same (target, key)."""
    t = np.concatenate([p["t"] for p in parts])
    key = np.concatenate([p["key"] for p in parts])
    v = np.concatenate([p["v"] for p in parts])
    exact = all(p["exact"] for p in parts)
    if t.size == 0:
        return {"t": t, "key": key, "v": v, "exact": exact}
    order = np.lexsort((key, t))
    t, key, v = t[order], key[order], v[order]
    start = np.concatenate([[True], (t[1:] != t[:-1]) | (key[1:] != key[:-1])])
    idx = np.flatnonzero(start)
    return {"t": t[idx], "key": key[idx], "v": np.add.reduceat(v, idx), "exact": exact}


def _merge_parts(parts):
    """Dense and sparse parts whose values can be hashed (and compared) part by
    part.  Values of one key are grouped together (:func:`_hash_columns`), so
    parts that share a key are hashed as one: dense parts over disjoint
    targets with the same keys (an LSTM's four gates reading the same inputs)
    are stacked into one dense part; any other sharing (a (target, key) two
    parts may both hold, or keys shared only in part, or with a sparse part)
    turns the dense part into entries, summed with the sparse ones.  Entries
    take 24 bytes per weight and a sort of them all, so they are the last
    resort."""
    dense = [p for p in parts if "A" in p]
    sparse = [p for p in parts if "A" not in p]
    if len(dense) > 1 or sparse:
        spans = [(np.unique(p["targets"]), np.unique(p["keys"])) for p in dense]
        skeys = [np.unique(p["key"]) for p in sparse]
        comp = list(range(len(dense)))             # dense parts joined by a shared key (a few parts)
        for i in range(len(dense)):
            for j in range(i):
                if _meets(spans[i][1], spans[j][1]):
                    old, new = comp[i], comp[j]
                    comp = [new if c == old else c for c in comp]
        groups = {}
        for i, c in enumerate(comp):
            groups.setdefault(c, []).append(i)
        keep, to_sparse = [], []
        for idx in groups.values():
            g = [dense[i] for i in idx]
            alone = not any(_meets(spans[i][1], sk) for i in idx for sk in skeys)
            same = all(np.array_equal(p["keys"], g[0]["keys"]) for p in g)
            disjoint = np.unique(np.concatenate([spans[i][0] for i in idx])).size == sum(spans[i][0].size for i in idx)
            if alone and same and disjoint:        # one part, or the same keys over other targets: stacked
                keep.append(g[0] if len(g) == 1 else _stack(g))
            else:
                to_sparse += g
        dense = keep
        sparse += [_dense_to_sparse(p) for p in to_sparse]
    if sparse:
        sparse = [_sum_sparse(sparse)]
    return dense, sparse


def _stack(group):
    """Dense parts with the same keys over disjoint targets as one part."""
    dt = np.float32 if all(p["A"].dtype == np.float32 for p in group) else np.float64
    A = np.concatenate([p["A"] for p in group], axis=0, dtype=dt)
    for p in group:
        drop_mapped(p["A"])           # a part that is a view of a mapped weight: its pages go back
    return {"targets": np.concatenate([p["targets"] for p in group]), "A": A, "keys": group[0]["keys"],
            "exact": all(p["exact"] for p in group)}


def _meets(a, b):
    """Whether the sorted unique arrays ``a`` and ``b`` share an element."""
    if a.size == 0 or b.size == 0 or a[-1] < b[0] or b[-1] < a[0]:
        return False
    pos = np.searchsorted(b, a)
    pos[pos == b.size] = b.size - 1
    return bool(np.any(b[pos] == a))


# ---------------------------------------------------------- quantising
_PROBE_COLUMNS = 8
_SINGLETON_SALT = np.uint64(0xD6E8FEB86659FD93)


_CHUNK = 1 << 19       # entries of one float64 chunk of a dense block (4 MB)


def col_chunks(n_rows, K, chunk=_CHUNK):
    """Column ranges of about ``chunk`` entries for a block of ``n_rows`` rows."""
    step = max(1, chunk // max(n_rows, 1))
    return [(k0, min(K, k0 + step)) for k0 in range(0, K, step)]


def _abs_max(values):
    """max |values| without a temporary of the values' size, a block of its
    memory at a time (a mapped weight's pages go back block by block)."""
    if values.size == 0:
        return 0.0
    m = 0.0
    for c in blocks(values, _CHUNK):
        m = max(m, float(c.max()), -float(c.min()))
        drop_mapped(c)
    return m


def _hash_dense(A, keys, tol):
    """Hashes of the rows of a dense signature block: values grouped per column
    (rule of :mod:`fibgraph.engine.sparse`), then ``(key, group)`` mixes summed per row.

    The block may be a float32 view of a weight; it is read in column chunks
    of about ``_CHUNK`` entries (a row's hash is a sum over columns), so the
    float64 temporaries stay bounded whatever the block's size.  Large blocks
    are first probed on a few columns: a row whose probe groups no other row
    shares differs from every row in this block, so it gets a hash of its own
    and only the remaining rows are grouped on every column.
    """
    n_t, K = A.shape
    if n_t > 256 and K > 4 * _PROBE_COLUMNS:
        var = np.concatenate([read(A[:, k0:k1]).var(axis=0) for k0, k1 in col_chunks(n_t, K)])
        cols = np.argsort(-var, kind="stable")[:_PROBE_COLUMNS]
        del var
        p1, p2 = _hash_columns(np.asarray(A[:, cols], dtype=np.float64), keys[cols], tol)
        probe = np.stack([p1.view(np.int64), p2.view(np.int64)], 1)
        _, inv, cnt = np.unique(probe, axis=0, return_inverse=True, return_counts=True)
        shared = cnt[inv.reshape(-1)] > 1
        if not shared.all():
            h1 = np.empty(n_t, np.uint64)
            h2 = np.empty(n_t, np.uint64)
            lone = np.flatnonzero(~shared)
            h1[lone] = mix(lone.astype(np.uint64) + _SINGLETON_SALT)
            h2[lone] = mix(lone.astype(np.uint64) ^ _SINGLETON_SALT)
            rest = np.flatnonzero(shared)
            if rest.size:
                h1[rest], h2[rest] = _hash_dense_all(A, keys, tol, rest)
            return h1, h2
    return _hash_dense_all(A, keys, tol)


def _hash_dense_all(A, keys, tol, rows=None):
    """Row hashes of ``A`` (or of its rows ``rows``), one column chunk at a time."""
    n_t = A.shape[0] if rows is None else rows.size
    K = A.shape[1]
    h1 = np.zeros(n_t, np.uint64)
    h2 = np.zeros(n_t, np.uint64)
    if n_t == 0 or K == 0:
        return h1, h2
    for k0, k1 in col_chunks(n_t, K):
        sub = read(A[:, k0:k1], order="C") if rows is None else np.ascontiguousarray(A[rows, k0:k1], dtype=np.float64)
        a, b = _hash_columns(sub, keys[k0:k1], tol)
        h1 += a
        h2 += b
    return h1, h2


def _hash_columns(A, keys, tol):
    """Row hashes of one float64 block (all its columns at once)."""
    n_t, K = A.shape
    if n_t == 0 or K == 0:
        return np.zeros(n_t, np.uint64), np.zeros(n_t, np.uint64)
    if tol > 0:
        order = np.argsort(A, axis=0, kind="stable")          # per column
        S = np.take_along_axis(A, order, axis=0)
        small = np.diff(S, axis=0) <= tol
        gap = np.vstack([np.ones((1, K), bool), ~small])
        gid = np.cumsum(gap, axis=0) + np.arange(K)[None, :] * (n_t + 1)   # plain gap chaining
        zero = np.zeros(K * (n_t + 1) + 1, bool)
        zero[gid[np.abs(S) <= tol]] = True
        lab_sorted = np.where(zero[gid], 0, gid)
        del gap, gid, zero
        # a chain can span more than tol only if it has 3+ values: regroup those
        # columns with the grid rule (group_sorted equals gap chaining elsewhere)
        cand = np.flatnonzero((small[:-1] & small[1:]).any(axis=0)) if n_t > 2 else []
        del small
        if len(cand):
            sub = np.ascontiguousarray(S[:, cand].T).reshape(-1)
            newkey = np.zeros(sub.size, bool)
            newkey[::n_t] = True
            g = group_sorted(sub, newkey, tol).reshape(len(cand), n_t).T
            lab_sorted[:, cand] = np.where(g == 0, 0, g + K * (n_t + 1) + 1)
        del S
        L = np.empty((n_t, K), np.int64)
        np.put_along_axis(L, order, lab_sorted, axis=0)
    else:
        L = value_labels(A)
    Lu = L.view(np.uint64)
    nz = L != 0
    h1 = np.where(nz, mix(keys[None, :] + Lu * GOLD), np.uint64(0)).sum(axis=1, dtype=np.uint64)
    h2 = np.where(nz, mix((keys[None, :] ^ M2) + Lu * M1), np.uint64(0)).sum(axis=1, dtype=np.uint64)
    return h1, h2


def _hash_sparse(t_local, key, v, tol, n_t):
    if key.size == 0:
        return np.zeros(n_t, np.uint64), np.zeros(n_t, np.uint64)
    _, kcode = np.unique(key, return_inverse=True)
    lab = quantise(kcode.reshape(-1), v, tol)
    return hash_entries(key, lab, t_local, n_t)


def _tol(values, exact, rtol, wscale=0.0):
    """``rtol`` times the larger of the largest sum and the largest single weight
    (sums that cancel to rounding residue must not shrink the tolerance)."""
    if exact or values.size == 0:
        return 0.0
    return float(rtol * max(_abs_max(values), wscale))


def _weight_scale(graph, mask, direction, scales):
    """Largest |weight| (times the largest scale) over the blocks that feed ``mask``."""
    m = 0.0
    for b in graph.blocks:
        targets = b.dst if direction == "in" else b.src
        if not mask[targets].any():
            continue
        m = max(m, _abs_max(b.weight if b.dense else b.values))
    return m * (float(scales.max()) if scales.size else 1.0)


# ------------------------------------------------------------- one split
def split_exact(graph, nodes, directions, colours, scales, rtol):
    """New local labels of ``nodes``: (old colour, signatures) up to rounding."""
    mask = np.zeros(graph.n, dtype=bool)
    mask[nodes] = True
    local = np.full(graph.n, -1, dtype=np.int64)
    local[nodes] = np.arange(nodes.size)
    cols = [colours[nodes].astype(np.int64)]
    for direction in directions:
        wscale = _weight_scale(graph, mask, direction, scales)
        fast = sparse_hash(graph, nodes, mask, local, direction, colours, scales, rtol, wscale)
        if fast is not None:  # every block is sparse: one sparse product, no sort
            cols += [fast[0], fast[1]]
            continue
        dense, sparse = _merge_parts(list(_parts(graph, mask, direction, colours, scales)))
        h1 = np.zeros(nodes.size, np.uint64)
        h2 = np.zeros(nodes.size, np.uint64)
        for p in dense:
            a, b = _hash_dense(p["A"], p["keys"], _tol(p["A"], p["exact"], rtol, wscale))
            tl = local[p["targets"]]
            h1[tl] += a
            h2[tl] += b
        for p in sparse:
            a, b = _hash_sparse(local[p["t"]], p["key"], p["v"], _tol(p["v"], p["exact"], rtol, wscale),
                                nodes.size)
            h1 += a
            h2 += b
        cols += [h1, h2]
    return group_rows(cols)


def signature_matrix(graph, nodes, directions, colours, scales):
    """Signature rows of ``nodes`` as a (sparse) matrix with aligned columns; a
    big dense part over only some of the rows (an LSTM level's gates) makes it
    a :class:`~fibgraph.engine.rowparts.RowParts` instead: the part as it is,
    not filled with zero rows or copied into a sparse matrix."""
    mask = np.zeros(graph.n, dtype=bool)
    mask[nodes] = True
    local = np.full(graph.n, -1, dtype=np.int64)
    local[nodes] = np.arange(nodes.size)
    mats, held, loose = [], [], []
    exact = True
    for direction in directions:
        dense, sparse = _merge_parts(list(_parts(graph, mask, direction, colours, scales)))
        for p in dense:
            exact &= p["exact"]
            tl = local[p["targets"]]
            held.append((tl, p["A"]))
            if np.array_equal(tl, np.arange(nodes.size)):
                mats.append(p["A"])                  # no copy (a float32 view of a weight stays one)
                continue
            mats.append((tl, p["A"]))                # zero-filled below, unless the rows stay in parts
        for p in sparse:
            exact &= p["exact"]
            uk, kcol = np.unique(p["key"], return_inverse=True)
            loose.append(sp.csr_matrix((p["v"], (local[p["t"]], kcol)), shape=(nodes.size, uk.size)))
            mats.append(loose[-1])
    if any(tl.size < nodes.size and nodes.size * A.shape[1] >= F32_ROWS_MIN for tl, A in held):
        return RowParts(nodes.size, held, sp.hstack(loose).tocsr() if loose else None), exact
    for k, m in enumerate(mats):
        if isinstance(m, tuple):                     # a dense part over some of the rows
            tl, A = m
            M = np.zeros((nodes.size, A.shape[1]))
            M[tl] = A
            mats[k] = sp.csr_matrix(M)
    if not mats:
        return np.zeros((nodes.size, 0)), exact
    dense_mats = [m for m in mats if isinstance(m, np.ndarray)]
    # rows of float32 weights that are big stay float32 (half the memory; the
    # clustering computes in float64 from them: fibgraph.engine.cluster)
    dt = np.float32 if dense_mats and all(m.dtype == np.float32 for m in dense_mats) and \
        nodes.size * sum(m.shape[1] for m in mats) >= F32_ROWS_MIN else np.float64
    if len(dense_mats) == len(mats):
        return (mats[0] if len(mats) == 1 else np.hstack(mats, dtype=dt)), exact
    dense_size = sum(m.size for m in dense_mats)
    sparse_size = sum(m.shape[0] * m.shape[1] for m in mats if not isinstance(m, np.ndarray))
    if dense_size and sparse_size <= dense_size:
        # a dense block beside narrow sparse ones (a weight and its bias): one
        # dense matrix, never a sparse copy of the dense block (~3x its size)
        return np.hstack([m if isinstance(m, np.ndarray) else m.toarray() for m in mats], dtype=dt), exact
    return sp.hstack([sp.csr_matrix(m) for m in mats]).tocsr(), exact


def dense_width(X, members):
    """The number of columns :func:`dense_rows` gives for ``members``."""
    if isinstance(X, RowParts):
        return X.width(members)
    if not sp.issparse(X):
        return X.shape[1]
    return sparse_width(X, members)


def dense_rows(X, members):
    """The rows ``members`` of a signature matrix as a dense array (of a sparse
    matrix or a :class:`~fibgraph.engine.rowparts.RowParts`: only the columns
    those rows use)."""
    if isinstance(X, RowParts):
        return X.rows(members)
    if not sp.issparse(X) and members.size == X.shape[0] and np.array_equal(members, np.arange(members.size)):
        return X                                     # every row, in order: no copy
    if sp.issparse(X):          # only the columns these rows use
        return sparse_rows(X, members, X.dtype)
    return X[members]
