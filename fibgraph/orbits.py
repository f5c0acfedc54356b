"""Automorphism orbits of a weighted digraph, weights and edge types respected.

An *automorphism* is a permutation ``p`` of the nodes that keeps the initial
colours (``initial[p(i)] == initial[i]``) and every weighted edge:
``W[p(i), p(k)] == W[i, k]`` for all ``i, k`` (vector weights compared as
vectors, each edge type separately; multi-edges are added first, so ``W`` is
the summed weight).  The *orbits* are the classes of "some automorphism maps
``i`` to ``j``"; they refine the strict covering, which refines fibers and
opfibers (docs/design.md section 2).

bliss (through python-igraph) takes vertex colours only, so weights are
encoded: every directed edge ``k -> i`` (after summing multi-edges, per edge
type) becomes a vertex ``e`` in the middle, ``k -> e -> i``, whose colour is
the quantised ``(edge type, weight vector)``; node colours come from the
initial colouring and are kept apart from edge-vertex colours.  When every
edge has the same colour and there is no self-loop the plain digraph is used.

Quantisation: integer (``exact``) weights exactly; float weights as
``round(w / max|w| * 1e9)`` (about 9 significant digits relative to the
largest weight).  Summed weights that round to 0 are no edge, as in the
refinement engine.  Equal quantised weights differ by at most ``1e-9 max|w|``,
far below the engine's tolerance (``rtol = 1e-5`` of the largest sum), so
orbits refine the engine's colourings on real data.

False twins (same colour, identical coloured neighbourhoods, e.g. isolated
nodes or leaves of one parent) are interchangeable in every way: they are
taken out before bliss runs (each class of ``k`` twins multiplies the group
order by ``k!`` and shares one orbit), otherwise ``k`` isolated nodes alone
make bliss list ``k - 1`` generators of the whole graph each.  The orbits
are computed from the generators that bliss returns (union-find via
connected components); the group order is bliss's count times the twins'
factorials (a Python int; :func:`format_group_size` prints it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .graph import WeightedDigraph
from .partition import canonical
from .lazy import lazy_module

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = ["Orbits", "OrbitsTooLarge", "automorphism_orbits", "weighted_edges", "format_group_size",
           "QUANT_DIGITS"]

QUANT_DIGITS = 9


@dataclass
class Orbits:
    """``labels``: canonical orbit labels; ``group_size``: order of the
    automorphism group (a Python int; ``None`` if not computed);
    ``generators``: permutations of the nodes that generate the group."""

    labels: np.ndarray
    group_size: int | None = None
    generators: list = field(default_factory=list)

    @property
    def n_orbits(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 0


def weighted_edges(graph: WeightedDigraph):
    """Summed edges ``(src, dst, etype, values[m, D], exact)``: one row per
    ``(src, dst, edge type)``; rows whose summed weight is 0 are dropped (for
    float weights: below the quantisation step relative to the largest single
    weight, so multi-edges that cancel to rounding residue are no edge).
    ``etype`` is -1 for blocks without types."""
    parts = [b.coo() for b in graph.blocks]
    exact = all(b.exact for b in graph.blocks)
    if not parts:
        return (np.zeros(0, np.int64),) * 3 + (np.zeros((0, 1)), exact)
    D = max(p[2].shape[1] for p in parts)
    src = np.concatenate([p[0] for p in parts]).astype(np.int64)
    dst = np.concatenate([p[1] for p in parts]).astype(np.int64)
    vals = np.concatenate([np.pad(np.asarray(p[2], np.float64), ((0, 0), (0, D - p[2].shape[1])))
                           for p in parts])
    et = np.concatenate([np.full(p[0].size, -1, np.int64) if p[3] is None
                         else np.asarray(p[3], np.int64) for p in parts])
    if src.size == 0:
        return src, dst, et, vals, exact
    _, ecode = np.unique(et, return_inverse=True)
    ecode = ecode.reshape(-1)
    E = int(ecode.max()) + 1
    n = graph.n
    if n * n * E < 2 ** 62:
        code = (src * n + dst) * E + ecode
        u, inv = np.unique(code, return_inverse=True)
    else:  # pragma: no cover - enormous graphs
        u, inv = np.unique(np.stack([src, dst, ecode], 1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    first = np.full(u.shape[0], src.size, np.int64)
    np.minimum.at(first, inv, np.arange(src.size))
    summed = np.zeros((u.shape[0], D))
    np.add.at(summed, inv, vals)
    if exact:
        keep = np.any(summed != 0, axis=1)
    else:   # multi-edges that cancel to rounding residue (0.3 + 0.6 - 0.3 - 0.6) are no edge
        ref = float(np.abs(vals).max())
        keep = np.any(np.abs(summed) > 0.5 * 10.0 ** -QUANT_DIGITS * ref, axis=1)
    f = first[keep]
    return src[f], dst[f], et[f], summed[keep], exact


def _quantise(vals, exact):
    if exact:
        return np.rint(vals).astype(np.int64)
    scale = np.abs(vals).max() if vals.size else 0.0
    if scale == 0:
        return np.zeros(vals.shape, np.int64)
    return np.rint(vals / scale * 10.0 ** QUANT_DIGITS).astype(np.int64)


class OrbitsTooLarge(ValueError):
    """The automorphism group's generators would not fit the memory budget."""


def _twin_classes(n, node_col, src, dst, ecol):
    """Classes of false twins: same initial colour, same self-loop colour, same
    multiset of (in-neighbour, edge colour) and (out-neighbour, edge colour)
    among the other nodes (so twins are not adjacent).  Any permutation inside
    a twin class is an automorphism.  Two independent 64-bit multiset hashes."""
    from .hashing import GOLD as _GOLD, M1 as _M1, M2 as _M2, mix as _mix
    from .engine.sparse import group_rows

    h = []
    loop = src == dst
    for salt in (_GOLD, _M2):
        acc = np.zeros(n, np.uint64)
        for side, (me, other) in enumerate(((dst, src), (src, dst))):
            sel = ~loop
            x = _mix(_mix(other[sel].astype(np.uint64) + salt) ^ (ecol[sel].astype(np.uint64) * _M1
                                                                  + np.uint64(side + 1)))
            np.add.at(acc, me[sel], x)
        ls = np.zeros(n, np.uint64)
        np.add.at(ls, src[loop], _mix(ecol[loop].astype(np.uint64) + salt + _M2))
        h += [acc, ls]
    return group_rows([node_col.astype(np.int64)] + h)


def format_group_size(size) -> str:
    """The group order as digits, or ``~ 1.23e+4567`` when it has more than 30 digits."""
    if size is None:
        return "not computed"
    if size.bit_length() <= 99:                      # below 10**29: exact digits
        return str(size)
    lg = math.log10(size)
    return f"~ {10 ** (lg - math.floor(lg)):.3f}e+{math.floor(lg)}"


def automorphism_orbits(graph: WeightedDigraph, initial=None, group_size=True,
                        sh="fl", max_generator_bytes=4e9, keep_generators=None) -> Orbits:
    """Orbits of the automorphism group of ``graph`` (see module doc).

    ``initial``: node colours to keep (default ``graph.initial``);
    ``group_size``: also return the group order;
    ``sh``: bliss splitting heuristic;
    ``max_generator_bytes``: refuse (:class:`OrbitsTooLarge`) when bliss's list
    of generators would exceed this (estimated from the group order: every
    generator at least doubles the group found so far);
    ``keep_generators``: return the generators (permutations of the nodes);
    default only for graphs of at most 10,000 nodes.

    False twins (nodes with identical coloured neighbourhoods, e.g. isolated
    nodes, leaves of one parent) are taken out first: each twin class of size
    ``k`` contributes ``k!`` to the group order and its members share the
    orbit of the one member kept; bliss sees the rest with every kept member
    coloured by its class size.  This keeps graphs with thousands of
    interchangeable nodes from producing thousands of generators.
    """
    import igraph as ig

    n = graph.n
    if n == 0:
        return Orbits(np.zeros(0, np.int64), 1, [])
    node_col = canonical(graph.initial if initial is None else initial)
    if node_col.size != n:
        raise ValueError(f"initial colouring has {node_col.size} entries for {n} nodes")
    src, dst, et, vals, exact = weighted_edges(graph)
    q = _quantise(vals, exact)
    nz = np.any(q != 0, axis=1)
    src, dst, et, q = src[nz], dst[nz], et[nz], q[nz]
    if src.size:
        _, ecol = np.unique(np.column_stack([et, q]), axis=0, return_inverse=True)
        ecol = ecol.reshape(-1).astype(np.int64)
    else:
        ecol = np.zeros(0, np.int64)
    # --- false twins out
    twin = _twin_classes(n, node_col, src, dst, ecol)
    tsize = np.bincount(twin)
    rep = np.full(tsize.size, n, np.int64)
    np.minimum.at(rep, twin, np.arange(n))
    keep = rep                                   # kept node of every twin class (sorted? no)
    keep = np.sort(keep)
    new_id = np.full(n, -1, np.int64)
    new_id[keep] = np.arange(keep.size)
    e_keep = (new_id[src] >= 0) & (new_id[dst] >= 0)
    rs, rd, rc = new_id[src[e_keep]], new_id[dst[e_keep]], ecol[e_keep]
    nr = keep.size
    rcol = canonical(np.stack([node_col[keep], tsize[twin[keep]]], 1))
    m = rs.size
    C = int(rcol.max()) + 1
    if m:
        _, rc = np.unique(rc, return_inverse=True)
        rc = rc.reshape(-1)
    plain = m == 0 or (int(rc.max()) == 0 and not np.any(rs == rd))
    if plain:
        edges = np.stack([rs, rd], 1)
        colours = rcol
        nv = nr
    else:
        mid = nr + np.arange(m)
        edges = np.concatenate([np.stack([rs, mid], 1), np.stack([mid, rd], 1)])
        colours = np.concatenate([rcol, C + rc])
        nv = nr + m
    g = ig.Graph(n=nv, edges=edges.tolist(), directed=True)
    del edges
    col = colours.tolist()
    reduced_size = int(g.count_automorphisms(sh=sh, color=col))
    est = max(reduced_size.bit_length() - 1, 0) * nv * 40.0
    if est > max_generator_bytes:
        raise OrbitsTooLarge(
            f"automorphism group of order ~2^{reduced_size.bit_length() - 1} on {nv} bliss "
            f"vertices: its generators would need ~{est / 1e9:.0f} GB; orbits not computed")
    gens = g.automorphism_group(sh=sh, color=col) if reduced_size > 1 else []
    # orbits of the kept nodes from the generators (union-find), then twins join their kept node
    parts_r, parts_c = [], []
    for p in gens:
        p = np.asarray(p[:nr], dtype=np.int64)
        moved = np.flatnonzero(p != np.arange(nr))
        parts_r.append(moved)
        parts_c.append(p[moved])
    if parts_r:
        r = np.concatenate(parts_r)
        c = np.concatenate(parts_c)
        A = sp.csr_matrix((np.ones(r.size, np.int8), (r, c)), shape=(nr, nr))
        _, lab_r = sp.csgraph.connected_components(A, directed=False)
    else:
        lab_r = np.arange(nr)
    labels = canonical(lab_r[new_id[rep[twin]]])
    size = None
    if group_size:
        size = reduced_size
        for k in tsize[tsize > 1].tolist():
            size *= math.factorial(int(k))
    if keep_generators is None:
        keep_generators = n <= 10_000
    perms = []
    if keep_generators:
        members = [[] for _ in range(tsize.size)]
        for i in range(n):
            members[twin[i]].append(i)
        for p in gens:
            p = np.asarray(p[:nr], dtype=np.int64)
            full = np.arange(n)
            for a in range(nr):
                b = int(p[a])
                if a != b:
                    full[members[twin[keep[a]]]] = members[twin[keep[b]]]
            perms.append(full)
        for t, mem in enumerate(members):       # transpositions inside twin classes
            for a, b in zip(mem[:-1], mem[1:]):
                full = np.arange(n)
                full[a], full[b] = b, a
                perms.append(full)
    return Orbits(labels, size, perms)
