"""The base writer's core (docs/design.md sections 5-6): the copy of the model
being written, fresh names, new initializers and nodes, and the steps after
the per-record rules: cuts (Split / Slice / Gather along a shrunk axis in
kept positions), shapes (Shape ops report the ORIGINAL sizes, so every
computed shape downstream is unchanged; Reshape targets get the kept sizes)
and the final clean-up of dead nodes and initializers.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .attention import plan_folds
from .axis import Axis, column_scales
from .groups import nodes_along, op_axes, unit_axes
from .registry import rule_for

__all__ = ["Writer", "SHAPE_REWRITE"]

#: the name (prefix) of the nodes that rewrite a shape vector for a base's new sizes
SHAPE_REWRITE = "fib_shape"


class Writer:
    """The model being written: a copy of ``imp.model`` whose nodes the rules
    (:mod:`.registry`) rewrite one record at a time, and the shared steps
    after them (:meth:`cuts`, :meth:`shapes`, :meth:`finish`).  ``gid``,
    ``kept``: per node, its group and whether it is kept (:func:`.groups.dag_groups`);
    ``prune``: kept nodes stand for themselves only; ``scales``: per node, the
    rescaling merge's scales; ``labels``: the colouring (merge mode)."""

    def __init__(self, imp, gid, kept, prune=False, scales=None, labels=None, dry=False, spill=None):
        self.imp = imp
        self.dry = dry               # new weights as shapes only (a parameter count, no data)
        self.spill = spill           # new weights to a data file (:class:`..spill.Spill`), not the protobuf
        self.labels = None if prune else labels
        self.gid, self.kept = gid, kept
        self.prune = prune
        self.scales = None if scales is None or prune else column_scales(imp, scales)
        self.m = onnx.ModelProto()
        self.m.CopyFrom(imp.model)
        self.g = self.m.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.nodes = {n.name: n for n in self.g.node if n.name}
        self.by_index = list(self.g.node)    # the copy's nodes in the imported order
        self.counter = 0
        # every name in use: a model compressed before (a retuned base) already
        # holds fib_const*/..__fib* names, and new ones must not collide
        g = self.g
        self.taken = {n.name for n in g.node} | {x for n in g.node for x in list(n.input) + list(n.output)} \
            | {t.name for t in g.initializer} | {v.name for v in list(g.input) + list(g.output) + list(g.value_info)}
        self.written = {}
        self.new_nodes = {}          # node name -> list of (before|after, nodes)
        self.own = set()             # names of nodes the writer added that read base positions
        self.pending_packed = []
        plan_folds(self)              # q.k multiplicities folded into q projections

    def axis(self, tname, scaled=False):
        return Axis(self.imp.layouts[tname], self.gid, self.kept, self.prune,
                     self.scales if scaled else None)

    def node(self, rec):
        """(position, node) of the record's ONNX node in the model being written:
        by the index the importer recorded (names may be empty or repeated),
        else by name."""
        if rec.index is not None:
            target = self.by_index[rec.index]
            for k, n in enumerate(self.g.node):
                if n is target:
                    return k, n
        for k, n in enumerate(self.g.node):
            if n.name == rec.node:
                return k, n
        raise KeyError(rec.node)

    def value(self, name):
        v = self.imp.consts.get(name)
        if v is None:
            v = self.imp.feeds.get(name)
        return None if v is None else np.asarray(v)

    def put(self, node, slot, value, like):
        """Replace input ``slot`` of ``node`` by a new initializer holding ``value``."""
        dt = np.dtype(like.dtype if like is not None else np.float32)
        # a weight shared by several nodes (an unrolled recurrence) that they all
        # shrink alike is written once; dry (a parameter count): ``value`` may be
        # a shape-only stand-in, and a weight is shrunk alike where its shapes agree
        if self.dry:
            arr = None
            key = (node.input[slot], np.shape(value), dt.str)
        else:
            arr = np.ascontiguousarray(np.asarray(value).astype(dt, copy=False))
            key = (node.input[slot], arr.shape, arr.dtype.str, hashlib.sha1(arr.data).hexdigest())
        name = self.written.get(key)
        if name is None:
            name = self.fresh(lambda c: f"{node.input[slot] or 'fib'}__base{c}")
            if self.dry:
                t = onnx.TensorProto(name=name, dims=np.shape(value),
                                     data_type=helper.np_dtype_to_tensor_dtype(dt))
                self.g.initializer.append(t)
            else:
                self.g.initializer.append(numpy_helper.from_array(arr, name) if self.spill is None
                                          else self.spill.tensor(arr, name))
            self.written[key] = name
        node.input[slot] = name
        return name

    def const(self, value, dtype=np.float32):
        name = self.fresh(lambda c: f"fib_const{c}")
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value).astype(dtype), name))
        return name

    def insert(self, index, nodes):
        for k, n in enumerate(nodes):
            self.g.node.insert(index + k, n)

    def tmp(self, base):
        return self.fresh(lambda c: f"{base}__fib{c}")

    def fresh(self, make):
        """A name ``make(counter)`` not used anywhere in the model."""
        while True:
            self.counter += 1
            name = make(self.counter)
            if name not in self.taken:
                self.taken.add(name)
                return name

    def write(self, rec):
        """Rewrite the node of one typed record by its kind's rule."""
        rule_for(rec)(self, rec)

    def kept_count(self, tname, axis):
        return int(self.kept_along(tname, axis).sum())

    def shrunk(self, tname):
        """Unit axes of ``tname`` that the base shrinks: {axis: (L, L_hat)}."""
        ids = self.imp.layouts[tname]
        out = {}
        for j in unit_axes(ids):
            k = self.kept_count(tname, j)
            if k < ids.shape[j]:
                out[j] = (ids.shape[j], k)
        return out

    def patch(self, k, node, slot, dims, values, rank):
        """Input ``slot`` of ``node`` becomes Where(mask, values, old) over a shape vector."""
        mask = np.zeros(rank, dtype=bool)
        val = np.zeros(rank, dtype=np.int64)
        for j, v in zip(dims, values):
            mask[j], val[j] = True, v
        old, t = node.input[slot], self.tmp(node.input[slot])
        node.input[slot] = t          # before the insert: the node is a reference into the list
        self.insert(k, [helper.make_node("Where", [self.const(mask, bool), self.const(val, np.int64), old],
                                         [t], name=self.tmp(SHAPE_REWRITE))])

    def kept_along(self, tname, axis):
        """Kept positions along ``axis``.  Along the last unit axis (the one that
        shrinks: a cell's units) the nodes at index 0 of the other axes decide;
        along an outer unit axis (heads, q/k/v of a packed projection) a position
        is kept when any node of its slice is (the first feature of a head may be
        a pruned one)."""
        ids = self.imp.layouts[tname]
        ua = unit_axes(ids)
        if len(ua) > 1 and axis != ua[-1]:
            return np.moveaxis(self.kept[ids], axis, 0).reshape(ids.shape[axis], -1).any(axis=1)
        return self.kept[nodes_along(ids, axis)]

    def cuts(self):
        """Split, Slice and Gather along a shrunk unit axis: sizes, bounds and
        indices in kept positions (a merged position reads its group's kept one)."""
        for node in list(self.g.node):
            op = node.op_type
            if op not in ("Split", "Slice", "Gather") or not node.input or node.input[0] not in self.imp.layouts \
                    or node.name in self.own:
                continue
            x = node.input[0]
            sh = self.shrunk(x)
            rank = len(self.imp.shapes[x])
            axes = [a for a in op_axes(self.imp, node, rank) if a in sh]
            if not axes:
                continue
            ax = axes[0]
            if op == "Split":
                sizes = np.array([self.kept_count(o, ax) if o in self.imp.layouts else 0 for o in node.output],
                                 dtype=np.int64)
                if len(node.input) > 1 and node.input[1]:
                    self.put(node, 1, sizes, sizes)
                else:
                    attrs = [at for at in node.attribute if at.name in ("split", "num_outputs")]
                    for at in attrs:
                        node.attribute.remove(at)
                    if self.imp.opset >= 13:
                        while len(node.input) < 2:
                            node.input.append("")
                        node.input[1] = self.const(sizes, np.int64)
                    else:
                        node.attribute.append(helper.make_attribute("split", [int(v) for v in sizes]))
            elif op == "Slice":
                kept = self.kept_along(x, ax)
                L = kept.size
                cs = np.cumsum(np.concatenate([[0], kept.astype(np.int64)]))
                starts = np.asarray(self.imp.consts[node.input[1]]).astype(np.int64).copy()
                ends = np.asarray(self.imp.consts[node.input[2]]).astype(np.int64).copy()
                ax_list = (np.asarray(self.imp.consts[node.input[3]]).astype(np.int64).reshape(-1)
                           if len(node.input) > 3 and node.input[3] else np.arange(starts.size))
                for i, a in enumerate(ax_list):
                    if (a + rank if a < 0 else a) != ax:
                        continue
                    st = int(np.clip(starts[i] + L if starts[i] < 0 else starts[i], 0, L))
                    en = int(np.clip(ends[i] + L if ends[i] < 0 else ends[i], 0, L))
                    starts[i], ends[i] = cs[st], cs[en]
                self.put(node, 1, starts, starts)
                self.put(node, 2, ends, ends)
            else:
                axis_map = Axis(np.moveaxis(self.imp.layouts[x], ax, 0)[(slice(None),) + (0,) * (rank - 1)]
                                 .reshape(-1), self.gid, self.kept, self.prune)
                idx = np.asarray(self.imp.consts[node.input[1]]).astype(np.int64)
                L = axis_map.L
                self.put(node, 1, axis_map.target[np.where(idx < 0, idx + L, idx)], idx)

    def shapes(self):
        """Shape ops that read a shrunk tensor report the ORIGINAL sizes (so every
        computed shape downstream is unchanged), and every Reshape whose output
        shrinks gets those unit dims replaced, constant or computed target alike."""
        k = 0
        while k < len(self.g.node):
            node = self.g.node[k]
            if node.op_type == "Shape" and node.input[0] in self.imp.layouts:
                sh = self.shrunk(node.input[0])
                if sh:
                    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
                    rank = len(self.imp.shapes[node.input[0]])
                    dims = list(range(rank))[int(a.get("start", 0)):a.get("end", None)]
                    sel = [(i, sh[d][0]) for i, d in enumerate(dims) if d in sh]
                    if sel:
                        out = node.output[0]
                        t = self.tmp(out)
                        node.output[0] = t
                        mask = np.zeros(len(dims), dtype=bool)
                        val = np.zeros(len(dims), dtype=np.int64)
                        for i, v in sel:
                            mask[i], val[i] = True, v
                        self.insert(k + 1, [helper.make_node(
                            "Where", [self.const(mask, bool), self.const(val, np.int64), t], [out],
                            name=self.tmp(SHAPE_REWRITE))])
                        k += 1
            elif node.op_type == "Reshape" and node.output[0] in self.imp.layouts:
                sh = self.shrunk(node.output[0])
                if sh:
                    rank = len(self.imp.shapes[node.output[0]])
                    if node.input[1] in self.imp.consts:
                        t = np.asarray(self.imp.consts[node.input[1]]).astype(np.int64).copy()
                        for j, (_, kk) in sh.items():
                            t[j] = kk
                        self.put(node, 1, t, t)
                    else:
                        self.patch(k, node, 1, list(sh), [kk for _, kk in sh.values()], rank)
                        k += 1
                    for at in node.attribute:
                        if at.name == "allowzero":
                            at.i = 0
            k += 1

    def finish(self):
        from ..load import outer_refs as _outer_refs

        # nodes whose results nothing reads any more (a computed constant the
        # writer replaced by its shrunk value) go, then their initializers
        need = {o.name for o in self.g.output}
        live = []
        for n in reversed(list(self.g.node)):
            if any(o in need for o in n.output if o):
                live.append(n)
                need.update(x for x in n.input if x)
                need |= _outer_refs(n)            # subgraphs read outer names
        if len(live) != len(self.g.node):
            live.reverse()
            del self.g.node[:]
            self.g.node.extend(live)
        used = {x for n in self.g.node for x in n.input} | {o.name for o in self.g.output}
        for n in self.g.node:
            used |= _outer_refs(n)
        # deleted where they are: clearing the field and extending it by the kept
        # ones would copy every new weight (protobuf copies a message it adds)
        dropped = set()
        for k in reversed(range(len(self.g.initializer))):
            if self.g.initializer[k].name not in used:
                dropped.add(self.g.initializer[k].name)
                del self.g.initializer[k]
        keep = self.g.initializer
        if self.m.ir_version < 4:
            # old IR: every initializer is also a graph input
            ins = [i for i in self.g.input if i.name not in dropped]
            have = {i.name for i in ins}
            for t in keep:
                if t.name not in have:
                    ins.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            del self.g.input[:]
            self.g.input.extend(ins)
        # drop value_info (shapes changed) and intermediate shapes of the outputs' batch axes stay
        del self.g.value_info[:]
        return self.m

