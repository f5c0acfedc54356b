"""Fibration symmetry breaking (FSB): compress the covers to the base, lift back.

Definition (main paper 3.4, docs/design.md sections 7 and 12).  Let a layer's
units carry a partition ``c`` (the covers: fibers meet flavoured opfibers, or
plain fibers) and per-unit scales ``s`` (the rescaling merge: unit ``i``
carries ``s_i`` times its class's base value; 1 without it).  The base
weight of a layer reading a layer with partition ``a`` is::

    W_hat[c', a] = mean_{i in c'} (1 / s_i) * sum_{k in a} W[i, k] * s_k
    b_hat[c']    = mean_{i in c'} b_i / s_i

(rows averaged, columns summed: exactly the compressed model the writer
builds).  Breaking lifts the base back to the original size: in every class
one *representative* (its lowest unit index) takes the base row and, through
the next layer's ``W_hat``, the class's summed outgoing column; every other
member gets fresh input weights and bias (drawn by the caller with the
layer's own initialiser) and zero outgoing weights.  Shapes do not change.
When the covers are exact the representative computes what every member
computed and the fresh units contribute nothing, so the function is
unchanged; under a tolerance (eps > 0) the change is the compression error.

Example: three hidden units of which 0 and 2 are one cover::

    >>> import numpy as np
    >>> plan = plan_layer(np.array([0, 1, 0]))
    >>> plan.reps.tolist(), plan.reinit.tolist()
    ([0, 1], [2])
    >>> W_next = np.array([[1.0, 2.0, 3.0]])         # reads the three units
    >>> lift_weight(W_next, plan, plan_layer(np.arange(1)))[0].tolist()
    [[4.0, 2.0, 0.0]]

Format-free: the graph of a chain (:func:`chain_graph`) and the covers
(:func:`chain_covers`) use the one refinement engine; applying the result to
torch modules or ONNX initializers lives in ``fibgraph.importers``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engine import Exact, refine
from .graph import Block, WeightedDigraph
from .partition import canonical
from .lazy import lazy_module

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = ["LayerPlan", "plan_layer", "lift_weight", "chain_graph", "chain_covers", "BREAK_SYMMETRIES"]

#: the symmetries breaking accepts: ``covering`` = fibers meet flavoured
#: opfibers (the paper's covers), ``fibration`` = fibers alone
BREAK_SYMMETRIES = ("covering", "fibration")


@dataclass
class LayerPlan:
    """Partition ``labels`` (canonical), ``scales``, the representative unit of
    each class ``reps`` (class order) and the units to re-initialise ``reinit``."""

    labels: np.ndarray
    scales: np.ndarray
    reps: np.ndarray
    reinit: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.reps.size)

    def cover_sizes(self):
        """Sizes of the classes with two or more units, largest first."""
        sz = np.bincount(self.labels)
        return sorted((int(x) for x in sz[sz > 1]), reverse=True)


def plan_layer(labels, scales=None) -> LayerPlan:
    """Representatives (lowest index of each class) and the members to re-initialise."""
    lab = canonical(np.asarray(labels, dtype=np.int64))
    n = lab.size
    order = np.lexsort((np.arange(n), lab))
    first = np.ones(n, dtype=bool)
    first[1:] = lab[order][1:] != lab[order][:-1]
    reps = order[first]                      # class k's lowest unit (classes in canonical order)
    is_rep = np.zeros(n, dtype=bool)
    is_rep[reps] = True
    sc = np.ones(n) if scales is None else np.asarray(scales, dtype=np.float64)
    return LayerPlan(lab, sc, reps, np.flatnonzero(~is_rep))


def _class_matrix(plan: LayerPlan, mean: bool):
    """(classes, units): mean of rows divided by scales (``mean``), or sum of
    columns times scales."""
    n, k = plan.labels.size, plan.n_classes
    v = 1.0 / plan.scales / np.bincount(plan.labels, minlength=k)[plan.labels] if mean else plan.scales
    return sp.csr_matrix((v, (plan.labels, np.arange(n))), shape=(k, n))


def lift_weight(W, in_plan: LayerPlan, out_plan: LayerPlan, bias=None):
    """Compress ``W`` (out units, in units, ...) to the base and lift it back:
    the representatives' block holds ``W_hat``, everything else is zero (the
    re-initialised rows are the caller's to fill).  Returns ``(W_new, b_new)``
    (``b_new`` None without a bias)."""
    W = np.asarray(W, dtype=np.float64)
    R = _class_matrix(out_plan, mean=True)
    C = _class_matrix(in_plan, mean=False)
    sh = W.shape
    rows = np.asarray(R @ W.reshape(sh[0], -1)).reshape(R.shape[0], sh[1], -1)      # (c, i, D)
    cols = np.asarray(C @ rows.transpose(1, 0, 2).reshape(sh[1], -1))                 # (a, c * D)
    W_hat = cols.reshape(C.shape[0], R.shape[0], -1).transpose(1, 0, 2).reshape((R.shape[0], C.shape[0]) + sh[2:])
    out = np.zeros_like(W)
    out[np.ix_(out_plan.reps, in_plan.reps)] = W_hat
    b_new = None
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64)
        b_new = np.zeros_like(b)
        b_new[out_plan.reps] = R @ b
    return out, b_new


def chain_graph(layers, n_inputs):
    """The weighted digraph of a feed-forward chain.

    ``layers``: one dict per layer with ``weight`` (out, in, D) (D = 1 for a
    dense layer, the kernel or the flattened positions otherwise), optional
    ``bias`` (out,) and ``homogeneous`` (its activation is of the ReLU family).
    Nodes: the inputs, one bias node per layer, then each layer's units;
    inputs, bias nodes and the last layer's units start distinct.  Returns
    ``(graph, unit_ids)`` with ``unit_ids[l]`` the node ids of layer ``l``.
    """
    L = len(layers)
    sizes = [int(np.asarray(ly["weight"]).shape[0]) for ly in layers]
    inputs = np.arange(n_inputs)
    bias_nodes = n_inputs + np.arange(L)
    start = n_inputs + L
    unit_ids, blocks = [], []
    prev = inputs
    for l, ly in enumerate(layers):
        ids = start + np.arange(sizes[l])
        start += sizes[l]
        W = np.asarray(ly["weight"], dtype=np.float64)
        if W.ndim == 2:
            W = W[:, :, None]
        if W.shape[1] != prev.size:
            raise ValueError(f"layer {l}: weight reads {W.shape[1]} units, previous layer has {prev.size}")
        blocks.append(Block(src=prev, dst=ids, weight=W.reshape(W.shape[0], W.shape[1], -1), name=f"layer{l}"))
        if ly.get("bias") is not None:
            blocks.append(Block(src=bias_nodes[l:l + 1], dst=ids,
                                weight=np.asarray(ly["bias"], dtype=np.float64).reshape(-1, 1, 1),
                                name=f"layer{l}.bias"))
        unit_ids.append(ids)
        prev = ids
    n = start
    layer = np.zeros(n, dtype=np.int64)
    initial = np.zeros(n, dtype=np.int64)
    homog = np.zeros(n, dtype=bool)
    fixed = np.concatenate([inputs, bias_nodes, unit_ids[-1]])
    initial[fixed] = np.arange(fixed.size)
    nxt = fixed.size
    for l, ids in enumerate(unit_ids):
        layer[ids] = l + 1
        homog[ids] = bool(layers[l].get("homogeneous", False))
        if l < L - 1:
            initial[ids] = nxt
            nxt += 1
    levels = [np.concatenate([inputs, bias_nodes])] + unit_ids
    names = ["input"] + [ly.get("name", f"layer{l}") for l, ly in enumerate(layers)]
    g = WeightedDigraph(n=n, blocks=blocks, levels=levels, initial=initial, layer=layer,
                        layer_names=names, homogeneous=homog)
    return g, unit_ids


def chain_covers(layers, n_inputs, symmetry="covering", criterion=None):
    """One :class:`LayerPlan` per layer of a chain (the last, the outputs:
    singletons).  ``symmetry``: ``'covering'`` (fibers meet flavoured
    opfibers: the out-balanced refinement of the fibers, scales carried) or
    ``'fibration'``; ``criterion``: :class:`~fibgraph.engine.Exact` (default)
    or :class:`~fibgraph.engine.Tolerance`."""
    if symmetry not in BREAK_SYMMETRIES:
        raise ValueError(f"symmetry must be one of {', '.join(BREAK_SYMMETRIES)}, got {symmetry!r}")
    g, unit_ids = chain_graph(layers, n_inputs)
    crit = criterion or Exact()
    r = refine(g, "in", crit)
    labels, scales = r.labels, r.scales
    if symmetry == "covering":
        r = refine(g, "out", crit, labels, scales=scales)
        labels, scales = r.labels, r.scales
    return [plan_layer(labels[ids], scales[ids]) for ids in unit_ids]
