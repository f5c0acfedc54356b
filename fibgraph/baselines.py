"""Baselines for fibration compression at the SAME number of units, format-free.

The methods (:data:`METHODS`) that ``compare-methods`` runs at exactly the
fibration base's unit counts (:mod:`fibgraph.importers.compare_dag` chooses the units
on the hypergraph and writes the models):

- pruning (:data:`PRUNING`; units removed, the survivors' weights untouched):
  ``random`` (units drawn uniformly, seeded), ``l2`` / ``l1`` (the units
  with the largest L2 / L1 norm of their input weights: the compression
  paper's "L2-norm pruning", magnitude structured pruning as
  ``torch.nn.utils.prune.ln_structured``);
- ``fold``: data-free neuron merging as in Model Folding (Wang et al. 2025):
  k-means (:func:`kmeans_labels`) on each unit's concatenated input weights,
  constants and output weights; a cluster is merged by the fibration base's
  formula (rows averaged, input columns summed).

:func:`prune_scores` and :func:`kmeans_labels` are the format-free parts.
"""
from __future__ import annotations

import warnings

import numpy as np

from .partition import canonical

__all__ = ["METHODS", "PRUNING", "prune_scores", "kmeans_labels"]

PRUNING = ("random", "l2", "l1")
METHODS = PRUNING + ("fold",)


def prune_scores(rows: np.ndarray, method: str, rng=None) -> np.ndarray:
    """Importance of each unit (higher = kept first) from its input-weight
    ``rows`` (one row per unit): L2 or L1 norm, or uniform random numbers
    drawn from ``rng`` (a ``numpy.random.Generator``)."""
    rows = np.asarray(rows, dtype=np.float64)
    n = rows.shape[0]
    if method == "random":
        return (rng if rng is not None else np.random.default_rng(0)).random(n)
    R = rows.reshape(n, -1)
    if method == "l2":
        return np.linalg.norm(R, axis=1)
    if method == "l1":
        return np.abs(R).sum(axis=1)
    raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(PRUNING)}")


def kmeans_labels(X: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Canonical labels of a k-means partition of the rows of ``X`` into exactly
    ``k`` clusters: ``n_init`` runs of scipy's ``kmeans2`` (k-means++ seeding
    drawn from ``seed``, then Lloyd steps until no label moves), the one of
    lowest inertia kept (as scikit-learn's ``KMeans(n_init=10)``; deterministic
    for a seed).  Identical points that leave fewer than ``k`` clusters are
    split, largest cluster first."""
    from scipy.cluster.vq import kmeans2

    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= n:
        return np.arange(n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "one of the clusters is empty": fixed below
        for _ in range(max(1, int(n_init))):
            try:
                C, lab = kmeans2(X, k, iter=1, minit="++", missing="warn", rng=rng)
            except TypeError:             # scipy < 1.15 names it seed
                C, lab = kmeans2(X, k, iter=1, minit="++", missing="warn", seed=rng)
            for _ in range(300):          # Lloyd steps until no label moves
                C2, lab2 = kmeans2(X, C, iter=1, minit="matrix", missing="warn")
                if np.array_equal(lab2, lab):
                    break
                C, lab = C2, lab2
            means = np.zeros((k, X.shape[1]))
            np.add.at(means, lab, X)
            means /= np.maximum(np.bincount(lab, minlength=k), 1)[:, None]
            inertia = float(((X - means[lab]) ** 2).sum())
            if inertia < best_inertia - 1e-12 * max(1.0, best_inertia if np.isfinite(best_inertia) else 1.0):
                best, best_inertia = lab, inertia
    lab = best
    lab = canonical(lab)
    nxt = int(lab.max()) + 1
    while nxt < k:
        sizes = np.bincount(lab)
        big = int(np.argmax(sizes))
        members = np.flatnonzero(lab == big)
        lab[members[: members.size // 2]] = nxt
        nxt += 1
    return canonical(lab)
