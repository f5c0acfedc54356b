"""Numerical checks of the main paper's theorems (the format-free part).

1. Activity synchronisation (eq. 4): units of a fiber have identical
   activations on every input.  :func:`activity_sync`.
2. Error synchronisation (eq. 6): units of a *flavoured* opfiber have
   identical error signals ``delta_i = dL/dz_i`` (pre-activation) for every
   input and target.  :func:`error_sync`.
3. Cover coarse-graining (theorem 2.1): under gradient descent the covering
   at step t+1 is a coarsening of the covering at step t; a strict cover
   present at step t is still present at t+1.  :func:`cover_state` per step.

The checks here take a :class:`~fibgraph.layerview.LayerView`, a colouring of
its graph and per-layer arrays ``{weight name: (samples, units)}``; running
a torch model (float64 activations, errors by autograd, training) is
``fibgraph.importers.torch_analysis`` (``check_activity_sync``, ``check_error_sync``,
``check_cover_persistence``, ``torch_mlp``).

The exact setting of 2 and 3 (what they need, what they do not):

- The network's graph gives every output unit its own colour (the initial
  colouring), so output units are never grouped and the output errors need
  no symmetry: the theorems hold for ANY targets and any loss that is a sum
  over samples of a function of the outputs.  Only if output units are
  grouped (an ``initial`` colouring that merges outputs) must their
  errors agree, e.g. equal targets per sample for grouped outputs under MSE:
  see :func:`grouped_initial`.
- Why 3 holds: the gradient of ``W[m, i]`` is ``sum_samples delta_m h_i``.  In
  a partition balanced both ways (strict covering) every class has equal
  activities (in-balance) and equal errors (out-balance + equal activities,
  so equal slopes), so each block ``W[class q, class p]`` receives a
  CONSTANT update: the row sums over ``p`` change equally for all rows of
  ``q`` and the column sums over ``q`` equally for all columns of ``p``;
  bias updates are equal within a class.  Balance both ways is kept, for
  full-batch GD, mini-batch SGD, momentum and weight decay alike (all
  updates are linear in balanced quantities).  Fibers alone are NOT kept:
  two units of a fiber with different errors get different updates.
- Numbers: float64, the covering recomputed from the weights after every
  step with the exact criterion (rtol 1e-5 of the layer's largest weight
  sum); the planted partition must refine it (it may coarsen: classes may
  merge, never split).
"""
from __future__ import annotations

import numpy as np

from .partition import canonical, classes, refines

__all__ = ["class_spread", "pair_gap", "activity_sync", "error_sync", "grouped_initial", "cover_state"]


def class_spread(values, labels) -> float:
    """Largest ``max_samples |v_i - v_j|`` over pairs in one class (0 for singletons)."""
    values = np.asarray(values)
    worst = 0.0
    for cl in classes(labels):
        if len(cl) > 1:
            v = values[:, cl]
            worst = max(worst, float((v.max(1) - v.min(1)).max()))
    return worst


def pair_gap(values, labels, pairs=None) -> float:
    """Smallest ``max_samples |v_i - v_j|`` over pairs in DIFFERENT classes
    (or over the given pairs): how far apart the non-synchronised units are."""
    values = np.asarray(values)
    labels = canonical(labels)
    if pairs is None:
        n = labels.size
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]]
    if not pairs:
        return float("inf")
    return float(min(np.abs(values[:, i] - values[:, j]).max() for i, j in pairs))


def _scale(arrs):
    return max(1.0, max(float(np.abs(a).max()) for a in arrs))


def activity_sync(view, labels, hs) -> list:
    """Per hidden weight layer of ``view`` with activities in ``hs`` (``{name:
    (samples, units)}``): the classes of ``labels`` (a colouring of the graph,
    e.g. exact fibers), the largest in-class and the smallest between-class
    activity difference, relative to the largest activity (at least 1)."""
    s = _scale([hs[ly.name] for ly in view.layers if ly.name in hs])
    out = []
    for l in view.hidden():
        ly = view.layers[l]
        if ly.name not in hs:
            continue
        lab = view.layer_labels(labels, l)
        out.append({"layer": l + 1, "name": ly.name, "classes": classes(lab),
                    "within": class_spread(hs[ly.name], lab) / s, "between": pair_gap(hs[ly.name], lab) / s})
    return out


def error_sync(view, flavoured, plain, ds) -> list:
    """Per weight layer with errors in ``ds`` (``{name: (samples, units)}``, the
    pre-activation errors): flavoured opfibers (``flavoured``, a colouring)
    and the largest in-class / smallest between-class error difference, plus
    the pairs that only the plain opfibers (``plain``) group and their gap."""
    s = _scale([ds[ly.name] for ly in view.layers if ly.name in ds])
    out = []
    for l, ly in enumerate(view.layers):
        if ly.name not in ds:
            continue
        d = ds[ly.name]
        lf, lp = view.layer_labels(flavoured, l), view.layer_labels(plain, l)
        same_p = lp[:, None] == lp[None, :]
        diff_f = lf[:, None] != lf[None, :]
        extra = [(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(same_p & diff_f, 1)))]
        out.append({"layer": l + 1, "name": ly.name, "flavoured": classes(lf), "plain": classes(lp),
                    "within": class_spread(d, lf) / s, "between": pair_gap(d, lf) / s,
                    "plain_only_pairs": extra,
                    "plain_only_gap": pair_gap(d, lf, extra) / s if extra else None})
    return out


def grouped_initial(view, groups, layer=-1) -> np.ndarray:
    """The graph's initial colouring with the units of each group (lists of unit
    indices of weight layer ``layer``, the output layer by default) merged:
    every node tied to a unit of the group takes the colour of the node tied
    to the group's first unit in the same node set."""
    g = view.graph
    initial = np.asarray(g.initial, dtype=np.int64).copy()
    ly = view.layers[layer]
    space = np.asarray(g.layer, dtype=np.int64)
    for grp in groups or []:
        grp = [int(u) for u in grp]
        first = np.flatnonzero(view.tie == view.tie[ly.nodes[grp[0]]])
        ref = dict(zip(space[first].tolist(), initial[first].tolist()))
        for u in grp[1:]:
            nodes = np.flatnonzero(view.tie == view.tie[ly.nodes[u]])
            for v in nodes:
                if int(space[v]) in ref:
                    initial[v] = ref[int(space[v])]
    return initial


def cover_state(view, labels, planted, layers=None) -> dict:
    """Whether the planted partitions (``planted[i]`` for hidden layer
    ``layers[i]``, by default the hidden layers in order) refine / equal the
    colouring ``labels`` on those layers, and its class counts there."""
    layers = view.hidden()[:len(planted)] if layers is None else list(layers)
    labs = [view.layer_labels(labels, l) for l in layers]
    return {"refines": all(bool(refines(p, q)) for p, q in zip(planted, labs)),
            "equal": all(np.array_equal(canonical(p), q) for p, q in zip(planted, labs)),
            "classes": [int(q.max()) + 1 if q.size else 0 for q in labs]}
