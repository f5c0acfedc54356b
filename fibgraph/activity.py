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

- activities per layer: :func:`torch_activations` (a torch ``nn.Sequential``,
  post-activation values just before the next linear layer; a conv channel's
  activity over (sample, position) pairs) or :func:`network_activations` (a
  dense :class:`~fibgraph.network.Network` with known activations, e.g. an
  imported ONNX MLP);
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
- :func:`activity_report`: all of it per layer, with ARI.
"""
from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from .compare import adjusted_rand_index, variation_of_information
from .errors import InputError
from .partition import canonical, meet, num_classes, refines

__all__ = ["torch_activations", "network_activations", "correlation_matrix", "synchrony_clusters",
           "class_conditional_clusters", "refinement_score", "activity_report"]


# ------------------------------------------------------------- activities
def _as_units(t):
    """(N, C, ...) -> (N * positions, C); (N, F) stays."""
    a = t.detach().to("cpu").double().numpy()
    if a.ndim == 2:
        return a
    a = np.moveaxis(a, 1, -1)
    return a.reshape(-1, a.shape[-1])


def torch_activations(module, x, batch=4096) -> list:
    """Per linear layer of an ``nn.Sequential``: the activity of its units as
    ``(samples, units)`` arrays, taken just before the next linear layer (after
    its activation, pooling, BatchNorm); for the output layer, its output
    before a final Softmax.  Conv channels: positions count as samples."""
    import torch
    import torch.nn as nn

    from importers.torch_net import _CONV, _TAIL, _flatten_modules, network_from_torch

    network_from_torch(module)  # refuses what it cannot map, with the reason
    mods = _flatten_modules(module)
    is_lin = [isinstance(m, nn.Linear) or type(m).__name__ in _CONV for _, m in mods]
    lin_pos = [k for k, v in enumerate(is_lin) if v]
    xt = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    dtype = next(module.parameters()).dtype
    outs = [[] for _ in lin_pos]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for s in range(0, xt.shape[0], batch):
                h = xt[s:s + batch].to(dtype)
                li = -1
                last = None
                for k, (_, m) in enumerate(mods):
                    if is_lin[k]:
                        if li >= 0:
                            outs[li].append(_as_units(last))
                        li += 1
                    if type(m).__name__ in _TAIL:
                        break
                    h = m(h)
                    if not isinstance(m, nn.Flatten):
                        last = h
                outs[li].append(_as_units(last))
    finally:
        module.train(was_training)
    return [np.concatenate(o) for o in outs]


_ACT = {"": lambda z: z, "Identity": lambda z: z, "Relu": lambda z: np.maximum(z, 0),
        "Tanh": np.tanh, "Sigmoid": lambda z: 1 / (1 + np.exp(-z))}


def network_activations(net, x) -> list:
    """Activities of a dense :class:`Network` (layers ``'dense'`` with ``D = 1``
    and activation Relu, Tanh, Sigmoid or none) on inputs ``x (N, n_in)``."""
    h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if h.shape[1] != net.input_units:
        raise InputError(f"inputs have {h.shape[1]} features, the network reads {net.input_units}")
    out = []
    for ly in net.layers:
        if ly.kind != "dense" or ly.weight.shape[2] != 1:
            raise InputError(f"layer {ly.name!r}: network_activations runs dense layers only; "
                             "use torch_activations for conv models")
        if ly.unit_key is not None:
            raise InputError(f"layer {ly.name!r}: per-unit parameters after the layer are not run here")
        z = h @ ly.weight[:, :, 0].T + ly.bias
        acts = [a for a in (ly.activation or "").split("+") if a not in ("Dropout",)]
        for a in acts if acts else [""]:
            if a not in _ACT:
                raise InputError(f"layer {ly.name!r}: activation {a!r} is not run here "
                                 f"(known: {', '.join(k for k in _ACT if k)})")
            z = _ACT[a](z)
        out.append(z)
        h = z
    return out


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
def activity_report(model, x, y=None, symmetry="fibration", criterion=None, threshold=0.9,
                    method="average", include_output=False) -> list:
    """Per layer: weight fibers vs activity synchrony clusters.

    ``model``: torch ``nn.Sequential`` or dense :class:`Network`.  For each
    layer: counts of fibers, all-data clusters, class-conditional clusters
    (per class and their meet), the refinement score of fibers in the
    all-data clusters and (mean over classes) in the class clusters, whether
    fibers refine them, and the ARI of fibers vs all-data clusters.
    """
    from .network import Network, colour_network

    if isinstance(model, Network):
        net = model
        acts = network_activations(net, x)
    else:
        from importers.torch_net import network_from_torch

        net = network_from_torch(model)
        acts = torch_activations(model, x)
    col = colour_network(net, symmetry, criterion)
    n_inputs = len(x)
    out = []
    for l, ly in enumerate(net.layers):
        if ly.is_output and not include_output:
            continue
        A = acts[l]
        spi = A.shape[0] // n_inputs
        fib = col.level_labels(l + 1)
        allc = synchrony_clusters(A, threshold, method)
        s_all, pairs = refinement_score(fib, allc)
        rec = {"layer": l + 1, "name": ly.name, "units": ly.n_out, "fibers": num_classes(fib),
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
