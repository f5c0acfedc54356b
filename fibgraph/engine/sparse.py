"""Vectorised pieces of the exact refinement step (used by
:mod:`fibgraph.engine.signatures`; docs/design.md section 3).

The exact criterion compares per-colour weight sums ``s[i, key]`` (``key`` =
colour of the other end, vector component, edge type).  Two nodes get the
same new colour iff they had the same old colour and, for every key, their
sums are *equal*:

- integer (``exact``) weights: equal means equal (sums of integers stored as
  float64 are exact below 2**53); a zero sum is the same as no edge;
- float weights: values of one key are sorted and grouped, a new group
  starting at every gap larger than ``tol = rtol * max(max|s|, max|w|)``
  (``w``: the single weights, so that sums cancelling to rounding residue
  do not shrink the tolerance; values that
  differ by float rounding stay together).  A chain of such groups may
  drift: on a large graph thousands of distinct sums can be spaced closer
  than ``tol``, and chaining would merge values far apart (measured: 2M
  nodes with random float in-weights lost over 1000 true distinctions).  A
  chain that spans more than ``tol`` is therefore first cut at its gaps
  wider than ``tol / 32`` (far above float rounding); a piece still wider
  than ``tol`` is cut at the grid ``floor(s / tol)`` (each grid cell is
  narrower than ``tol``).  Only in such a dense piece can two values that
  differ by rounding be split, when a grid line falls between them.
  A group containing a value with ``|s| <= tol`` counts as
  zero, i.e. as no edge.

Node hashes are sums of 64-bit mixes of ``(key, group)`` over a node's
entries (two independent hashes, 128 bits in all), so equal multisets give
equal hashes.

:func:`sparse_hash` is the fast path for graphs whose edges are all in sparse
(COO) blocks, e.g. every graph read from a file: the per-colour sums of a
round are one sparse product ``A @ P`` (``A``: the edge matrix, built once and
cached on the graph; ``P``: the colour indicator), O(m) with no sort and no
64-bit key hashing; float values are then grouped with one ``argsort`` on
``(key, grid cell)``.  :func:`group_rows` numbers the new colours with one
``argsort`` of the nodes' hashes.
"""
from __future__ import annotations

import numpy as np

from ..hashing import GOLD as _GOLD, M1 as _M1, M2 as _M2, mix as _mix

__all__ = ["quantise", "group_in_order", "group_sorted", "value_labels", "hash_entries", "sparse_hash", "group_rows"]

_LIMIT = 2 ** 62


def value_labels(v):
    """Exact labels: the bits of ``v`` (``-0.0`` becomes ``0.0``); 0 iff ``v == 0``."""
    v = np.asarray(v, dtype=np.float64) + 0.0
    return v.view(np.int64)


def quantise(key, v, tol):
    """Group labels (``int64``, 0 = zero) of values ``v`` grouped per ``key``.

    ``key``: non-negative ``int64`` codes; see the module docstring for the
    grouping rule.  With ``tol <= 0`` the labels are :func:`value_labels`.
    One ``argsort`` of the int64 code ``(key, floor(v / tol))``.
    """
    v = np.asarray(v, dtype=np.float64)
    m = v.size
    if m == 0:
        return np.zeros(0, np.int64)
    if not tol > 0:
        return value_labels(v)
    key = np.asarray(key, dtype=np.int64)
    b = np.floor(v / tol).astype(np.int64)
    bmin = int(b.min())
    nb = int(b.max()) - bmin + 1
    kmax = int(key.max()) + 1
    if kmax * nb < _LIMIT:
        code = key * nb
        code += b
        code -= bmin
        del b
        order = np.argsort(code)
        cs = code[order]
        del code
        newkey = np.empty(m, bool)
        newkey[0] = True
        np.not_equal(cs[1:] // nb, cs[:-1] // nb, out=newkey[1:])
        del cs
    else:  # pragma: no cover - astronomically many cells
        order = np.lexsort((v, key))
        ks = key[order]
        newkey = np.concatenate([[True], ks[1:] != ks[:-1]])
        del ks, b
    lab = np.empty(m, np.int64)
    lab[order] = group_in_order(v[order], newkey, tol)
    return lab


def group_sorted(vs, newkey, tol):
    """:func:`group_in_order` for values sorted inside every key: plain gap
    chaining, and the grid rule only when some chain spans more than ``tol``."""
    m = vs.size
    if m == 0:
        return np.zeros(0, np.int64)
    newchain = newkey.copy()
    newchain[1:] |= (vs[1:] - vs[:-1]) > tol
    cstart = np.flatnonzero(newchain)
    cend = np.append(cstart[1:], m) - 1
    gid = np.cumsum(newchain)                     # 1-based chain of every value
    zero = np.zeros(int(gid[-1]) + 1, bool)
    zero[gid[np.abs(vs) <= tol]] = True
    lab = np.where(zero[gid], 0, gid)
    long_chain = vs[cend] - vs[cstart] > tol
    if long_chain.any():                          # regroup only the long chains
        sel = long_chain[gid - 1]
        sub = group_in_order(vs[sel], newchain[sel], tol)
        lab[sel] = np.where(sub == 0, 0, sub + int(gid[-1]))
    return lab


def group_in_order(vs, newkey, tol):
    """Group labels (0 = zero) of values ``vs`` given in an order where every key
    is contiguous (``newkey`` marks each key's first entry) and, inside a key,
    the grid cells ``floor(v / tol)`` do not decrease (e.g. sorted values)."""
    m = vs.size
    if m == 0:
        return np.zeros(0, np.int64)
    b = np.floor(vs / tol).astype(np.int64)
    bstart = newkey.copy()
    bstart[1:] |= b[1:] != b[:-1]
    starts = np.flatnonzero(bstart)
    bkey = np.cumsum(newkey)[starts]
    bbin = b[starts]
    del b, bstart
    vmin = np.minimum.reduceat(vs, starts)
    vmax = np.maximum.reduceat(vs, starts)
    amin = np.minimum.reduceat(np.abs(vs), starts)
    counts = np.diff(np.append(starts, m))
    del starts
    nbins = vmin.size
    newchain = np.empty(nbins, bool)
    newchain[0] = True
    newchain[1:] = ((bkey[1:] != bkey[:-1]) | (bbin[1:] != bbin[:-1] + 1)
                    | ((vmin[1:] - vmax[:-1]) > tol))
    del bkey, bbin
    cstart = np.flatnonzero(newchain)
    cend = np.append(cstart[1:], nbins) - 1
    long_chain = (vmax[cend] - vmin[cstart]) > tol
    del cend
    if long_chain.any():
        # Inside a chain wider than tol, first cut only at gaps wider than
        # tol / 32 (far above float rounding, so values that differ by rounding
        # stay together); only sub-chains still wider than tol are cut at the
        # grid lines.
        inlong = long_chain[np.cumsum(newchain) - 1]
        fine = np.empty(nbins, bool)
        fine[0] = True
        fine[1:] = (vmin[1:] - vmax[:-1]) > tol / 32
        newsub = newchain | (inlong & fine)
        sstart = np.flatnonzero(newsub)
        send = np.append(sstart[1:], nbins) - 1
        long_sub = (vmax[send] - vmin[sstart]) > tol
        newgroup = newsub | (long_sub[np.cumsum(newsub) - 1] & inlong)
        del inlong, fine, newsub, sstart, send, long_sub
    else:
        newgroup = newchain
    del vmin, vmax
    gid = np.cumsum(newgroup)                     # 1-based group of every bin
    del newgroup, newchain
    zero = np.zeros(int(gid[-1]) + 1, bool)
    zero[gid[amin <= tol]] = True
    glab = np.where(zero[gid], 0, gid)
    return np.repeat(glab, counts)


def hash_entries(key_u, lab, t, n_t, t_sorted=False):
    """Per-target sums of two 64-bit mixes of ``(key_u, lab)``; entries with
    ``lab == 0`` are left out.  ``key_u``: ``uint64`` key identities."""
    h1 = np.zeros(n_t, np.uint64)
    h2 = np.zeros(n_t, np.uint64)
    if lab.size == 0:
        return h1, h2
    nz = lab != 0
    if not nz.all():
        key_u, lab, t = key_u[nz], lab[nz], t[nz]
    if lab.size == 0:
        return h1, h2
    lu = lab.view(np.uint64)
    a = _mix(key_u + lu * _GOLD)
    b = _mix((key_u ^ _M2) + lu * _M1)
    if t_sorted:
        s = np.empty(t.size, bool)
        s[0] = True
        np.not_equal(t[1:], t[:-1], out=s[1:])
        starts = np.flatnonzero(s)
        tt = t[starts]
        h1[tt] = np.add.reduceat(a, starts)
        h2[tt] = np.add.reduceat(b, starts)
    else:
        np.add.at(h1, t, a)
        np.add.at(h2, t, b)
    return h1, h2


def _is_arange(a, n):
    return a.size == n and (n == 0 or (a[0] == 0 and a[-1] == n - 1 and
                                       bool(np.all(np.diff(a) == 1))))


def _fingerprint(blocks, direction, D, E):
    # the arrays themselves (compared by identity, kept alive by the cache, so an
    # id cannot be reused by a new array while the entry exists)
    return (direction, D, E) + tuple((b.rows, b.cols, b.values, b.etype) for b in blocks)


def _same(fp1, fp2):
    return (len(fp1) == len(fp2) and fp1[:3] == fp2[:3]
            and all(a is b for t1, t2 in zip(fp1[3:], fp2[3:]) for a, b in zip(t1, t2)))


def _edge_matrix(graph, blocks, direction, mask, local, n_t, D, E, etu):
    """CSR ``A[t, (o, d, e)]``: summed weight component ``d`` of the type-``e``
    edges between target ``t`` (local index) and other end ``o``.  Cached on the
    graph for the all-nodes case (the rounds schedule reuses it every round)."""
    import scipy.sparse as sp

    all_nodes = n_t == graph.n
    fp = _fingerprint(blocks, direction, D, E)
    cache = graph.__dict__.setdefault("_edge_matrix_cache", {})
    hit = cache.get(direction)
    if all_nodes and hit is not None and _same(hit[0], fp):
        return hit[1]
    DE = D * E
    rows, cols, vals = [], [], []
    for b in blocks:
        r, c = (b.rows, b.cols) if direction == "in" else (b.cols, b.rows)
        targets, others = (b.dst, b.src) if direction == "in" else (b.src, b.dst)
        v = b.values
        et = b.etype
        t = r if (all_nodes and _is_arange(targets, graph.n)) else targets[r]
        if not all_nodes:
            keep = mask[t]
            t, c, v = t[keep], c[keep], v[keep]
            et = None if et is None else et[keep]
            t = local[t]
        o = c if _is_arange(others, graph.n) else others[c]
        d = v.shape[1]
        col = o * DE if DE > 1 else o
        if E > 1:
            e = np.zeros(o.size, np.int64) if et is None else 1 + np.searchsorted(etu, et)
            col = col + e
        if d > 1:
            col = (col[:, None] + (np.arange(d) * E)[None, :]).reshape(-1)
            t = np.repeat(t, d)
        rows.append(t)
        cols.append(col)
        vals.append(np.asarray(v, dtype=np.float64).reshape(-1))
    r = rows[0] if len(rows) == 1 else np.concatenate(rows)
    c = cols[0] if len(cols) == 1 else np.concatenate(cols)
    v = vals[0] if len(vals) == 1 else np.concatenate(vals)
    del rows, cols, vals
    A = sp.coo_matrix((v, (r, c)), shape=(n_t, graph.n * DE)).tocsr()
    del r, c, v
    if all_nodes:
        cache[direction] = (fp, A)
    return A


def sparse_hash(graph, nodes, mask, local, direction, colours, scales, rtol, wscale=0.0):
    """``(h1, h2)`` signature hashes of ``nodes`` in ``direction`` when every
    block that touches them is sparse; ``None`` otherwise (caller falls back).

    The per-colour sums are one sparse product ``S = A @ P`` (``A``: the edge
    matrix, cached across rounds; ``P[(o, d, e), (colour(o), d, e)] = scale(o)``),
    O(m) without sorting.  The cache lives on the graph (``_edge_matrix_cache``,
    one entry per direction, keyed by the identity of the blocks' arrays):
    replace a block's arrays rather than editing them in place, or drop the
    cache with ``graph.__dict__.pop("_edge_matrix_cache", None)``.
    """
    import scipy.sparse as sp

    n_t = nodes.size
    blocks = []
    for b in graph.blocks:
        targets = b.dst if direction == "in" else b.src
        if not mask[targets].any():
            continue
        if b.dense:
            return None
        blocks.append(b)
    if not blocks:
        return np.zeros(n_t, np.uint64), np.zeros(n_t, np.uint64)
    ncol = int(colours.max()) + 1
    D = max(b.dim for b in blocks)
    ets = [np.unique(b.etype) for b in blocks if b.etype is not None]
    etu = np.unique(np.concatenate(ets)) if ets else np.zeros(0, np.int64)
    E = 1 + etu.size
    DE = D * E
    exact = all(bool(b.exact) for b in blocks)
    A = _edge_matrix(graph, blocks, direction, mask, local, n_t, D, E, etu)
    # S = A @ P without P (n * DE rows: most of them never read): A's column
    # (o, d, e) goes to (colour(o), d, e) times scale(o), duplicates summed and
    # zero sums dropped, as the sparse product does
    o = A.indices // DE
    col = colours[o].astype(np.int64) * DE + A.indices % DE
    val = A.data.astype(np.float64, copy=True) if np.all(scales == 1) else A.data * scales[o].astype(np.float64)
    del o
    S = sp.csr_matrix((val, col, A.indptr.copy()), shape=(n_t, ncol * DE))
    del col, val
    S.sum_duplicates()
    S.eliminate_zeros()
    key = S.indices.astype(np.int64)
    v = S.data
    t = np.repeat(np.arange(n_t, dtype=np.int64), np.diff(S.indptr))
    del S
    if exact:
        lab = value_labels(v)
    else:
        tol = float(rtol * max(np.abs(v).max(), wscale)) if v.size else 0.0
        lab = quantise(key, v, tol) if tol > 0 else np.zeros(v.size, np.int64)
    del v
    key_u = _mix(key.astype(np.uint64))
    del key
    return hash_entries(key_u, lab, t, n_t, t_sorted=True)


def group_rows(cols):
    """Canonical labels (classes numbered by smallest member) of the rows of
    the columns ``cols``: equal rows, equal label.

    One ``argsort`` of a 64-bit mix of the row; the rows inside each run are
    then checked and a full ``lexsort`` is used in the (astronomically rare)
    case of a collision.
    """
    cols = [np.ascontiguousarray(c).view(np.uint64) for c in cols]
    n = cols[0].size
    if n == 0:
        return np.zeros(0, np.int64)
    h = _mix(cols[0])
    for c in cols[1:]:
        h = _mix(h ^ _mix(c + _M1))
    order = np.argsort(h)
    hs = h[order]
    del h
    new = np.empty(n, bool)
    new[0] = True
    np.not_equal(hs[1:], hs[:-1], out=new[1:])
    del hs
    same = ~new[1:]
    for c in cols:
        cs = c[order]
        if np.any(cs[1:][same] != cs[:-1][same]):  # pragma: no cover - 64-bit collision
            order = np.lexsort(cols[::-1])
            new = np.zeros(n, bool)
            new[0] = True
            for c2 in cols:
                cs2 = c2[order]
                new[1:] |= cs2[1:] != cs2[:-1]
            break
    starts = np.flatnonzero(new)
    first = np.minimum.reduceat(order, starts)        # smallest member of every class
    is_first = np.zeros(n, bool)
    is_first[first] = True
    rank = np.cumsum(is_first) - 1                    # canonical number of a class's first node
    gid = np.cumsum(new) - 1
    lab = np.empty(n, np.int64)
    lab[order] = rank[first][gid]
    return lab
