"""Column grouping of the base writer (docs/design.md sections 5-6): which
positions of a coloured DAG model the base keeps.

Positions that element-wise ops, contractions and recurrences tie together
(a residual stream's every writer and reader, an LSTM's gates, cell and hidden
state) form one *family* (a *column*); its positions are grouped by the meet
of the colours of all its node sets (the AND rule), and one position per group
is kept.  Because nodes of one colour carry equal values, keeping any
refinement of the colouring is exact; a family whose layout cannot be
rewritten (units on two axes of one tensor, as attention heads, or a computed
shape that names a unit axis) keeps every position, and the report says why.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from fibgraph.partition import canonical

from ..records import SINGLE_AXIS_KINDS, Kind

__all__ = [
    "dag_groups",
    "group_columns",
    "join_components",
    "nodes_along",
    "op_axes",
    "packed_records",
    "readers",
    "unit_axes",
]


def unit_axes(ids):
    return [k for k in range(ids.ndim) if ids.shape[k] > 1]


def nodes_along(ids, axis):
    """The node ids along ``axis`` of a layout, at index 0 of its other axes."""
    return np.moveaxis(ids, axis, 0).reshape(ids.shape[axis], -1)[:, 0]


def packed_records(imp):
    """The ``packed`` records (a packed projection cut into q, k, v: see
    ``fibgraph.importers.onnx.rules.movement.packed_cut``) the writer rewrites as Slices of their
    source, and the tensors between (``region``: units on several axes) that
    the rewrite leaves unread, so their cells need not keep equal sizes.  A
    record is used only when every reader of its region is part of such a
    chain (no Shape, no other op reads the packed layout)."""
    recs = [r for r in imp.records if r.kind is Kind.PACKED]
    if not recs:
        return [], set()
    consumers = {}
    for n in imp.model.graph.node:
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(n)
    graph_out = {o.name for o in imp.model.graph.output}
    while True:
        region = {t for r in recs for t in r.region}
        outs = {r.output for r in recs}
        bad = {t for t in region if t in graph_out or any(
            o and o not in region and o not in outs and (o in consumers or o in graph_out)
            for n in consumers.get(t, []) for o in n.output)}
        keep = [r for r in recs if not bad & set(r.region)]
        if len(keep) == len(recs):
            return recs, region
        recs = keep


def readers(blocks, nodes):
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


def join_components(imp):
    """Per node: its column (:func:`fibgraph.groups.tie_columns` of ``imp.joins``:
    nodes tied position by position by element-wise ops, contractions and recurrences)."""
    from ..groups import columns_of

    return columns_of(imp)


def dag_groups(imp, labels, keep_pref=None):
    """Per node: its group (``gid``) and whether it is kept; per space the reason
    its units were kept whole (or None).  ``keep_pref`` (per node, optional):
    the kept column of a group is the one whose nodes have the largest
    preference (ties: the smallest column), not simply the smallest column."""
    d = group_columns(imp, labels, keep_pref)
    return d["gid"], d["kept"], d["why"]


def group_columns(imp, labels, keep_pref=None, split=True):
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
    from fibgraph.hashing import mix as _mix

    n = imp.graph.n
    space_of = imp.space_of
    col = canonical(join_components(imp))
    n_col = int(col.max()) + 1 if n else 0
    why = [None] * len(imp.spaces)
    unique = np.zeros(n_col, dtype=bool)           # columns that may not merge
    unique[col[imp.keep]] = True
    multi = {t: ids for t, ids in imp.layouts.items() if len(unit_axes(ids)) > 1}
    # layouts the writer can only rewrite along one axis
    single_only = set()
    for rec in imp.records:
        if rec.kind in SINGLE_AXIS_KINDS:
            single_only.update(x for x in (getattr(rec, "input", None), getattr(rec, "output", None)) if x)
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
        ua = unit_axes(ids)
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
    packed_region = packed_records(imp)[1]
    for _ in range(n_col + 1 if split else 0):
        changed = False
        for t, ids in multi.items():
            if t in packed_region:
                continue
            ua = unit_axes(ids)
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
    Reshape are rewritten instead: see ``Writer.shapes``.)"""
    blocked = set()
    for node in imp.model.graph.node:
        op = node.op_type
        if not node.input or node.input[0] not in imp.layouts:
            continue
        ids = imp.layouts[node.input[0]]
        ua = unit_axes(ids)
        if not ua:
            continue
        bad = False
        if op in ("Size", "Expand", "Tile", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth"):
            bad = op in ("Size", "DepthToSpace", "SpaceToDepth") or _shape_param_on_axes(imp, node, ua)
        elif op in ("Slice", "Gather", "Split"):
            # whole cells may be picked; a cut along the shrinking axis is rewritten
            # when its bounds are constants (see Writer.cuts)
            bad = ua[-1] in op_axes(imp, node, ids.ndim) and not _cut_constant(imp, node)
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


def op_axes(imp, node, rank):
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
