"""Writer rules for attention (docs/design.md section 6): the q.k fold, the
ONNX Attention op and packed projections.

- q.k: a kept head dim standing for ``m`` (q colour, k colour) equal products
  has its q row (and q's bias) multiplied by ``m`` when nothing but the score
  reads q (:func:`plan_folds`, "multiplicity folded into W_Q"), else a Mul
  before the score (:func:`.elementwise.contract`); the scores' original
  1/sqrt(d_k) stays (computed shapes report the original sizes);
- the Attention op: q scaled by ``m`` and the original scale written out;
- a packed projection (torch's ``in_proj``: q, k, v as one MatMul, reshaped to
  (..., 3, d) and cut) is read as Slices of its output, so q, k and v keep
  their own sizes; only the heads of each keep equal sizes (:func:`packed_cuts`).
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..records import Kind
from .groups import nodes_along, packed_records, readers
from .registry import writes


def multiplicities(w, rows):
    """Per row of node ids (a head's dims): the group size of each kept node
    (prune: 1, a kept node stands for itself)."""
    if w.prune:
        return np.ones((len(rows), int(w.kept[rows[0]].sum()) if len(rows) else 0))
    out = []
    for r in rows:
        g = w.gid[r]
        cnt = {int(x): int(c) for x, c in zip(*np.unique(g, return_counts=True))}
        out.append([cnt[int(x)] for x in g[w.kept[r]]])
    return np.array(out, dtype=np.float64)


def plan_folds(w):
    """Where q.k's multiplicities go into q's projection (docs/design.md 6:
    "multiplicity folded into W_Q") instead of a Mul: the score's first
    operand is, up to layout ops and constant scalings, a linear layer's
    output or that plus a bias (Add of a constant), node for node, and
    nothing else reads those nodes.  Sets ``row_scale`` (per node: the
    factor of its row, bias included), ``fold_adds`` (bias Adds to scale)
    and ``folded`` (contractions that need no Mul)."""
    imp = w.imp
    w.row_scale = np.ones(imp.graph.n)
    w.fold_adds, w.folded = set(), set()
    records = imp.records
    contracts = [r for r in records if r.kind is Kind.CONTRACT]
    if w.prune or not contracts:
        return
    lin_space = {r.space: r for r in records if r.kind is Kind.LINEAR}
    adds = [r for r in records if r.kind is Kind.ELEMENTWISE and r.op == "Add"
            and len(r.streams) == 1 and r.output in imp.layouts]
    producer = {o: n for n in imp.model.graph.node for o in n.output if o}
    for rec in contracts:
        A = rec.inputs[0]
        ids = imp.layouts[A]
        L = ids.shape[-1]
        if L == 1:
            continue
        rows = ids.reshape(-1, L)
        m = multiplicities(w, rows)
        if np.all(m == 1):
            continue
        kn = np.concatenate([r[w.kept[r]] for r in rows])
        km = m.reshape(-1)
        na = np.unique(ids)
        first = {}
        if any(first.setdefault(int(a), b) != b for a, b in zip(kn, km)):
            continue                               # a node with two multiplicities
        if any(b.name != f"{rec.node}:a" for b, _ in readers(imp.graph.blocks, na)):
            continue
        sp_ = np.unique(imp.space_of[na])
        if sp_.size != 1:
            continue
        sp_ = int(sp_[0])
        scale = [(kn, km)]
        if sp_ in lin_space:
            target, add = lin_space[sp_].output, None
        else:
            add = next((r for r in adds if imp.space_of[imp.layouts[r.output].reshape(-1)[0]] == sp_), None)
            if add is None:
                continue
            out_ids = imp.layouts[add.output]
            in_ids = imp.layouts.get(add.streams[0])
            if in_ids is None or in_ids.ndim != out_ids.ndim:
                continue
            pairs = np.unique(np.stack([out_ids.reshape(-1), np.broadcast_to(in_ids, out_ids.shape).reshape(-1)],
                                       1), axis=0)
            lin = {int(a): int(b) for a, b in pairs}
            if len(lin) != pairs.shape[0] or len(set(lin.values())) != len(lin):
                continue                           # not node for node
            src = np.array([lin[int(a)] for a in na])
            sps = np.unique(imp.space_of[src])
            if sps.size != 1 or int(sps[0]) not in lin_space or \
                    lin_space[int(sps[0])].output != add.streams[0]:
                continue
            if any(not np.isin(d, na).all() for _, d in readers(imp.graph.blocks, src)):
                continue
            target = add.output
            scale.append((np.array([lin[int(a)] for a in kn]), km))
        # the tensor path target -> A: layout ops and constant scalings only
        t, ok = A, True
        for _ in range(64):
            if t == target:
                break
            n = producer.get(t)
            dyn = [x for x in (n.input if n is not None else []) if x in imp.layouts]
            if n is None or len(dyn) != 1:
                ok = False
                break
            if n.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Slice",
                             "Split", "Identity", "Cast", "Dropout") and n.input[0] == dyn[0]:
                t = dyn[0]
            elif n.op_type in ("Mul", "Div") and (n.op_type == "Mul" or n.input[0] == dyn[0]):
                t = dyn[0]
            else:
                ok = False
                break
        if not ok or t != target:
            continue
        for nodes, f in scale:
            w.row_scale[nodes] *= f
        if add is not None:
            w.fold_adds.add(add.node)
        w.folded.add(rec.node)


def row_factor(w, tname, ax):
    """The fold factors of the kept positions of ``tname``'s axis (None: all 1)."""
    if ax.axis is None or not w.folded:
        return None
    f = w.row_scale[nodes_along(w.imp.layouts[tname], ax.axis)[ax.keep_pos]]
    return None if np.all(f == 1) else f


@writes(Kind.ATTENTION)
def attention(w, rec):
    """The Attention op: q scaled by the multiplicity of its kept head dims,
    and the ORIGINAL 1/sqrt(head size) written as ``scale`` (the op would
    recompute it from the compressed size)."""
    k, node = w.node(rec)
    m = multiplicities(w, w.imp.layouts[rec.heads])      # (Hq, D)
    if m.shape[1] == rec.dh:
        return
    if not any(at.name == "scale" for at in node.attribute):
        node.attribute.append(helper.make_attribute("scale", float(1.0 / np.sqrt(rec.dh))))
    if not np.all(m == 1):
        mt = m.reshape(1, m.shape[0], 1, m.shape[1]) if rec.four else m.reshape(1, 1, -1)
        t = w.tmp(rec.q)
        node.input[0] = t
        w.insert(k, [helper.make_node("Mul", [rec.q, w.const(mt)], [t], name=w.tmp("fib_mult"))])


@writes(Kind.PACKED)
def packed(w, rec):
    """Collected; written by :func:`packed_cuts` after ``Writer.cuts``."""
    w.pending_packed.append(rec)


def packed_cuts(w):
    """A cut of a packed projection (q, k or v of torch's in_proj) becomes a
    Slice of its source along the unit axis, in kept positions: q, k and v
    each keep their own size.  The old reshape/transpose chain is left
    unread and dropped by ``Writer.finish``."""
    valid = {(r.node, r.output) for r in packed_records(w.imp)[0]}
    for rec in w.pending_packed:
        if (rec.node, rec.output) not in valid:
            continue
        src, u = rec.source, rec.axis
        kept = w.kept_along(src, u)
        if kept.all():
            continue
        cs = np.cumsum(np.concatenate([[0], kept.astype(np.int64)]))
        a, b = int(cs[rec.start]), int(cs[rec.end])
        k, node = w.node(rec)
        out = rec.output
        node.output[list(node.output).index(out)] = w.tmp(out)
        if w.imp.opset < 10:
            sl = helper.make_node("Slice", [src], [out], starts=[a], ends=[b], axes=[u],
                                  name=w.tmp("fib_packed"))
        else:
            sl = helper.make_node("Slice", [src, w.const([a], np.int64), w.const([b], np.int64),
                                            w.const([u], np.int64)], [out], name=w.tmp("fib_packed"))
        w.insert(k + 1, [sl])
