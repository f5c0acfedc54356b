"""Baselines for fibration compression at the SAME number of nodes per layer.

Every function takes a :class:`~fibgraph.network.Network` and the node count
wanted for each layer (e.g. ``node_counts(fibration_base)``; the output layer
always keeps all its units) and returns a smaller ``Network`` whose layers keep
the importer's ``meta`` (with ``'rep'``, ``'in_labels'``, ``'n_in_before'``,
``'n_out_before'`` updated), so the ONNX writer can write it back.

Pruning (units removed, the survivors' weights untouched):

- ``random``: units drawn uniformly without replacement (seeded);
- ``l2``: the units with the largest L2 norm of their input weights
  (the compression paper's "L2-norm pruning");
- ``l1``: the units with the largest L1 norm of their input weights
  (magnitude structured pruning, ``torch.nn.utils.prune.ln_structured(n=1, dim=0)``).

Scores are computed on the original weights, layer by layer; a pruned layer
reads only the surviving units of the layer before.  ``meta['rep']`` = the
kept units; ``meta['in_labels']`` maps each original input unit to its new
index (-1: removed).

Folding (data-free neuron merging as in Model Folding, Wang et al. 2025):
per hidden layer, k-means on each unit's concatenated (input weights, bias,
output weights); a cluster becomes one unit with the cluster MEAN of the input
weights and bias and the SUM of the members' output columns - the same formula
as the fibration base (:func:`fibgraph.network.compress_network`) applied to
the k-means partition (:func:`partition_base`).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .network import Network, NetworkColouring, compress_network
from .partition import canonical

__all__ = ["METHODS", "PRUNING", "node_counts", "unit_scores", "prune_network", "prune_to_counts",
           "fold_partition", "partition_base", "fold_to_counts", "baseline"]

PRUNING = ("random", "l2", "l1")
METHODS = PRUNING + ("fold",)


def node_counts(net: Network) -> list:
    """Units per layer (output units of each layer)."""
    return [ly.n_out for ly in net.layers]


def _check_counts(net, counts):
    counts = [int(c) for c in counts]
    if len(counts) != len(net.layers):
        raise ValueError(f"need one node count per layer ({len(net.layers)}), got {len(counts)}")
    for ly, c in zip(net.layers, counts):
        if not (1 <= c <= ly.n_out):
            raise ValueError(f"layer {ly.name!r}: node count {c} not in 1..{ly.n_out}")
        if ly.is_output and c != ly.n_out:
            raise ValueError(f"layer {ly.name!r} is the output layer: it keeps all {ly.n_out} units")
        if ly.meta.get("depthwise") and c != ly.n_out:
            raise ValueError(f"layer {ly.name!r}: pruning or folding a depthwise conv is not supported")
    return counts


def unit_scores(net: Network, method: str, seed=0) -> list:
    """Importance of each unit of each layer (higher = kept first)."""
    rng = np.random.default_rng(seed)
    out = []
    for ly in net.layers:
        W = ly.weight.reshape(ly.n_out, -1)
        if method == "random":
            s = rng.random(ly.n_out)
        elif method == "l2":
            s = np.linalg.norm(W, axis=1)
        elif method == "l1":
            s = np.abs(W).sum(axis=1)
        else:
            raise ValueError(f"unknown pruning method {method!r}; choose from {PRUNING}")
        out.append(s)
    return out


def prune_network(net: Network, keep: list) -> Network:
    """The network restricted to the units ``keep[l]`` of each layer (sorted
    unit indices; ``None`` = all)."""
    layers = []
    prev = np.arange(net.input_units)
    n_prev = net.input_units
    for ly, k in zip(net.layers, keep):
        k = np.arange(ly.n_out) if k is None else np.sort(np.asarray(k, dtype=np.int64))
        if k.size == 0 or np.unique(k).size != k.size or k.min() < 0 or k.max() >= ly.n_out:
            raise ValueError(f"layer {ly.name!r}: invalid units to keep")
        in_labels = np.full(n_prev, -1, dtype=np.int64)
        in_labels[prev] = np.arange(prev.size)
        W = ly.weight[k][:, prev, :]
        key = None if ly.unit_key is None else ly.unit_key[k]
        layers.append(replace(ly, weight=np.array(W, dtype=np.float64), bias=np.array(ly.bias[k], dtype=np.float64),
                              unit_key=key,
                              meta={**ly.meta, "rep": k, "in_labels": in_labels,
                                    "n_in_before": ly.n_in, "n_out_before": ly.n_out}))
        prev, n_prev = k, ly.n_out
    return Network(net.input_units, layers, net.name, dict(net.meta))


def prune_to_counts(net: Network, counts, method="l2", seed=0) -> Network:
    """Keep the ``counts[l]`` highest-scoring units of every layer."""
    counts = _check_counts(net, counts)
    scores = unit_scores(net, method, seed)
    keep = []
    for ly, c, s in zip(net.layers, counts, scores):
        if ly.is_output or c == ly.n_out:
            keep.append(None)
        else:
            keep.append(np.sort(np.argsort(-s, kind="stable")[:c]))
    return prune_network(net, keep)


def partition_base(net: Network, level_labels: list, level_scales: list | None = None):
    """Base network of an arbitrary partition of each layer's units
    (``level_labels[l]`` for layer ``l``'s outputs; the output layer's labels
    are ignored and kept distinct).  Inputs keep distinct colours.  Returns
    ``(base, maps)`` like :func:`compress_network`."""
    sizes = net.level_sizes()
    labs = [np.arange(sizes[0])]
    for ly, lab in zip(net.layers, level_labels):
        lab = np.arange(ly.n_out) if (lab is None or ly.is_output) else canonical(lab)
        if lab.size != ly.n_out:
            raise ValueError(f"layer {ly.name!r}: {lab.size} labels for {ly.n_out} units")
        labs.append(lab)
    n_bias = len(net.layers)
    labels = []
    off = 0
    for lab in labs:
        labels.append(lab + off)
        off += int(lab.max()) + 1 if lab.size else 0
    labels.append(off + np.arange(n_bias))
    labels = np.concatenate(labels).astype(np.int64)
    if level_scales is None:
        scales = np.ones(labels.size)
    else:
        scales = np.concatenate([np.ones(sizes[0])] +
                                [np.ones(s) if sc is None else np.asarray(sc, dtype=np.float64)
                                 for s, sc in zip(sizes[1:], level_scales)] + [np.ones(n_bias)])
    col = NetworkColouring(net, None, labels, scales, "partition", None, {})
    return compress_network(col)


def _kmeans(X, k, seed):
    """k-means labels of the rows of ``X`` (scipy's ``kmeans2``: k-means++
    seeding from ``seed``, then Lloyd steps until no label moves; deterministic
    for a seed)."""
    from scipy.cluster.vq import kmeans2

    n = X.shape[0]
    if k >= n:
        return np.arange(n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    import warnings

    X = np.asarray(X, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "one of the clusters is empty": fixed below
        try:
            C, lab = kmeans2(X, k, iter=1, minit="++", missing="warn", rng=np.random.default_rng(seed))
        except TypeError:                 # scipy < 1.15 names it seed
            C, lab = kmeans2(X, k, iter=1, minit="++", missing="warn", seed=np.random.default_rng(seed))
        for _ in range(300):              # Lloyd steps until no label moves
            C2, lab2 = kmeans2(X, C, iter=1, minit="matrix", missing="warn")
            if np.array_equal(lab2, lab):
                break
            C, lab = C2, lab2
    lab = canonical(lab)
    # identical points can leave fewer than k clusters: split the largest ones
    nxt = int(lab.max()) + 1
    while nxt < k:
        sizes = np.bincount(lab)
        big = int(np.argmax(sizes))
        members = np.flatnonzero(lab == big)
        lab[members[: members.size // 2]] = nxt
        nxt += 1
    return canonical(lab)


def fold_partition(net: Network, counts, seed=0) -> list:
    """k-means partition of each hidden layer into ``counts[l]`` clusters on
    the units' concatenated (input weights, bias, output weights)."""
    counts = _check_counts(net, counts)
    out = []
    for l, (ly, c) in enumerate(zip(net.layers, counts)):
        if ly.is_output or c == ly.n_out:
            out.append(np.arange(ly.n_out))
            continue
        parts = [ly.weight.reshape(ly.n_out, -1), ly.bias[:, None]]
        if l + 1 < len(net.layers):
            nxt = net.layers[l + 1].weight            # (n_next, n_out, D)
            parts.append(nxt.transpose(1, 0, 2).reshape(ly.n_out, -1))
        X = np.hstack(parts).astype(np.float64)
        out.append(_kmeans(X, c, seed))
    return out


def fold_to_counts(net: Network, counts, seed=0) -> Network:
    """Model-Folding baseline: the base of the k-means partition."""
    return partition_base(net, fold_partition(net, counts, seed))[0]


def baseline(net: Network, method: str, counts, seed=0) -> Network:
    """One of :data:`METHODS` at the given node counts."""
    if method == "fold":
        return fold_to_counts(net, counts, seed)
    if method in PRUNING:
        return prune_to_counts(net, counts, method, seed)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
