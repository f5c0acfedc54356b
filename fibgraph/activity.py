"""Activity-based synchrony clusters, compared with weight-based fibers.

The main paper (section 3.5) looks at the network's *activity*: the
correlation matrix of the units of a layer over inputs, for inputs of one
class at a time, forms large blocks of synchronised units ("class-conditional
synchrony clusters"); the paper's chain is covers -> fibers -> synchrony
clusters of all data -> class-conditional clusters, each refining the next.
Only the first links are theorems: fibers have identical activity on every
input, so exact fibers refine the synchrony clusters of ANY input set at any
threshold < 1.  Between clusterings at a correlation threshold the chain is
empirical (a threshold is not transitive, and correlations over a subset of
inputs can be lower as well as higher).  This module measures these relations:

- activities per weight layer come as ``(samples, units)`` arrays (a conv
  channel's activity over (sample, position) pairs); for torch modules
  ``fibgraph.importers.torch_analysis.torch_activations`` collects them with forward
  hooks and ``fibgraph.importers.torch_analysis.activity_report`` runs all of this;
- :func:`synchrony_clusters`: units clustered by correlation distance
  ``1 - corr`` with scipy's hierarchical clustering, cut at ``1 - threshold``
  (average linkage by default; ``complete`` bounds every in-cluster pair).
  Units whose activity is constant on the inputs have no correlation: they
  form one cluster of their own ("silent" units, e.g. dead ReLUs);
- :func:`class_conditional_clusters`: the same for the inputs of each class;
- :func:`refinement_score`: fraction of the pairs of units that share a
  class of the fine partition (weight fibers) that also share a class of the
  coarse one (activity clusters): 1 iff the fine partition refines the coarse
  one (on the pairs it has);
- :func:`fiber_activity_report`: all of it per weight layer of a
  :class:`~fibgraph.layerview.LayerView`, with ARI.
"""
from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from .compare import adjusted_rand_index, variation_of_information
from .errors import InputError
from .partition import canonical, meet, num_classes, refines

__all__ = ["correlation_matrix", "synchrony_clusters", "class_conditional_clusters", "refinement_score",
           "fiber_activity_report"]


# --------------------------------------------------------------- clusters
def correlation_matrix(acts, rtol=1e-9):
    """Pearson correlation between the columns of ``acts (samples, units)`` and a
    mask of the constant (silent) units, whose rows/columns are 0."""
    A = np.asarray(acts, dtype=np.float64)
    A = A - A.mean(axis=0)
    sd = np.sqrt((A * A).mean(axis=0))
    scale = np.abs(np.asarray(acts)).max() if A.size else 0.0
    silent = sd <= rtol * max(scale, 1e-300)
    Z = np.where(silent, 0.0, A / np.where(silent, 1.0, sd))
    C = (Z.T @ Z) / max(A.shape[0], 1)
    np.clip(C, -1.0, 1.0, out=C)
    return C, silent


def synchrony_clusters(acts, threshold=0.9, method="average") -> np.ndarray:
    """Canonical labels: units clustered at correlation >= ``threshold``
    (distance ``1 - corr`` cut at ``1 - threshold``); silent units together."""
    if not (-1 <= threshold <= 1):
        raise InputError(f"correlation threshold must be in [-1, 1], got {threshold}")
    if method not in ("average", "complete", "single"):
        raise InputError(f"linkage must be average, complete or single, got {method!r}")
    C, silent = correlation_matrix(acts)
    n = C.shape[0]
    labels = np.zeros(n, dtype=np.int64)
    live = np.flatnonzero(~silent)
    nxt = 1
    if live.size == 1:
        labels[live] = nxt
    elif live.size > 1:
        D = 1.0 - C[np.ix_(live, live)]
        D = 0.5 * (D + D.T)
        np.fill_diagonal(D, 0.0)
        D = np.clip(D, 0.0, 2.0)
        lab = fcluster(linkage(squareform(D, checks=False), method=method), t=1.0 - threshold + 1e-12,
                       criterion="distance")
        labels[live] = nxt + lab
    return canonical(labels)


def class_conditional_clusters(acts, y, threshold=0.9, method="average", samples_per_input=1) -> dict:
    """``{class: labels}``: synchrony clusters of the inputs of each class.
    ``samples_per_input``: rows of ``acts`` per input (conv: positions)."""
    y = np.asarray(y).reshape(-1)
    rows = np.repeat(y, samples_per_input)
    if rows.size != len(acts):
        raise InputError(f"{len(y)} labels for {len(acts)} activity rows")
    return {c.item() if hasattr(c, "item") else c: synchrony_clusters(acts[rows == c], threshold, method)
            for c in np.unique(y)}


def refinement_score(fine, coarse):
    """(fraction of same-class pairs of ``fine`` that share a class of ``coarse``,
    number of such pairs); 1.0 when ``fine`` has no non-trivial class."""
    fine, coarse = canonical(fine), canonical(coarse)
    both = meet(fine, coarse)
    pairs = lambda lab: int((np.bincount(lab).astype(np.int64) * (np.bincount(lab) - 1) // 2).sum())  # noqa: E731
    p_fine = pairs(fine)
    if p_fine == 0:
        return 1.0, 0
    return pairs(both) / p_fine, p_fine


# ----------------------------------------------------------------- report
def fiber_activity_report(view, labels, acts, n_inputs, y=None, threshold=0.9, method="average",
                          include_output=False) -> list:
    """Per weight layer: weight fibers vs activity synchrony clusters.

    ``view``: a :class:`~fibgraph.layerview.LayerView`; ``labels``: a
    colouring of its graph (e.g. ``view.colour("fibration", criterion)``);
    ``acts``: ``{layer name: (samples, units) array}`` (layers without an
    entry are left out); ``n_inputs``: the number of inputs the activities
    were taken on (a conv layer has ``n_inputs * positions`` rows).  For each
    layer: counts of fibers, all-data clusters, class-conditional clusters
    (per class and their meet; with labels ``y``), the refinement score of
    fibers in the all-data clusters and (mean over classes) in the class
    clusters, whether fibers refine them, and the ARI of fibers vs all-data
    clusters.
    """
    out = []
    for l, ly in enumerate(view.layers):
        if (ly.output and not include_output) or ly.name not in acts:
            continue
        A = np.asarray(acts[ly.name], dtype=np.float64)
        if A.ndim != 2 or A.shape[1] != ly.units:
            raise InputError(f"layer {ly.name!r}: activities of shape {A.shape}, the layer has {ly.units} units")
        if n_inputs < 1 or A.shape[0] % n_inputs:
            raise InputError(f"layer {ly.name!r}: {A.shape[0]} activity rows for {n_inputs} inputs")
        spi = A.shape[0] // n_inputs
        fib = view.layer_labels(labels, l)
        allc = synchrony_clusters(A, threshold, method)
        s_all, pairs = refinement_score(fib, allc)
        rec = {"layer": l + 1, "name": ly.name, "units": ly.units, "fibers": num_classes(fib),
               "fiber_pairs": pairs, "clusters": num_classes(allc), "fibers_refine_clusters": refines(fib, allc),
               "refinement_score": s_all, "ari_fibers_clusters": adjusted_rand_index(fib, allc),
               "vi_fibers_clusters": variation_of_information(fib, allc),
               "silent_units": int(correlation_matrix(A)[1].sum())}
        if y is not None:
            cc = class_conditional_clusters(A, y, threshold, method, spi)
            scores = [refinement_score(fib, lab)[0] for lab in cc.values()]
            m = meet(*cc.values()) if cc else fib
            rec.update({"class_clusters": {str(k): num_classes(v) for k, v in cc.items()},
                        "class_clusters_mean": float(np.mean([num_classes(v) for v in cc.values()])),
                        "class_refinement_score_mean": float(np.mean(scores)),
                        "fibers_refine_every_class": all(refines(fib, v) for v in cc.values()),
                        "class_meet_clusters": num_classes(m),
                        "fibers_refine_class_meet": refines(fib, m),
                        "ari_fibers_class_meet": adjusted_rand_index(fib, m)})
        out.append(rec)
    return out
