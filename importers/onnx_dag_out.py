"""The base of a coloured DAG model written back as ONNX (DESIGN.md sections 5-6).

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
- per-unit constants (bias adds, BatchNorm, PRelu, LayerNorm's gamma/beta):
  the mean over the group;
- sums over a unit axis (ReduceMean/ReduceSum, LayerNorm's statistics,
  softmax's denominator, q.k over head dims): weighted by the group sizes
  ``m``, so that the compressed model sums what the original summed;
- LSTM/GRU: ``hidden_size`` = number of hidden groups, gate blocks
  compressed with the hidden grouping, ``R`` by rows and columns.
"""
from __future__ import annotations

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import helper, numpy_helper

from fibgraph.partition import canonical

__all__ = ["dag_groups", "write_dag_base"]


class _UF:
    def __init__(self, n):
        self.p = np.arange(n)

    def find_all(self):
        p = self.p
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q

    def union(self, a, b):
        # vectorised union by repeated pointer jumping (small graphs: a few passes)
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        for _ in range(64):
            ra, rb = self.find_all()[a], self.find_all()[b]
            diff = ra != rb
            if not diff.any():
                return
            lo, hi = np.minimum(ra[diff], rb[diff]), np.maximum(ra[diff], rb[diff])
            self.p[hi] = lo
        raise RuntimeError("union-find did not converge")


def _unit_axes(ids):
    return [k for k in range(ids.ndim) if ids.shape[k] > 1]


def dag_groups(imp, labels):
    """Per node: its group (``gid``, global) and whether it is kept; per space the
    reason it was left uncompressed (or None).  See the module doc."""
    n = imp.graph.n
    uf = _UF(n)
    for a, b in imp.joins:
        uf.union(a, b)
    col = uf.find_all()
    space_of = imp.space_of
    n_sp = len(imp.spaces)
    why = [None] * n_sp
    # a space with two nodes in one column, or not all its nodes in the family, is not a position set
    fam_of_col = canonical(col)                       # column ids
    # family = connected spaces through columns
    fam_uf = _UF(n_sp)
    sp_col = np.stack([space_of, fam_of_col], 1)
    order = np.lexsort((space_of, fam_of_col))
    sc = sp_col[order]
    same_col = sc[1:, 1] == sc[:-1, 1]
    fam_uf.union(sc[1:, 0][same_col], sc[:-1, 0][same_col])
    fam = fam_uf.find_all()
    # validity: every space of a family has exactly one node per column of the family
    cols_per_fam = {}
    for f in np.unique(fam):
        members = np.nonzero(fam == f)[0]
        nodes = np.concatenate([imp.spaces[s].ids for s in members])
        c = fam_of_col[nodes]
        ncol = np.unique(c).size
        ok = all(imp.spaces[s].n == ncol and np.unique(fam_of_col[imp.spaces[s].ids]).size == ncol
                 for s in members)
        cols_per_fam[int(f)] = (members, ok)
        if not ok:
            for s in members:
                why[s] = "units tied to other positions of the same layer (e.g. q and k of one projection)"
    # tensors with units on two axes (heads x head dims, directions x hidden) cannot shrink one axis
    for t, ids in imp.layouts.items():
        if len(_unit_axes(ids)) > 1:
            for s in np.unique(space_of[ids.reshape(-1)]):
                for m in cols_per_fam[int(fam[s])][0]:
                    why[m] = why[m] or f"tensor {t!r} has units on several axes (heads or directions)"
    for s in _shape_blocked(imp, space_of):
        for m in cols_per_fam[int(fam[s])][0]:
            why[m] = why[m] or "a computed shape or an index names its unit axis"
    gid = np.arange(n, dtype=np.int64)
    keep_col = imp.keep
    for f, (members, ok) in cols_per_fam.items():
        if not ok or any(why[s] for s in members):
            continue
        # key per column: colours of the node of each member space in it
        base = imp.spaces[members[0]]
        cols0 = fam_of_col[base.ids]
        pos_in = {}
        keys = np.zeros((base.n, len(members)), dtype=np.int64)
        for j, s in enumerate(members):
            sp_ = imp.spaces[s]
            c = fam_of_col[sp_.ids]
            # place node colours at the position of their column in the base space
            where = np.empty(c.max() + 1, dtype=np.int64)
            where[cols0] = np.arange(base.n)
            keys[where[c], j] = labels[sp_.ids]
            kept = imp.keep[sp_.ids]
            if kept.any():
                keys[where[c[kept]], j] = -1 - np.nonzero(kept)[0]
        g = canonical(keys)                          # group per position of the base space
        # global group ids: per column (node of the base space)
        for s in members:
            sp_ = imp.spaces[s]
            c = fam_of_col[sp_.ids]
            where = np.empty(c.max() + 1, dtype=np.int64)
            where[cols0] = np.arange(base.n)
            gid[sp_.ids] = base.start + g[where[c]]    # unique per (family, group)
    # the kept node of a group: its first position in every space (rep column shared)
    rep_col = {}
    kept = np.zeros(n, dtype=bool)
    for s, sp_ in enumerate(imp.spaces):
        ids = sp_.ids
        g = gid[ids]
        # rep column: the column of the first node (in the family's base space order) of the group
        for k, node in enumerate(ids):
            gg = int(g[k])
            if gg not in rep_col:
                rep_col[gg] = int(fam_of_col[node])
        kept[ids] = np.array([rep_col[int(x)] == int(fam_of_col[v]) for x, v in zip(g, ids)])
    return gid, kept, why


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
            bad = any(a in ua for a in _op_axes(imp, node, ids.ndim))
        if bad:
            blocked.update(int(s) for s in np.unique(space_of[ids.reshape(-1)]))
    return blocked


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
    standing for position ``p``; ``L_hat`` kept positions; ``m`` group sizes."""

    def __init__(self, ids, gid, kept):
        ua = _unit_axes(ids)
        self.axis = ua[0] if ua else None
        if self.axis is None:
            self.L = self.L_hat = 1
            self.target = np.zeros(1, np.int64)
            self.m = np.ones(1)
            self.identity = True
            return
        nodes = np.moveaxis(ids, self.axis, 0).reshape(ids.shape[self.axis], -1)[:, 0]
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
        self.m = np.bincount(self.target, minlength=self.L_hat).astype(np.float64)
        self.identity = self.L_hat == self.L

    def sum_matrix(self):
        """(L_hat, L) indicator: columns of a group add up."""
        return sp.csr_matrix((np.ones(self.L), (self.target, np.arange(self.L))), shape=(self.L_hat, self.L))

    def mean_matrix(self):
        return sp.diags(1.0 / self.m) @ self.sum_matrix()


class _Writer:
    def __init__(self, imp, gid, kept):
        self.imp = imp
        self.gid, self.kept = gid, kept
        self.m = onnx.ModelProto()
        self.m.CopyFrom(imp.model)
        self.g = self.m.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.nodes = {n.name: n for n in self.g.node if n.name}
        self.counter = 0
        self.new_nodes = {}          # node name -> list of (before|after, nodes)

    def axis(self, tname):
        return _Axis(self.imp.layouts[tname], self.gid, self.kept)

    def node(self, rec):
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
        self.counter += 1
        name = f"{node.input[slot] or 'fib'}__base{self.counter}"
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value).astype(dt), name))
        node.input[slot] = name
        return name

    def const(self, value, dtype=np.float32):
        self.counter += 1
        name = f"fib_const{self.counter}"
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value).astype(dtype), name))
        return name

    def insert(self, index, nodes):
        for k, n in enumerate(nodes):
            self.g.node.insert(index + k, n)

    def tmp(self, base):
        self.counter += 1
        return f"{base}__fib{self.counter}"

    # ---- per record
    def linear(self, rec):
        k, node = self.node(rec)
        ax_in = self.axis(rec["input"])
        ax_out = self.axis(rec["output"])
        if ax_in.identity and ax_out.identity:
            return
        op = rec["op"]
        wname = node.input[1] if op != "MatMul" or rec["x_axis"] == -1 else node.input[0]
        slot = 1 if wname == node.input[1] else 0
        W = self.value(wname)
        dt = W.dtype
        W = W.astype(np.float64)
        a = rec["attrs"]
        Rm = ax_out.mean_matrix()
        C = ax_in.sum_matrix()

        def rows_cols(M):          # M (n_out, n_in, ...) -> compressed
            sh = M.shape
            M2 = M.reshape(sh[0], -1)
            M2 = Rm @ M2
            M3 = M2.reshape(ax_out.L_hat, sh[1], -1).transpose(1, 0, 2).reshape(sh[1], -1)
            M3 = C @ M3
            return M3.reshape(ax_in.L_hat, ax_out.L_hat, *sh[2:]).swapaxes(0, 1)

        if op in ("Conv",):
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
        self.put(node, slot, Wh, W.astype(dt))
        bslot = 2 if op in ("Gemm", "Conv", "ConvTranspose") else None
        if bslot is not None and len(node.input) > 2 and node.input[2]:
            b = self.value(node.input[2])
            if b.size > 1:
                bh = (Rm @ b.astype(np.float64).reshape(ax_out.L, -1)).reshape((ax_out.L_hat,) + b.shape[1:]) \
                    if b.shape[0] == ax_out.L else (Rm @ b.reshape(-1).astype(np.float64)).reshape(
                        b.shape[:-1] + (ax_out.L_hat,))
                self.put(node, 2, bh, b)

    def embedding(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["output"])
        if ax.identity:
            return
        T = self.value(node.input[0])
        self.put(node, 0, (ax.mean_matrix() @ T.astype(np.float64).T).T, T)

    def elementwise(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["output"])
        if ax.identity:
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
                ch = np.moveaxis(c.astype(np.float64), a, 0)
                sh = ch.shape
                ch = (ax.mean_matrix() @ ch.reshape(sh[0], -1)).reshape((ax.L_hat,) + sh[1:])
                self.put(node, slot, np.moveaxis(ch, 0, a), c)

    def depthwise(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["output"])
        if ax.identity:
            return
        W = self.value(node.input[1])
        Rm = ax.mean_matrix()
        self.put(node, 1, (Rm @ W.astype(np.float64).reshape(W.shape[0], -1)).reshape((ax.L_hat,) + W.shape[1:]), W)
        if len(node.input) > 2 and node.input[2]:
            b = self.value(node.input[2])
            self.put(node, 2, Rm @ b.astype(np.float64), b)
        for at in node.attribute:
            if at.name == "group":
                at.i = ax.L_hat

    def channel_norm(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["output"])
        if ax.identity:
            return
        Rm = ax.mean_matrix()
        for slot in range(1, len(node.input)):
            v = self.value(node.input[slot])
            if v is not None and v.size == ax.L:
                self.put(node, slot, Rm @ v.astype(np.float64).reshape(-1), v)

    def _weights_along(self, ax, rank, scale):
        shape = [1] * rank
        shape[ax.axis] = ax.L_hat
        return (ax.m * scale).reshape(shape)

    def reduce(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["input"])
        if ax.identity or rec["mode"] in ("ReduceMax", "ReduceMin"):
            return
        rank = len(self.imp.shapes[rec["input"]])
        w = self._weights_along(ax, rank, ax.L_hat / ax.L if rec["mode"] == "mean" else 1.0)
        t = self.tmp(node.input[0])
        mul = helper.make_node("Mul", [node.input[0], self.const(w)], [t], name=self.tmp("fib_weight"))
        node.input[0] = t
        self.insert(k, [mul])

    def softmax(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["input"])
        if ax.identity:
            return
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

    def contract(self, rec):
        k, node = self.node(rec)
        A = rec["inputs"][0]
        ids = self.imp.layouts[A]
        ax = _Axis(ids, self.gid, self.kept)
        if ax.identity or ax.axis != ids.ndim - 1:
            return
        m = self._weights_along(ax, ids.ndim, 1.0)
        t = self.tmp(A)
        self.insert(k, [helper.make_node("Mul", [A, self.const(m)], [t], name=self.tmp("fib_mult"))])
        node.input[0] = t

    def layernorm(self, rec):
        k, node = self.node(rec)
        ax = self.axis(rec["input"])
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if ax.identity:
            return
        rank = len(self.imp.shapes[rec["input"]])
        Rm = ax.mean_matrix()
        gam = self.value(node.input[1])
        bet = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None

        def shrink(v):
            a2 = ax.axis - (rank - v.ndim)
            vh = np.moveaxis(v.astype(np.float64), a2, 0)
            sh = vh.shape
            return np.moveaxis((Rm @ vh.reshape(sh[0], -1)).reshape((ax.L_hat,) + sh[1:]), 0, a2)

        g_hat = shrink(gam)
        b_hat = shrink(bet) if bet is not None else None
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
        k, node = self.node(rec)
        if rec["dirs"] != 1:
            return
        H = rec["H"]
        hs = self.imp.spaces[rec["hidden"][0]]
        ids = hs.ids.reshape(1, H)
        ax_h = _Axis(ids, self.gid, self.kept)
        ax_x = self.axis(rec["input"])
        if ax_h.identity and ax_x.identity:
            return
        G = 4 if rec["op"] == "LSTM" else 3
        Rm, Ch, Cx = ax_h.mean_matrix(), ax_h.sum_matrix(), ax_x.sum_matrix()
        Hh = ax_h.L_hat
        W = self.value(node.input[1])
        R = self.value(node.input[2])
        Wf, Rf = W.astype(np.float64)[0], R.astype(np.float64)[0]
        Wh = np.concatenate([Rm @ Wf[g * H:(g + 1) * H] @ Cx.T for g in range(G)])
        Rh = np.concatenate([Rm @ Rf[g * H:(g + 1) * H] @ Ch.T for g in range(G)])
        self.put(node, 1, Wh[None], W)
        self.put(node, 2, Rh[None], R)
        if len(node.input) > 3 and node.input[3]:
            B = self.value(node.input[3])
            Bf = B.astype(np.float64)[0]
            Bh = np.concatenate([Rm @ Bf[g * H:(g + 1) * H] for g in range(2 * G)])
            self.put(node, 3, Bh[None], B)
        for slot in (5, 6):
            if len(node.input) > slot and node.input[slot]:
                if node.input[slot] in self.imp.layouts:
                    continue              # a state input: its units are kept distinct
                v = self.imp.consts.get(node.input[slot])
                if v is None:
                    node.input[slot] = ""     # computed zeros (checked by the importer): the default
                    continue
                vh = v.astype(np.float64)
                vh = (vh.reshape(-1, H) @ Rm.T).reshape(v.shape[:-1] + (Hh,))
                self.put(node, slot, vh, v)
        if len(node.input) > 7 and node.input[7]:
            P = self.value(node.input[7])
            Pf = P.astype(np.float64)[0]
            self.put(node, 7, np.concatenate([Rm @ Pf[g * H:(g + 1) * H] for g in range(3)])[None], P)
        for at in node.attribute:
            if at.name == "hidden_size":
                at.i = Hh

    def kept_count(self, tname, axis):
        ids = self.imp.layouts[tname]
        nodes = np.moveaxis(ids, axis, 0).reshape(ids.shape[axis], -1)[:, 0]
        return int(self.kept[nodes].sum())

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
        used = {x for n in self.g.node for x in n.input}
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        # drop value_info (shapes changed) and intermediate shapes of the outputs' batch axes stay
        del self.g.value_info[:]
        return self.m


def write_dag_base(imp, labels):
    """The compressed ONNX model of ``imp`` under the colouring ``labels``;
    returns ``(model, gid, kept, why)``."""
    gid, kept, why = dag_groups(imp, labels)
    w = _Writer(imp, gid, kept)
    for rec in imp.records:
        getattr(w, rec["kind"])(rec)
    w.shapes()
    return w.finish(), gid, kept, why
