"""Repair of a base model on calibration data: the next layer re-fitted in closed form.

After a merge, the layer reading the merged units (the *consumer*: a ``MatMul``,
``Gemm`` or 2-D ``Conv`` whose input width shrank) sees the base's activations
``A_b`` (n x k; a Conv: its input patches) instead of the original's ``A_o``
(n x m).  Its weight ``W_b`` (k x p, the original's columns summed over each
fiber) is replaced by the ridge solution regularised towards ``W_b``::

    W' = argmin_W ||A_b W - A_o W_o||^2 + lam ||W - W_b||^2
       = (A_b^T A_b + lam I)^-1 (A_b^T A_o W_o + lam W_b),
    lam = ridge * trace(A_b^T A_b) / k

so the consumer's pre-activations match the original's as closely as the base's
activations allow.  Since ``W' = W_b`` gives the objective
``||A_b W_b - A_o W_o||^2``, the repaired pre-activation error on the
calibration data is never larger, and an exact merge (``A_b W_b = A_o W_o``)
is a fixed point: ``W' = W_b`` up to float rounding.  Consumers are repaired in
graph order, each on the activations of the base repaired so far.  Memory: one
consumer's ``A_b`` and ``A_o`` on the calibration batch (Conv: its patches, in
chunks) plus a ``k x k`` Gram matrix; no distance matrix.

BatchNormalization nodes whose channel count the base keeps but whose input the
merge changed get their statistics shifted by what the calibration data shows::

    mean' = mean + E[x_b] - E[x_o],   var' = var * Var[x_b] / Var[x_o]

(per channel; an exact merge leaves them as they are).  LayerNorm normalises
per sample and needs no statistics.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from .onnx.external import tensor_array

__all__ = ["repair_base", "output_map", "intermediates", "RIDGE"]

#: the ridge weight relative to the mean diagonal of the Gram matrix
RIDGE = 1e-3


def _inits(model):
    return {t.name: t for t in model.graph.initializer}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def intermediates(model, names, feeds):
    """Values of the tensors ``names`` (graph outputs added on a copy)."""
    from .onnx.external import session
    from .onnx.runtime import lean_options

    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.ValueInfoProto(name=n))
    s = session(m, lean_options())          # a big (lean) model's weights read from their file
    want = {i.name for i in s.get_inputs()}
    try:
        out = s.run(list(names), {k: v for k, v in feeds.items() if k in want})
    except Exception as e:
        from fibgraph.errors import InputError

        from .onnx.feeds import short_error

        raise InputError(f"onnxruntime could not run the model on the calibration data: {short_error(e)}") from None
    return {k: np.asarray(v, dtype=np.float64) for k, v in zip(names, out)}


def _consumers(orig, base):
    """(base node, original node, kind) of every linear node whose weight's input
    width the base shrank, in graph order."""
    oi, bi = _inits(orig), _inits(base)
    onodes = {n.name: n for n in orig.graph.node if n.name}
    uses = {}
    for n in base.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    out = []
    for n in base.graph.node:
        o = onodes.get(n.name)
        if o is None or o.op_type != n.op_type or n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        if len(n.input) < 2 or n.input[1] not in bi or o.input[1] not in oi or uses.get(n.input[1], 0) != 1:
            continue
        Wb, Wo = bi[n.input[1]].dims, oi[o.input[1]].dims
        if n.op_type == "MatMul":
            axis = 0
        elif n.op_type == "Gemm":
            if _attr(n, "transA", 0):
                continue
            axis = 1 if _attr(n, "transB", 0) else 0
        else:
            if _attr(n, "group", 1) != 1 or len(Wb) != 4:
                continue
            axis = 1
        if len(Wb) != len(Wo) or Wb[axis] >= Wo[axis]:
            continue
        out.append((n, o, axis))
    return out


def _as_matrix(node, W, axis):
    """The weight as (inputs x outputs) for MatMul / Gemm; (in * kh * kw) x out for Conv."""
    if node.op_type == "MatMul":
        return W
    if node.op_type == "Gemm":
        return float(_attr(node, "alpha", 1.0)) * (W.T if axis == 1 else W)
    return W.reshape(W.shape[0], -1).T


def _from_matrix(node, M, shape, axis):
    if node.op_type == "MatMul":
        return M
    if node.op_type == "Gemm":
        M = M / float(_attr(node, "alpha", 1.0))
        return M.T if axis == 1 else M
    return M.T.reshape(shape)


def _patches(node, X, kshape):
    """Conv input (n, c, h, w) -> chunks of im2col rows (positions, c * kh * kw)."""
    kh, kw = kshape
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    sh, sw = list(_attr(node, "strides", [1, 1]))
    dh, dw = list(_attr(node, "dilations", [1, 1]))
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("auto_pad")
    X = np.pad(X, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    V = sliding_window_view(X, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    # V: (n, c, oh, ow, kh, kw) -> rows (n * oh * ow, c * kh * kw)
    for s in range(0, V.shape[0], 64):
        v = V[s:s + 64]
        yield np.ascontiguousarray(v.transpose(0, 2, 3, 1, 4, 5)).reshape(-1, v.shape[1] * kh * kw)


def _normal_equations(node, Xb, Xo, Mb, Mo, kshape):
    """(G = A_b^T A_b, R = A_b^T A_o W_o, err(W) for the pre-activation error)."""
    if node.op_type == "Conv":
        k = Mb.shape[0]
        G = np.zeros((k, k))
        R = np.zeros((k, Mo.shape[1]))
        pairs = list(zip(_patches(node, Xb, kshape), _patches(node, Xo, kshape)))
        for Pb, Po in pairs:
            T = Po @ Mo
            G += Pb.T @ Pb
            R += Pb.T @ T

        def err(M):
            return float(sum(np.sum((Pb @ M - Po @ Mo) ** 2) for Pb, Po in pairs))
        return G, R, err
    Ab = Xb.reshape(-1, Mb.shape[0])
    Ao = Xo.reshape(-1, Mo.shape[0])
    T = Ao @ Mo
    return Ab.T @ Ab, Ab.T @ T, (lambda M: float(np.sum((Ab @ M - T) ** 2)))


def output_map(imp, gid, kept, scales=None, prune=False):
    """``P(tensor name, p, p_b, channel_axis)``: the (p x p_b) matrix taking the
    original's pre-activations of a tensor to the base's: ``P[i, c] = 1 / (s_i
    |c|)`` for unit ``i`` of fiber ``c`` (the base unit computes its fiber's
    pre-activations over their rescaling factors ``s_i``, averaged), from the
    writer's groups ``gid`` and ``kept`` on the import ``imp``; None where the
    tensor's units are not known.  ``prune``: the base keeps some units as
    they are and drops the others (``P[i, c] = 1`` for the kept unit ``i`` at
    base position ``c``, rows of dropped units 0; ``gid`` is not read)."""
    def P(name, p, p_b, axis):
        L = imp.layouts.get(name)
        if L is None:
            return None
        L = np.asarray(L)
        L = np.moveaxis(L, axis, 0).reshape(L.shape[axis], -1)[:, 0] if L.ndim else L.reshape(-1)
        if L.size != p:
            return None
        reps = L[kept[L]]
        if reps.size != p_b:
            return None
        if prune:
            M = np.zeros((p, p_b))
            M[np.flatnonzero(kept[L]), np.arange(p_b)] = 1.0
            return M
        col = {int(g): c for c, g in enumerate(gid[reps])}
        c = np.array([col.get(int(g), -1) for g in gid[L]])
        if (c < 0).any():
            return None
        s = np.ones(p) if scales is None else np.asarray(scales, dtype=np.float64)[L]
        M = np.zeros((p, p_b))
        M[np.arange(p), c] = 1.0 / np.where(s > 0, s, 1.0)
        return M / np.maximum(np.bincount(c, minlength=p_b), 1)[None, :]
    return P


def repair_base(orig, base, feeds, ridge=RIDGE, batchnorm=True, out_map=None):
    """``(repaired base, rows)``: every consumer of a merged layer re-fitted on the
    calibration ``feeds`` (input name -> array) as in the module doc; where the
    consumer's own units are merged as well, the target is ``A_o W_o P`` with
    ``P = out_map(...)`` (:func:`output_map`).  ``rows``:
    per consumer ``{node, weight, inputs_before, inputs_after, error_before,
    error_after}`` (squared pre-activation error on the calibration data), and
    per BatchNormalization repaired ``{node, batchnorm: True}``; ``skipped``
    rows say why a node was left alone."""
    from scipy.linalg import solve

    base = copy.deepcopy(base)
    bi, oi = _inits(base), _inits(orig)
    rows = []
    cons = _consumers(orig, base)
    if cons:
        acts_o = intermediates(orig, sorted({o.input[0] for _, o, _ in cons}), feeds)
    for n, o, axis in cons:
        Wb = tensor_array(bi[n.input[1]]).astype(np.float64)
        Wo = tensor_array(oi[o.input[1]]).astype(np.float64)
        Xb = intermediates(base, [n.input[0]], feeds)[n.input[0]]
        Xo = acts_o[o.input[0]]
        Mb, Mo = _as_matrix(n, Wb, axis), _as_matrix(o, Wo, axis)
        if Mb.shape[1] != Mo.shape[1]:     # the consumer's own units merged too: target their fibers' mean
            P = None if out_map is None else out_map(o.output[0], Mo.shape[1], Mb.shape[1],
                                                     0 if n.op_type == "Conv" else -1)
            if P is None:
                rows.append({"node": n.name, "skipped": "its own units were merged and their fibers are unknown"})
                continue
            Mo = Mo @ P
        try:
            G, R, err = _normal_equations(n, Xb, Xo, Mb, Mo, Wb.shape[2:] if n.op_type == "Conv" else None)
        except ValueError as e:
            rows.append({"node": n.name, "skipped": f"unsupported attribute {e}"})
            continue
        k = G.shape[0]
        lam = ridge * max(float(np.trace(G)) / max(k, 1), 1e-12)
        M = solve(G + lam * np.eye(k), R + lam * Mb, assume_a="pos")
        e0, e1 = err(Mb), err(M)
        if not e1 <= e0:          # rounding on an exact merge: keep the merged weights
            M, e1 = Mb, e0
        new = _from_matrix(n, M, Wb.shape, axis).astype(tensor_array(bi[n.input[1]]).dtype)
        bi[n.input[1]].CopyFrom(numpy_helper.from_array(new, n.input[1]))
        rows.append({"node": n.name, "op": n.op_type, "weight": n.input[1], "inputs_before": int(Mo.shape[0]),
                     "inputs_after": int(k), "error_before": e0, "error_after": e1})
    if batchnorm:
        rows += _repair_batchnorm(orig, base, feeds)
    return base, rows


def _repair_batchnorm(orig, base, feeds):
    bi = _inits(base)
    onodes = {n.name: n for n in orig.graph.node if n.name}
    todo = []
    for n in base.graph.node:
        o = onodes.get(n.name)
        if n.op_type != "BatchNormalization" or o is None or len(n.input) < 5:
            continue
        if not all(x in bi for x in n.input[3:5]):
            continue
        if tensor_array(bi[n.input[3]]).size != tensor_array(_inits(orig)[o.input[3]]).size:
            continue                         # the merged units' own norm: merged with them
        todo.append((n, o))
    if not todo:
        return []
    xo = intermediates(orig, [o.input[0] for _, o in todo], feeds)
    xb = intermediates(base, [n.input[0] for n, _ in todo], feeds)
    rows = []
    for n, o in todo:
        a, b = xb[n.input[0]], xo[o.input[0]]
        if np.abs(a - b).max(initial=0.0) <= 1e-5 * np.abs(b).max(initial=0.0):
            continue                         # an exact merge (up to float rounding): nothing to shift
        ax = (0,) + tuple(range(2, a.ndim))
        mean = tensor_array(bi[n.input[3]]).astype(np.float64)
        var = tensor_array(bi[n.input[4]]).astype(np.float64)
        vb, vo = a.var(axis=ax), b.var(axis=ax)
        mean2 = mean + a.mean(axis=ax) - b.mean(axis=ax)
        var2 = var * np.where(vo > 0, vb / np.where(vo > 0, vo, 1.0), 1.0)
        dt = tensor_array(bi[n.input[3]]).dtype
        bi[n.input[3]].CopyFrom(numpy_helper.from_array(mean2.astype(dt), n.input[3]))
        bi[n.input[4]].CopyFrom(numpy_helper.from_array(var2.astype(dt), n.input[4]))
        rows.append({"node": n.name, "batchnorm": True})
    return rows
