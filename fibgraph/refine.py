"""The one refinement engine: coarsest balanced colourings by signature rounds.

Definitions (docs/design.md section 2).  A colouring ``c`` of the nodes is
*in-balanced* (a fibration's fibers) iff for every two nodes ``i ~ j`` and every
colour ``a``::

    sum_{k: c(k) = a} W[i, k] == sum_{k: c(k) = a} W[j, k]

(weights are vectors, edge categories are kept apart, bias edges come from a
constant node of its own colour).  *Out-balanced* (opfibration) is the same on
outgoing weights; *balanced both ways* is the strict covering.  The engine
computes the coarsest such colouring that refines a given initial colouring:
each step replaces a node's colour by ``(old colour, signature)`` where the
signature is the vector of per-colour weight sums above.

Two schedules, one engine:
- levelled (a DAG given in topological levels, e.g. a feed-forward network):
  each level is refined once, in order (reverse order for out-balance) - the
  paper's layer-by-layer procedure, O(m) in all;
- rounds (any digraph, cycles included): synchronous rounds, each O(m log m)
  vectorised, until the number of colours stops growing.

Two criteria for "equal signatures":
- :class:`Exact`: equal up to float rounding.  Each signature entry is
  compared with tolerance ``rtol * max(max|entry|, max|weight|)`` over the
  level (0 for integer weights); values are grouped by sorting and splitting at gaps larger than
  the tolerance (a chain of groups spanning more than the tolerance is cut at
  the grid ``floor(value / tol)``, so that chaining cannot merge values far
  apart), then rows are hashed (two independent 64-bit hashes); see
  :mod:`fibgraph.sigsparse`, which also holds the fast path for graphs whose
  blocks are all sparse.
- :class:`Tolerance`: quasi-fibrations (the paper's Algorithm 1): per level,
  agglomerative clustering of the signature rows at distance ``eps``
  (see :mod:`fibgraph.cluster`).  With ``metric='cosine'`` on nodes whose
  activation is positively homogeneous, proportional rows merge exactly by
  the rescaling merge (``relu(s z) = s relu(z)``): each node gets a scale and
  the next level aggregates ``s_k W[i, k]``.  On other nodes cosine is not
  exact, so the magnitude-aware euclidean distance is used instead and the
  substitution is recorded.

Joint clustering of tied node sets (``tie``, e.g. ``graph.tie``): nodes of one
level that sit at the same position in several node sets (one *column*: the
gates i/f/g/o, cell and hidden node of one LSTM unit; GRU: z/r/n, the reset
product and the hidden node) are clustered as ONE item under
:class:`Tolerance`.  Items are grouped by the tuple of their nodes' old
colours; within a group the item's row is the concatenation, over the tied
node sets, of each set's signature row prepared for the metric on its own
(euclidean: over the set's largest row norm in the level, so that a class
that shrinks in a later round of a cyclic level does not magnify its
distances; cosine: unit rows),
divided by ``sqrt(number of sets)``, and these rows are clustered once at
``eps`` (:func:`fibgraph.cluster.joint_rows`).  So the distance of two units
is the root mean square of their per-set distances (cosine: the mean of the
per-set cosine distances), and a quasi-fiber of the column is a class whose
units are within ``eps`` in that distance (complete linkage: every pair;
average: the mean over pairs), every node set taking the SAME partition.  A
cyclic level repeats this (rows aggregated by the current colours: the
recurrence reads the hidden partition) until no class splits; each round
refines the last, so it terminates.  Without ties each node set is clustered
alone and a writer keeping the meet of those partitions over-splits whenever
the sets' clusterings disagree slightly.  :class:`Exact` ignores ties: exact
equality is transitive, so the meet of the exact partitions already is the
joint one, and eps = 0 colourings do not depend on ties.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .cluster import LINKAGES, METRICS, threshold_clusters
from .graph import WeightedDigraph
from .hashing import GOLD as _GOLD, M1 as _M1, M2 as _M2, mix
from .partition import canonical

__all__ = ["Exact", "Tolerance", "Refinement", "refine", "DEFAULT_RTOL"]

DEFAULT_RTOL = 1e-5


@dataclass(frozen=True)
class Exact:
    """Signatures equal up to ``rtol`` times the largest magnitude in the level."""

    rtol: float = DEFAULT_RTOL


@dataclass(frozen=True)
class Tolerance:
    """Quasi-fibration: signature rows clustered at distance ``eps``."""

    eps: float
    linkage: str = "average"
    metric: str = "cosine"
    rescale: bool = True

    def __post_init__(self):
        if not (0.0 <= self.eps < 2.0) or not np.isfinite(self.eps):
            raise ValueError(f"eps must be in [0, 2), got {self.eps}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")


def make_criterion(eps=0.0, linkage="average", metric="cosine", rescale=True, rtol=DEFAULT_RTOL):
    """``Exact`` for ``eps == 0``, else ``Tolerance``."""
    if eps is None or eps == 0:
        return Exact(rtol)
    return Tolerance(float(eps), linkage, metric, rescale)


@dataclass
class Refinement:
    """Result of :func:`refine`: canonical ``labels``, per-node ``scales`` (1 unless
    the rescaling merge applied), the number of sweeps or rounds, and per-level
    notes (criterion actually used)."""

    labels: np.ndarray
    scales: np.ndarray
    rounds: int
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- hashing
_mix = mix


def _key(colour, d, etype=None):
    k = _mix(_mix(np.asarray(colour, dtype=np.int64).astype(np.uint64)) + np.asarray(d, dtype=np.uint64))
    if etype is not None:
        k = _mix(k ^ _mix(np.asarray(etype, dtype=np.int64).astype(np.uint64) + _M1))
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
                A = np.empty((n_t, n_o, D), dtype=np.float64)
                A[:, inv, :] = W
            else:
                # columns sorted by colour, then one segmented sum (float64)
                order = np.argsort(inv, kind="stable")
                Wo = np.take(W, order, axis=1).astype(np.float64, copy=False)
                if not np.all(s == 1):
                    Wo = Wo * s[order][None, :, None]
                starts = np.flatnonzero(np.r_[True, inv[order][1:] != inv[order][:-1]])
                A = np.add.reduceat(Wo, starts, axis=1)
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
    """Dense parts stay dense when their keys are disjoint from every other part's."""
    dense = [p for p in parts if "A" in p]
    sparse = [p for p in parts if "A" not in p]
    if len(dense) > 1 or sparse:
        allkeys = [p["keys"] for p in dense] + [np.unique(p["key"]) for p in sparse]
        cat = np.concatenate(allkeys) if allkeys else np.zeros(0, np.uint64)
        u, cnt = np.unique(cat, return_counts=True)
        shared = set(u[cnt > 1].tolist())
        keep = []
        for p in dense:
            if shared and np.isin(p["keys"], list(shared)).any():
                sparse.append(_dense_to_sparse(p))
            else:
                keep.append(p)
        dense = keep
    if sparse:
        sparse = [_sum_sparse(sparse)]
    return dense, sparse


# ---------------------------------------------------------- quantising
_PROBE_COLUMNS = 8
_SINGLETON_SALT = np.uint64(0xD6E8FEB86659FD93)


def _hash_dense(A, keys, tol):
    """Hashes of the rows of a dense signature block: values grouped per column
    (rule of :mod:`fibgraph.sigsparse`), then ``(key, group)`` mixes summed per row.

    Large blocks are first probed on a few columns: a row whose probe groups no
    other row shares differs from every row in this block, so it gets a hash
    of its own and only the remaining rows are grouped on every column.
    """
    n_t, K = A.shape
    if n_t > 256 and K > 4 * _PROBE_COLUMNS:
        cols = np.argsort(-A.var(axis=0), kind="stable")[:_PROBE_COLUMNS]
        p1, p2 = _hash_dense_all(np.ascontiguousarray(A[:, cols]), keys[cols], tol)
        probe = np.stack([p1.view(np.int64), p2.view(np.int64)], 1)
        _, inv, cnt = np.unique(probe, axis=0, return_inverse=True, return_counts=True)
        shared = cnt[inv.reshape(-1)] > 1
        if not shared.all():
            h1 = np.empty(n_t, np.uint64)
            h2 = np.empty(n_t, np.uint64)
            lone = np.flatnonzero(~shared)
            h1[lone] = _mix(lone.astype(np.uint64) + _SINGLETON_SALT)
            h2[lone] = _mix(lone.astype(np.uint64) ^ _SINGLETON_SALT)
            rest = np.flatnonzero(shared)
            if rest.size:
                h1[rest], h2[rest] = _hash_dense_all(A[rest], keys, tol)
            return h1, h2
    return _hash_dense_all(A, keys, tol)


def _hash_dense_all(A, keys, tol):
    from .sigsparse import group_sorted, value_labels

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
    h1 = np.where(nz, _mix(keys[None, :] + Lu * _GOLD), np.uint64(0)).sum(axis=1, dtype=np.uint64)
    h2 = np.where(nz, _mix((keys[None, :] ^ _M2) + Lu * _M1), np.uint64(0)).sum(axis=1, dtype=np.uint64)
    return h1, h2


def _hash_sparse(t_local, key, v, tol, n_t):
    from .sigsparse import hash_entries, quantise

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
    return float(rtol * max(np.abs(values).max(), wscale))


def _weight_scale(graph, mask, direction, scales):
    """Largest |weight| (times the largest scale) over the blocks that feed ``mask``."""
    m = 0.0
    for b in graph.blocks:
        targets = b.dst if direction == "in" else b.src
        if not mask[targets].any():
            continue
        w = b.weight if b.dense else b.values
        if w.size:                                   # no |w| temporary: max and -min
            m = max(m, float(w.max()), -float(w.min()))
    return m * (float(scales.max()) if scales.size else 1.0)


# ------------------------------------------------------------- one split
def _split_exact(graph, nodes, directions, colours, scales, rtol):
    """New local labels of ``nodes``: (old colour, signatures) up to rounding."""
    from .sigsparse import group_rows, sparse_hash

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


def _signature_matrix(graph, nodes, directions, colours, scales):
    """Signature rows of ``nodes`` as a (sparse) matrix with aligned columns."""
    mask = np.zeros(graph.n, dtype=bool)
    mask[nodes] = True
    local = np.full(graph.n, -1, dtype=np.int64)
    local[nodes] = np.arange(nodes.size)
    mats = []
    exact = True
    for direction in directions:
        dense, sparse = _merge_parts(list(_parts(graph, mask, direction, colours, scales)))
        for p in dense:
            exact &= p["exact"]
            tl = local[p["targets"]]
            M = np.zeros((nodes.size, p["A"].shape[1]))
            M[tl] = p["A"]
            mats.append(sp.csr_matrix(M) if not np.array_equal(tl, np.arange(nodes.size)) else M)
        for p in sparse:
            exact &= p["exact"]
            uk, kcol = np.unique(p["key"], return_inverse=True)
            mats.append(sp.csr_matrix((p["v"], (local[p["t"]], kcol)), shape=(nodes.size, uk.size)))
    if not mats:
        return np.zeros((nodes.size, 0)), exact
    if all(isinstance(m, np.ndarray) for m in mats):
        return np.hstack(mats), exact
    return sp.hstack([sp.csr_matrix(m) for m in mats]).tocsr(), exact


def _dense_rows(X, members):
    rows = X[members]
    if sp.issparse(rows):  # only the columns these rows use
        rows = rows.tocsc()
        rows = rows[:, np.flatnonzero(np.diff(rows.indptr))].toarray()
    return rows


def _columns(graph, nodes, tie):
    """Items of a level under ``tie``: ``(item of each node, position of each
    node in its item, items x positions table of local node indices (-1 where
    absent))``, or None when no two nodes of the level share a tie id.  A
    position is a node set (``graph.layer``) of the level."""
    t = np.asarray(tie, dtype=np.int64)[nodes]
    tied = t >= 0
    if not tied.any():
        return None
    key = np.where(tied, t, -1 - np.arange(nodes.size))
    _, item, cnt = np.unique(key, return_inverse=True, return_counts=True)
    item = item.reshape(-1)
    if not (cnt > 1).any():
        return None
    _, pos = np.unique(graph.layer[nodes], return_inverse=True)
    pos = pos.reshape(-1)
    table = np.full((cnt.size, int(pos.max()) + 1), -1, dtype=np.int64)
    table[item, pos] = np.arange(nodes.size)
    if (table >= 0).sum() != nodes.size:
        raise ValueError("a tie holds two nodes of one node set in one level")
    return item, pos, table


def _split_tolerance(graph, nodes, directions, colours, scales, crit, info_key, info, tie=None):
    """Cluster the signature rows of ``nodes`` within each old colour class.

    With ``tie`` (node -> column id): the nodes of one column in this level
    (one per node set, e.g. the gates, cell and hidden node of one LSTM unit)
    are one item; items are grouped by the tuple of their nodes' old colours
    and clustered once on :func:`fibgraph.cluster.joint_rows` (each node
    set's rows prepared for the metric: euclidean over the set's largest row
    norm in the LEVEL, cosine unit rows; concatenated, over ``sqrt(sets)``),
    and every node of an item takes the item's cluster: one partition of the
    columns, the same in all tied node sets.  No rescaling merge on items.
    """
    X, _ = _signature_matrix(graph, nodes, directions, colours, scales)
    if X.shape[1] == 0:  # no edges into these nodes: nothing to compare
        return canonical(colours[nodes]), np.ones(nodes.size)
    cols = _columns(graph, nodes, tie) if tie is not None else None
    if cols is not None:
        return _split_tolerance_tied(graph, nodes, X, colours, crit, info_key, info, cols)
    homog, metric, note = _metric_for(graph, nodes, crit)
    rescale = crit.rescale and metric == "cosine" and homog and list(directions) == ["in"]
    old = _and_rule_classes(graph, nodes, directions, colours)
    out = np.zeros(nodes.size, dtype=np.int64)
    new_scales = np.ones(nodes.size)
    nxt = 0
    order = np.argsort(old, kind="stable")
    bounds = np.flatnonzero(np.diff(old[order])) + 1
    for members in np.split(order, bounds):
        if members.size == 1:
            out[members] = nxt
            nxt += 1
            continue
        rows = _dense_rows(X, members)
        lab = threshold_clusters(rows, crit.eps, crit.linkage, metric)
        out[members] = nxt + lab
        nxt += int(lab.max()) + 1
        if rescale:
            norms = np.linalg.norm(rows, axis=1)
            for c in np.unique(lab):
                m = lab == c
                mean = norms[m].mean()
                if m.sum() > 1 and mean > 0:
                    new_scales[members[m]] = np.where(norms[m] > 0, norms[m] / mean, 1.0)
    info[info_key] = {"eps": crit.eps, "linkage": crit.linkage, "metric": metric,
                      "metric_requested": crit.metric, "rescale": rescale,
                      **({"note": note} if note else {})}
    return canonical(out), new_scales


#: node kinds (the hypergraph importer's) whose colour is the tuple of their
#: operands' colours: sums and products of streams, norms, bias adds and scales
AND_KINDS = ("factor", "norm", "per-unit")


def _and_rule_classes(graph, nodes, directions, colours):
    """The old classes of ``nodes``, split for the AND rule under a tolerance:
    a sum, product, norm or bias add (``AND_KINDS``) may only merge with nodes
    whose stream operands (every in-neighbour that is not a constant node) have
    the same colours on the same slots; eps then applies to its constants
    (gamma, beta, bias).  Without it, norms reading different stream colours
    could fall within eps and the next layer would be aggregated over one class
    that the base (which keeps the meet) never forms."""
    old = colours[nodes]
    if graph.kind is None or list(directions) != ["in"]:
        return old
    is_and = np.isin(graph.kind[nodes].astype(str), AND_KINDS)
    if not is_and.any():
        return old
    local = np.full(graph.n, -1, dtype=np.int64)
    local[nodes[is_and]] = np.flatnonzero(is_and)
    const = graph.kind.astype(str) == "const"
    h = np.zeros(nodes.size, dtype=np.uint64)
    for b in graph.blocks:
        src, dst, _, et = b.coo()
        t = local[dst]
        keep = (t >= 0) & ~const[src]
        if not keep.any():
            continue
        e = np.zeros(int(keep.sum()), dtype=np.uint64) if et is None else \
            np.asarray(et, dtype=np.int64)[keep].astype(np.uint64)
        np.add.at(h, t[keep], _mix(_mix(colours[src[keep]].astype(np.int64).astype(np.uint64)) + e))
    return canonical(np.stack([old, h.view(np.int64)], 1))


def _metric_for(graph, nodes, crit):
    """(homogeneous, metric, note): cosine only where every node's activation is
    positively homogeneous (a scaled row then computes a scaled output)."""
    homog = bool(np.all(graph.homogeneous[nodes])) if nodes.size else False
    if crit.metric == "cosine" and not homog:
        return homog, "euclidean", "cosine is not exact for non-homogeneous activations: euclidean used"
    return homog, crit.metric, None


def _split_tolerance_tied(graph, nodes, X, colours, crit, info_key, info, cols):
    """:func:`_split_tolerance` over the items of ``cols`` (see :func:`_columns`)."""
    from .cluster import joint_rows

    item, pos, table = cols
    homog, metric, note = _metric_for(graph, nodes, crit)
    # an item's old class: the old colours at every position (-1 where absent)
    old = np.where(table >= 0, colours[nodes][np.maximum(table, 0)], -1)
    _, cls = np.unique(old, axis=0, return_inverse=True)
    cls = cls.reshape(-1)
    n_pos = table.shape[1]
    lab_item = np.zeros(table.shape[0], dtype=np.int64)
    nxt = 0
    order = np.argsort(cls, kind="stable")
    bounds = np.flatnonzero(np.diff(cls[order])) + 1
    # euclidean: each node set's rows over that set's largest row norm in the level
    # (not in the class: a class that shrinks must not magnify its distances)
    if sp.issparse(X):
        norm = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).reshape(-1))
    else:
        norm = np.linalg.norm(X, axis=1)
    set_scale = np.zeros(n_pos)
    np.maximum.at(set_scale, pos, norm)
    joint = 0
    for members in np.split(order, bounds):
        if members.size == 1:
            lab_item[members] = nxt
            nxt += 1
            continue
        present = np.flatnonzero(table[members[0]] >= 0)     # the same in the whole class
        blocks = [_dense_rows(X, table[members, p]) for p in present]
        if len(blocks) == 1:
            lab = threshold_clusters(blocks[0], crit.eps, crit.linkage, metric)
        else:
            rows = joint_rows(blocks, metric, set_scale[present])
            lab = threshold_clusters(rows, crit.eps, crit.linkage, metric, prepared=True)
            joint += members.size
        lab_item[members] = nxt + lab
        nxt += int(lab.max()) + 1
    # a node's new label: (its item's cluster, its node set); distinct node sets never share one
    out = lab_item[item] * n_pos + pos
    multi = table[(table >= 0).sum(1) > 1]
    sets = [str(graph.layer_names[int(l)]) if graph.layer_names and int(l) < len(graph.layer_names) else str(int(l))
            for l in np.unique(graph.layer[nodes[multi[multi >= 0]]])]
    info[info_key] = {"eps": crit.eps, "linkage": crit.linkage, "metric": metric,
                      "metric_requested": crit.metric, "rescale": False,
                      "joint": {"items": int(joint), "node_sets": sets},
                      **({"note": note} if note else {})}
    return canonical(out), np.ones(nodes.size)


# ------------------------------------------------------------------ engine
def _criterion_for(criterion, level_name):
    if isinstance(criterion, dict):
        return criterion.get(level_name, criterion.get(None, Exact()))
    return criterion


def _level_views(graph, direction):
    """Per level: the graph restricted to the blocks whose targets (dst for
    'in', src for 'out') lie in that level, so that a level's split reads its
    own blocks only (O(m) per sweep, not O(levels x blocks))."""
    import copy

    node_level = np.full(graph.n, -1, dtype=np.int64)
    for k, lv in enumerate(graph.levels):
        node_level[np.asarray(lv, dtype=np.int64)] = k
    per = [[] for _ in graph.levels]
    for b in graph.blocks:
        targets = b.dst if direction == "in" else b.src
        for k in np.unique(node_level[targets]):
            if k >= 0:
                per[int(k)].append(b)
    views = []
    for blocks in per:
        v = copy.copy(graph)
        v.__dict__.pop("_edge_matrix_cache", None)
        v.blocks = blocks
        views.append(v)
    return views


def refine(graph: WeightedDigraph, direction="in", criterion=None, initial=None,
           schedule="auto", scales=None, max_rounds=None, tie=None) -> Refinement:
    """Coarsest colouring refining ``initial`` that is balanced in ``direction``.

    ``direction``: ``'in'`` (fibration), ``'out'`` (opfibration) or ``'both'``
    (strict covering).  ``criterion``: :class:`Exact` (default),
    :class:`Tolerance`, or a dict ``{level name: criterion, None: default}``.
    ``schedule``: ``'levels'`` (one sweep per direction over ``graph.levels``;
    'both' alternates sweeps until stable), ``'rounds'`` (synchronous rounds to
    a fixed point), or ``'auto'`` (levels when the graph has them).
    ``scales``: incoming per-node scales (rescaling merge); returned updated.
    ``tie``: column id per node (-1: untied; default ``graph.tie``).  Under
    :class:`Tolerance`, the nodes of one column that lie in one level are
    clustered jointly (one item, features concatenated over their node sets,
    see :func:`_split_tolerance`), so the quasi-fibration partition of the
    column's node sets is one and the same; :class:`Exact` ignores ties (exact
    equality is transitive: the meet of exact partitions already is the joint
    one), so eps = 0 results do not depend on them.
    """
    if direction not in ("in", "out", "both"):
        raise ValueError(f"direction must be 'in', 'out' or 'both', got {direction!r}")
    criterion = Exact() if criterion is None else criterion
    tie = getattr(graph, "tie", None) if tie is None else tie
    n = graph.n
    colours = canonical(graph.initial if initial is None else initial)
    scales = np.ones(n) if scales is None else np.asarray(scales, dtype=np.float64).copy()
    info: dict = {}
    use_levels = graph.levels is not None and schedule in ("auto", "levels")
    if schedule == "levels" and graph.levels is None:
        raise ValueError("graph has no levels; use schedule='rounds'")
    rounds = 0
    if use_levels:
        dirs = ["in"] if direction == "in" else ["out"] if direction == "out" else ["in", "out"]
        views = {d: _level_views(graph, d) for d in dirs}
        while True:
            before = colours.max() + 1 if n else 0
            for d in dirs:
                levels = graph.levels if d == "in" else list(reversed(graph.levels))
                order = range(len(graph.levels)) if d == "in" else range(len(graph.levels) - 1, -1, -1)
                for li, lv in zip(order, levels):
                    lv = np.asarray(lv, dtype=np.int64)
                    if lv.size == 0:
                        continue
                    name = graph.layer_names[graph.layer[lv[0]]]
                    crit = _criterion_for(criterion, name)
                    loop = bool(graph.cyclic) and li in graph.cyclic
                    k_before = np.unique(colours[lv]).size
                    view = views[d][li]
                    while True:
                        if isinstance(crit, Tolerance) and crit.eps > 0:
                            new, sc = _split_tolerance(view, lv, [d], colours, scales, crit,
                                                       name, info, tie)
                            scales[lv] = scales[lv] * sc if d == "out" else sc
                        else:
                            new = _split_exact(view, lv, [d], colours, scales,
                                               getattr(crit, "rtol", DEFAULT_RTOL))
                        # a loop level: its nodes' new colours refine the old ones
                        # (the old colour is part of the key) until nothing splits
                        if loop:
                            new = canonical(np.stack([colours[lv], new], 1))
                        colours[lv] = colours.max() + 1 + new
                        k_after = int(new.max()) + 1
                        if not loop or k_after == k_before:
                            break
                        k_before = k_after
                colours = canonical(colours)
                rounds += 1
            after = colours.max() + 1 if n else 0
            if direction != "both" or after == before:
                break
        return Refinement(colours, scales, rounds, info)

    dirs = ["in"] if direction == "in" else ["out"] if direction == "out" else ["in", "out"]
    allnodes = np.arange(n, dtype=np.int64)
    ncol = colours.max() + 1 if n else 0
    while max_rounds is None or rounds < max_rounds:
        crit = _criterion_for(criterion, graph.layer_names[0] if graph.layer_names else None)
        if isinstance(crit, Tolerance) and crit.eps > 0:
            new, _ = _split_tolerance(graph, allnodes, dirs, colours, scales, crit, "graph", info, tie)
        else:
            new = _split_exact(graph, allnodes, dirs, colours, scales,
                               getattr(crit, "rtol", DEFAULT_RTOL))
        rounds += 1
        new_n = new.max() + 1 if n else 0
        colours = new
        if new_n == ncol:
            break
        ncol = new_n
    return Refinement(colours, scales, rounds, info)
