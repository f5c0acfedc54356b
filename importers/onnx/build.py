"""The hypergraph builder: node sets, layouts, weight blocks, factor nodes (the
AND rule), constant nodes and barriers, and :meth:`Builder.run`, which walks
the graph once and hands every node with a stream operand to the rule its op
type is registered with (:mod:`fibgraph.importers.onnx.rules`; the importer passes the
table in, so this module does not import the rules).

A *layout* is an int64 array of node ids over a tensor's axes: an axis along
which the ids vary is a unit axis, an axis of size 1 is positional (see
:mod:`fibgraph.importers.onnx.importer`).  A rule is a function
``rule(builder, node, name, attrs, kinds) -> role`` that reads the operands'
layouts, adds node sets and blocks through the public methods here, sets the
outputs' layouts, appends a typed record (:mod:`fibgraph.importers.onnx.records`) and
returns the node's role; it raises :class:`Barrier` for what it cannot map.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx

from fibgraph.errors import InputError
from fibgraph.graph import FACTOR, PER_UNIT, Block

from . import external as _external
from .fold import constant_value
from .load import attrs, graph_float_tensors, outer_refs, tensor_value
from .probe import probe_model
from .records import EmbeddingRecord

__all__ = ["Builder", "Space", "Barrier", "META", "attrs", "nodename", "etype", "opset", "unit_axes", "collapse",
           "dedupe_cols"]


class Barrier(Exception):
    """Raised by a rule: the node is a barrier (the message says why)."""


def nodename(node, i):
    """The node's name, or ``{op}_{i}`` for an unnamed node."""
    return node.name or f"{node.op_type}_{i}"


def etype(*parts) -> int:
    """A stable 62-bit edge category from a description (op, operand slot, attrs)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def opset(model):
    """The model's default-domain opset (13 if it names none)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 13


def unit_axes(ids):
    """The axes of a layout along which the ids vary (length > 1)."""
    return [k for k in range(ids.ndim) if ids.shape[k] > 1]


def collapse(r):
    """Shrink every axis along which the ids do not vary to size 1."""
    for k in range(r.ndim):
        if r.shape[k] > 1 and np.all(r == r.take([0], axis=k)):
            r = r.take([0], axis=k)
    return np.ascontiguousarray(r)


def _rank_of(col_ids, uniq):
    """Index in ``uniq`` (ordered by first occurrence) of every entry of ``col_ids``."""
    lookup = {int(u): k for k, u in enumerate(uniq)}
    return np.array([lookup[int(c)] for c in col_ids], dtype=np.int64)


def as_float(x):
    """``x`` as a float array: float32 and float64 as they are (a weight stays a
    view of its tensor; the engine sums in float64), other types as float64."""
    a = np.asarray(x)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def dedupe_cols(W, col_ids):
    """(n_out, L, K) weights over positions with node ids -> (src nodes, (n_out, n_src, D*K))."""
    col_ids = np.asarray(col_ids).reshape(-1)
    uniq, first = np.unique(col_ids, return_index=True)
    uniq = uniq[np.argsort(first, kind="stable")]
    if uniq.size == col_ids.size:
        return col_ids, W
    r = _rank_of(col_ids, uniq)
    counts = np.bincount(r)
    if counts.min() != counts.max():
        raise Barrier("a layer reads units with unequal numbers of positions")
    pos = np.argsort(r, kind="stable")
    return uniq, W[:, pos].reshape(W.shape[0], uniq.size, -1)


@dataclass
class Space:
    """A set of nodes made by one op: ``start .. start + n``."""

    name: str
    start: int
    n: int
    kind: str                 # input, linear, factor, norm, stats, reduce, gate, cell, hidden, barrier, const
    node: str = ""            # the ONNX node that made it
    weight: str | None = None  # the weight initializer of a linear op
    level: int = 0

    @property
    def ids(self):
        return np.arange(self.start, self.start + self.n)


#: ops on shapes: their outputs are shape values (meta), never units
META = {"Shape", "Size"}


class Builder:
    """The graph under construction.  ``rules``: the op table, a callable
    ``op type -> rule or None`` (:func:`fibgraph.importers.onnx.rules.lookup`);
    ``probe``: ``(feeds, values)`` of :func:`probe_model` (run here if None);
    ``input_axis``: where the inputs' units lie ('last', '1' or 'none')."""

    def __init__(self, model, label, rules, feeds=None, probe=None, input_axis="last"):
        self.model = model
        self.rules = rules
        self.input_axis = input_axis
        self.label = label
        g = model.graph
        self.consts = {t.name: tensor_value(t) for t in g.initializer}
        for node in g.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = self._constant_value(node)
        self.n_params = int(sum(v.size for v in self.consts.values() if v.dtype.kind == "f"))
        self.feeds, self.values = probe if probe is not None else probe_model(model, feeds)
        for k, v in self.consts.items():
            self.values.setdefault(k, v)
        self.shapes = {k: list(np.shape(v)) for k, v in self.values.items()}
        self.n = 0
        self.spaces = []
        self.space_of = []
        self.init_key = []        # per node: initial class key
        self.keep = []
        self.blocks = []
        self.layout = {}          # stream tensor -> ids
        self.meta = set()
        self.records = []
        self._tagged = 0          # records[:_tagged] carry the index of their ONNX node
        self.node_index = None
        self.barriers = []
        self.ops = []
        self.datameta = set()     # integer tensors computed from integer graph inputs
        self.joins = []           # (ids, ids): nodes that sit at the same positions (element-wise)
        self.computed = set()     # float constants computed from shapes (their value is the probe's)
        self.cyclic = set()
        self.consumers = {}
        for node in g.node:
            for x in node.input:
                if x:
                    self.consumers.setdefault(x, []).append(node)

    def _constant_value(self, node):
        try:
            return constant_value(node)
        except InputError as e:
            raise InputError(f"{self.label}: {e}") from None

    # ------------------------------------------------------------ nodes
    def new_space(self, n, kind, node="", weight=None, key=None, distinct=False, level=None):
        s = Space(name=f"{node}:{kind}" if node else kind, start=self.n, n=int(n), kind=kind,
                  node=node, weight=weight)
        if level is None:
            level = len(self.spaces) + 1
        s.level = level
        self.spaces.append(s)
        sid = len(self.spaces) - 1
        self.space_of.extend([sid] * s.n)
        if distinct:
            self.init_key.extend([("distinct", s.start + k) for k in range(s.n)])
        else:
            self.init_key.extend([("space", sid, None if key is None else key[k]) for k in range(s.n)])
        self.keep.extend([False] * s.n)
        self.n += s.n
        return s

    def const_node(self, node):
        return self.new_space(1, "const", node, distinct=True, level=0).start

    def dense(self, src, dst, W, name):
        W = as_float(W)
        if W.ndim == 2:
            W = W[:, :, None]
        self.blocks.append(Block(src=np.asarray(src), dst=np.asarray(dst), weight=W, name=name))

    def sparse(self, src, dst, values, etype, name):
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if src.size == 0:
            return
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1:
            v = v[:, None]
        et = np.broadcast_to(np.asarray(etype, dtype=np.int64), (src.size,))
        us, cs = np.unique(src, return_inverse=True)
        ud, rs = np.unique(dst, return_inverse=True)
        self.blocks.append(Block(src=us, dst=ud, rows=rs, cols=cs, values=v, etype=et.copy(), name=name))

    def fresh_layout(self, tname, node, distinct=True, kind="barrier", like=None):
        """New distinct nodes for an input or a tensor we cannot follow: the unit
        axis is axis 1 for images (rank 4+) and rank 2; for rank 3 the last axis
        (batch, time, features) or axis 1 (batch, channels, time), whichever
        the importer was asked for (it tries both)."""
        shp = self.shapes.get(tname)
        if shp is None or len(shp) == 0:
            s = self.new_space(1, kind, node, distinct=distinct)
            self.layout[tname] = np.array(s.start).reshape(())
            return s
        ax = 0 if len(shp) == 1 else 1
        if kind == "input" and self.input_axis == "none":
            s = self.new_space(1, kind, node, distinct=distinct)
            self.layout[tname] = np.array(s.start).reshape([1] * len(shp))
            return s
        if len(shp) == 3 and self.input_axis == "last" and kind == "input":
            ax = 2
        if like is not None and like.ndim == len(shp) and len(unit_axes(like)) == 1:
            ax = unit_axes(like)[0]
        n = int(shp[ax])
        s = self.new_space(n, kind, node, distinct=distinct)
        ids = s.ids.reshape([n if k == ax else 1 for k in range(len(shp))])
        self.layout[tname] = ids
        return s

    # ------------------------------------------------------------ walk
    def kind(self, name):
        if not name:
            return "none"
        if name in self.layout:
            return "stream"
        if name in self.meta:
            return "meta"
        if name in self.consts:
            return "const"
        return "unknown"

    def run(self):
        g = self.model.graph
        self.inputs = []
        for vi in g.input:
            if vi.name in self.consts:
                continue
            v = self.values[vi.name]
            if v.dtype.kind != "f":
                self.meta.add(vi.name)     # integer inputs (token ids, sample rates): data, not units
                self.datameta.add(vi.name)
                continue
            self.inputs.append(vi.name)
            self.fresh_layout(vi.name, "", distinct=True, kind="input")
        tick = getattr(self, "progress", None)
        for i, node in enumerate(g.node):
            if tick is not None:
                tick(1)
            if i % 8 == 7:
                _external.release()     # the weight pages the last nodes read: not all resident at the end
            self.tag_records()
            self.node_index = i
            if node.op_type == "Constant":
                continue
            name = nodename(node, i)
            kinds = [self.kind(x) for x in node.input]
            outer = outer_refs(node)
            if outer:
                # control flow: a barrier, whatever its bodies read from this graph
                why = "control flow (subgraph)"
                self.ops.append((name, node.op_type, self.barrier(node, i, name, why, extra=outer)))
                continue
            if "stream" not in kinds:
                if any(x in self.datameta for x in node.input):
                    try:
                        role = self._from_data(node, i, name, kinds)
                    except Barrier as b:
                        role = self.barrier(node, i, name, str(b))
                    self.ops.append((name, node.op_type, role))
                    continue
                role = self._const_or_meta(node, kinds)
                self.ops.append((name, node.op_type, role))
                continue
            try:
                role = self.map_node(node, i, name, kinds)
            except Barrier as b:
                role = self.barrier(node, i, name, str(b))
            self.ops.append((name, node.op_type, role))
        self.tag_records()
        if not self.layout:
            raise InputError(f"{self.label}: no floating-point tensor depends on the model's inputs")
        self.outputs = [o.name for o in g.output]
        for o in self.outputs:
            if o in self.layout:
                self.mark_keep(self.layout[o])
        return self

    def tag_records(self):
        """New records get ``index``: the position of their node in the graph
        (the writer finds nodes by it; names may be empty or repeated)."""
        for rec in self.records[self._tagged:]:
            if rec.index is None:
                rec.index = self.node_index
        self._tagged = len(self.records)

    def _from_data(self, node, i, name, kinds):
        """Ops on integer data inputs: an embedding lookup (Gather from a constant
        float table) makes one node per embedding feature reading a one-hot node
        per table row; other float results are new distinct inputs."""
        out = node.output[0]
        v = self.values.get(out)
        if node.op_type == "Gather" and kinds[0] == "const" and node.input[1] in self.datameta and \
                int(attrs(node).get("axis", 0)) == 0 and np.asarray(self.consts[node.input[0]]).dtype.kind == "f":
            T = as_float(self.consts[node.input[0]])
            if T.ndim != 2:
                raise Barrier("embedding table of rank != 2")
            vocab = self.new_space(T.shape[0], "input", name + ":vocab", distinct=True, level=0)
            s = self.new_space(T.shape[1], "linear", name, weight=node.input[0])
            self.dense(vocab.ids, s.ids, T.T, node.input[0])
            shape = [1] * len(self.shapes[out])
            shape[-1] = T.shape[1]
            self.layout[out] = s.ids.reshape(shape)
            self.records.append(EmbeddingRecord(node=node.name, weight=node.input[0],
                                                space=len(self.spaces) - 1, output=out))
            return "embedding"
        if v is not None and np.asarray(v).dtype.kind == "f":
            self.fresh_layout(out, name, distinct=True, kind="input")
            return "input"
        for o in node.output:
            if o:
                self.meta.add(o)
                self.datameta.add(o)
        return "data"

    def _const_or_meta(self, node, kinds):
        if node.op_type in META or "meta" in kinds or "unknown" in kinds:
            outs = [o for o in node.output if o]
            vals = [self.values.get(o) for o in outs]
            if node.op_type not in META and vals and all(v is not None and np.asarray(v).dtype.kind == "f"
                                                         for v in vals):
                # a float tensor computed from shapes (zero initial states, a scale
                # from a head size): a constant, its value from the probe
                for o, v in zip(outs, vals):
                    self.consts[o] = np.asarray(v)
                    self.computed.add(o)
                return "constant"
            for o in outs:
                self.meta.add(o)
            return "shape"
        derived = any(x in self.computed for x in node.input)
        for o in node.output:
            if o and o in self.values:
                self.consts[o] = self.values[o]
                if derived:
                    self.computed.add(o)
        return "constant"

    def mark_keep(self, ids):
        ids = np.asarray(ids).reshape(-1)
        ids = ids[ids >= 0]
        for k in np.unique(ids):
            self.keep[k] = True

    def barrier(self, node, i, name, why, extra=()):
        covered = 0
        like = next((self.layout[x] for x in node.input if x in self.layout), None)
        for x in list(node.input) + [x for x in extra if x not in node.input]:
            if x in self.layout:
                self.mark_keep(self.layout[x])
            elif x in self.consts and np.asarray(self.consts[x]).dtype.kind == "f":
                covered += int(np.asarray(self.consts[x]).size)
        for o in node.output:
            if o:
                if o in self.values and np.asarray(self.values[o]).dtype.kind == "f":
                    self.fresh_layout(o, name, distinct=True, kind="barrier", like=like)
                else:
                    self.meta.add(o)
        inside = []
        for at in node.attribute:                 # weights inside control-flow bodies
            for g in ([at.g] if at.type == onnx.AttributeProto.GRAPH else
                      list(at.graphs) if at.type == onnx.AttributeProto.GRAPHS else []):
                graph_float_tensors(g, inside)
        covered += sum(k for _, k in inside)
        self.barriers.append({"node": name, "op": node.op_type, "why": why, "params": covered})
        return "barrier"

    def map_node(self, node, i, name, kinds):
        """Map a node with a stream operand by the rule registered for its op
        type; an op without a rule, or with subgraphs, raises :class:`Barrier`."""
        if any(at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for at in node.attribute):
            raise Barrier("control flow (subgraph)")
        fn = self.rules(node.op_type)
        if fn is None:
            raise Barrier(f"op {node.op_type} is not supported")
        return fn(self, node, name, attrs(node), kinds)

    # ------------------------------------------------------------ shared pieces of the rules

    def reduce_nodes(self, ids, axes, what, name, weight="mean"):
        """Nodes summarising ``ids`` over ``axes`` (kept as size-1 axes)."""
        moved = np.moveaxis(ids, axes, list(range(ids.ndim - len(axes), ids.ndim)))
        keep_shape = moved.shape[:ids.ndim - len(axes)]
        flat = moved.reshape(int(np.prod(keep_shape)) if keep_shape else 1, -1)
        s = self.new_space(flat.shape[0], "stats" if what != "reduce" else "reduce", name)
        L = flat.shape[1]
        dst = np.repeat(s.ids, L)
        w = np.full(dst.size, 1.0 / L if weight == "mean" else 1.0)
        self.sparse(flat.reshape(-1), dst, w, etype(what, name if what == "reduce" else ""), f"{name}:{what}")
        out_shape = [1 if k in axes else ids.shape[k] for k in range(ids.ndim)]
        return s.ids.reshape(out_shape), s

    def const_vectors(self, c, out_ids):
        """Per element of ``out_ids``: the constant's values along positional axes."""
        c = np.asarray(c, dtype=np.float64)
        full = np.broadcast_shapes(out_ids.shape, c.shape)
        cb = np.broadcast_to(c, full)
        if len(full) != out_ids.ndim:
            raise Barrier("constant of higher rank than the stream")
        pos = [k for k in range(len(full)) if out_ids.shape[k] == 1]
        cb = np.moveaxis(cb, pos, list(range(len(full) - len(pos), len(full))))
        unit_shape = [full[k] for k in range(len(full)) if k not in pos]
        return cb.reshape(int(np.prod(unit_shape)) if unit_shape else 1, -1)

    def combine(self, operand_ids, out, name, tag, consts=(), kind=FACTOR, unit_axes=None):
        """Factor nodes: one per distinct tuple of operand nodes (AND rule), plus
        constant edges; ``consts`` = [(slot, array)] broadcast against the result.
        ``unit_axes`` = {axis: length}: axes the constants alone span (a
        per-sample statistic times a per-unit gamma): one node per position there."""
        shape = np.broadcast_shapes(*[o.shape for o in operand_ids])
        for _, c in consts:
            cs = np.shape(c)
            if len(cs) > len(shape):
                raise Barrier("constant of higher rank than the stream")
        if unit_axes:
            shape = tuple(unit_axes.get(k, d) for k, d in enumerate(shape))
        cols = [np.broadcast_to(o, shape).reshape(-1) for o in operand_ids]
        keys = np.stack(cols, 1)
        if unit_axes:
            idx = np.indices(shape)
            pos = np.ravel_multi_index([idx[k] for k in sorted(unit_axes)], [shape[k] for k in sorted(unit_axes)])
            keys = np.concatenate([keys, pos.reshape(-1, 1)], 1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        # order new nodes by first occurrence
        first = np.full(uniq.shape[0], keys.shape[0])
        np.minimum.at(first, inv, np.arange(inv.size))
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        s = self.new_space(uniq.shape[0], kind, name)
        out_ids = (s.start + rank[inv]).reshape(shape)
        for slot, col in enumerate(cols):
            src = uniq[order, slot]
            self.sparse(src, s.ids, np.ones(s.n), etype(tag, slot), f"{name}:in{slot}")
            if operand_ids[slot].shape == tuple(shape):       # aligned, not broadcast
                self.joins.append((operand_ids[slot].reshape(-1), out_ids.reshape(-1)))
        for slot, c in consts:
            vec = self.const_vectors(c, out_ids)           # (#elements, P)
            flat = out_ids.reshape(-1)
            # one vector per node: elements of a node are concatenated in order
            by = np.argsort(flat, kind="stable")
            counts = np.bincount(flat - s.start, minlength=s.n)
            if counts.min() != counts.max():
                raise Barrier("units of unequal multiplicity meet a constant")
            v = vec[by].reshape(s.n, -1)
            cn = self.const_node(name)
            self.sparse(np.full(s.n, cn), s.ids, v, etype(tag, "const", slot), f"{name}:const{slot}")
        self.layout[out] = out_ids
        return FACTOR if len(operand_ids) > 1 else PER_UNIT
