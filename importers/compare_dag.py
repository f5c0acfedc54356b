"""``compare-methods`` on the hypergraph path (residual streams, LSTM/GRU,
attention, LayerNorm): fibration bases against pruning and folding at exactly
the fibration base's node counts.

The unit of choice is a *column*: the nodes that joins tie position by
position (a layer's units and its bias add, an LSTM unit's gates, cell and
hidden state, one feature of a residual stream with all its writers and
readers, a head dim's q and k): the columns of one
:class:`fibgraph.groups.Group` (:func:`fibgraph.importers.onnx.groups.groups_of`,
``Group.columns``).  Columns with the same structure (the same
node sets and slots, the same attention cell, see
:func:`fibgraph.importers.onnx.write.group_columns`) form a *column class*; a class
lies inside one group, and every group of the writer lies inside one class.  For every class that the
fibration base shrinks to ``k`` kept columns, each baseline chooses its own
``k`` columns of that class:

- ``random``: ``k`` columns drawn uniformly (seeded);
- ``l2`` / ``l1``: the ``k`` columns with the largest L2 / L1 norm of their
  input-weight rows (every dense block writing into a node of the column:
  linear and conv rows, embedding rows, LSTM/GRU ``W`` and ``R`` rows of all
  gates);
- ``fold``: k-means (seeded) on each column's input-weight rows, constant
  edges (biases, LayerNorm gamma/beta, BatchNorm parameters) and
  output-weight columns (every dense block reading a node of the column);
  the clusters are merged by the writer's base formula (rows averaged, input
  columns summed, multiplicities in sums over units): Model Folding.

Pruning is written with ``write_dag_base(mode="prune")``: the kept columns
keep their rows as they are, the dropped ones vanish (no sums, no
multiplicities: LayerNorm, means and softmax run over the kept units only;
attention keeps the original 1/sqrt(head size)).  Attention head dims are
chosen per head (a head is a class), so every head keeps the fibration's
size.  Classes the fibration keeps whole are kept whole by every method.
"""
from __future__ import annotations

import os

import numpy as np

from fibgraph.baselines import METHODS, PRUNING, kmeans_labels, prune_scores
from fibgraph.errors import InputError
from fibgraph.partition import canonical

from fibgraph.progress import task

from .onnx.write import group_columns, write_dag_base
from .scoring import evaluate_any, feeds_eval as eval_data

__all__ = ["DagMethods", "compare_dag_methods", "eval_data", "evaluate_any"]


class DagMethods:
    """A hypergraph import with its column classes and per-column features."""

    def __init__(self, imp):
        from .onnx.groups import groups_of, weight_uses

        self.imp = imp
        n = imp.graph.n
        z = group_columns(imp, np.zeros(n, dtype=np.int64), split=False)
        self.col = z["col"]
        self.slot = z["slot"]
        self.n_col = int(self.col.max()) + 1 if n else 0
        self.cls = canonical(z["gid_col"])                 # column -> class
        self.n_cls = int(self.cls.max()) + 1 if self.n_col else 0
        self.cls_size = np.bincount(self.cls, minlength=self.n_cls)
        self.pos = np.empty(self.n_col, dtype=np.int64)     # column -> index inside its class
        order = np.argsort(self.cls, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.cls_size)[:-1]])
        self.pos[order] = np.arange(self.n_col) - np.repeat(starts, self.cls_size)
        self.members = np.split(order, np.cumsum(self.cls_size)[:-1]) if self.n_col else []
        # the group of each column (-1: none holds a weight); every class lies inside one group
        self.groups = groups_of(imp)
        self.group_of_col = np.full(self.n_col, -1, dtype=np.int64)
        for k, g in enumerate(self.groups):
            self.group_of_col[g.columns] = k
        # one entry per weight (an unrolled loop's steps: the first) and per node
        # set (W and R of one LSTM/GRU count once, under W's name)
        self.entries = []
        for u, _ in weight_uses(imp):
            if any(u.weight == e[0] or np.array_equal(u.units, e[1]) for e in self.entries):
                continue
            self.entries.append((u.weight, u.units))

    # ---------------------------------------------------------- counts
    def kept_columns(self, kept):
        kc = np.zeros(self.n_col, dtype=bool)
        kc[self.col[kept]] = True
        return kc

    def class_counts(self, kept):
        return np.bincount(self.cls, weights=self.kept_columns(kept), minlength=self.n_cls).astype(np.int64)

    def entry_counts(self, kept):
        return [int(kept[ids].sum()) for _, ids in self.entries]

    # ---------------------------------------------------------- features
    def features(self, classes, with_out=True, with_const=True):
        """Per class in ``classes``: (input rows, constant edges, output columns)
        as matrices with one row per column of the class (in class order)."""
        want = np.zeros(self.n_cls, dtype=bool)
        want[list(classes)] = True
        pieces = {int(c): {"in": [], "const": [], "out": []} for c in classes}
        const_node = np.zeros(self.imp.graph.n, dtype=bool)
        for s in self.imp.spaces:
            if s.kind == "const":
                const_node[s.start:s.start + s.n] = True

        def add(nodes, M, role):
            c = self.col[nodes]
            cl = self.cls[c]
            sel = want[cl]
            if not sel.any():
                return
            nodes, M, c, cl = nodes[sel], M[sel], c[sel], cl[sel]
            # several nodes of one column in this block (q and k of a packed
            # projection): side by side, by their order in the block
            o = np.lexsort((np.arange(c.size), c))
            run = np.ones(c.size, dtype=bool)
            run[1:] = c[o][1:] != c[o][:-1]
            start = np.maximum.accumulate(np.where(run, np.arange(c.size), 0))
            rank = np.empty(c.size, dtype=np.int64)
            rank[o] = np.arange(c.size) - start
            for u in np.unique(cl):
                s = cl == u
                r = rank[s]
                F = np.zeros((self.cls_size[u], int(r.max()) + 1, M.shape[1]))
                F[self.pos[c[s]], r] = M[s]
                pieces[int(u)][role].append(F.reshape(self.cls_size[u], -1))

        for b in self.imp.graph.blocks:
            if b.dense:
                W = np.asarray(b.weight, dtype=np.float64)
                add(b.dst, W.reshape(W.shape[0], -1), "in")
                if with_out:
                    add(b.src, W.transpose(1, 0, 2).reshape(W.shape[1], -1), "out")
            elif with_const and b.src.size and const_node[b.src].all():
                V = np.zeros((b.dst.size, b.values.shape[1]))
                np.add.at(V, b.rows, np.asarray(b.values, dtype=np.float64))
                add(b.dst, V, "const")
        out = {}
        for u, p in pieces.items():
            k = self.cls_size[u]
            out[u] = {r: (np.hstack(v) if v else np.zeros((k, 0))) for r, v in p.items()}
        return out

    # ---------------------------------------------------------- baselines
    def partition(self, method, counts, seed=0):
        """``(group of each column, keep preference of each column)`` for
        ``method`` with ``counts[c]`` kept columns in class ``c``."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != self.cls_size.shape:
            raise ValueError(f"need one count per column class ({self.n_cls}), got {counts.size}")
        if (counts < 1).any():
            raise ValueError(f"column class {int(np.argmax(counts < 1))}: fewer than 1 kept column")
        group = np.arange(self.n_col, dtype=np.int64)
        pref = np.zeros(self.n_col)
        shrink = [int(c) for c in np.flatnonzero(counts < self.cls_size)]
        if not shrink:
            return group, pref
        if method in PRUNING and method != "random":
            feats = self.features(shrink, with_out=False, with_const=False)
        elif method == "fold":
            feats = self.features(shrink)
        rng = np.random.default_rng(seed)
        for u in shrink:
            cols = self.members[u]           # in class order (pos 0, 1, ...)
            k = int(counts[u])
            if k < 1:
                raise ValueError(f"column class {u}: {k} kept columns")
            if method == "fold":
                f = feats[u]
                X = np.hstack([f["in"], f["const"], f["out"]])
                lab = kmeans_labels(X, k, seed) if X.shape[1] else np.minimum(np.arange(cols.size), k - 1)
                group[cols] = cols[np.unique(lab, return_index=True)[1]][lab]   # a member names the cluster
                continue
            score = prune_scores(np.zeros((cols.size, 0)) if method == "random" else feats[u]["in"], method, rng)
            keep = np.sort(np.argsort(-score, kind="stable")[:k])
            pref[cols[keep]] = 1.0
            # dropped columns vanish: they join the group of the first kept one
            drop = np.setdiff1d(np.arange(cols.size), keep)
            group[cols[drop]] = cols[keep[0]]
        return group, pref

    def write(self, method, counts, seed=0):
        """``(model, kept)`` of ``method`` at ``counts`` kept columns per class."""
        group, pref = self.partition(method, counts, seed)
        labels = group[self.col]
        mode = "merge" if method == "fold" else "prune"
        m2, gid, kept, _ = write_dag_base(self.imp, labels, mode=mode, keep_pref=pref[self.col])
        self.last = (gid, kept, mode)          # what the repair's output map reads
        if not np.array_equal(self.class_counts(kept), np.minimum(counts, self.cls_size)) or \
                not np.array_equal(canonical(np.stack([group[self.col], self.slot], 1)), gid):
            raise ValueError("these kept counts per column class cannot be written: the cells of one "
                             "tensor (heads; q, k, v of a packed projection) must keep equal sizes")
        return m2, kept


def _finetune(m2, calib, epochs, seed):
    """``m2`` trained ``epochs`` epochs on ``calib`` (see :func:`compare_dag_methods`)."""
    try:
        from .onnx.to_torch import OnnxModule
        from .torch_train import retune
    except ImportError:
        raise InputError("--finetune-epochs needs torch: pip install torch==2.13.0 (CPU build)") from None
    from .onnx.runtime import load_data

    xy = load_data(calib, need_y=True)
    mod = OnnxModule(m2)
    retune(mod, xy, xy, lr=1e-3, batch=100, max_epochs=int(epochs), patience=int(epochs) + 1, seed=seed)
    return mod.to_onnx()


def compare_dag_methods(model, imp, data, xy, eps_list, eps_files=(), linkage="complete", metric="cosine",
                        methods=METHODS, seed=0, on_point=None, keeps=(), calib=None, finetune_epochs=0):
    """The rows of :func:`fibgraph.importers.compare.compare_methods` for a model of the
    hypergraph path (``imp`` its :class:`~fibgraph.importers.onnx.importer.DagImport`).

    ``keeps``: fractions of the parameters; for each, the fibration base of
    :func:`fibgraph.importers.keep.keep_search` (data-aware on ``calib``, an
    .npz path, else data-free) fixes the units per column class, and every
    baseline keeps exactly as many.  ``calib``: also a ``<method>+repair`` row
    per model, the repair of :mod:`fibgraph.importers.repair` on ``calib``
    (the same for pruning, folding and fibration).  ``finetune_epochs`` (needs
    ``calib`` and torch): also a ``<row>+ft`` row per model, the model as an
    :class:`~fibgraph.importers.onnx.to_torch.OnnxModule` trained that many
    epochs on ``calib`` with the same optimiser for every method (Adam, lr 1e-3,
    batch 100, seed ``seed``; the state of lowest calibration loss kept,
    :func:`fibgraph.importers.torch_train.retune`)."""
    from .criteria import check_eps, read_eps_table
    from .onnx.runtime import count_params
    from .dag_api import colour_dag
    from .onnx.groups import weight_uses

    dm = DagMethods(imp)
    names = [u.weight for u, _ in weight_uses(imp)]
    data_eval = eval_data(imp.model, data, xy)
    p0 = count_params(imp.model)
    r0 = evaluate_any(imp.model, data_eval)
    all_kept = np.ones(imp.graph.n, dtype=bool)
    rows = [{"method": "original", "point": "original", "eps": None, "nodes": dm.entry_counts(all_kept),
             "params": p0, "params_kept": 1.0, "accuracy": r0["accuracy"], "loss": r0["loss"]}]
    points = [(f"eps={e:g}", float(e), float(e), None) for e in eps_list]
    for p in eps_files:
        table = read_eps_table(p, names)
        table = {k: check_eps(v, f"{p}[{k!r}]") for k, v in table.items()}
        points.append((f"eps-file {os.path.basename(p)}", table, 0.0, table))
    keep_info = {}
    if keeps:
        from .keep import check_keep, keep_search
        from .onnx.runtime import load_data
        from .tuning import DagCompressor

        mc = DagCompressor(imp.model, linkage, "euclidean", rescale=False, imported=imp)
        cal_xy = load_data(calib) if calib is not None else None
        for F in keeps:
            found = keep_search(mc, check_keep(F), data=cal_xy)
            keep_info[f"keep={F:g}"] = {k: v for k, v in found.items() if k != "eps"}
            points.append((f"keep={F:g}", found["eps"], 0.0, found["eps"]))
    feeds_cal = None
    if calib is not None:
        from .onnx.runtime import data_feeds

        feeds_cal = data_feeds(calib, imp.model)
    dropped = []                     # eps points whose base is the previous eps point's
    prev = None
    kept_whole = set()
    with task(f"compare-methods: {len(points)} points x {1 + len(methods)} models",
              total=len(points) * (1 + len(methods))) as advance:
        for label, eps_report, eps, table in points:
            # as reported (fibgraph.importers.compare): the magnitude-aware distance, no rescaling merge
            col = colour_dag(imp, "fibration", eps, table, linkage, "euclidean", rescale=False)
            m_fib, gid_fib, kept, why = write_dag_base(imp, col.labels, scales=col.scales)
            key = (gid_fib.tobytes(), kept.tobytes())
            if table is None and prev is not None and key == prev[1]:
                dropped.append({"point": label, "eps": eps_report, "same_as": prev[0]})
                advance(1 + len(methods))
                continue
            if table is None:
                prev = (label, key)
            kept_whole.update(w for w in why if w)
            _point_rows(dm, imp, m_fib, gid_fib, kept, col.scales, label, eps_report, methods, seed, data_eval,
                        p0, rows, on_point, advance, feeds_cal, calib, finetune_epochs)
    notes = ["hypergraph path: eps > 0 clusters with the magnitude-aware euclidean distance "
             "(no rescaling merge); pruned models drop units (LayerNorm, means and softmax over the kept "
             "ones), merged ones (fibration, folding) carry their multiplicities as constants, counted "
             "as parameters"] + [f"kept whole: {w}" for w in sorted(kept_whole)]
    if calib is not None:
        notes.append("<method>+repair: the layers reading merged or pruned units re-fitted by ridge least "
                     "squares on the calibration data, BatchNorm statistics shifted (importers/repair.py)")
    return {"graph": "hypergraph", "layers": [w for w, _ in dm.entries], "params_before": p0,
            "rows": rows, "notes": notes, "dropped": dropped, "keep": keep_info}


def _point_rows(dm, imp, m_fib, gid_fib, kept, scales, label, eps_report, methods, seed, data_eval, p0, rows,
                on_point, advance, feeds_cal=None, calib=None, finetune_epochs=0):
    """The rows of one point: the fibration base and every baseline at its
    counts (with ``feeds_cal`` each also repaired, with ``finetune_epochs``
    each also fine-tuned)."""
    from .onnx.runtime import count_params

    counts = dm.class_counts(kept)
    nodes = dm.entry_counts(kept)
    variants = [("fibration", m_fib, kept)]
    maps = {"fibration": (gid_fib, kept, "merge", scales)}
    for meth in methods:
        m2, k2 = dm.write(meth, counts, seed)
        variants.append((meth, m2, k2))
        maps[meth] = dm.last + (None,)
    if feeds_cal is not None:
        from .repair import output_map, repair_base

        for meth, m2, k2 in list(variants):
            g, kk, mode, sc = maps[meth]
            fixed, _ = repair_base(imp.model, m2, feeds_cal,
                                   out_map=output_map(imp, g, kk, sc, prune=(mode == "prune")))
            variants.append((meth + "+repair", fixed, k2))
    if finetune_epochs:
        variants += [(meth + "+ft", _finetune(m2, calib, finetune_epochs, seed), k2) for meth, m2, k2 in variants]
    base_names = {"fibration", *methods}
    for meth, m2, k2 in variants:
        got = dm.entry_counts(k2)
        assert got == nodes, f"{meth}: nodes per weight {got} != fibration's {nodes}"
        assert np.array_equal(dm.class_counts(k2), counts), f"{meth}: kept columns per class differ"
        r = evaluate_any(m2, data_eval)
        pk = count_params(m2)
        rows.append({"method": meth, "point": label, "eps": eps_report, "nodes": got,
                     "params": pk, "params_kept": pk / p0, "accuracy": r["accuracy"], "loss": r["loss"]})
        if meth in base_names:
            advance(1, f"compare-methods: {label}, {meth}")
        if on_point is not None:
            on_point(rows[-1])
