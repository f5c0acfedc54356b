"""The base of a coloured DAG model written back as ONNX (docs/design.md sections 5-6).

Positions that element-wise ops, contractions and recurrences tie together
(a residual stream's every writer and reader, an LSTM's gates, cell and hidden
state) form one *family*; its positions are grouped by the meet of the colours
of all its node sets (the AND rule), and one position per group is kept.
Because nodes of one colour carry equal values, keeping any refinement of the
colouring is exact; a family whose layout cannot be rewritten (units on two
axes of one tensor, as attention heads, or a computed shape that names a
unit axis) keeps every position, and the report says why.

Rewrites, for kept positions ``q`` each standing for a group ``G(q)``:
- linear weights: ``W_hat[r, q] = mean_{i in G(r)} sum_{k in G(q)} W[i, k]``
  (rows: the mean over the output fiber, the papers' sum is wrong for
  biases; columns: the sum over the input group); biases the mean;
- the rescaling merge (``scales``, DESIGN.md section 4): a node ``i`` with
  scale ``s_i`` carries ``s_i`` times its base node's value, so its row and
  bias enter the base divided by ``s_i`` (the mean of normalised rows) and
  the next layer's columns are summed with the factors ``s_k``:
  ``W_hat[r, q] = mean_{i in G(r)} (1/s_i) sum_{k in G(q)} s_k W[i, k]``.
  One scale per column (the nodes a bias add ties to its layer's): the
  scale of the column's last node set, the one the next layer reads; a bias
  add's constant is divided by it like a bias;
- per-unit constants (bias adds, PRelu, LayerNorm's gamma/beta): the mean
  over the group; BatchNorm: the group's mean affine map (``channel_norm``);
- sums over a unit axis (ReduceMean/ReduceSum, LayerNorm's statistics,
  softmax's denominator, q.k over head dims): weighted by the group sizes
  ``m``, so that the compressed model sums what the original summed;
- LSTM/GRU: ``hidden_size`` = number of hidden groups, gate blocks
  compressed with the hidden grouping, ``R`` by rows and columns;
- q.k: a kept head dim standing for ``m`` (q colour, k colour) equal products
  has its q row (and q's bias) multiplied by ``m`` when nothing but the score
  reads q (else a Mul before the score); the scores' original 1/sqrt(d_k)
  stays (computed shapes report the original sizes);
- a packed projection (torch's ``in_proj``: q, k, v as one MatMul, reshaped to
  (..., 3, d) and cut) is read as Slices of its output, so q, k and v keep
  their own sizes; only the heads of each keep equal sizes.
"""
from __future__ import annotations

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import helper, numpy_helper

from fibgraph.partition import canonical

__all__ = ["dag_groups", "write_dag_base"]


def _unit_axes(ids):
    return [k for k in range(ids.ndim) if ids.shape[k] > 1]


def _nodes_along(ids, axis):
    """The node ids along ``axis`` of a layout, at index 0 of its other axes."""
    return np.moveaxis(ids, axis, 0).reshape(ids.shape[axis], -1)[:, 0]


def _packed(imp):
    """The ``packed`` records (a packed projection cut into q, k, v: see
    ``onnx_dag._Builder._packed_cut``) the writer rewrites as Slices of their
    source, and the tensors between (``region``: units on several axes) that
    the rewrite leaves unread, so their cells need not keep equal sizes.  A
    record is used only when every reader of its region is part of such a
    chain (no Shape, no other op reads the packed layout)."""
    recs = [r for r in imp.records if r["kind"] == "packed"]
    if not recs:
        return [], set()
    consumers = {}
    for n in imp.model.graph.node:
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(n)
    graph_out = {o.name for o in imp.model.graph.output}
    while True:
        region = {t for r in recs for t in r["region"]}
        outs = {r["output"] for r in recs}
        bad = {t for t in region if t in graph_out or any(
            o and o not in region and o not in outs and (o in consumers or o in graph_out)
            for n in consumers.get(t, []) for o in n.output)}
        keep = [r for r in recs if not bad & set(r["region"])]
        if len(keep) == len(recs):
            return recs, region
        recs = keep


def _readers(blocks, nodes):
    """(block, its destination nodes) for every edge block that reads ``nodes``."""
    out = []
    for b in blocks:
        mask = np.isin(b.src, nodes)
        if not mask.any():
            continue
        if b.weight is not None:
            dst = b.dst[np.any(b.weight[:, mask] != 0, axis=tuple(range(1, b.weight.ndim)))]
        else:
            dst = b.dst[b.rows[mask[b.cols]]]
        if dst.size:
            out.append((b, dst))
    return out


def dag_groups(imp, labels, keep_pref=None):
    """Per node: its group (``gid``) and whether it is kept; per space the reason
    its units were kept whole (or None).  ``keep_pref`` (per node, optional):
    the kept column of a group is the one whose nodes have the largest
    preference (ties: the smallest column), not simply the smallest column."""
    d = _group_columns(imp, labels, keep_pref)
    return d["gid"], d["kept"], d["why"]


def _group_columns(imp, labels, keep_pref=None, split=True):
    """:func:`dag_groups` with its intermediate results: ``col`` (column of
    each node), ``gid_col`` (group of each column), ``slot``, ``gid``,
    ``kept``, ``why``.  ``split=False`` skips the equalisation of cell sizes.

    Columns: nodes tied by joins (element-wise ops, contractions, recurrences)
    share a column.  Two columns merge iff every node set has the same colour
    in both (the AND rule; a layer with two nodes in a column, q and k of one
    projection, gives a pair of colours) and they lie in the same *cell* of
    every tensor with units on several axes (heads x head dims: only the last
    unit axis shrinks).  Cells of one tensor must keep equal sizes (reshapes
    need it), so groups are split, which is still exact, until they do."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from fibgraph.hashing import mix as _mix

    n = imp.graph.n
    space_of = imp.space_of
    if imp.joins:
        a = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p, _ in imp.joins])
        b = np.concatenate([np.asarray(q, dtype=np.int64).reshape(-1) for _, q in imp.joins])
    else:
        a = b = np.zeros(0, np.int64)
    _, comp = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(n, n)), directed=False)
    col = canonical(comp)
    n_col = int(col.max()) + 1 if n else 0
    why = [None] * len(imp.spaces)
    unique = np.zeros(n_col, dtype=bool)           # columns that may not merge
    unique[col[imp.keep]] = True
    multi = {t: ids for t, ids in imp.layouts.items() if len(_unit_axes(ids)) > 1}
    # layouts the writer can only rewrite along one axis
    single_only = set()
    for rec in imp.records:
        if rec["kind"] in ("elementwise", "channel_norm", "layernorm", "reduce", "softmax", "depthwise",
                           "linear", "embedding"):
            single_only.update(x for x in (rec.get("input"), rec.get("output")) if x)
    for t in single_only & set(multi):
        nodes = multi[t].reshape(-1)
        unique[col[nodes]] = True
        for sp_ in np.unique(space_of[nodes]):
            why[sp_] = why[sp_] or f"tensor {t!r} has units on several axes"
    for sp_ in _shape_blocked(imp, space_of):
        unique[col[imp.spaces[sp_].ids]] = True
        why[sp_] = why[sp_] or "an index, Size, Expand or Tile names its unit axis"
    # slot of a node: its rank among the nodes of its own space in its column
    # (q and k of one projection are two slots of one column)
    order = np.lexsort((np.arange(n), space_of, col))
    run = np.ones(n, dtype=bool)
    if n:
        run[1:] = (col[order][1:] != col[order][:-1]) | (space_of[order][1:] != space_of[order][:-1])
    start = np.maximum.accumulate(np.where(run, np.arange(n), 0))
    slot = np.empty(n, dtype=np.int64)
    slot[order] = np.arange(n) - start
    # signature of a column: the (space, slot, colour) of its nodes, the cells it
    # lies in (tensors with units on several axes: the indices on all unit axes but
    # the last), and uniqueness; two 64-bit hashes summed over members, plus counts
    u64 = np.uint64
    h_node = _mix(_mix(space_of.astype(u64)) + _mix(slot.astype(u64) + u64(7)) + labels.astype(np.int64).astype(u64))
    h2_node = _mix(h_node ^ u64(0x5851F42D4C957F2D))
    h1 = np.zeros(n_col, dtype=u64)
    h2 = np.zeros(n_col, dtype=u64)
    np.add.at(h1, col, h_node)
    np.add.at(h2, col, h2_node)
    cells = []
    for ti, (t, ids) in enumerate(multi.items()):
        ua = _unit_axes(ids)
        last = ua[-1]
        idx = np.indices(ids.shape).reshape(ids.ndim, -1)
        other = np.zeros(idx.shape[1], dtype=u64)
        for k in ua:
            if k != last:
                other = _mix(other + idx[k].astype(u64))
        cells.append(np.stack([col[ids.reshape(-1)].astype(u64), _mix(other + u64(ti) * u64(0x9E37))], 1))
    if cells:
        cc = np.unique(np.concatenate(cells), axis=0)                 # a cell counts once per column
        np.add.at(h1, cc[:, 0].astype(np.int64), _mix(cc[:, 1]))
        np.add.at(h2, cc[:, 0].astype(np.int64), _mix(cc[:, 1] ^ u64(0xABCD)))
    count = np.bincount(col, minlength=n_col)
    uniq_key = np.where(unique, np.arange(n_col), -1)
    gid_col = canonical(np.stack([h1.view(np.int64), h2.view(np.int64), count, uniq_key], 1))
    # equal cell sizes: split groups (largest first) in cells that keep fewer;
    # a packed projection's (..., 3, d) view is read as three Slices instead
    packed_region = _packed(imp)[1]
    for _ in range(n_col + 1 if split else 0):
        changed = False
        for t, ids in multi.items():
            if t in packed_region:
                continue
            ua = _unit_axes(ids)
            last = ua[-1]
            rows = np.moveaxis(ids, last, -1).reshape(-1, ids.shape[last])
            cols_rows = col[rows]
            counts = [np.unique(gid_col[r]).size for r in cols_rows]
            top = max(counts)
            for r, k in zip(cols_rows, counts):
                while k < top:
                    g, cnt = np.unique(gid_col[r], return_counts=True)
                    big = g[np.argmax(cnt)]
                    c_split = r[gid_col[r] == big][-1]
                    gid_col[c_split] = gid_col.max() + 1
                    k += 1
                    changed = True
        if not changed:
            break
    # a group of columns holds one node per space slot: the node's group is (column group, slot)
    gid = canonical(np.stack([gid_col[col], slot], 1))
    n_grp = int(gid_col.max()) + 1 if n_col else 0
    if keep_pref is None:
        rep = np.full(n_grp, n_col, dtype=np.int64)
        np.minimum.at(rep, gid_col, np.arange(n_col))
    else:
        prio = np.full(n_col, -np.inf)
        np.maximum.at(prio, col, np.asarray(keep_pref, dtype=np.float64).reshape(-1))
        order = np.lexsort((np.arange(n_col), -prio, gid_col))
        first = np.ones(n_col, dtype=bool)
        first[1:] = gid_col[order][1:] != gid_col[order][:-1]
        rep = np.empty(n_grp, dtype=np.int64)
        rep[gid_col[order][first]] = order[first]
    kept = rep[gid_col[col]] == col
    return {"col": col, "gid_col": gid_col, "slot": slot, "gid": gid, "kept": kept, "why": why,
            "unique": unique}


def _shape_blocked(imp, space_of):
    """Spaces whose unit axis is read by Size, cut by Slice/Gather/Split along it,
    or sized by Expand/Tile/Resize: their layout cannot shrink.  (Shape and
    Reshape are rewritten instead: see ``_Writer.shapes``.)"""
    blocked = set()
    for node in imp.model.graph.node:
        op = node.op_type
        if not node.input or node.input[0] not in imp.layouts:
            continue
        ids = imp.layouts[node.input[0]]
        ua = _unit_axes(ids)
        if not ua:
            continue
        bad = False
        if op in ("Size", "Expand", "Tile", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth"):
            bad = op in ("Size", "DepthToSpace", "SpaceToDepth") or _shape_param_on_axes(imp, node, ua)
        elif op in ("Slice", "Gather", "Split"):
            # whole cells may be picked; a cut along the shrinking axis is rewritten
            # when its bounds are constants (see _Writer.cuts)
            bad = ua[-1] in _op_axes(imp, node, ids.ndim) and not _cut_constant(imp, node)
        if bad:
            blocked.update(int(s) for s in np.unique(space_of[ids.reshape(-1)]))
    return blocked


def _cut_constant(imp, node):
    op = node.op_type
    if op == "Slice":
        if len(node.input) < 3:
            return False                   # opset < 10: bounds in attributes
        steps = node.input[4] if len(node.input) > 4 and node.input[4] else None
        ok = all(x in imp.consts for x in node.input[1:3]) and (len(node.input) < 4 or not node.input[3]
                                                                 or node.input[3] in imp.consts)
        return ok and (steps is None or (steps in imp.consts and np.all(np.asarray(imp.consts[steps]) == 1)))
    if op == "Split":
        if len(node.input) > 1 and node.input[1]:
            return node.input[1] in imp.consts
        return True
    if op == "Gather":
        return node.input[1] in imp.consts
    return False


def _op_axes(imp, node, rank):
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    op = node.op_type
    if op == "Gather":
        ax = [int(a.get("axis", 0))]
    elif op == "Split":
        ax = [int(a.get("axis", 0))]
    else:
        if len(node.input) > 3 and node.input[3]:
            ax = [int(v) for v in np.asarray(imp.feeds.get(node.input[3], imp.consts.get(node.input[3],
                                                                                        []))).reshape(-1)]
        elif "axes" in a:
            ax = list(a["axes"])
        else:
            starts = node.input[1] if len(node.input) > 1 else None
            k = np.asarray(imp.consts.get(starts, [0])).size if starts else rank
            ax = list(range(k))
    return [x + rank if x < 0 else x for x in ax]


def _shape_param_on_axes(imp, node, ua):
    if len(node.input) < 2:
        return False
    v = imp.consts.get(node.input[-1])
    if v is None:
        return True
    v = np.asarray(v).reshape(-1)
    return any(k < v.size and v[k] != 1 for k in ua)


# ---------------------------------------------------------------- writing
class _Axis:
    """The compressed view of one tensor's unit axis: ``target[p]`` = kept index
    standing for position ``p``; ``L_hat`` kept positions; ``m`` group sizes.

    ``prune``: the kept position of a group stands for itself only (the other
    members are dropped, not merged): ``sum_matrix`` and ``mean_matrix`` select
    the kept positions and every multiplicity ``m`` is 1."""

    def __init__(self, ids, gid, kept, prune=False, scale=None):
        ua = _unit_axes(ids)
        self.axis = ua[0] if ua else None
        self.prune = prune
        if self.axis is None:
            self.L = self.L_hat = 1
            self.target = np.zeros(1, np.int64)
            self.keep_pos = np.zeros(1, np.int64)
            self.m = np.ones(1)
            self.s = np.ones(1) if scale is None else np.asarray(scale, np.float64)[np.asarray(ids).reshape(-1)[:1]]
            self.identity = True
            self.scaled = bool(np.any(self.s != 1))
            return
        nodes = _nodes_along(ids, self.axis)
        # per position: the rescaling merge's scale of its node (1 where none)
        self.s = np.ones(nodes.size) if scale is None or prune else np.asarray(scale, np.float64)[nodes]
        self.scaled = bool(np.any(self.s != 1))
        self.L = nodes.size
        g = gid[nodes]
        # occurrence index of each position among positions of the same node
        occ = np.zeros(self.L, np.int64)
        seen = {}
        for p, v in enumerate(nodes):
            occ[p] = seen.get(int(v), 0)
            seen[int(v)] = occ[p] + 1
        keep_pos = np.nonzero(kept[nodes])[0]
        self.L_hat = keep_pos.size
        index = {(int(g[p]), int(occ[p])): q for q, p in enumerate(keep_pos)}
        self.target = np.array([index[(int(g[p]), int(occ[p]))] for p in range(self.L)], dtype=np.int64)
        self.keep_pos = keep_pos
        self.m = (np.ones(self.L_hat) if prune else
                  np.bincount(self.target, minlength=self.L_hat).astype(np.float64))
        self.identity = self.L_hat == self.L

    def sum_matrix(self, scaled=False):
        """(L_hat, L) indicator: columns of a group add up (prune: only the kept one);
        ``scaled``: column ``p`` enters times its node's scale ``s_p``."""
        if self.prune:
            return sp.csr_matrix((np.ones(self.L_hat), (np.arange(self.L_hat), self.keep_pos)),
                                 shape=(self.L_hat, self.L))
        v = self.s if scaled else np.ones(self.L)
        return sp.csr_matrix((v, (self.target, np.arange(self.L))), shape=(self.L_hat, self.L))

    def mean_matrix(self, scaled=False):
        """(L_hat, L): the mean over each group; ``scaled``: of the rows divided
        by their nodes' scales (the rescaling merge's base row)."""
        if scaled and not self.prune:
            S = sp.csr_matrix((1.0 / self.s, (self.target, np.arange(self.L))), shape=(self.L_hat, self.L))
            return sp.diags(1.0 / self.m) @ S
        return sp.diags(1.0 / self.m) @ self.sum_matrix()

    def mean_along(self, v, axis, scaled=False):
        """``v`` with its ``axis`` (of length L) replaced by the mean over each group
        (``scaled``: of ``v`` divided by the scales)."""
        vh = np.moveaxis(np.asarray(v, dtype=np.float64), axis, 0)
        sh = vh.shape
        return np.moveaxis((self.mean_matrix(scaled) @ vh.reshape(sh[0], -1)).reshape((self.L_hat,) + sh[1:]),
                           0, axis)


class _Writer:
    def __init__(self, imp, gid, kept, prune=False, scales=None, labels=None):
        self.imp = imp
        self.labels = None if prune else labels
        self.gid, self.kept = gid, kept
        self.prune = prune
        self.scales = None if scales is None or prune else _column_scales(imp, scales)
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
        self._fold_plan()

    def axis(self, tname, scaled=False):
        return _Axis(self.imp.layouts[tname], self.gid, self.kept, self.prune,
                     self.scales if scaled else None)

    def node(self, rec):
        """(position, node) of the record's ONNX node in the model being written:
        by the index the importer recorded (names may be empty or repeated),
        else by name."""
        if rec.get("index") is not None:
            target = self.by_index[rec["index"]]
            for k, n in enumerate(self.g.node):
                if n is target:
                    return k, n
        for k, n in enumerate(self.g.node):
            if n.name == rec["node"]:
                return k, n
        raise KeyError(rec["node"])

    def value(self, name):
        v = self.imp.consts.get(name)
        if v is None:
            v = self.imp.feeds.get(name)
        return None if v is None else np.asarray(v)

    def put(self, node, slot, value, like):
        """Replace input ``slot`` of ``node`` by a new initializer holding ``value``."""
        dt = like.dtype if like is not None else np.float32
        arr = np.ascontiguousarray(np.asarray(value).astype(dt))
        # a weight shared by several nodes (an unrolled recurrence) that they all
        # shrink alike is written once
        key = (node.input[slot], arr.shape, arr.dtype.str, hash(arr.tobytes()))
        name = self.written.get(key)
        if name is None:
            name = self.fresh(lambda c: f"{node.input[slot] or 'fib'}__base{c}")
            self.g.initializer.append(numpy_helper.from_array(arr, name))
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

    # ---- per record
    def linear(self, rec):
        k, node = self.node(rec)
        ax_in = self.axis(rec["input"], scaled=True)
        ax_out = self.axis(rec["output"], scaled=True)
        if ax_in.identity and ax_out.identity and not (ax_in.scaled or ax_out.scaled):
            return
        op = rec["op"]
        wname = node.input[1] if op != "MatMul" or rec["x_axis"] == -1 else node.input[0]
        slot = 1 if wname == node.input[1] else 0
        W = self.value(wname)
        dt = W.dtype
        W = W.astype(np.float64)
        a = rec["attrs"]
        Rm = ax_out.mean_matrix(scaled=True)
        fold = self._row_factor(rec["output"], ax_out)          # q.k multiplicities folded into W_Q
        if fold is not None:
            Rm = sp.diags(fold) @ Rm
        C = ax_in.sum_matrix(scaled=True)

        def rows_cols(M):          # M (n_out, n_in, ...) -> compressed
            sh = M.shape
            M2 = M.reshape(sh[0], -1)
            M2 = Rm @ M2
            M3 = M2.reshape(ax_out.L_hat, sh[1], -1).transpose(1, 0, 2).reshape(sh[1], -1)
            M3 = C @ M3
            return M3.reshape(ax_in.L_hat, ax_out.L_hat, *sh[2:]).swapaxes(0, 1)

        group = int(a.get("group", 1))
        if op == "Conv" and group > 1:
            self.grouped_conv(k, node, W, dt, group, rows_cols, ax_in)
        elif op in ("Conv",):
            Wh = rows_cols(W)
        elif op == "ConvTranspose":
            Wh = np.moveaxis(rows_cols(np.moveaxis(W, 0, 1)), 0, 1)
        elif op == "Gemm":
            Wt = W if a.get("transB", 0) else W.T
            Wh = rows_cols(Wt)
            Wh = Wh if a.get("transB", 0) else Wh.T
        elif slot == 1:                                  # MatMul x @ B: B (K, N)
            Wh = rows_cols(W.T).T
        else:                                            # MatMul A @ x: A (N, K)
            Wh = rows_cols(W)
        if not (op == "Conv" and group > 1):
            self.put(node, slot, Wh, W.astype(dt))
        bslot = 2 if op in ("Gemm", "Conv", "ConvTranspose") else None
        if bslot is not None and len(node.input) > 2 and node.input[2] and not (ax_out.identity and not ax_out.scaled):
            b = self.value(node.input[2])
            if b.size > 1 or ax_out.scaled:
                if b.size == 1 and ax_out.L > 1:        # a scalar bias: one per unit once rescaled
                    b = np.broadcast_to(b.reshape(-1), (ax_out.L,)).astype(b.dtype)
                bax = 0 if b.shape[0] == ax_out.L else b.ndim - 1
                bh = ax_out.mean_along(b, bax, scaled=True)
                if fold is not None:
                    bh = bh * fold.reshape([-1 if j == bax else 1 for j in range(b.ndim)])
                self.put(node, 2, bh, b)

    def grouped_conv(self, k, node, W, dt, group, rows_cols, ax_in):
        """A grouped Conv (depthwise with any multiplier): the base of its dense,
        block-diagonal form.  Where every base output channel reads one base
        input channel ``j(o)`` (the chain importer's rule), it stays depthwise:
        ``group`` = output channels, preceded by a Gather of the channels ``j``
        when they are not simply ``0..n-1``; otherwise a dense Conv (group 1).
        Base input channels of one colour carry equal (base) values, so a row
        reading several of them reads the first with their kernels summed: an
        input family split finer than its colours (a residual stream's meet)
        does not turn a depthwise conv dense."""
        c_out, gi = W.shape[:2]
        c_in = gi * group
        go = c_out // group
        full = np.zeros((c_out, c_in) + W.shape[2:])
        for g in range(group):
            full[g * go:(g + 1) * go, g * gi:(g + 1) * gi] = W[g * go:(g + 1) * go]
        Wh = rows_cols(full)
        # the base input channels a base output reads: a kernel within float
        # rounding of zero (the engine's eps = 0 tolerance) reads none
        from fibgraph.refine import DEFAULT_RTOL

        mag = np.abs(Wh).reshape(Wh.shape[0], Wh.shape[1], -1).max(axis=2)
        support = mag > DEFAULT_RTOL * (float(mag.max()) if mag.size else 0.0)
        n_out, n_in = support.shape
        if self.labels is not None and ax_in.axis is not None:
            ids_in = _nodes_along(self.imp.layouts[node.input[0]], ax_in.axis)
            colour = np.asarray(self.labels)[ids_in[ax_in.keep_pos]]
            for o in np.flatnonzero(support.sum(axis=1) > 1):
                q = np.flatnonzero(support[o])
                if np.all(colour[q] == colour[q[0]]):
                    Wh[o, q[0]] = Wh[o, q].sum(axis=0)
                    Wh[o, q[1:]] = 0
                    support[o, q[1:]] = False
        reads = support.sum(axis=1)
        if np.any(reads > 1):
            if Wh.size <= W.size:             # a dense Conv (group 1) no larger than the original
                for at in node.attribute:
                    if at.name == "group":
                        at.i = 1
                self.put(node, 1, Wh, W.astype(dt))
                return
            # quasi-fibers (eps > 0) mixing input colours: each base output reads
            # the input it reads most (exact fibers never get here)
            best = np.where(support, mag, -1.0).argmax(axis=1)
            support = np.zeros_like(support)
            support[np.arange(n_out), best] = True
            reads = support.sum(axis=1)
        j = np.where(reads == 1, support.argmax(axis=1), 0)
        self.put(node, 1, Wh[np.arange(n_out), j][:, None], W.astype(dt))
        for at in node.attribute:
            if at.name == "group":
                at.i = n_out
        if n_in != n_out or not np.array_equal(j, np.arange(n_out)):
            t = self.tmp(node.input[0])
            g = helper.make_node("Gather", [node.input[0], self.const(j.astype(np.int64), np.int64)], [t],
                                 axis=1, name=self.tmp("fib_gather"))
            node.input[0] = t
            self.own.add(g.name)                  # already in base positions: cuts() leaves it
            self.insert(k, [g])

    def embedding(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["output"])
        if ax.identity:
            return
        T = self.value(node.input[0])
        self.put(node, 0, (ax.mean_matrix() @ T.astype(np.float64).T).T, T)

    def elementwise(self, rec):
        k, node = self.node(rec)
        # a bias add after a rescaled layer: its constant is divided by the scales
        ax = self.axis(rec["output"], scaled=rec["op"] in ("Add", "Sub"))
        if ax.identity and not ax.scaled:
            return
        rank = len(self.imp.shapes[rec["output"]])
        for slot, x in enumerate(node.input):
            if x in rec["consts"]:
                c = self.value(x)
                if c is None:
                    continue
                a = ax.axis - (rank - c.ndim)
                if a < 0 or c.shape[a] == 1:
                    continue
                ch = ax.mean_along(c, a, scaled=ax.scaled)
                fold = self._row_factor(rec["output"], ax) if rec["node"] in self.fold_adds else None
                if fold is not None:                   # the bias of a folded q projection
                    ch = ch * fold.reshape([-1 if j == a else 1 for j in range(c.ndim)])
                self.put(node, slot, ch, c)

    def depthwise(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["output"])
        if ax.identity:
            return
        W = self.value(node.input[1])
        self.put(node, 1, ax.mean_along(W, 0), W)
        if len(node.input) > 2 and node.input[2]:
            b = self.value(node.input[2])
            self.put(node, 2, ax.mean_along(b, 0), b)
        for at in node.attribute:
            if at.name == "group":
                at.i = ax.L_hat

    def channel_norm(self, rec):
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
        k, node = self.node(rec)
        ax = self.axis(rec["output"])
        if ax.identity:
            return
        Rm = ax.mean_matrix()
        vals = [self.value(x) if x else None for x in node.input]
        if node.op_type == "BatchNormalization" and not rec.get("training") and \
                all(v is not None and v.size == ax.L for v in vals[1:5]):
            e = rec.get("epsilon", 1e-5)
            sc, b, mean, var = (v.astype(np.float64).reshape(-1) for v in vals[1:5])
            mul = sc / np.sqrt(var + e)
            add = b - mul * mean
            mul_h, add_h, mean_h, var_h = (Rm @ v for v in (mul, add, mean, var))
            new = {1: mul_h * np.sqrt(var_h + e), 2: add_h + mul_h * mean_h, 3: mean_h, 4: var_h}
        else:
            new = {slot: Rm @ v.astype(np.float64).reshape(-1) for slot, v in enumerate(vals)
                   if slot and v is not None and v.size == ax.L}
        for slot, v in new.items():
            self.put(node, slot, v, vals[slot])

    def _weights_along(self, ax, rank, scale):
        shape = [1] * rank
        shape[ax.axis] = ax.L_hat
        return (ax.m * scale).reshape(shape)

    def reduce(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["input"])
        if ax.identity or rec["mode"] in ("ReduceMax", "ReduceMin") or self.prune:
            return                  # prune: the sum or mean over the kept units only
        rank = len(self.imp.shapes[rec["input"]])
        w = self._weights_along(ax, rank, ax.L_hat / ax.L if rec["mode"] == "mean" else 1.0)
        t = self.tmp(node.input[0])
        mul = helper.make_node("Mul", [node.input[0], self.const(w)], [t], name=self.tmp("fib_weight"))
        node.input[0] = t
        self.insert(k, [mul])

    def softmax(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["input"])
        if ax.identity or self.prune:
            return                  # prune: softmax over the kept units only
        rank = len(self.imp.shapes[rec["input"]])
        m = self._weights_along(ax, rank, 1.0)
        t_in, t_out = self.tmp(node.input[0]), self.tmp(node.output[0])
        out = node.output[0]
        add = helper.make_node("Add", [node.input[0], self.const(np.log(m))], [t_in], name=self.tmp("fib_logm"))
        node.input[0] = t_in
        node.output[0] = t_out
        fix = helper.make_node("Div" if rec["op"] == "Softmax" else "Sub",
                               [t_out, self.const(m if rec["op"] == "Softmax" else np.log(m))], [out],
                               name=self.tmp("fib_divm"))
        self.insert(k, [add])
        self.insert(k + 2, [fix])

    def multiplicities(self, rows):
        """Per row of node ids (a head's dims): the group size of each kept node
        (prune: 1, a kept node stands for itself)."""
        if self.prune:
            return np.ones((len(rows), int(self.kept[rows[0]].sum()) if len(rows) else 0))
        out = []
        for r in rows:
            g = self.gid[r]
            cnt = {int(x): int(c) for x, c in zip(*np.unique(g, return_counts=True))}
            out.append([cnt[int(x)] for x in g[self.kept[r]]])
        return np.array(out, dtype=np.float64)

    def _fold_plan(self):
        """Where q.k's multiplicities go into q's projection (DESIGN.md 6:
        "multiplicity folded into W_Q") instead of a Mul: the score's first
        operand is, up to layout ops and constant scalings, a linear layer's
        output or that plus a bias (Add of a constant), node for node, and
        nothing else reads those nodes.  Sets ``row_scale`` (per node: the
        factor of its row, bias included), ``fold_adds`` (bias Adds to scale)
        and ``folded`` (contractions that need no Mul)."""
        imp = self.imp
        self.row_scale = np.ones(imp.graph.n)
        self.fold_adds, self.folded = set(), set()
        contracts = [r for r in imp.records if r["kind"] == "contract"]
        if self.prune or not contracts:
            return
        lin_space = {r["space"]: r for r in imp.records if r["kind"] == "linear"}
        adds = [r for r in imp.records if r["kind"] == "elementwise" and r["op"] == "Add"
                and len(r["streams"]) == 1 and r["output"] in imp.layouts]
        producer = {o: n for n in imp.model.graph.node for o in n.output if o}
        for rec in contracts:
            A = rec["inputs"][0]
            ids = imp.layouts[A]
            L = ids.shape[-1]
            if L == 1:
                continue
            rows = ids.reshape(-1, L)
            m = self.multiplicities(rows)
            if np.all(m == 1):
                continue
            kn = np.concatenate([r[self.kept[r]] for r in rows])
            km = m.reshape(-1)
            na = np.unique(ids)
            first = {}
            if any(first.setdefault(int(a), b) != b for a, b in zip(kn, km)):
                continue                               # a node with two multiplicities
            if any(b.name != f"{rec['node']}:a" for b, _ in _readers(imp.graph.blocks, na)):
                continue
            sp_ = np.unique(imp.space_of[na])
            if sp_.size != 1:
                continue
            sp_ = int(sp_[0])
            scale = [(kn, km)]
            if sp_ in lin_space:
                target, add = lin_space[sp_]["output"], None
            else:
                add = next((r for r in adds if imp.space_of[imp.layouts[r["output"]].reshape(-1)[0]] == sp_), None)
                if add is None:
                    continue
                out_ids = imp.layouts[add["output"]]
                in_ids = imp.layouts.get(add["streams"][0])
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
                        lin_space[int(sps[0])]["output"] != add["streams"][0]:
                    continue
                if any(not np.isin(d, na).all() for _, d in _readers(imp.graph.blocks, src)):
                    continue
                target = add["output"]
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
                self.row_scale[nodes] *= f
            if add is not None:
                self.fold_adds.add(add["node"])
            self.folded.add(rec["node"])

    def _row_factor(self, tname, ax):
        """The fold factors of the kept positions of ``tname``'s axis (None: all 1)."""
        if ax.axis is None or not self.folded:
            return None
        f = self.row_scale[_nodes_along(self.imp.layouts[tname], ax.axis)[ax.keep_pos]]
        return None if np.all(f == 1) else f

    def contract(self, rec):
        """q.k over a unit axis: the kept position of a group of ``m`` head dims
        stands for ``m`` equal products, so A is scaled by ``m`` (0 nowhere:
        every kept position is a real group): folded into q's projection
        where :meth:`_fold_plan` allows, else a Mul."""
        if rec["node"] in self.folded:
            return
        k, node = self.node(rec)
        A = rec["inputs"][0]
        ids = self.imp.layouts[A]
        last = ids.ndim - 1
        if ids.shape[last] == 1:
            return
        m = self.multiplicities(np.moveaxis(ids, last, -1).reshape(-1, ids.shape[last]))
        if np.all(m == 1):
            return
        shape = list(ids.shape[:last]) + [m.shape[1]]
        m = np.moveaxis(m.reshape(shape), -1, last)
        t = self.tmp(A)
        node.input[0] = t
        self.insert(k, [helper.make_node("Mul", [A, self.const(m)], [t], name=self.tmp("fib_mult"))])

    def attention(self, rec):
        """The Attention op: q scaled by the multiplicity of its kept head dims,
        and the ORIGINAL 1/sqrt(head size) written as ``scale`` (the op would
        recompute it from the compressed size)."""
        k, node = self.node(rec)
        m = self.multiplicities(self.imp.layouts[rec["heads"]])      # (Hq, D)
        if m.shape[1] == rec["dh"]:
            return
        if not any(at.name == "scale" for at in node.attribute):
            node.attribute.append(helper.make_attribute("scale", float(1.0 / np.sqrt(rec["dh"]))))
        if not np.all(m == 1):
            mt = m.reshape(1, m.shape[0], 1, m.shape[1]) if rec["four"] else m.reshape(1, 1, -1)
            t = self.tmp(rec["q"])
            node.input[0] = t
            self.insert(k, [helper.make_node("Mul", [rec["q"], self.const(mt)], [t], name=self.tmp("fib_mult"))])

    def packed(self, rec):
        """Collected; written by :meth:`packed_cuts` after :meth:`cuts`."""
        self.pending_packed.append(rec)

    def packed_cuts(self):
        """A cut of a packed projection (q, k or v of torch's in_proj) becomes a
        Slice of its source along the unit axis, in kept positions: q, k and v
        each keep their own size.  The old reshape/transpose chain is left
        unread and dropped by :meth:`finish`."""
        valid = {(r["node"], r["output"]) for r in _packed(self.imp)[0]}
        for rec in self.pending_packed:
            if (rec["node"], rec["output"]) not in valid:
                continue
            src, u = rec["source"], rec["axis"]
            kept = self._kept_along(src, u)
            if kept.all():
                continue
            cs = np.cumsum(np.concatenate([[0], kept.astype(np.int64)]))
            a, b = int(cs[rec["start"]]), int(cs[rec["end"]])
            k, node = self.node(rec)
            out = rec["output"]
            node.output[list(node.output).index(out)] = self.tmp(out)
            if self.imp.opset < 10:
                sl = helper.make_node("Slice", [src], [out], starts=[a], ends=[b], axes=[u],
                                      name=self.tmp("fib_packed"))
            else:
                sl = helper.make_node("Slice", [src, self.const([a], np.int64), self.const([b], np.int64),
                                                self.const([u], np.int64)], [out], name=self.tmp("fib_packed"))
            self.insert(k + 1, [sl])

    def layernorm(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["input"])
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if ax.identity:
            return
        rank = len(self.imp.shapes[rec["input"]])
        gam = self.value(node.input[1])
        bet = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None

        def shrink(v):
            return ax.mean_along(v, ax.axis - (rank - v.ndim))

        g_hat = shrink(gam)
        b_hat = shrink(bet) if bet is not None else None
        if self.prune:
            # the LayerNorm of the kept units: statistics over them only
            self.put(node, 1, g_hat, gam)
            if b_hat is not None:
                self.put(node, 2, b_hat, bet)
            return
        w = self._weights_along(ax, rank, ax.L_hat / ax.L)
        axes = rec["axes"]
        x, y = node.input[0], node.output[0]
        eps = float(a.get("epsilon", 1e-5))
        opset = max([o.version for o in self.m.opset_import if o.domain in ("", "ai.onnx")] or [17])
        dt = gam.dtype

        def rmean(inp, out):
            if opset >= 18:
                return helper.make_node("ReduceMean", [inp, self.const(np.array(axes), np.int64)], [out],
                                        keepdims=1, name=self.tmp("fib_ln_mean"))
            return helper.make_node("ReduceMean", [inp], [out], axes=axes, keepdims=1, name=self.tmp("fib_ln_mean"))

        t = [self.tmp(y) for _ in range(9)]
        nodes = [helper.make_node("Mul", [x, self.const(w, dt)], [t[0]], name=self.tmp("fib_ln")),
                 rmean(t[0], t[1]),
                 helper.make_node("Sub", [x, t[1]], [t[2]], name=self.tmp("fib_ln")),
                 helper.make_node("Mul", [t[2], t[2]], [t[3]], name=self.tmp("fib_ln")),
                 helper.make_node("Mul", [t[3], self.const(w, dt)], [t[4]], name=self.tmp("fib_ln")),
                 rmean(t[4], t[5]),
                 helper.make_node("Add", [t[5], self.const(np.array(eps), dt)], [t[6]], name=self.tmp("fib_ln")),
                 helper.make_node("Sqrt", [t[6]], [t[7]], name=self.tmp("fib_ln")),
                 helper.make_node("Div", [t[2], t[7]], [t[8]], name=self.tmp("fib_ln"))]
        if b_hat is not None:
            t9 = self.tmp(y)
            nodes += [helper.make_node("Mul", [t[8], self.const(g_hat, dt)], [t9], name=self.tmp("fib_ln")),
                      helper.make_node("Add", [t9, self.const(b_hat, dt)], [y], name=self.tmp("fib_ln"))]
        else:
            nodes += [helper.make_node("Mul", [t[8], self.const(g_hat, dt)], [y], name=self.tmp("fib_ln"))]
        del self.g.node[k]
        self.insert(k, nodes)

    def recurrent(self, rec):
        """LSTM/GRU: per direction, gate blocks of W, R, B (and peepholes) by the
        hidden grouping (rows: mean; R's columns: sum), W's columns by the
        input's; ``hidden_size`` = the kept count (equal in both directions)."""
        k, node = self.node(rec)
        H, dirs = rec["H"], rec["dirs"]
        axes = [_Axis(self.imp.spaces[s].ids.reshape(1, H), self.gid, self.kept, self.prune) for s in rec["hidden"]]
        ax_x = self.axis(rec["input"])
        if all(a.identity for a in axes) and ax_x.identity:
            return
        Hh = axes[0].L_hat
        if any(a.L_hat != Hh for a in axes):
            raise RuntimeError("directions of a recurrent op keep different numbers of units")
        G = 4 if rec["op"] == "LSTM" else 3
        Cx = ax_x.sum_matrix()

        def blocks(M, nb, cols):
            out = []
            for d in range(dirs):
                Rm = axes[d].mean_matrix()
                C = cols(d)
                out.append(np.concatenate([(Rm @ M[d, g * H:(g + 1) * H]) @ C.T if C is not None
                                           else Rm @ M[d, g * H:(g + 1) * H] for g in range(nb)]))
            return np.stack(out)

        W = self.value(node.input[1])
        R = self.value(node.input[2])
        self.put(node, 1, blocks(W.astype(np.float64), G, lambda d: Cx), W)
        self.put(node, 2, blocks(R.astype(np.float64), G, lambda d: axes[d].sum_matrix()), R)
        if len(node.input) > 3 and node.input[3]:
            B = self.value(node.input[3])
            self.put(node, 3, blocks(B.astype(np.float64), 2 * G, lambda d: None), B)
        for slot in (5, 6):
            if len(node.input) > slot and node.input[slot]:
                if node.input[slot] in self.imp.layouts:
                    continue              # a state input: its units are kept distinct
                v = self.imp.consts.get(node.input[slot])
                if v is None or node.input[slot] in self.imp.computed:
                    node.input[slot] = ""     # computed zeros (checked by the importer): the default
                    continue
                v64 = np.moveaxis(v.astype(np.float64), rec["layout"], 0)     # (dirs, batch, H)
                vh = np.stack([v64[d] @ axes[d].mean_matrix().T for d in range(dirs)])
                self.put(node, slot, np.moveaxis(vh, 0, rec["layout"]), v)
        if len(node.input) > 7 and node.input[7]:
            P = self.value(node.input[7])
            self.put(node, 7, blocks(P.astype(np.float64), 3, lambda d: None), P)
        for at in node.attribute:
            if at.name == "hidden_size":
                at.i = Hh

    def kept_count(self, tname, axis):
        return int(self._kept_along(tname, axis).sum())

    def _shrunk(self, tname):
        """Unit axes of ``tname`` that the base shrinks: {axis: (L, L_hat)}."""
        ids = self.imp.layouts[tname]
        out = {}
        for j in _unit_axes(ids):
            k = self.kept_count(tname, j)
            if k < ids.shape[j]:
                out[j] = (ids.shape[j], k)
        return out

    def _patch(self, k, node, slot, dims, values, rank):
        """Input ``slot`` of ``node`` becomes Where(mask, values, old) over a shape vector."""
        mask = np.zeros(rank, dtype=bool)
        val = np.zeros(rank, dtype=np.int64)
        for j, v in zip(dims, values):
            mask[j], val[j] = True, v
        old, t = node.input[slot], self.tmp(node.input[slot])
        node.input[slot] = t          # before the insert: the node is a reference into the list
        self.insert(k, [helper.make_node("Where", [self.const(mask, bool), self.const(val, np.int64), old],
                                         [t], name=self.tmp("fib_shape"))])

    def _kept_along(self, tname, axis):
        """Kept positions along ``axis``.  Along the last unit axis (the one that
        shrinks: a cell's units) the nodes at index 0 of the other axes decide;
        along an outer unit axis (heads, q/k/v of a packed projection) a position
        is kept when any node of its slice is (the first feature of a head may be
        a pruned one)."""
        ids = self.imp.layouts[tname]
        ua = _unit_axes(ids)
        if len(ua) > 1 and axis != ua[-1]:
            return np.moveaxis(self.kept[ids], axis, 0).reshape(ids.shape[axis], -1).any(axis=1)
        return self.kept[_nodes_along(ids, axis)]

    def cuts(self):
        """Split, Slice and Gather along a shrunk unit axis: sizes, bounds and
        indices in kept positions (a merged position reads its group's kept one)."""
        for node in list(self.g.node):
            op = node.op_type
            if op not in ("Split", "Slice", "Gather") or not node.input or node.input[0] not in self.imp.layouts \
                    or node.name in self.own:
                continue
            x = node.input[0]
            sh = self._shrunk(x)
            rank = len(self.imp.shapes[x])
            axes = [a for a in _op_axes(self.imp, node, rank) if a in sh]
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
                kept = self._kept_along(x, ax)
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
                axis_map = _Axis(np.moveaxis(self.imp.layouts[x], ax, 0)[(slice(None),) + (0,) * (rank - 1)]
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
                sh = self._shrunk(node.input[0])
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
                            name=self.tmp("fib_shape"))])
                        k += 1
            elif node.op_type == "Reshape" and node.output[0] in self.imp.layouts:
                sh = self._shrunk(node.output[0])
                if sh:
                    rank = len(self.imp.shapes[node.output[0]])
                    if node.input[1] in self.imp.consts:
                        t = np.asarray(self.imp.consts[node.input[1]]).astype(np.int64).copy()
                        for j, (_, kk) in sh.items():
                            t[j] = kk
                        self.put(node, 1, t, t)
                    else:
                        self._patch(k, node, 1, list(sh), [kk for _, kk in sh.values()], rank)
                        k += 1
                    for at in node.attribute:
                        if at.name == "allowzero":
                            at.i = 0
            k += 1

    def finish(self):
        from .onnx.load import outer_refs as _outer_refs

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
        keep = [t for t in self.g.initializer if t.name in used]
        dropped = {t.name for t in self.g.initializer} - {t.name for t in keep}
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
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


def _column_scales(imp, scales):
    """Per node: the rescaling merge's scale of its column (the nodes joins tie
    position by position: a layer and the bias add after it).  A column takes
    the scale of its LAST node set (the largest space index: the one the next
    layer reads); columns with no scale are 1.  Only node sets the importer
    marks homogeneous carry scales, and a column holding one holds only such
    sets (see ``onnx_dag._homogeneous_spaces``), so for exact fibers every
    node set of a column is scaled alike and any choice is exact."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    scales = np.asarray(scales, dtype=np.float64)
    n = imp.graph.n
    if n == 0 or np.all(scales == 1):
        return None
    if imp.joins:
        a = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p, _ in imp.joins])
        b = np.concatenate([np.asarray(q, dtype=np.int64).reshape(-1) for _, q in imp.joins])
    else:
        a = b = np.zeros(0, np.int64)
    _, comp = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(n, n)), directed=False)
    order = np.lexsort((np.arange(n), imp.space_of, comp))        # last of each column: its head
    last = np.ones(n, dtype=bool)
    last[:-1] = comp[order][1:] != comp[order][:-1]
    head = np.empty(int(comp.max()) + 1, dtype=np.int64)
    head[comp[order][last]] = order[last]
    return scales[head[comp]]


def write_dag_base(imp, labels, mode="merge", keep_pref=None, groups=None, scales=None):
    """The compressed ONNX model of ``imp`` under the colouring ``labels``;
    returns ``(model, gid, kept, why)``.

    ``mode="merge"`` (the base): a kept node stands for its group (rows
    averaged, input columns summed, multiplicities in sums over units).
    ``mode="prune"``: the groups only say which nodes vanish; the kept node of
    each group (the one with the largest ``keep_pref``, per node) keeps its
    rows as they are, the input columns of the other members are dropped, and
    every multiplicity is 1 (LayerNorm, means and softmax over the kept units).
    ``groups``: ``dag_groups(imp, labels, keep_pref)`` when the caller has it.
    ``scales``: per node, the rescaling merge's scales (``Refinement.scales``;
    None: all 1)."""
    if mode not in ("merge", "prune"):
        raise ValueError(f"mode must be 'merge' or 'prune', got {mode!r}")
    gid, kept, why = groups if groups is not None else dag_groups(imp, labels, keep_pref)
    w = _Writer(imp, gid, kept, prune=mode == "prune", scales=scales, labels=labels)
    for rec in imp.records:
        getattr(w, rec["kind"])(rec)
    w.cuts()
    w.packed_cuts()
    w.shapes()
    return w.finish(), gid, kept, why
