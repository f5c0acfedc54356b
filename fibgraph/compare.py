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

:func:`compare_networks` colours two networks of the same architecture
(same layer kinds and weight shapes) and compares their partitions layer by
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
from .network import Network, colour_network
from .partition import canonical, meet, num_classes, refines

__all__ = ["contingency", "adjusted_rand_index", "variation_of_information", "check_same_architecture",
           "align_units", "compare_networks", "compare_partitions", "LEVELS"]

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


def check_same_architecture(A: Network, B: Network, names=("A", "B")):
    """InputError naming the first difference of layer count, kind or weight shape."""
    na, nb = names
    if A.input_units != B.input_units:
        raise InputError(f"architecture mismatch: {na} reads {A.input_units} input units, {nb} {B.input_units}")
    if len(A.layers) != len(B.layers):
        raise InputError(f"architecture mismatch: {na} has {len(A.layers)} layers, {nb} has {len(B.layers)}")
    for l, (x, y) in enumerate(zip(A.layers, B.layers)):
        if x.kind != y.kind or x.weight.shape != y.weight.shape:
            raise InputError(f"architecture mismatch at layer {l + 1}: {na} {x.name!r} is {x.kind} "
                             f"{tuple(x.weight.shape)}, {nb} {y.name!r} is {y.kind} {tuple(y.weight.shape)} "
                             "(weight shape: units out, units in, kernel/positions)")
        if (x.unit_key is None) != (y.unit_key is None) or (
                x.unit_key is not None and x.unit_key.shape != y.unit_key.shape):
            raise InputError(f"architecture mismatch at layer {l + 1}: per-unit parameters "
                             "(BatchNorm, PReLU, scaling) differ")


def align_units(A: Network, B: Network) -> list:
    """Permutations ``perm[l]`` (one per layer) such that unit ``perm[l][i]`` of B
    matches unit ``i`` of A: forward pass, layer by layer, Hungarian matching of
    incoming weights (B's columns permuted by the previous match) and bias.
    Output layers keep their order.  Matching uses incoming weights only: units
    with equal incoming rows (exact duplicates) are interchangeable, and the
    order chosen among them can make the NEXT layer's rows look different
    (its fibers are balanced sums, not equal columns); good for independent
    runs, where ties do not occur."""
    from scipy.optimize import linear_sum_assignment

    check_same_architecture(A, B)
    perms = []
    prev = np.arange(A.input_units)
    for la, lb in zip(A.layers, B.layers):
        if la.is_output:
            p = np.arange(la.n_out)
        else:
            Wb = lb.weight[:, prev, :]
            fa = np.hstack([la.weight.reshape(la.n_out, -1), la.bias[:, None]])
            fb = np.hstack([Wb.reshape(lb.n_out, -1), lb.bias[:, None]])
            cost = (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None, :] - 2 * fa @ fb.T
            _, p = linear_sum_assignment(cost)
        perms.append(np.asarray(p, dtype=np.int64))
        prev = perms[-1]
    return perms


def compare_networks(A: Network, B: Network, symmetry="fibration", criterion=None, align=False,
                     levels=LEVELS, names=("A", "B")) -> dict:
    """Per layer: partition scores for ``symmetry`` and class counts per level.

    Returns ``{"symmetry", "aligned", "layers": [{layer, name_a, name_b, units,
    ari, vi, vi_normalised, a_refines_b, b_refines_a, equal, classes_a,
    classes_b, counts: {level: {"a": n, "b": n}}}, ...]}``.
    """
    check_same_architecture(A, B, names)
    perms = align_units(A, B) if align else [np.arange(ly.n_out) for ly in B.layers]
    cols = {}
    for sym in dict.fromkeys([symmetry, *levels]):
        cols[sym] = (colour_network(A, sym, criterion), colour_network(B, sym, criterion))
    layers = []
    for l, (la, lb) in enumerate(zip(A.layers, B.layers)):
        ca, cb = cols[symmetry]
        pa = ca.level_labels(l + 1)
        pb = canonical(cb.level_labels(l + 1)[perms[l]])
        rec = {"layer": l + 1, "name_a": la.name, "name_b": lb.name, "kind": la.kind,
               "output_layer": bool(la.is_output), **compare_partitions(pa, pb)}
        rec["counts"] = {lev: {"a": num_classes(cols[lev][0].level_labels(l + 1)),
                               "b": num_classes(cols[lev][1].level_labels(l + 1))} for lev in levels}
        layers.append(rec)
    return {"symmetry": symmetry, "aligned": bool(align), "levels": list(levels), "layers": layers}
