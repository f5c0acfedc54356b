"""Writer rules for element-wise ops, reductions, softmax and q.k contractions
(docs/design.md sections 5-6).

- per-unit constants (bias adds, PRelu slopes, scales): the mean over the
  group; a bias add after a rescaled layer divides its constant by the
  scales like a bias (docs/design.md section 4);
- sums over a unit axis (ReduceMean/ReduceSum, softmax's denominator, q.k
  over head dims): weighted by the group sizes ``m``, so that the
  compressed model sums what the original summed (ReduceMean also by
  ``L_hat / L``: it divides by the kept count); ``prune`` mode keeps the sums
  over the kept units only;
- q.k: a kept head dim standing for ``m`` (q colour, k colour) equal products
  scales A by ``m`` (folded into q's projection where possible: see
  :mod:`.attention`); the scores' original 1/sqrt(d_k) stays.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..records import Kind
from .attention import multiplicities, row_factor
from .registry import writes


@writes(Kind.ELEMENTWISE)
def elementwise(w, rec):
    _, node = w.node(rec)
    # a bias add after a rescaled layer: its constant is divided by the scales
    ax = w.axis(rec.output, scaled=rec.op in ("Add", "Sub"))
    if ax.identity and not ax.scaled:
        return
    rank = len(w.imp.shapes[rec.output])
    for slot, x in enumerate(node.input):
        if x in rec.consts:
            c = w.value(x)
            if c is None:
                continue
            a = ax.axis - (rank - c.ndim)
            if a < 0 or c.shape[a] == 1:
                continue
            ch = ax.mean_along(c, a, scaled=ax.scaled)
            fold = row_factor(w, rec.output, ax) if rec.node in w.fold_adds else None
            if fold is not None:                   # the bias of a folded q projection
                ch = ch * fold.reshape([-1 if j == a else 1 for j in range(c.ndim)])
            w.put(node, slot, ch, c)


@writes(Kind.REDUCE)
def reduce(w, rec):
    k, node = w.node(rec)
    ax = w.axis(rec.input)
    if ax.identity or rec.mode in ("ReduceMax", "ReduceMin") or w.prune:
        return                  # prune: the sum or mean over the kept units only
    rank = len(w.imp.shapes[rec.input])
    wts = ax.weights_along(rank, ax.L_hat / ax.L if rec.mode == "mean" else 1.0)
    t = w.tmp(node.input[0])
    mul = helper.make_node("Mul", [node.input[0], w.const(wts)], [t], name=w.tmp("fib_weight"))
    node.input[0] = t
    w.insert(k, [mul])


@writes(Kind.SOFTMAX)
def softmax(w, rec):
    k, node = w.node(rec)
    ax = w.axis(rec.input)
    if ax.identity or w.prune:
        return                  # prune: softmax over the kept units only
    rank = len(w.imp.shapes[rec.input])
    m = ax.weights_along(rank, 1.0)
    t_in, t_out = w.tmp(node.input[0]), w.tmp(node.output[0])
    out = node.output[0]
    add = helper.make_node("Add", [node.input[0], w.const(np.log(m))], [t_in], name=w.tmp("fib_logm"))
    node.input[0] = t_in
    node.output[0] = t_out
    fix = helper.make_node("Div" if rec.op == "Softmax" else "Sub",
                           [t_out, w.const(m if rec.op == "Softmax" else np.log(m))], [out],
                           name=w.tmp("fib_divm"))
    w.insert(k, [add])
    w.insert(k + 2, [fix])


@writes(Kind.CONTRACT)
def contract(w, rec):
    """q.k over a unit axis: the kept position of a group of ``m`` head dims
    stands for ``m`` equal products, so A is scaled by ``m`` (0 nowhere:
    every kept position is a real group): folded into q's projection
    where :func:`.attention.plan_folds` allows, else a Mul."""
    if rec.node in w.folded:
        return
    k, node = w.node(rec)
    A = rec.inputs[0]
    ids = w.imp.layouts[A]
    last = ids.ndim - 1
    if ids.shape[last] == 1:
        return
    m = multiplicities(w, np.moveaxis(ids, last, -1).reshape(-1, ids.shape[last]))
    if np.all(m == 1):
        return
    shape = list(ids.shape[:last]) + [m.shape[1]]
    m = np.moveaxis(m.reshape(shape), -1, last)
    t = w.tmp(A)
    node.input[0] = t
    w.insert(k, [helper.make_node("Mul", [A, w.const(m)], [t], name=w.tmp("fib_mult"))])
