"""The groups of a hypergraph import (:mod:`fibgraph.groups`), built once.

:func:`groups_of` reads the importer's typed records (the compressible weights:
linear / conv / embedding weights, LSTM/GRU ``W`` and ``R``), its node sets
(``imp.spaces``, ``imp.space_of``), ``imp.joins``, ``imp.keep`` and the graph
outputs, and returns one :class:`fibgraph.groups.Group` per tied component;
the list is cached on the import.  :func:`weight_uses` lists every weight use
in record order (what the report has one row for).
"""
from __future__ import annotations

import ast
import re

import numpy as np

from fibgraph.groups import Group, GroupKind, WeightUse, set_components, tie_columns

from .records import Kind

__all__ = ["columns_of", "output_mask", "kept_mask", "group_of_weight", "groups_of", "weight_uses", "module_name",
           "display_names", "node_module", "torch_names", "eps_names",
           "space_display_names"]


def columns_of(imp) -> np.ndarray:
    """Column id per node of ``imp`` (:func:`fibgraph.groups.tie_columns` of its joins), cached."""
    key = (id(imp.joins), len(imp.joins), int(imp.graph.n))
    cached = getattr(imp, "_tie_columns", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    col = tie_columns(imp.graph.n, imp.joins)
    col.flags.writeable = False             # shared by the writer, the groups and the analysis
    _cache(imp, "_tie_columns", (key, col))
    return col


def _cache(imp, attr, value):
    try:
        object.__setattr__(imp, attr, value)
    except (AttributeError, TypeError):
        pass                                # an object without a __dict__: no cache


def output_mask(imp, col=None) -> np.ndarray:
    """Nodes tied (a column of :func:`columns_of`: element-wise ops, a bias add,
    a normalisation along the units, a residual stream) to a node of a graph
    output.  The writer keeps such a column whole, so a weight whose units all
    lie in such columns is an output layer: a softmax head (``MatMul -> Add ->
    Softmax``) is one as much as a bare last ``Linear``."""
    col = columns_of(imp) if col is None else col
    out = np.zeros(imp.graph.n, dtype=bool)
    for o in imp.outputs:
        if o in imp.layouts:
            out[np.asarray(imp.layouts[o]).reshape(-1)] = True
    return np.isin(col, col[out])


def kept_mask(imp, col=None) -> np.ndarray:
    """Nodes tied to a node the writer must keep (``imp.keep``: a graph output,
    an input of a barrier): the writer keeps their columns whole."""
    col = columns_of(imp) if col is None else col
    return np.isin(col, col[np.asarray(imp.keep, dtype=bool)])


def _uses(imp):
    """(WeightUse, its node set indices, record kind) per compressible weight use, in record order.

    A use is an output layer (``is_output``) or kept whole (``keep``) when every
    one of its units is tied to an output or a kept node: the writer keeps
    those columns, so no eps shrinks the weight (:func:`output_mask`)."""
    col = columns_of(imp)
    out_nodes, kept = output_mask(imp, col), kept_mask(imp, col)
    res = []
    for rec in imp.records:
        if rec.kind in (Kind.LINEAR, Kind.EMBEDDING):
            sets, roles = (int(rec.space),), (rec.weight,)
            ids = imp.spaces[rec.space].ids
        elif rec.kind is Kind.RECURRENT:
            sets, roles = tuple(int(s) for s in rec.spaces), (rec.W, rec.R)
            ids = np.concatenate([imp.spaces[s].ids for s in rec.hidden])
        else:
            continue
        names = tuple(imp.spaces[s].name for s in sets)
        for w in roles:
            res.append((WeightUse(w, rec.op, ids, names, bool(out_nodes[ids].all()), bool(kept[ids].all()),
                                  len(res), sets, "linear" if rec.kind is Kind.LINEAR else rec.kind.value),
                        sets, rec.kind))
    return res


def _attention_sets(imp):
    """Pairs of node-set arrays that a score contraction or an Attention op ties (q and k)."""
    pairs = []
    for rec in imp.records:
        if rec.kind is Kind.CONTRACT and len(rec.inputs) == 2:
            a, b = rec.inputs
            if a in imp.layouts and b in imp.layouts:
                pairs.append((np.unique(imp.space_of[np.asarray(imp.layouts[a]).reshape(-1)]),
                              np.unique(imp.space_of[np.asarray(imp.layouts[b]).reshape(-1)])))
        elif rec.kind is Kind.ATTENTION and rec.heads in imp.layouts:
            s = np.unique(imp.space_of[np.asarray(imp.layouts[rec.heads]).reshape(-1)])
            pairs.append((s, s))
    return pairs


def groups_of(imp) -> list:
    """The groups of ``imp`` in order of their first weight use (cached on ``imp``)."""
    key = (id(imp.records), len(imp.records), id(imp.joins), len(imp.joins))
    cached = getattr(imp, "_groups", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    groups = _build(imp)
    _cache(imp, "_groups", (key, groups))
    return groups


def _build(imp):
    ns = len(imp.spaces)
    uses = _uses(imp)
    # node sets tied by joins, plus the (non-constant) sets of one recurrent op, plus every use of one weight
    links = []
    first_set = {}
    for u, sets, _ in uses:
        own = [s for s in sets if imp.spaces[s].kind != "const"] or list(sets[:1])
        s0 = first_set.setdefault(u.weight, own[0])
        links.append((np.full(len(own), s0, dtype=np.int64), np.asarray(own, dtype=np.int64)))
    ident = np.arange(ns, dtype=np.int64)
    comp = set_components(ident, [(ident[imp.space_of[np.asarray(a).reshape(-1)]],
                                   ident[imp.space_of[np.asarray(b).reshape(-1)]])
                                  for a, b in imp.joins if np.asarray(a).size] + links, ns)
    col = columns_of(imp)
    att = _attention_sets(imp)
    by_comp = {}
    for u, sets, kind in uses:
        own = [s for s in sets if imp.spaces[s].kind != "const"] or list(sets[:1])
        by_comp.setdefault(int(comp[own[0]]), []).append((u, kind))
    groups = []
    for k, (c, members) in enumerate(by_comp.items()):
        sets = np.nonzero(comp == c)[0]
        nodes = np.nonzero(np.isin(imp.space_of, sets))[0]
        weights = tuple(dict.fromkeys(u.weight for u, _ in members))
        kinds = {kd for _, kd in members}
        if Kind.RECURRENT in kinds:
            gk = GroupKind.RECURRENT
        elif any(np.isin(a, sets).any() and np.isin(b, sets).any() for a, b in att):
            gk = GroupKind.ATTENTION
        elif len(weights) > 1:
            gk = GroupKind.STREAM
        elif kinds == {Kind.EMBEDDING}:
            gk = GroupKind.EMBEDDING
        else:
            gk = GroupKind.LAYER
        us = tuple(u for u, _ in members)
        is_out = all(u.is_output for u in us)
        units = np.unique(np.concatenate([u.units for u in us])).astype(np.int64)
        groups.append(Group(
            name=weights[0], kind=gk, weights=weights, uses=us,
            node_sets=tuple(int(s) for s in sets), node_set_names=tuple(imp.spaces[s].name for s in sets),
            units=units, nodes=nodes, columns=col[nodes], sets=np.asarray(imp.space_of[nodes], dtype=np.int64),
            is_output=is_out,
            kept_whole="its units feed a barrier" if all(u.keep for u in us) and not is_out else None, index=k))
    return groups


def weight_uses(imp) -> list:
    """(use, its group) per compressible weight use, in record order."""
    return sorted(((u, g) for g in groups_of(imp) for u in g.uses), key=lambda t: t[0].index)


def group_of_weight(imp) -> dict:
    """Weight name -> its group."""
    return {w: g for g in groups_of(imp) for w in g.weights}


def module_name(weight, node_set_name="") -> str:
    """A readable layer name: the torch module of a weight (``fc1.weight`` ->
    ``fc1``), else the module path in the ONNX node's name (the TorchScript
    exporter names a transposed weight ``onnx::MatMul_12`` but its node
    ``/fc1/MatMul``: -> ``fc1``), else the node or weight name."""
    w = str(weight or "")
    if w and "::" not in w and not w.startswith("/"):
        for suf in (".weight", ".bias"):
            if w.endswith(suf) and len(w) > len(suf):
                return w[: -len(suf)]
        return w
    node = str(node_set_name or "").split(":")[0].strip("/")
    parts = [p for p in node.split("/") if p]
    if len(parts) > 1:
        return join_scopes(parts[:-1])
    return parts[0] if parts else (w or "layer")


_SCOPES = "pkg.torch.onnx.name_scopes"
#: the exporters' names for tensors that are not a parameter as it is (a
#: transposed or folded copy), also after fibgraph's writer (``__base3``)
_ANONYMOUS = re.compile(r"(val_\d+|onnx::.+)(__base\d+)?")


def node_module(node) -> str:
    """The torch module path an exporter recorded for an ONNX node, or ``""``.

    The dynamo exporter stores the scopes in the node's metadata
    (``pkg.torch.onnx.name_scopes``: ``['', 'enc', 'enc.fc1', 'linear']``, the
    module path grows by ``.part`` and ends with the op's name); the
    TorchScript exporter names the node ``/enc/fc1/MatMul``.
    """
    for p in node.metadata_props:
        if p.key == _SCOPES:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return ""
            path = ""
            for sc in scopes if isinstance(scopes, (list, tuple)) else ():
                if not isinstance(sc, str) or not sc:
                    continue
                if path and not sc.startswith(path + "."):
                    break
                path = sc
            return path
    parts = [q for q in str(node.name).split("/") if q] if str(node.name).startswith("/") else []
    return join_scopes(parts[:-1]) if len(parts) > 1 else ""


def join_scopes(parts) -> str:
    """A module path from the TorchScript exporter's scope names: a child of a
    called container repeats its parent's name (``/enc/enc.0/MatMul``: the
    path is ``enc.0``), a child of a ModuleList does not
    (``/encoder/layer.0/...``: ``encoder.layer.0``)."""
    path = []
    for q in parts:
        if path and q.startswith(path[-1] + "."):
            path[-1] = q
        else:
            path.append(q)
    return ".".join(path)


def torch_names(imp) -> dict:
    """``{weight: torch name}`` for the weights whose ONNX name is an exporter's
    anonymous one (``val_60``, ``onnx::MatMul_1351``: transposed or folded copies)
    when the model came from torch (producer ``pytorch``): the module of the
    node that reads it (:func:`node_module`) plus ``.weight`` (``.weight_ih`` /
    ``.weight_hh`` for a recurrent op's W / R), so ``val_60`` reads
    ``encoder.layer.0.attention.self.query.weight``.  Weights already named
    like torch tensors (``fc1.weight``) are left out.  Reports, pictures and
    eps files name layers by it; eps files accept both names."""
    cached = getattr(imp, "_torch_names", None)
    if cached is not None:
        return cached
    out = {}
    if str(imp.model.producer_name).lower() == "pytorch":
        by_node = {n.name: n for n in imp.model.graph.node}
        taken = {t.name for t in imp.model.graph.initializer}
        for rec in imp.records:
            node = by_node.get(getattr(rec, "node", None))
            path = node_module(node) if node is not None else ""
            for attr, suffix in (("weight", ".weight"), ("W", ".weight_ih"), ("R", ".weight_hh")):
                w = getattr(rec, attr, None)
                if not w or not isinstance(w, str) or w in out or not path:
                    continue
                if not _ANONYMOUS.fullmatch(w):               # a name of its own (fc1.weight, W1)
                    continue
                name, k = path + suffix, 1
                while name in taken:
                    k += 1
                    name = f"{path}{suffix}#{k}"
                taken.add(name)
                out[w] = name
    _cache(imp, "_torch_names", out)
    return out


def eps_names(imp, weights) -> dict:
    """``{weight: the name reports and eps files give it}`` (:func:`torch_names`, else the weight)."""
    names = torch_names(imp)
    return {w: names.get(w, w) for w in weights}


def display_names(imp) -> dict:
    """Group index -> readable unique layer name (:func:`module_name` of its first use)."""
    out, seen = {}, {}
    names = torch_names(imp)
    for g in groups_of(imp):
        u = g.uses[0]
        name = module_name(names.get(u.weight, u.weight), u.node_sets[0] if u.node_sets else "")
        k = seen.get(name, 0)
        seen[name] = k + 1
        out[g.index] = name if k == 0 else f"{name}#{k + 1}"
    return out


def space_display_names(imp) -> list:
    """A readable name per node set: a weight's own node set takes its layer's
    name, the group's other node sets (bias add, norm) ``layer (kind)``, the
    rest their cleaned node name (``/blocks.0/Add:sum`` -> ``blocks.0.Add (sum)``)."""
    names = []
    for sp in imp.spaces:
        node, _, kind = str(sp.name).partition(":")
        parts = [p for p in node.strip("/").split("/") if p]
        base = join_scopes(parts) if parts else str(sp.name)
        names.append(base if not kind or base == kind else f"{base} ({kind})")
    layer = display_names(imp)
    for g in groups_of(imp):
        own = {s for u in g.uses for s in u.set_ids}
        for s in g.node_sets:
            kind = imp.spaces[s].kind
            names[s] = layer[g.index] if s in own else f"{layer[g.index]} ({kind})"
    return names
