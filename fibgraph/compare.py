"""Comparing partitions, and the symmetries of two models of one architecture.

Partition scores (numpy only; scikit-learn is not needed):

- :func:`adjusted_rand_index`: the Hubert-Arabie ARI from the pair confusion
  matrix (equal to ``sklearn.metrics.adjusted_rand_score``, including its
  convention that two partitions that both put every item alone, or both put
  everything together, score 1).
- :func:`variation_of_information`: ``VI = H(X|Y) + H(Y|X)`` in nats (Meila
  2007), a metric on partitions: 0 iff the partitions are equal; at most
  ``log n``.  Computed from the conditional entropies term by term, so equal
  partitions give exactly 0.

:func:`compare_views` colours two models of the same architecture, given as
:class:`~fibgraph.layerview.LayerView` s (same graph shape: nodes, edge
blocks, weight layers), and compares their partitions weight layer by weight
layer.  Units are compared by index: meaningful for checkpoints of one run, a
model and its fine-tuned or pruned version, or two runs from one
initialisation.  Independently trained models have arbitrary unit orders
(permutation symmetry): pass ``align=True`` to match B's hidden units to A's
first (:func:`align_units`, a forward weight-matching pass with the
Hungarian algorithm); the partition COUNTS need no alignment.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .partition import canonical, meet, num_classes, refines

__all__ = ["contingency", "adjusted_rand_index", "variation_of_information", "check_same_architecture",
           "align_units", "compare_views", "compare_partitions", "LEVELS"]

LEVELS = ("fibration", "opfibration", "covering-strict")


def contingency(a, b) -> np.ndarray:
    """Contingency table ``C[i, j] = #{k: a_k = i, b_k = j}`` of two labelings."""
    a = canonical(np.asarray(a).reshape(-1))
    b = canonical(np.asarray(b).reshape(-1))
    if a.size != b.size:
        raise ValueError(f"partitions of different sizes ({a.size} and {b.size})")
    if a.size == 0:
        return np.zeros((0, 0), dtype=np.int64)
    C = np.zeros((int(a.max()) + 1, int(b.max()) + 1), dtype=np.int64)
    np.add.at(C, (a, b), 1)
    return C


def _table(a, b):
    """Nonzero contingency counts and the two marginals (int64), without a dense table."""
    a = canonical(np.asarray(a).reshape(-1))
    b = canonical(np.asarray(b).reshape(-1))
    if a.size != b.size:
        raise ValueError(f"partitions of different sizes ({a.size} and {b.size})")
    if a.size == 0:
        z = np.zeros(0, np.int64)
        return z, z, z, z, z
    key = a * (int(b.max()) + 1) + b
    uk, cnt = np.unique(key, return_counts=True)
    return cnt.astype(np.int64), uk // (int(b.max()) + 1), uk % (int(b.max()) + 1), \
        np.bincount(a).astype(np.int64), np.bincount(b).astype(np.int64)


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index of two partitions (1 = identical, ~0 = chance level)."""
    cnt, _, _, na, nb = _table(a, b)
    n = int(cnt.sum())
    if n <= 1:
        return 1.0
    ss = int((cnt.astype(object) ** 2).sum())
    sa = int((na.astype(object) ** 2).sum())
    sb = int((nb.astype(object) ** 2).sum())
    tp = ss - n
    fp = sb - ss           # pairs together in b, apart in a (ordered pairs)
    fn = sa - ss           # pairs together in a, apart in b
    tn = n * n - fp - fn - ss
    if fn == 0 and fp == 0:
        return 1.0
    num = 2 * (tp * tn - fn * fp)
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    return float(num / den) if den else 1.0


def variation_of_information(a, b, normalised=False) -> float:
    """VI = H(A|B) + H(B|A) in nats; ``normalised``: divided by ``log n`` (in [0, 1])."""
    cnt, i, j, na, nb = _table(a, b)
    n = int(cnt.sum())
    if n <= 1:
        return 0.0
    v = cnt.astype(np.float64)
    h_a_given_b = -(v / n * np.log(v / nb[j])).sum()
    h_b_given_a = -(v / n * np.log(v / na[i])).sum()
    vi = max(0.0, float(h_a_given_b + h_b_given_a))
    return vi / np.log(n) if normalised else vi


def compare_partitions(a, b) -> dict:
    """Scores of two partitions of the same units."""
    a, b = canonical(a), canonical(b)
    return {"units": int(a.size), "classes_a": num_classes(a), "classes_b": num_classes(b),
            "ari": adjusted_rand_index(a, b), "vi": variation_of_information(a, b),
            "vi_normalised": variation_of_information(a, b, normalised=True),
            "a_refines_b": bool(refines(a, b)), "b_refines_a": bool(refines(b, a)),
            "equal": bool(np.array_equal(a, b)), "meet_classes": num_classes(meet(a, b))}


def _block_shape(b):
    return ("dense", b.weight.shape) if b.dense else ("sparse", b.src.size, b.dst.size, b.values.shape)


def check_same_architecture(A, B, names=("A", "B")):
    """InputError naming the first difference of weight layers (count, kind,
    units) or of the graphs (nodes, edge blocks)."""
    na, nb = names
    if len(A.layers) != len(B.layers):
        raise InputError(f"architecture mismatch: {na} has {len(A.layers)} weight layers, {nb} has {len(B.layers)}")
    for l, (x, y) in enumerate(zip(A.layers, B.layers)):
        if x.kind != y.kind or x.units != y.units:
            raise InputError(f"architecture mismatch at layer {l + 1}: {na} {x.name!r} is {x.kind} with "
                             f"{x.units} units, {nb} {y.name!r} is {y.kind} with {y.units} units")
    ga, gb = A.graph, B.graph
    if ga.n != gb.n or len(ga.blocks) != len(gb.blocks):
        raise InputError(f"architecture mismatch: the graphs differ ({na}: {ga.n} nodes, {len(ga.blocks)} edge "
                         f"blocks; {nb}: {gb.n} nodes, {len(gb.blocks)} edge blocks)")
    for x, y in zip(ga.blocks, gb.blocks):
        if _block_shape(x) != _block_shape(y) or not (np.array_equal(x.src, y.src)
                                                      and np.array_equal(x.dst, y.dst)):
            raise InputError(f"architecture mismatch: edge block {x.name!r} of {na} and {y.name!r} of {nb} "
                             f"differ in shape or nodes")
    for x, y in zip(A.layers, B.layers):
        if not np.array_equal(x.nodes, y.nodes):
            raise InputError(f"architecture mismatch: layer {x.name!r} of {na} and {y.name!r} of {nb} "
                             "sit on other nodes")


def _columns(b, node_map):
    """Positions in ``b.src`` of ``node_map[b.src]`` (B's column for each of A's)."""
    mapped = node_map[b.src]
    order = np.argsort(b.src, kind="stable")
    k = np.minimum(np.searchsorted(b.src[order], mapped), b.src.size - 1)
    pos = order[k]
    if not np.array_equal(b.src[pos], mapped):
        raise InputError(f"--align: the edge block {b.name!r} reads only part of a permuted layer's nodes; "
                         "cannot align its columns")
    return pos


def _incoming(view, k, layer_of, unit_of, node_map):
    """``(units, features)``: per unit of layer ``k``, the weights of the edges
    into its tied nodes from nodes not tied to layer ``k``; columns follow
    ``node_map`` (the source node that stands for each of A's source nodes)."""
    n = view.layers[k].units
    parts = []
    for b in view.graph.blocks:
        dl = layer_of[b.dst]
        if not (dl == k).any():
            continue
        pos = _columns(b, node_map)
        ext = layer_of[b.src[pos]] != k                   # columns from outside the layer
        if b.dense:
            rows = np.flatnonzero(dl == k)
            W = b.weight[rows][:, pos][:, ext]
            M = np.zeros((n, W.shape[1] * W.shape[2]))
            np.add.at(M, unit_of[b.dst[rows]], W.reshape(rows.size, -1))
        else:
            inv = np.empty_like(pos)
            inv[pos] = np.arange(pos.size)
            col = inv[b.cols]
            keep = (dl[b.rows] == k) & ext[col]
            D = b.values.shape[1]
            M = np.zeros((n, pos.size * D))
            flat = (col[keep][:, None] * D + np.arange(D)[None, :])
            np.add.at(M, (np.repeat(unit_of[b.dst[b.rows[keep]]], D).reshape(-1, D), flat), b.values[keep])
        parts.append(M)
    return np.hstack(parts) if parts else np.zeros((n, 0))


def align_units(A, B) -> list:
    """Permutations ``perm[l]`` (one per weight layer) such that unit ``perm[l][i]``
    of B matches unit ``i`` of A: forward pass, layer by layer, Hungarian
    matching of the weights into each unit's tied nodes (B's columns permuted
    by the earlier matches; bias edges included).  Output layers keep their
    order.  Matching uses incoming weights only: units with equal incoming
    rows (exact duplicates) are interchangeable, and the order chosen among
    them can make the NEXT layer's rows look different (its fibers are
    balanced sums, not equal columns); good for independent runs, where ties
    do not occur.  A hidden layer whose units share nodes with another layer
    (a residual stream column, q and k of one head) cannot be permuted on its
    own: InputError."""
    from scipy.optimize import linear_sum_assignment

    check_same_architecture(A, B)
    layer_of, unit_of, shared = B.unit_map()
    node_map = np.arange(B.graph.n)
    space = np.asarray(B.graph.layer, dtype=np.int64)
    perms = []
    for k, (la, lb) in enumerate(zip(A.layers, B.layers)):
        if la.output:
            perms.append(np.arange(la.units, dtype=np.int64))
            continue
        own = np.flatnonzero(layer_of == k)
        if shared[own].any() or shared[lb.nodes].any():
            raise InputError(f"--align: layer {k + 1} ({la.name!r}) shares its units' nodes with another "
                             "layer or unit (a residual stream, attention q/k); units can be aligned only "
                             "where each has nodes of its own")
        fa = _incoming(A, k, layer_of, unit_of, np.arange(A.graph.n))
        fb = _incoming(B, k, layer_of, unit_of, node_map)
        cost = (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None, :] - 2 * fa @ fb.T
        _, p = linear_sum_assignment(cost)
        p = np.asarray(p, dtype=np.int64)
        perms.append(p)
        # the node tied to unit j of layer k in each node set stands for B's node of unit p[j]
        U = la.units
        key = space[own] * U + unit_of[own]
        if np.unique(key).size != key.size:
            raise InputError(f"--align: layer {k + 1} ({la.name!r}) has units with several nodes in one "
                             "node set; cannot permute them")
        order = np.argsort(key)
        want = space[own] * U + p[unit_of[own]]
        node_map[own] = own[order[np.searchsorted(key[order], want)]]
    return perms


def compare_views(A, B, symmetry="fibration", criterion=None, align=False, levels=LEVELS,
                  names=("A", "B")) -> dict:
    """Per weight layer: partition scores for ``symmetry`` and class counts per level.

    ``A``, ``B``: :class:`~fibgraph.layerview.LayerView` s of one architecture;
    ``criterion``: what :func:`fibgraph.symmetry.colour` takes (a criterion,
    or ``{node set name: criterion, None: default}``), used for both.
    Returns ``{"symmetry", "aligned", "levels", "layers": [{layer, name_a,
    name_b, kind, output_layer, units, ari, vi, vi_normalised, a_refines_b,
    b_refines_a, equal, classes_a, classes_b, meet_classes, counts: {level:
    {"a": n, "b": n}}}, ...]}``.
    """
    check_same_architecture(A, B, names)
    perms = align_units(A, B) if align else [np.arange(ly.units) for ly in B.layers]
    cols = {sym: (A.colour(sym, criterion), B.colour(sym, criterion)) for sym in dict.fromkeys([symmetry, *levels])}
    layers = []
    for l, (la, lb) in enumerate(zip(A.layers, B.layers)):
        ca, cb = cols[symmetry]
        pa = A.layer_labels(ca, l)
        pb = canonical(B.layer_labels(cb, l)[perms[l]])
        rec = {"layer": l + 1, "name_a": la.name, "name_b": lb.name, "kind": la.kind,
               "output_layer": bool(la.output), **compare_partitions(pa, pb)}
        rec["counts"] = {lev: {"a": num_classes(A.layer_labels(cols[lev][0], l)),
                               "b": num_classes(B.layer_labels(cols[lev][1], l))} for lev in levels}
        layers.append(rec)
    return {"symmetry": symmetry, "aligned": bool(align), "levels": list(levels), "layers": layers}
