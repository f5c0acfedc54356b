"""Writer rules for normalisations (docs/design.md section 5).

- BatchNormalization / InstanceNormalization: the group's mean affine map
  (:func:`channel_norm`);
- LayerNormalization: gamma and beta the means over the group, and its
  statistics weighted by the group sizes ``m`` (a Mul by ``m * L_hat / L``
  before each ReduceMean), so that the base normalises by the original
  mean and variance; ``prune`` mode: the LayerNorm of the kept units.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..records import Kind
from .registry import writes


@writes(Kind.CHANNEL_NORM)
def channel_norm(w, rec):
    """BatchNormalization / InstanceNormalization: one parameter entry per
    kept channel.  The importer's criterion is the channel's map (inference
    BatchNorm: ``mul = scale / sqrt(var + epsilon)``, ``add = B - mul *
    mean``; training mode and InstanceNorm: ``(scale, B)``), so the base
    entry of a group is the group's MEAN MAP: ``mul_hat``, ``add_hat`` the
    means over the group, written back as ``mean_hat``, ``var_hat`` (the
    means of the running statistics) and ``scale = mul_hat * sqrt(var_hat +
    epsilon)``, ``B = add_hat + mul_hat * mean_hat``.  This is exact when the
    group's maps are equal (eps = 0), even if their raw parameters differ,
    and with eps > 0 it is the mean of the clustered constants, as for a
    bias; averaging the raw parameters one by one would not be either."""
    _, node = w.node(rec)
    ax = w.axis(rec.output)
    if ax.identity:
        return
    Rm = ax.mean_matrix()
    vals = [w.value(x) if x else None for x in node.input]
    if node.op_type == "BatchNormalization" and not rec.training and \
            all(v is not None and v.size == ax.L for v in vals[1:5]):
        e = rec.epsilon
        sc, b, mean, var = (v.astype(np.float64).reshape(-1) for v in vals[1:5])
        mul = sc / np.sqrt(var + e)
        add = b - mul * mean
        mul_h, add_h, mean_h, var_h = (Rm @ v for v in (mul, add, mean, var))
        new = {1: mul_h * np.sqrt(var_h + e), 2: add_h + mul_h * mean_h, 3: mean_h, 4: var_h}
    else:
        new = {slot: Rm @ v.astype(np.float64).reshape(-1) for slot, v in enumerate(vals)
               if slot and v is not None and v.size == ax.L}
    for slot, v in new.items():
        w.put(node, slot, v, vals[slot])


@writes(Kind.LAYERNORM)
def layernorm(w, rec):
    k, node = w.node(rec)
    ax = w.axis(rec.input)
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if ax.identity:
        return
    rank = len(w.imp.shapes[rec.input])
    gam = w.value(node.input[1])
    bet = w.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None

    def shrink(v):
        return ax.mean_along(v, ax.axis - (rank - v.ndim))

    g_hat = shrink(gam)
    b_hat = shrink(bet) if bet is not None else None
    if w.prune:
        # the LayerNorm of the kept units: statistics over them only
        w.put(node, 1, g_hat, gam)
        if b_hat is not None:
            w.put(node, 2, b_hat, bet)
        return
    wts = ax.weights_along(rank, ax.L_hat / ax.L)
    axes = rec.axes
    x, y = node.input[0], node.output[0]
    eps = float(a.get("epsilon", 1e-5))
    opset = max([o.version for o in w.m.opset_import if o.domain in ("", "ai.onnx")] or [17])
    dt = gam.dtype

    def rmean(inp, out):
        if opset >= 18:
            return helper.make_node("ReduceMean", [inp, w.const(np.array(axes), np.int64)], [out],
                                    keepdims=1, name=w.tmp("fib_ln_mean"))
        return helper.make_node("ReduceMean", [inp], [out], axes=axes, keepdims=1, name=w.tmp("fib_ln_mean"))

    t = [w.tmp(y) for _ in range(9)]
    nodes = [helper.make_node("Mul", [x, w.const(wts, dt)], [t[0]], name=w.tmp("fib_ln")),
             rmean(t[0], t[1]),
             helper.make_node("Sub", [x, t[1]], [t[2]], name=w.tmp("fib_ln")),
             helper.make_node("Mul", [t[2], t[2]], [t[3]], name=w.tmp("fib_ln")),
             helper.make_node("Mul", [t[3], w.const(wts, dt)], [t[4]], name=w.tmp("fib_ln")),
             rmean(t[4], t[5]),
             helper.make_node("Add", [t[5], w.const(np.array(eps), dt)], [t[6]], name=w.tmp("fib_ln")),
             helper.make_node("Sqrt", [t[6]], [t[7]], name=w.tmp("fib_ln")),
             helper.make_node("Div", [t[2], t[7]], [t[8]], name=w.tmp("fib_ln"))]
    if b_hat is not None:
        t9 = w.tmp(y)
        nodes += [helper.make_node("Mul", [t[8], w.const(g_hat, dt)], [t9], name=w.tmp("fib_ln")),
                  helper.make_node("Add", [t9, w.const(b_hat, dt)], [y], name=w.tmp("fib_ln"))]
    else:
        nodes += [helper.make_node("Mul", [t[8], w.const(g_hat, dt)], [y], name=w.tmp("fib_ln"))]
    del w.g.node[k]
    w.insert(k, nodes)
