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


def _greedy_kmeanspp(X, k, rng, sq):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; as scikit-learn does it):
    each new centre is the best of ``2 + ln k`` candidates drawn in proportion
    to the squared distance to the nearest centre so far."""
    n = X.shape[0]
    trials = 2 + int(np.log(k))
    centres = [int(rng.integers(n))]
    d2 = np.maximum(sq - 2 * X @ X[centres[0]] + sq[centres[0]], 0.0)
    for _ in range(1, k):
        tot = d2.sum()
        if tot <= 0:
            cand = rng.integers(n, size=trials)
        else:
            cand = np.searchsorted(np.cumsum(d2), rng.random(trials) * tot)
            cand = np.minimum(cand, n - 1)
        dc = np.maximum(sq[None, :] - 2 * X[cand] @ X.T + sq[cand][:, None], 0.0)   # (trials, n)
        pot = np.minimum(dc, d2[None, :]).sum(axis=1)
        best = int(np.argmin(pot))
        centres.append(int(cand[best]))
        d2 = np.minimum(d2, dc[best])
    return X[centres].copy()


def kmeans_labels(X: np.ndarray, k: int, seed: int = 0, n_init: int = 1) -> np.ndarray:
    """Canonical labels of a k-means partition of the rows of ``X`` into exactly
    ``k`` clusters: greedy k-means++ seeding from ``seed``, then Lloyd steps
    until no label moves; of ``n_init`` runs the one of lowest inertia is kept
    (scikit-learn's ``KMeans(n_init=1)`` by default, which the studies used;
    numpy only, deterministic for a seed).  Identical points that leave fewer
    than ``k`` clusters are split, largest cluster first."""
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= n:
        return np.arange(n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    sq = np.einsum("ij,ij->i", X, X)
    best, best_inertia = None, np.inf
    for _ in range(max(1, int(n_init))):
        C = _greedy_kmeanspp(X, k, rng, sq)
        lab = None
        for _ in range(300):              # Lloyd steps until no label moves
            d = sq[:, None] - 2 * X @ C.T + np.einsum("ij,ij->i", C, C)[None, :]
            new = np.argmin(d, axis=1)
            if lab is not None and np.array_equal(new, lab):
                break
            lab = new
            cnt = np.bincount(lab, minlength=k)
            C_new = np.zeros_like(C)
            np.add.at(C_new, lab, X)
            keep = cnt > 0
            C[keep] = C_new[keep] / cnt[keep, None]       # an empty cluster keeps its centre
        inertia = float(np.maximum(d[np.arange(n), lab], 0.0).sum())
        if inertia < best_inertia:
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
