"""The weight layers of a hypergraph import (:func:`fibgraph.importers.onnx.importer.import_dag`)
for the analysis modules: :func:`layer_view` (the format-free
:class:`fibgraph.layerview.LayerView` read by compare, tracking, activity and
theorem checks), :func:`dag_layers` (per-unit parameter vectors for the
permutation-symmetry metrics of ``fibgraph symmetry-metrics``, any model:
MLPs, CNNs, Transformers, LSTMs) and :func:`find_qk_pairs` (Q/K weights
recognised by name).

For every compressible weight (the records behind
:func:`fibgraph.importers.onnx.groups.weight_uses`, each in its group) one layer of units:

* a linear / conv / embedding weight: one unit per output node;
* output layer: every unit is tied (joins) to a node of a graph output (the
  last Linear, or a residual stream that is the model's output): no rows;
* an LSTM / GRU / RNN: one unit per hidden node (both directions), ``W`` and
  ``R`` together: the unit's nodes are its gate, hidden and cell nodes (the
  record's nodes tied to the hidden node by ``imp.joins``), so its incoming
  weights are the concatenated gate rows of ``W`` and ``R``.

A unit's vector ``(incoming, bias, outgoing)``:

* incoming: per dense block whose ``dst`` holds one of the unit's nodes, that
  row (summed over the unit's nodes in the block; one row in practice),
  flattened over ``D``; blocks concatenated in graph order;
* bias: per sparse block from a constant node into the unit's nodes or into
  its chain of per-unit element-wise nodes downstream (``MatMul -> Add(bias)``
  as torch exports ``Linear`` on 3-D inputs), those values;
* outgoing: the nodes tied to the unit (union-find over ``imp.joins``: its
  bias-add node, activation aliases, the residual stream column, the cell
  and gates of a recurrent unit), minus the own/chain nodes of *other* units
  of the same layer (q and k columns of one head are tied by the score
  contraction); per dense block that reads any of them as ``src``, the sum of
  those columns, flattened over ``(n_dst, D)``; a unit without a column in a
  block gets zeros there, so all vectors of a layer have one length.

An unrolled loop reads one weight at several steps: the uses of one weight are
concatenated per unit.  Units whose outgoing edges are not dense (q/k columns
read only by the score contraction) have no outgoing part.
"""
from __future__ import annotations

from fibgraph.graph import PER_UNIT

import re

import numpy as np

from .onnx.groups import output_mask, weight_uses
from .onnx.load import tensor_value

__all__ = ["DagLayer", "tie_labels", "dag_layers", "output_mask", "layer_view", "find_qk_pairs"]


class DagLayer(dict):
    """``{"name", "op", "units", "incoming" (n, a), "bias" (n, b), "outgoing" (n, c),
    "has_reader" (n,) bool, "output_layer", "uses"}``; :meth:`vectors` = hstack."""

    def vectors(self):
        return np.hstack([self["incoming"], self["bias"], self["outgoing"]]).astype(np.float64)


def tie_labels(imp) -> np.ndarray:
    """Column of every node: connected component in the graph of ``imp.joins``
    (:func:`fibgraph.groups.tie_columns`, the writer's columns)."""
    from .onnx.groups import columns_of

    return columns_of(imp)


def _weight_uses(imp):
    """(name, op, use) per weight use (:func:`fibgraph.importers.onnx.groups.weight_uses`):
    linear / embedding weights by name, an LSTM / GRU / RNN's ``W`` and ``R``
    uses as one, ``"W + R"``."""
    uses = [u for u, _ in weight_uses(imp)]
    i = 0
    while i < len(uses):
        u = uses[i]
        if u.kind == "recurrent":
            yield f"{u.weight} + {uses[i + 1].weight}", u.op, u
            i += 2
        else:
            yield u.weight, u.op, u
            i += 1


def layer_view(imp, name="model"):
    """The :class:`fibgraph.layerview.LayerView` of a hypergraph import: one
    layer per weight (an LSTM / GRU / RNN's ``W`` and ``R`` as one layer of
    hidden units), in the order of ``imp.records``; ``tie`` from ``imp.joins``.
    A weight read at several steps of an unrolled loop is one layer per use
    with other nodes (``"<name> (use 2)"``, ...)."""
    from fibgraph.layerview import LayerView, ViewLayer

    lab = tie_labels(imp)
    outs = output_mask(imp, lab)
    layers, seen = [], {}
    for wname, op, use in _weight_uses(imp):
        ids, _ = _unit_nodes(imp, use, lab)
        uses = seen.setdefault(wname, [])
        if any(np.array_equal(ids, u) for u in uses):
            continue
        uses.append(ids)
        label = wname if len(uses) == 1 else f"{wname} (use {len(uses)})"
        layers.append(ViewLayer(label, op, ids, bool(outs[ids].all()) if ids.size else False))
    return LayerView(imp.graph, layers, tie=lab, name=name)


def _unit_nodes(imp, use, lab):
    """(hidden / output node per unit, owner: unit index of the unit's own nodes, else -1)."""
    owner = np.full(imp.graph.n, -1, dtype=np.int64)
    ids = use.units
    if use.kind == "recurrent":
        own_space = np.nonzero(np.isin(imp.space_of, np.asarray(use.set_ids)))[0]
        lut = np.full(int(lab.max()) + 1, -1, dtype=np.int64)
        lut[lab[ids]] = np.arange(ids.size)
        owner[own_space] = lut[lab[own_space]]
    owner[ids] = np.arange(ids.size)
    return ids, owner


def _chain(imp, owner, kinds, blocks):
    """Extend ``owner`` (a global key per node, -1: none) along sparse edges into
    per-unit element-wise nodes (one stream input: bias adds, scales)."""
    ch = owner.copy()
    for _ in range(64):
        changed = False
        for b in blocks:
            s, d = b.src[b.cols], b.dst[b.rows]
            m = (ch[s] >= 0) & (ch[d] < 0) & (kinds[d] == PER_UNIT)
            if m.any():
                ch[d[m]] = ch[s[m]]
                changed = True
        if not changed:
            break
    return ch


def _one_use(imp, ids, own, chain, lab, const_node):
    """``own`` / ``chain``: unit index of this layer's own / own-or-chain nodes, else
    negative (-2 on other layers' own or chain nodes: tied nodes like any other)."""
    n = ids.size
    inc, bias, out = [], [], []
    has_reader = np.zeros(n, dtype=bool)
    ulab = lab[ids]
    for b in imp.graph.blocks:
        if b.dense:
            D = b.weight.shape[2]
            o = own[b.dst]
            if (o >= 0).any():                       # rows into the unit's nodes
                part = np.zeros((n, b.src.size * D))
                np.add.at(part, o[o >= 0], b.weight[o >= 0].reshape(int((o >= 0).sum()), -1))
                inc.append(part)
            if not np.isin(lab[b.src], ulab).any():
                continue
            # columns read from the nodes tied to each unit (not another unit's own/chain nodes)
            c_own = chain[b.src]
            hit = (lab[b.src][None, :] == ulab[:, None]) & ((c_own[None, :] < 0)
                                                            | (c_own[None, :] == np.arange(n)[:, None]))
            if hit.any():
                cols = b.weight.transpose(1, 0, 2).reshape(b.src.size, -1)      # (n_src, n_dst * D)
                out.append(hit.astype(np.float64) @ cols)
                has_reader |= hit.any(axis=1)
        else:
            s, d = b.src[b.cols], b.dst[b.rows]
            o = chain[d]
            m = const_node[s] & (o >= 0)
            if m.any():
                part = np.zeros((n, b.values.shape[1]))
                np.add.at(part, o[m], b.values[m])
                bias.append(part)
    cat = (lambda xs: np.hstack(xs) if xs else np.zeros((n, 0)))
    return cat(inc), cat(bias), cat(out), has_reader


def dag_layers(imp) -> list:
    """One :class:`DagLayer` per weight (recurrent ``W`` and ``R`` as one layer),
    in the order of ``imp.records``."""
    lab = tie_labels(imp)
    kinds = np.array([s.kind for s in imp.spaces], dtype=object)[imp.space_of] if imp.graph.n else np.zeros(0)
    const_node = kinds == "const"
    # a unit tied (through element-wise ops, a residual stream) to an output node is an output unit
    out_nodes = output_mask(imp, lab)
    uses = []                                  # (name, op, ids, own)
    for name, op, use in _weight_uses(imp):
        ids, own = _unit_nodes(imp, use, lab)
        uses.append((name, op, ids, own))
    # own nodes of every use under one global key, extended along per-unit chains once
    key = np.full(imp.graph.n, -1, dtype=np.int64)
    base = 0
    for _, _, ids, own in uses:
        m = own >= 0
        key[m] = base + own[m]
        base += ids.size
    sparse = [b for b in imp.graph.blocks if not b.dense]
    gchain = _chain(imp, key, kinds, sparse)
    layers, by_name = [], {}
    base = 0
    for name, op, ids, own in uses:
        chain = np.where(gchain < 0, -1, gchain - base)
        chain[(gchain >= 0) & ((chain < 0) | (chain >= ids.size))] = -2
        base += ids.size
        inc, bias, out, has_reader = _one_use(imp, ids, own, chain, lab, const_node)
        prev = by_name.get(name)
        if prev is not None and prev["units"] == ids.size:
            prev["incoming"] = np.hstack([prev["incoming"], inc])
            prev["bias"] = np.hstack([prev["bias"], bias])
            prev["outgoing"] = np.hstack([prev["outgoing"], out])
            prev["has_reader"] |= has_reader
            prev["output_layer"] = prev["output_layer"] and bool(out_nodes[ids].all())
            prev["uses"] += 1
            continue
        ly = DagLayer(name=name, op=op, units=int(ids.size), incoming=inc, bias=bias, outgoing=out,
                      has_reader=has_reader, output_layer=bool(out_nodes[ids].all()), uses=1,
                      nodes=ids)
        by_name[name] = ly
        layers.append(ly)
    return layers


# ------------------------------------------------------------- attention
_Q = ("q", "query", "q_proj", "wq", "to_q", "w_q", "queries")
_K = ("k", "key", "k_proj", "wk", "to_k", "w_k", "keys")


def find_qk_pairs(model) -> list:
    """Heuristic: 2-D float initializers of an ONNX model whose names differ
    only in a ``q``-like path component vs a ``k``-like one (``q_proj`` /
    ``k_proj``, ``query`` / ``key``, ``wq`` / ``wk``...).  Returned as
    ``(name_q, name_k, WQ, WK)`` oriented ``(d_model, k)``: MatMul weights as
    stored, Gemm weights with ``transB=1`` transposed.  Names are often lost on
    export; an empty list means none was recognised, not that none exists."""
    inits = {t.name: t for t in model.graph.initializer}
    trans = set()
    for node in model.graph.node:
        if node.op_type == "Gemm" and len(node.input) > 1:
            if any(a.name == "transB" and a.i for a in node.attribute):
                trans.add(node.input[1])
    out = []
    for name in inits:
        parts = re.split(r"([._/:])", name)
        for idx, p in enumerate(parts):
            low = p.lower()
            if low in _Q:
                kname = None
                for cand in _K:
                    c = cand if p.islower() else cand.upper() if p.isupper() else cand
                    trial = "".join(parts[:idx] + [c] + parts[idx + 1:])
                    if trial in inits:
                        kname = trial
                        break
                if kname is None:
                    continue
                WQ = tensor_value(inits[name])
                WK = tensor_value(inits[kname])
                if WQ.ndim != 2 or WK.ndim != 2 or WQ.dtype.kind != "f" or WK.dtype.kind != "f":
                    continue
                WQ = WQ.T if name in trans else WQ
                WK = WK.T if kname in trans else WK
                if WQ.shape != WK.shape:
                    continue
                out.append((name, kname, WQ.astype(np.float64), WK.astype(np.float64)))
                break
    return out
