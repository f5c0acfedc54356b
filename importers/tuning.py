"""Greedy per-layer eps (Algorithm 3) on an ONNX classifier, in memory.

:class:`DagCompressor` imports a model once (the hypergraph: any DAG of
ops, residual streams, LSTM/GRU, attention, LayerNorm) and compresses it for any ``{layer weight name: eps}``
(layers not named: eps = 0, exact fibers) to a ``ModelProto`` without writing
files; :func:`make_compressor` builds one.  :func:`tune_model` runs
:func:`fibgraph.tune.greedy_eps` with the loss = mean cross-entropy of the
compressed model on calibration data (onnxruntime), and returns a report
whose ``eps`` table is exactly what ``color``/``compress --eps-file`` read
(with the same ``--linkage``/``--metric``/``--no-rescale``).

Evaluations are cached by the partition they produce: two eps that give the
same fibers (and scales) give the same model and are run once.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import onnx

from fibgraph.errors import InputError
from fibgraph.engine import DEFAULT_RTOL
from fibgraph.tune import EPS_MAX, greedy_eps

from .criteria import criteria_from_table
from .onnx.runtime import count_params, evaluate, load_data, probe_feeds
from .onnx.importer import import_dag
from .onnx.load import load_onnx

__all__ = ["DagCompressor", "make_compressor", "tune_model", "criteria_for"]


def criteria_for(eps_by_layer, linkage="complete", metric="cosine", rescale=True, rtol=DEFAULT_RTOL):
    """``{None: Exact, name: Tolerance(eps)}`` exactly as ``make_criteria`` builds
    them from an eps file (eps 0 -> exact)."""
    return criteria_from_table(eps_by_layer, 0.0, linkage, metric, rescale, rtol)


class DagCompressor:
    """A model of the hypergraph path compressed in memory for any per-layer eps.

    A tunable layer is a compressible weight whose units are not the model's
    output and not kept whole (they feed a barrier).  Weights that share node
    sets (W and R of one LSTM/GRU) are one layer, named by the first; the eps
    file gives the tuned eps to all of them.  As in ``compress``, the
    rescaling merge applies to the node sets the importer marks positively
    homogeneous; elsewhere cosine is replaced by the magnitude-aware distance
    (see :mod:`fibgraph.importers.dag_api`)."""

    graph = "hypergraph"

    def __init__(self, model, linkage="complete", metric="cosine", rescale=True,
                 symmetry="fibration", rtol=DEFAULT_RTOL, imported=None, feeds=None):
        from .onnx.groups import groups_of
        from .onnx.importer import import_dag

        _check_options(linkage, metric)
        if imported is None:
            label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
            imported = import_dag(load_onnx(model) if label else model, feeds=feeds, label=label)
        self.imp = imported
        self.model = self.imp.model
        self.linkage, self.metric, self.rescale = linkage, metric, rescale
        self.symmetry, self.rtol = symmetry, rtol
        self.params_before = count_params(self.model)
        self.colour_graph = None     # the activation-weighted graph (--metric activation), else imp.graph
        # weights whose units are tied position by position (W and R of one
        # LSTM; every writer of a residual stream; q and k of one head) share
        # one partition in the base (the meet): one group, one tunable layer
        self.groups = groups_of(self.imp)
        self.ties = {g.name: list(g.weights) for g in self.groups}   # layer name -> every weight it stands for
        self._entries = [(g.name, g.units, g.is_output, g.kept_whole) for g in self.groups]
        self.notes = []
        homog = self.imp.graph.homogeneous
        tun = [ids for w, ids, is_out, whole in self._entries if not is_out and not whole]
        # tunable layers where cosine is exact (positively homogeneous activations)
        self.cosine_layers = sum(bool(homog[ids].all()) for ids in tun) if metric == "cosine" else 0
        if tun and metric == "cosine" and self.cosine_layers == 0:
            self.notes.append("the euclidean distance on every layer: cosine is exact only for positively "
                              "homogeneous activations (ReLU family), which no tuned layer has")
        elif tun and metric == "cosine" and self.cosine_layers < len(tun):
            self.notes.append(f"cosine on the {self.cosine_layers} positively homogeneous layers (ReLU family), "
                              "the magnitude-aware euclidean distance on the others (as compress does)")
        if tun and rescale and metric == "cosine" and not any(bool(homog[ids].all()) for ids in tun):
            self.notes.append("no layer licenses the rescaling merge (no positively homogeneous activation)")

    def pin(self, names):
        """Keep every node of the groups ``names`` distinct, as the inputs of a
        barrier are: their initial colours become singletons (no fiber merges
        them, at any eps) and the writer keeps their columns.  The other
        groups' fibers are those of the graph with these nodes fixed, so the
        base stays exact at eps 0.  Used where a merge of these units has no
        place to go (a torch class that cannot hold multiplicities)."""
        names = set(names)
        ids = [g.nodes for g in self.groups if g.name in names]
        if not ids:
            return
        ids = np.unique(np.concatenate(ids))
        g = self.imp.graph
        init = g.initial.copy()
        init[ids] = init.max() + 1 + np.arange(ids.size)
        g.initial = np.unique(init, return_inverse=True)[1].astype(np.int64)
        keep = np.array(self.imp.keep, dtype=bool)
        keep[ids] = True
        self.imp.keep = keep

    @property
    def tunable(self):
        return [w for w, _, is_out, whole in self._entries if not is_out and not whole]

    def table(self, eps_by_layer):
        return {t: float(e) for w, e in eps_by_layer.items() for t in self.ties.get(w, [w])}

    def colouring(self, eps_by_layer):
        from .dag_api import colour_dag

        return colour_dag(self.imp, self.symmetry, 0.0, self.table(eps_by_layer), self.linkage, self.metric,
                          self.rtol, self.rescale, graph=self.colour_graph)

    def key(self, col):
        """A hash of the writer's groups (colourings with the same base meet
        give the same model)."""
        from .onnx.write import dag_groups

        col.groups = dag_groups(self.imp, col.labels)      # kept for write()
        gid, kept, _ = col.groups
        h = hashlib.sha1(np.ascontiguousarray(gid, dtype=np.int64).tobytes())
        h.update(np.packbits(kept).tobytes())
        if col.scales is not None and np.any(col.scales != 1):
            h.update(np.round(np.ascontiguousarray(col.scales, dtype=np.float64), 12).tobytes())
        return h.hexdigest()

    def write(self, col, dry=False):
        """The base of ``col`` (``dry``: new weights as shapes only, enough for
        a parameter count)."""
        from .onnx.write import write_dag_base

        base = write_dag_base(self.imp, col.labels, groups=col.groups, scales=col.scales, dry=dry)
        if not dry:
            col.base = base
        return base[0]

    def compressed(self, eps_by_layer, check=False):
        """(ModelProto, base (model, gid, kept, why), colouring)."""
        col = self.colouring(eps_by_layer)
        m2 = self.write(col)
        if check:
            try:
                onnx.checker.check_model(m2)
            except Exception as e:      # a writer bug, never the user's input
                raise RuntimeError(f"the written base model does not pass the ONNX checker: {e}") from None
        return m2, col.base, col

    def layer_rows(self, eps_by_layer, base):
        kept = base[2]
        rows = []
        for w, ids, is_out, whole in self._entries:
            row = {"weight": w, "eps": eps_by_layer.get(w, 0.0), "nodes_before": int(ids.size),
                   "nodes_after": int(kept[ids].sum()), "output_layer": is_out}
            if len(self.ties[w]) > 1:
                row["tied"] = self.ties[w][1:]
            if whole:
                row["kept_whole"] = whole
            rows.append(row)
        return rows

    def eps_file(self, eps_by_layer):
        """The eps file of ``eps_by_layer``: every weight of each group, named
        as reports name it (torch names for a model exported from torch,
        :func:`fibgraph.importers.onnx.groups.eps_names`)."""
        from .onnx.groups import eps_names

        table = self.table(eps_by_layer)
        names = eps_names(self.imp, list(table))
        return {names[w]: e for w, e in table.items()}

    def name(self, weight):
        """The name reports give ``weight`` (its torch name when it has one)."""
        from .onnx.groups import eps_names

        return eps_names(self.imp, [weight])[weight]


def _check_options(linkage, metric):
    if linkage not in ("complete", "average"):
        raise InputError(f"--linkage must be complete or average, got {linkage!r}")
    if metric not in ("cosine", "euclidean"):
        raise InputError(f"--metric must be cosine or euclidean, got {metric!r}")


def make_compressor(model, linkage="complete", metric="cosine", rescale=True, rtol=DEFAULT_RTOL, data=None):
    """:class:`DagCompressor` of the model (the hypergraph importer, probed on
    the first sample of ``data``)."""
    _check_options(linkage, metric)
    label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
    m = load_onnx(model) if isinstance(model, (str, os.PathLike)) else model
    imp = import_dag(m, feeds=probe_feeds(data, m), label=label)
    return DagCompressor(m, linkage, metric, rescale, rtol=rtol, imported=imp)


def tune_model(model, data, tau=0.01, steps=8, linkage="complete", metric="cosine", rescale=True,
               rtol=DEFAULT_RTOL, on_step=None, compressor=None, max_eps=EPS_MAX, keep=None):
    """Algorithm 3 on an ONNX classifier: returns the report dict.

    ``keep`` (0 < keep <= 1): instead of the loss bound ``tau``, the per-group
    eps that keep this fraction of the parameters at the least calibration loss
    (:func:`fibgraph.importers.keep.keep_search`, data-aware); the report's
    ``"keep"`` says what it got and ``on_step(group, k, eps, kept)`` reports
    each greedy move.

    ``metric``: cosine, the one default of every command; at the same tau
    ``metric="euclidean"`` keeps fewer parameters (digits MLP, tau 0.01: 23.8%
    vs 39.3%; BENCHMARKS.md), and an eps file is reproduced by ``compress``
    only with the metric it was tuned with.
    ``data``: npz path or ``(x, y)``; the loss is the mean cross-entropy of the
    compressed model's output there.  The reference loss is the ORIGINAL
    model's loss.  ``on_step(layer, k, eps, loss, ok)`` reports progress.
    """
    if not np.isfinite(tau) or tau < 0:
        raise InputError(f"--tau must be >= 0, got {tau}")
    if steps < 0 or steps > 40:
        raise InputError(f"--steps must be in 0..40, got {steps}")
    t0 = time.perf_counter()
    xy = load_data(data, need_y=True) if not isinstance(data, tuple) else data
    mc = compressor or make_compressor(model, linkage, metric, rescale, rtol=rtol, data=data)
    if not mc.tunable:
        raise InputError("the model has no compressible (non-output) layer to tune")
    base_eval = evaluate(mc.model, xy)
    if keep is not None:
        return _tune_keep(model, data, xy, mc, keep, base_eval, on_step, t0)
    cache = {}
    keys = {}

    def loss(eps_by_layer):
        col = mc.colouring(eps_by_layer)
        key = mc.key(col)
        keys[tuple(sorted(eps_by_layer.items()))] = key
        if key not in cache:
            m2 = mc.write(col)
            r = evaluate(m2, xy)
            cache[key] = (r["loss"], r["accuracy"], count_params(m2))
        return cache[key][0]

    def settle(name, best, earlier, passed):
        # the smallest eps that gives the same compressed model: a larger one
        # only moves colours the base does not use (a residual stream's norms
        # clustered while its columns stay apart), which skews later layers
        def key(e):
            k = tuple(sorted({**earlier, name: e}.items()))
            if k not in keys:
                loss({**earlier, name: e})
            return keys[k]

        target = key(best)
        return min(e for e in passed if e <= best and key(e) == target)

    res = greedy_eps(mc.tunable, loss, tau=tau, steps=steps, base_loss=base_eval["loss"],
                     on_step=on_step, hi=max_eps, settle=settle)
    m2, base, col = mc.compressed(res.eps, check=True)
    final = evaluate(m2, xy)
    return {
        "model": os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>",
        "data": os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<arrays>",
        "graph": mc.graph, "notes": list(mc.notes),
        "n": int(xy[0].shape[0]), "tau": tau, "steps": steps, "linkage": linkage, "metric": metric,
        "rescale": bool(rescale), "symmetry": "fibration",
        "eps": mc.eps_file(res.eps),
        "loss_before": base_eval["loss"], "accuracy_before": base_eval["accuracy"],
        "limit": res.limit, "loss_after": final["loss"], "accuracy_after": final["accuracy"],
        "params_before": mc.params_before, "params_after": count_params(m2),
        "layers": mc.layer_rows(res.eps, base), "evaluations": res.evaluations,
        "distinct_models_run": len(cache), "trace": res.trace,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _tune_keep(model, data, xy, mc, keep, base_eval, on_step, t0):
    from .keep import check_keep, keep_search

    found = keep_search(mc, check_keep(keep), data=xy, on_step=on_step)
    m2, base, col = mc.compressed(found["group_eps"], check=True)
    final = evaluate(m2, xy)
    return {
        "model": os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>",
        "data": os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<arrays>",
        "graph": mc.graph, "notes": list(mc.notes) + ([found["note"]] if "note" in found else []),
        "n": int(xy[0].shape[0]), "keep": found, "linkage": mc.linkage, "metric": mc.metric,
        "rescale": bool(mc.rescale), "symmetry": "fibration", "eps": mc.eps_file(found["group_eps"]),
        "loss_before": base_eval["loss"], "accuracy_before": base_eval["accuracy"],
        "limit": None, "loss_after": final["loss"], "accuracy_after": final["accuracy"],
        "params_before": mc.params_before, "params_after": count_params(m2),
        "layers": mc.layer_rows(found["group_eps"], base), "evaluations": found["evaluations"],
        "distinct_models_run": found["evaluations"], "trace": [],
        "seconds": round(time.perf_counter() - t0, 3),
    }
