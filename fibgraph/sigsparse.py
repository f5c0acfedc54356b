"""Vectorised pieces of the exact refinement step (used by :mod:`fibgraph.refine`).

The exact criterion compares per-colour weight sums ``s[i, key]`` (``key`` =
colour of the other end, vector component, edge type).  Two nodes get the
same new colour iff they had the same old colour and, for every key, their
sums are *equal*:

- integer (``exact``) weights: equal means equal (sums of integers stored as
  float64 are exact below 2**53); a zero sum is the same as no edge;
- float weights: values of one key are sorted and grouped, a new group
  starting at every gap larger than ``tol = rtol * max|s|`` (so values that
  differ by float rounding are never split).  A chain of such groups may
  drift: on a large graph thousands of distinct sums can be spaced closer
  than ``tol``, and chaining would merge values far apart.  A chain that
  spans more than ``tol`` is therefore cut at the grid ``floor(s / tol)``
  (each grid cell is narrower than ``tol``).  A group containing a value
  with ``|s| <= tol`` counts as zero, i.e. as no edge.

Node hashes are sums of 64-bit mixes of ``(key, group)`` over a node's
entries (two independent hashes, 128 bits in all), so equal multisets give
equal hashes.

:func:`sparse_hash` is the fast path for graphs whose edges are all in sparse
(COO) blocks, e.g. every graph read from a file: one ``argsort`` of an
``int64`` code ``target * K + key`` aggregates the sums (no 64-bit key
hashing, no two-key ``lexsort``) and a second one on ``(key, grid cell)``
groups float values.
"""
from __future__ import annotations

import numpy as np

from .refine import _GOLD, _M1, _M2, _mix

__all__ = ["quantise", "value_labels", "hash_entries", "sparse_hash", "group_rows"]

_LIMIT = 2 ** 62


def value_labels(v):
    """Exact labels: the bits of ``v`` (``-0.0`` becomes ``0.0``); 0 iff ``v == 0``."""
    v = np.asarray(v, dtype=np.float64) + 0.0
    return v.view(np.int64)


def quantise(key, v, tol):
    """Group labels (``int64``, 0 = zero) of values ``v`` grouped per ``key``.

    ``key``: non-negative ``int64`` codes; see the module docstring for the
    grouping rule.  With ``tol <= 0`` the labels are :func:`value_labels`.
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
        bstart = np.empty(m, bool)
        bstart[0] = True
        np.not_equal(cs[1:], cs[:-1], out=bstart[1:])
        starts = np.flatnonzero(bstart)
        del bstart
        first = cs[starts]
        del cs
        bkey, bbin = np.divmod(first, nb)
        del first
    else:  # pragma: no cover - astronomically many cells
        order = np.lexsort((v, key))
        ks, bs = key[order], b[order]
        bstart = np.concatenate([[True], (ks[1:] != ks[:-1]) | (bs[1:] != bs[:-1])])
        starts = np.flatnonzero(bstart)
        bkey, bbin = ks[starts], bs[starts]
        del ks, bs, bstart, b
    vs = v[order]
    vmin = np.minimum.reduceat(vs, starts)
    vmax = np.maximum.reduceat(vs, starts)
    np.abs(vs, out=vs)
    amin = np.minimum.reduceat(vs, starts)
    del vs
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
    del vmin, vmax, cend
    if long_chain.any():
        cid = np.cumsum(newchain) - 1
        newgroup = newchain | long_chain[cid]
        del cid
    else:
        newgroup = newchain
    gid = np.cumsum(newgroup)                     # 1-based group of every bin
    del newgroup, newchain
    zero = np.zeros(int(gid[-1]) + 1, bool)
    zero[gid[amin <= tol]] = True
    glab = np.where(zero[gid], 0, gid)
    del gid, zero, amin
    lab = np.empty(m, np.int64)
    lab[order] = np.repeat(glab, counts)
    return lab


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


def sparse_hash(graph, nodes, mask, local, direction, colours, scales, rtol):
    """``(h1, h2)`` signature hashes of ``nodes`` in ``direction`` when every
    block that touches them is sparse; ``None`` otherwise (caller falls back)."""
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
    K = ncol * D * E
    if n_t * K >= _LIMIT:
        return None
    all_nodes = n_t == graph.n
    unit = bool(np.all(scales == 1))
    codes, vals = [], []
    exact = True
    for b in blocks:
        exact &= bool(b.exact)
        r, c = (b.rows, b.cols) if direction == "in" else (b.cols, b.rows)
        targets, others = (b.dst, b.src) if direction == "in" else (b.src, b.dst)
        v = b.values
        et = b.etype
        if all_nodes and _is_arange(targets, graph.n):
            t = r                                   # local == global == row index
        else:
            t = targets[r]
            keep = mask[t]
            if not keep.all():
                t, c, v = t[keep], c[keep], v[keep]
                et = None if et is None else et[keep]
            t = local[t]
        o = c if _is_arange(others, graph.n) else others[c]
        key = colours[o].astype(np.int64)
        if not unit:
            v = v * scales[o][:, None]
        del o
        d = v.shape[1]
        if D > 1:
            key = (key * D)[:, None] + np.arange(d)[None, :]
        if E > 1:
            e = (np.zeros(v.shape[0], np.int64) if et is None
                 else 1 + np.searchsorted(etu, et))
            key = key * E + (e[:, None] if key.ndim == 2 else e)
        if key.ndim == 2:
            t = np.repeat(t, d)
            key = key.reshape(-1)
        code = t * K
        del t
        code += key
        del key
        codes.append(code)
        vals.append(v.reshape(-1))
    code = codes[0] if len(codes) == 1 else np.concatenate(codes)
    v = vals[0] if len(vals) == 1 else np.concatenate(vals)
    del codes, vals
    # aggregate entries with the same (target, key): multi-edges and same colour add
    order = np.argsort(code)
    code = code[order]
    v = np.asarray(v, dtype=np.float64)[order]
    del order
    s = np.empty(code.size, bool)
    if code.size:
        s[0] = True
    np.not_equal(code[1:], code[:-1], out=s[1:])
    idx = np.flatnonzero(s)
    del s
    if idx.size < code.size:
        v = np.add.reduceat(v, idx) if idx.size else v[:0]
        code = code[idx]
    del idx
    t = code // K
    key = code - t * K
    del code
    if exact:
        lab = value_labels(v)
    else:
        tol = float(rtol * np.abs(v).max()) if v.size else 0.0
        lab = quantise(key, v, tol) if tol > 0 else np.zeros(v.size, np.int64)
    del v
    key_u = _mix(key.astype(np.uint64))
    del key
    return hash_entries(key_u, lab, t, n_t, t_sorted=True)


def group_rows(cols):
    """Canonical labels of the rows of the columns ``cols`` (equal rows, equal label).

    One ``argsort`` of a 64-bit mix of the row; the rows inside each run are
    then checked and a full ``lexsort`` is used in the (astronomically rare)
    case of a collision.
    """
    from .partition import canonical

    cols = [np.asarray(c).view(np.uint64) if np.asarray(c).dtype != np.uint64 else np.asarray(c)
            for c in cols]
    n = cols[0].size
    if n == 0:
        return np.zeros(0, np.int64)
    h = _mix(cols[0])
    for c in cols[1:]:
        h = _mix(h ^ _mix(c + _M1))
    order = np.argsort(h)
    hs = h[order]
    new = np.empty(n, bool)
    new[0] = True
    np.not_equal(hs[1:], hs[:-1], out=new[1:])
    same = ~new[1:]
    ok = True
    for c in cols:
        cs = c[order]
        if np.any(cs[1:][same] != cs[:-1][same]):
            ok = False
            break
    if not ok:  # pragma: no cover
        order = np.lexsort(cols[::-1])
        new = np.zeros(n, bool)
        new[0] = True
        for c in cols:
            cs = c[order]
            new[1:] |= cs[1:] != cs[:-1]
    lab = np.empty(n, np.int64)
    lab[order] = np.cumsum(new) - 1
    return canonical(lab)
