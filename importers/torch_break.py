"""Fibration symmetry breaking on torch modules (:mod:`fibgraph.breaking`).

:func:`break_symmetry` finds the covers of a module (fibers meet flavoured
opfibers, or plain fibers), compresses them to the base and lifts the base
back to the module's own shapes: per cover one representative keeps the base
row and the cover's summed outgoing columns, every other member gets fresh
input weights and bias from the layer's default initialiser
(``kaiming_uniform(a=sqrt(5))`` and a uniform bias, both of bound
``1/sqrt(fan_in)``) and zero outgoing weights.  The module is changed in
place; the report gives the covers, the units re-initialised, the largest
output change and (with labels) the loss before and after.

Two routes, one engine:

- ``nn.Sequential`` chains of ``Linear``/``Conv1d``/``Conv2d`` (groups 1),
  element-wise activations, pooling, ``Flatten`` and ``Dropout``: the
  weighted graph is built straight from the parameters
  (:func:`fibgraph.breaking.chain_graph`), no ONNX export, milliseconds per
  call (a training loop calls it at every task boundary);
- any other module: exported to ONNX in memory, broken there
  (:func:`fibgraph.importers.onnx_break.break_onnx_model`, the hypergraph
  importer's covers) and the lifted initializers copied back by parameter name.
"""
from __future__ import annotations

import math
import time

import numpy as np

from fibgraph.breaking import BREAK_SYMMETRIES, chain_covers, lift_weight
from fibgraph.engine import make_criterion
from fibgraph.errors import InputError

__all__ = ["break_symmetry", "find_covers", "reinit_units", "chain_modules", "fresh_rows"]

_HOMOG = {"ReLU", "LeakyReLU", "Identity", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d",
          "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d",
          "Dropout", "Flatten", "ReLU6"}
_NONHOMOG = {"Tanh", "Sigmoid", "GELU", "ELU", "SiLU", "Softplus", "Hardtanh", "Mish", "SELU", "CELU",
             "Softmax", "LogSoftmax"}


def fresh_rows(rng, n_rows, row_shape, fan_in):
    """Rows drawn like torch's default ``Linear``/``Conv`` initialiser:
    ``kaiming_uniform(a=sqrt(5))`` is uniform with bound ``1/sqrt(fan_in)``,
    and so is the bias.  Returns ``(weights (n_rows, *row_shape), biases (n_rows,))``."""
    bound = 1.0 / math.sqrt(max(int(fan_in), 1))
    w = rng.uniform(-bound, bound, (n_rows,) + tuple(row_shape))
    b = rng.uniform(-bound, bound, n_rows)
    return w, b


def _flatten(module):
    import torch.nn as nn

    out = []
    for m in module.children():
        if isinstance(m, nn.Sequential):
            out.extend(_flatten(m))
        else:
            out.append(m)
    return out


def _chain_layers(module):
    """The weight layers of a Sequential chain, or None when it is not one."""
    import torch.nn as nn

    if not isinstance(module, nn.Sequential):
        return None
    mods = _flatten(module)
    layers = []
    for m in mods:
        name = type(m).__name__
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if getattr(m, "groups", 1) != 1:
                return None
            layers.append({"module": m, "homogeneous": True})
        elif name in _HOMOG:
            continue
        elif name in _NONHOMOG:
            if layers:
                layers[-1]["homogeneous"] = False
        else:
            return None
    return layers or None


def _weights(layers, n_inputs):
    """(out, in units, D) float64 weights of the chain, Flatten handled."""
    out = []
    prev = n_inputs
    for ly in layers:
        W = ly["module"].weight.detach().cpu().numpy().astype(np.float64)
        shape = W.shape
        if W.ndim == 2 and W.shape[1] != prev:
            if W.shape[1] % prev:
                raise InputError(f"break: a Linear layer reads {W.shape[1]} features after {prev} channels")
            W = W.reshape(W.shape[0], prev, -1)        # Flatten of (C, H, W): channel-major
        else:
            W = W.reshape(W.shape[0], W.shape[1], -1)
        b = ly["module"].bias
        out.append({"weight": W, "bias": None if b is None else b.detach().cpu().numpy().astype(np.float64),
                    "homogeneous": ly["homogeneous"], "shape": shape})
        prev = W.shape[0]
    return out


def _n_inputs(layers):
    m = layers[0]["module"]
    return int(m.weight.shape[1])


def _outputs(module, xs):
    import torch

    with torch.no_grad():
        return module(*xs)


def _as_inputs(example_inputs):
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, np.ndarray):
        return (torch.as_tensor(example_inputs, dtype=torch.float32),)
    return tuple(example_inputs)


def _loss(out, y):
    import torch
    import torch.nn.functional as F

    y = torch.as_tensor(y)
    if out.ndim == 2 and not torch.is_floating_point(y):
        return float(F.cross_entropy(out, y.long()))
    return float(F.mse_loss(out, y.to(out.dtype).reshape(out.shape)))


def break_symmetry(module, example_inputs, eps=0.0, symmetry="covering", seed=None, data=None,
                   linkage="average", metric="cosine", rescale=True, measure=True):
    """Break the covers of ``module`` in place; returns a report dict.

    ``example_inputs``: a tensor or tuple (the probe input; the output change
    is measured on it unless ``data`` is given).  ``eps``: the tolerance of
    the covers (0: exact, the function is unchanged).  ``symmetry``:
    ``'covering'`` (fibers meet flavoured opfibers) or ``'fibration'``.
    ``seed``: the fresh weights' generator (int or ``numpy.random.Generator``).
    ``data``: ``x`` or ``(x, y)`` to measure on (with ``y``: the loss before
    and after: cross-entropy for integer labels, else squared error).
    ``measure=False`` skips the before/after forward passes (training loops).

    Report: ``layers`` (per weight layer: units, covers' sizes, units
    re-initialised), ``reinit`` (total), ``max_output_change``,
    ``loss_before``/``loss_after``, ``route`` (``'chain'`` or ``'onnx'``),
    ``seconds``.
    """
    import torch

    if symmetry not in BREAK_SYMMETRIES:
        raise InputError(f"symmetry must be one of {', '.join(BREAK_SYMMETRIES)}, got {symmetry!r}")
    try:
        crit = make_criterion(eps, linkage, metric, rescale)
    except ValueError as e:
        raise InputError(f"eps: {e}") from None
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    xs = _as_inputs(example_inputs)
    mx, my = (xs, None)
    if data is not None:
        if isinstance(data, (tuple, list)) and len(data) == 2:
            mx, my = _as_inputs(data[0]), data[1]
        else:
            mx = _as_inputs(data)
    t0 = time.perf_counter()
    before = _outputs(module, mx) if measure else None
    layers = _chain_layers(module)
    if layers is not None:
        report = _break_chain(module, layers, crit, symmetry, rng)
        report["route"] = "chain"
    else:
        from .onnx_break import break_torch_via_onnx

        report = break_torch_via_onnx(module, xs, crit, symmetry, rng)
        report["route"] = "onnx"
    report.update({"eps": float(eps), "symmetry": symmetry})
    if measure:
        after = _outputs(module, mx)
        report["max_output_change"] = float((after - before).abs().max()) if torch.is_tensor(after) else None
        if my is not None:
            report["loss_before"], report["loss_after"] = _loss(before, my), _loss(after, my)
    report["seconds"] = round(time.perf_counter() - t0, 4)
    return report


def chain_modules(module):
    """The weight layers (``Linear``/``Conv``) of a Sequential chain in order;
    InputError when ``module`` is not a chain :func:`break_symmetry` builds directly."""
    layers = _chain_layers(module)
    if layers is None:
        raise InputError(f"{type(module).__name__}: not a Sequential chain of Linear/Conv layers and "
                         "element-wise activations")
    return [ly["module"] for ly in layers]


def find_covers(module, eps=0.0, symmetry="covering", linkage="average", metric="cosine", rescale=True):
    """The :class:`fibgraph.breaking.LayerPlan` of every weight layer of a
    Sequential chain (the last: the outputs, singletons), nothing changed."""
    layers = _chain_layers(module)
    if layers is None:
        chain_modules(module)
    crit = make_criterion(eps, linkage, metric, rescale)
    n_in = _n_inputs(layers)
    return chain_covers(_weights(layers, n_in), n_in, symmetry, crit)


def reinit_units(module, units, seed=None):
    """Re-initialise units of a Sequential chain the way breaking does: fresh
    input weights and bias (the default initialiser), zero outgoing weights.
    ``units``: ``{weight-layer index: unit indices}`` (hidden layers only).
    Continual backprop's replacement and the random control use it."""
    import torch

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mods = chain_modules(module)
    for l, idx in units.items():
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            continue
        if not 0 <= l < len(mods) - 1:
            raise InputError(f"layer {l}: only hidden weight layers (0..{len(mods) - 2}) can be re-initialised")
        m, nxt = mods[l], mods[l + 1]
        fan_in = int(np.prod(m.weight.shape[1:]))
        fw, fb = fresh_rows(rng, idx.size, tuple(m.weight.shape[1:]), fan_in)
        t = torch.as_tensor(idx)
        with torch.no_grad():
            m.weight[t] = torch.as_tensor(fw, dtype=m.weight.dtype)
            if m.bias is not None:
                m.bias[t] = torch.as_tensor(fb, dtype=m.bias.dtype)
            n_units = m.weight.shape[0]
            W = nxt.weight
            if W.ndim == 2 and W.shape[1] != n_units:       # Linear after Flatten
                W.view(W.shape[0], n_units, -1)[:, t] = 0
            else:
                W[:, t] = 0


def _break_chain(module, mods, crit, symmetry, rng):
    import torch

    n_in = _n_inputs(mods)
    layers = _weights(mods, n_in)
    plans = chain_covers(layers, n_in, symmetry, crit)
    from fibgraph.breaking import plan_layer

    prev = plan_layer(np.arange(n_in))
    rows = []
    for ly, spec, plan in zip(mods, layers, plans):
        W, b = lift_weight(spec["weight"], prev, plan, spec["bias"])
        if plan.reinit.size:
            fan_in = int(np.prod(spec["shape"][1:]))
            fw, fb = fresh_rows(rng, plan.reinit.size, W.shape[1:], fan_in)
            W[plan.reinit] = fw
            if b is not None:
                b[plan.reinit] = fb
        m = ly["module"]
        with torch.no_grad():
            m.weight.copy_(torch.as_tensor(W.reshape(spec["shape"]), dtype=m.weight.dtype))
            if b is not None:
                m.bias.copy_(torch.as_tensor(b, dtype=m.bias.dtype))
        rows.append({"layer": type(m).__name__, "units": int(plan.labels.size), "classes": plan.n_classes,
                     "cover_sizes": plan.cover_sizes(), "reinit": [int(i) for i in plan.reinit]})
        prev = plan
    return {"layers": rows, "reinit": int(sum(len(r["reinit"]) for r in rows))}
