"""Numerical checks of the main paper's theorems on torch MLPs (float64).

1. Activity synchronisation (eq. 4): units of a fiber have identical
   activations on every input.  :func:`check_activity_sync`.
2. Error synchronisation (eq. 6): units of a *flavoured* opfiber have
   identical error signals ``delta_i = dL/dz_i`` (pre-activation) for every
   input and target.  :func:`check_error_sync`.
3. Cover coarse-graining (theorem 2.1): under gradient descent the covering
   at step t+1 is a coarsening of the covering at step t; a strict cover
   present at step t is still present at t+1.  :func:`check_cover_persistence`.

The exact setting of 2 and 3 (what they need, what they do not):

- The network's graph gives every output unit its own colour (the initial
  colouring), so output units are never grouped and the output errors need
  no symmetry: the theorems hold for ANY targets and any loss that is a sum
  over samples of a function of the outputs.  Only if output units are
  grouped (an ``initial`` colouring that merges outputs) must their
  errors agree, e.g. equal targets per sample for grouped outputs under MSE:
  see ``output_groups`` of :func:`check_error_sync`.
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

__all__ = ["torch_mlp", "forward_with_deltas", "class_spread", "pair_gap", "check_activity_sync",
           "check_error_sync", "check_cover_persistence"]


def torch_mlp(layers, act="tanh", dtype=None):
    """``nn.Sequential`` of Linear layers with weights ``[(W, b), ...]`` and
    activation ``act`` ('tanh', 'relu', 'sigmoid') between them (float64)."""
    import torch
    from torch import nn

    dtype = dtype or torch.float64
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
    mods = []
    for l, (W, b) in enumerate(layers):
        lin = nn.Linear(W.shape[1], W.shape[0]).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(W, dtype=dtype))
            lin.bias.copy_(torch.as_tensor(b, dtype=dtype))
        mods.append(lin)
        if l < len(layers) - 1:
            mods.append(acts[act]())
    return nn.Sequential(*mods)


def forward_with_deltas(model, x, targets=None, loss="mse"):
    """Per linear layer: activations ``h`` (after the activation; the output
    layer: its output) and errors ``delta = dL/dz`` (pre-activation), each
    ``(N, units)`` numpy arrays.  ``loss``: 'mse' (sum over samples and
    outputs of ``(y - t)^2 / 2``) or 'ce' (cross-entropy, integer targets)."""
    import torch
    from torch import nn

    dtype = next(model.parameters()).dtype
    h = torch.as_tensor(np.asarray(x), dtype=dtype)
    zs, hs = [], []
    mods = list(model)
    for k, m in enumerate(mods):
        h = m(h)
        if isinstance(m, nn.Linear):
            h.retain_grad()
            zs.append(h)
            if k == len(mods) - 1 or isinstance(mods[k + 1], nn.Linear):
                hs.append(h)
        elif zs and len(hs) < len(zs):
            hs.append(h)
    out = zs[-1]
    if targets is None:
        return [a.detach().numpy() for a in hs], None
    t = torch.as_tensor(np.asarray(targets))
    if loss == "mse":
        L = 0.5 * ((out - t.to(dtype)) ** 2).sum()
    elif loss == "ce":
        L = nn.functional.cross_entropy(out, t.long(), reduction="sum")
    else:
        raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")
    L.backward()
    model.zero_grad(set_to_none=True)
    return [a.detach().numpy() for a in hs], [z.grad.detach().numpy() for z in zs]


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


def check_activity_sync(model, x, symmetry="fibration", rtol=1e-5) -> list:
    """Per hidden layer: fibers (engine, exact) and the largest in-fiber and the
    smallest between-fiber activity difference on ``x``."""
    from importers.torch_net import network_from_torch

    from .network import colour_network
    from .refine import Exact

    net = network_from_torch(model)
    col = colour_network(net, symmetry, Exact(rtol))
    hs, _ = forward_with_deltas(model, x)
    s = _scale(hs)
    out = []
    for l, ly in enumerate(net.layers[:-1]):
        lab = col.level_labels(l + 1)
        out.append({"layer": l + 1, "classes": classes(lab), "within": class_spread(hs[l], lab) / s,
                    "between": pair_gap(hs[l], lab) / s})
    return out


def check_error_sync(model, x, targets, loss="mse", output_groups=None, rtol=1e-5) -> list:
    """Per layer: flavoured opfibers (engine, exact; ``output_groups`` merges
    output units in the initial colouring, a list of index lists) and the
    largest in-class and smallest between-class difference of the errors, plus
    the same for the plain (unflavoured) opfibers' extra pairs."""
    from importers.torch_net import network_from_torch

    from .refine import Exact
    from .symmetry import colour

    net = network_from_torch(model)
    g = net.graph()
    initial = g.initial.copy()
    out_level = np.asarray(g.levels[-1])
    for grp in output_groups or []:
        initial[out_level[list(grp)]] = initial[out_level[grp[0]]]
    flav = colour(g, "opfibration-flavoured", Exact(rtol), initial=initial).labels
    plain = colour(g, "opfibration", Exact(rtol), initial=initial).labels
    _, ds = forward_with_deltas(model, x, targets, loss)
    s = _scale(ds)
    out = []
    for l in range(len(net.layers)):
        lv = np.asarray(g.levels[l + 1])
        lf, lp = canonical(flav[lv]), canonical(plain[lv])
        extra = [(i, j) for i in range(lv.size) for j in range(i + 1, lv.size)
                 if lp[i] == lp[j] and lf[i] != lf[j]]
        out.append({"layer": l + 1, "flavoured": classes(lf), "plain": classes(lp),
                    "within": class_spread(ds[l], lf) / s, "between": pair_gap(ds[l], lf) / s,
                    "plain_only_pairs": extra,
                    "plain_only_gap": pair_gap(ds[l], lf, extra) / s if extra else None})
    return out


def check_cover_persistence(model, x, targets, planted, steps=200, lr=0.05, loss="mse",
                            symmetry="covering-strict", rtol=1e-5, every=1, optimizer="gd"):
    """Train ``model`` in place by full-batch gradient descent (``optimizer='gd'``,
    or ``'momentum'``) for ``steps`` steps; after every ``every`` steps recolour
    (``symmetry``, exact) and record whether the planted hidden partitions
    (``planted[l]`` for hidden level ``l + 1``) still refine the colouring and
    whether they are equal.  Returns a dict with per-check records and the loss."""
    import torch

    from importers.torch_net import network_from_torch

    from .network import colour_network
    from .refine import Exact

    X = torch.as_tensor(np.asarray(x), dtype=next(model.parameters()).dtype)
    T = torch.as_tensor(np.asarray(targets))
    if loss == "mse":
        T = T.to(X.dtype)
        lossf = lambda y: 0.5 * ((y - T) ** 2).sum() / len(X)  # noqa: E731
    else:
        lossf = lambda y: torch.nn.functional.cross_entropy(y, T.long())  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if optimizer == "momentum" else 0.0)
    records = []

    def check(step, L):
        col = colour_network(network_from_torch(model), symmetry, Exact(rtol))
        labs = [col.level_labels(l + 1) for l in range(len(planted))]
        records.append({"step": step, "loss": L,
                        "refines": all(refines(p, q) for p, q in zip(planted, labs)),
                        "equal": all(np.array_equal(canonical(p), q) for p, q in zip(planted, labs)),
                        "classes": [int(q.max()) + 1 for q in labs]})

    with torch.no_grad():
        check(0, float(lossf(model(X))))
    for step in range(1, steps + 1):
        opt.zero_grad()
        L = lossf(model(X))
        L.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                check(step, float(lossf(model(X))))
    return {"records": records, "all_refine": all(r["refines"] for r in records),
            "all_equal": all(r["equal"] for r in records),
            "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"]}
