"""The tolerance split: quasi-fibrations (docs/design.md section 4).

Under :class:`~fibgraph.engine.criteria.Tolerance` (the paper's Algorithm 1)
each level's signature rows (:func:`fibgraph.engine.signatures.signature_matrix`)
are clustered within each old colour class by agglomerative clustering at
distance ``eps`` (:func:`fibgraph.engine.cluster.threshold_clusters`).

Metric.  With ``metric='cosine'`` on nodes whose activation is positively
homogeneous, proportional rows merge exactly by the rescaling merge
(``relu(s z) = s relu(z)``): each node gets a scale (its row norm over the
mean norm of its cluster) and the next level aggregates ``s_k W[i, k]``.  On
other nodes cosine is not exact, so the magnitude-aware euclidean distance
is used instead and the substitution is recorded (:func:`metric_for`).

The AND rule (:func:`and_rule_classes`).  A sum, product, norm or bias add
(``AND_KINDS``) may only merge with nodes whose stream operands have the same
colours on the same slots; eps then applies to its constants only.

Joint clustering of tied node sets (``tie``, e.g. ``graph.tie``): nodes of one
level that sit at the same position in several node sets (one *column*: the
gates i/f/g/o, cell and hidden node of one LSTM unit; GRU: z/r/n, the reset
product and the hidden node) are clustered as ONE item (:func:`tied_columns`).
Items are grouped by the tuple of their nodes' old colours; within a group the
item's row is the concatenation, over the tied node sets, of each set's
signature row prepared for the metric on its own (euclidean: over the set's
largest row norm in the level, so that a class that shrinks in a later round
of a cyclic level does not magnify its distances; cosine: unit rows), divided
by ``sqrt(number of sets)``, and these rows are clustered once at ``eps``
(:func:`fibgraph.engine.cluster.joint_rows`).  So the distance of two units
is the root mean square of their per-set distances (cosine: the mean of the
per-set cosine distances), and a quasi-fiber of the column is a class whose
units are within ``eps`` in that distance (complete linkage: every pair;
average: the mean over pairs), every node set taking the SAME partition.  A
cyclic level repeats this (rows aggregated by the current colours: the
recurrence reads the hidden partition) until no class splits; each round
refines the last, so it terminates.  Without ties each node set is clustered
alone and a writer keeping the meet of those partitions over-splits whenever
the sets' clusterings disagree slightly.  :class:`~fibgraph.engine.criteria.Exact`
ignores ties: exact equality is transitive, so the meet of the exact
partitions already is the joint one, and eps = 0 colourings do not depend on
ties.

Example: nodes 2, 3 and 4 (one old class) read the two inputs with rows
(1, 0), (0.9, 0.1) and (0, 1); the first two are at euclidean distance 0.14
(over the largest row norm, 1), within eps = 0.2, the third is not::

    >>> import numpy as np
    >>> from fibgraph.graph import WeightedDigraph
    >>> from fibgraph.engine.criteria import Tolerance
    >>> g = WeightedDigraph.from_edges([0, 1, 0, 1, 1], [2, 2, 3, 3, 4], [1.0, 0.0, 0.9, 0.1, 1.0])
    >>> info = {}
    >>> split_tolerance(g, np.arange(5), ["in"], np.array([0, 1, 2, 2, 2]), np.ones(5),
    ...                 Tolerance(0.2, metric="euclidean"), "graph", info)[0]
    array([0, 1, 2, 2, 3])
"""
from __future__ import annotations

import numpy as np

from ..hashing import mix
from ..partition import canonical
from ..graph import AND_KINDS
from ..pages import mapped_in
from .cluster import joint_rows, row_norms, threshold_clusters
from .rowparts import F32_ROWS_MIN, RowParts
from .signatures import dense_rows, dense_width, signature_matrix
from ..lazy import lazy_module

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = ["AND_KINDS", "split_tolerance", "tied_columns", "and_rule_classes", "metric_for"]


def tied_columns(graph, nodes, tie):
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


def split_tolerance(graph, nodes, directions, colours, scales, crit, info_key, info, tie=None):
    """Cluster the signature rows of ``nodes`` within each old colour class.

    With ``tie`` (node -> column id): the nodes of one column in this level
    (one per node set, e.g. the gates, cell and hidden node of one LSTM unit)
    are one item; items are grouped by the tuple of their nodes' old colours
    and clustered once on :func:`fibgraph.engine.cluster.joint_rows` (each node
    set's rows prepared for the metric: euclidean over the set's largest row
    norm in the LEVEL, cosine unit rows; concatenated, over ``sqrt(sets)``),
    and every node of an item takes the item's cluster: one partition of the
    columns, the same in all tied node sets.  No rescaling merge on items.
    """
    X, _ = signature_matrix(graph, nodes, directions, colours, scales)
    if X.shape[1] == 0:  # no edges into these nodes: nothing to compare
        return canonical(colours[nodes]), np.ones(nodes.size)
    if graph.relieve is not None and mapped_in(X) is None:
        graph.relieve()      # the rows are a copy: the weight pages read to make them go back before clustering
    cols = tied_columns(graph, nodes, tie) if tie is not None else None
    if cols is not None:
        return _split_tied(graph, nodes, X, colours, crit, info_key, info, cols)
    homog, metric, note = metric_for(graph, nodes, crit)
    rescale = crit.rescale and metric == "cosine" and homog and list(directions) == ["in"]
    old = and_rule_classes(graph, nodes, directions, colours)
    out = np.zeros(nodes.size, dtype=np.int64)
    new_scales = np.ones(nodes.size)
    nxt = 0
    order = np.argsort(old, kind="stable")
    bounds = np.flatnonzero(np.diff(old[order])) + 1
    stats = {}
    for members in np.split(order, bounds):
        if members.size == 1:
            out[members] = nxt
            nxt += 1
            continue
        rows = dense_rows(X, members)
        norms = row_norms(rows) if rescale else None
        # scaled in place: the rows are this loop's own copy, or every row of a
        # fresh X; prepare_rows never overwrites a view (of a weight)
        lab = threshold_clusters(rows, crit.eps, crit.linkage, metric, overwrite=True, stats=stats)
        out[members] = nxt + lab
        nxt += int(lab.max()) + 1
        if rescale:     # each member over its cluster's mean row norm (clusters of 2+ rows)
            cnt = np.bincount(lab)
            mean = np.bincount(lab, weights=norms) / np.maximum(cnt, 1)
            sel = (cnt[lab] > 1) & (mean[lab] > 0)
            new_scales[members[sel]] = np.where(norms[sel] > 0, norms[sel] / np.where(sel, mean[lab], 1.0)[sel], 1.0)
    info[info_key] = {"eps": crit.eps, "linkage": crit.linkage, "metric": metric,
                      "metric_requested": crit.metric, "rescale": rescale, **stats,
                      **({"note": note} if note else {})}
    return canonical(out), new_scales


#: node kinds (the hypergraph importer's) whose colour is the tuple of their
#: operands' colours: sums and products of streams, norms, bias adds and scales


def and_rule_classes(graph, nodes, directions, colours):
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
        rows = local[b.dst] >= 0
        if not rows.any():                      # the block feeds none of them
            continue
        if b.dense:                              # only the rows of those nodes
            sel = np.flatnonzero(rows)
            r, c = np.nonzero(np.any(b.weight[sel] != 0, axis=2))
            src, dst, et = b.src[c], b.dst[sel[r]], None
        else:
            src, dst, et = b.src[b.cols], b.dst[b.rows], b.etype
        t = local[dst]
        keep = (t >= 0) & ~const[src]
        if not keep.any():
            continue
        e = np.zeros(int(keep.sum()), dtype=np.uint64) if et is None else \
            np.asarray(et, dtype=np.int64)[keep].astype(np.uint64)
        np.add.at(h, t[keep], mix(mix(colours[src[keep]].astype(np.int64).astype(np.uint64)) + e))
    return canonical(np.stack([old, h.view(np.int64)], 1))


def metric_for(graph, nodes, crit):
    """(homogeneous, metric, note): cosine only where every node's activation is
    positively homogeneous (a scaled row then computes a scaled output)."""
    homog = bool(np.all(graph.homogeneous[nodes])) if nodes.size else False
    if crit.metric == "cosine" and not homog:
        return homog, "euclidean", "cosine is not exact for non-homogeneous activations: euclidean used"
    return homog, crit.metric, None


def _split_tied(graph, nodes, X, colours, crit, info_key, info, cols):
    """:func:`split_tolerance` over the items of ``cols`` (see :func:`tied_columns`)."""
    item, pos, table = cols
    homog, metric, note = metric_for(graph, nodes, crit)
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
    if isinstance(X, RowParts):
        norm = X.row_norms()
    elif sp.issparse(X):
        norm = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).reshape(-1))
    else:
        norm = row_norms(X)
    set_scale = np.zeros(n_pos)
    np.maximum.at(set_scale, pos, norm)
    joint = 0
    stats = {}
    for members in np.split(order, bounds):
        if members.size == 1:
            lab_item[members] = nxt
            nxt += 1
            continue
        present = np.flatnonzero(table[members[0]] >= 0)     # the same in the whole class
        if len(present) == 1:
            lab = threshold_clusters(dense_rows(X, table[members, present[0]]), crit.eps, crit.linkage, metric,
                                     stats=stats)
        else:                  # one node set's rows at a time, each prepared and stored before the next is made
            blocks = (dense_rows(X, table[members, p]) for p in present)
            # a big class's rows go straight into one array sized from the
            # widths; a small one's (most of them) are simply concatenated
            big = members.size * X.shape[1] >= F32_ROWS_MIN // 8
            rows = joint_rows(blocks, metric, set_scale[present],
                              widths=[dense_width(X, table[members, p]) for p in present] if big else None)
            lab = threshold_clusters(rows, crit.eps, crit.linkage, metric, prepared=True, stats=stats)
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
                      "joint": {"items": int(joint), "node_sets": sets}, **stats,
                      **({"note": note} if note else {})}
    return canonical(out), np.ones(nodes.size)
