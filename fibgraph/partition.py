"""Partitions of a node set, stored as integer colour labels.

A partition of ``n`` nodes is an ``int64`` array ``labels`` of length ``n``;
nodes ``i`` and ``j`` share a class (a *fiber*, *opfiber*, *cover* or *orbit*,
depending on the symmetry) iff ``labels[i] == labels[j]``.

Canonical labelling (stable and documented): classes are numbered ``0, 1, ...``
in the order of their smallest node index.  Every partition returned by
fibgraph is canonical, so two partitions are equal iff their arrays are equal.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "canonical",
    "meet",
    "refines",
    "classes",
    "num_classes",
    "class_sizes",
    "from_classes",
]


def canonical(labels) -> np.ndarray:
    """Relabel ``labels`` so that classes are numbered by first occurrence."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    if labels.ndim > 1:  # rows are keys
        _, inv = np.unique(labels, axis=0, return_inverse=True)
    else:
        _, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(-1)
    first = np.full(inv.max() + 1, labels.shape[0], dtype=np.int64)
    np.minimum.at(first, inv, np.arange(inv.size))
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inv].astype(np.int64)


def meet(*partitions) -> np.ndarray:
    """The coarsest common refinement (intersection) of partitions."""
    stacked = np.stack([np.asarray(p, dtype=np.int64) for p in partitions], axis=1)
    return canonical(stacked)


def refines(fine, coarse) -> bool:
    """True iff every class of ``fine`` lies inside one class of ``coarse``."""
    fine = np.asarray(fine)
    coarse = np.asarray(coarse)
    if fine.shape != coarse.shape:
        raise ValueError("partitions of different node sets")
    return num_classes(meet(fine, coarse)) == num_classes(fine)


def num_classes(labels) -> int:
    labels = np.asarray(labels)
    return int(np.unique(labels).size) if labels.size else 0


def class_sizes(labels) -> np.ndarray:
    """Sizes of the classes of a canonical partition, indexed by label."""
    return np.bincount(np.asarray(labels, dtype=np.int64))


def classes(labels) -> list[list[int]]:
    """The classes as sorted lists of node indices, ordered by smallest member."""
    labels = canonical(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return [part.tolist() for part in np.split(order, bounds)] if labels.size else []


def from_classes(groups, n: int) -> np.ndarray:
    """Partition array from a list of classes covering ``range(n)``."""
    labels = np.full(n, -1, dtype=np.int64)
    for c, members in enumerate(groups):
        labels[np.asarray(members, dtype=np.int64)] = c
    if (labels < 0).any():
        raise ValueError("classes do not cover every node")
    return canonical(labels)
