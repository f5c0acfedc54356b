"""Fibration compression against pruning and folding at equal node counts.

For each tolerance (or eps file) the fibration base of the model fixes the
number of units per layer; every baseline of :mod:`fibgraph.baselines` is
then built with exactly those counts, written back to ONNX in memory and
evaluated (accuracy, mean cross-entropy) with onnxruntime.  Equal node counts
give equal parameter counts for dense and conv layers, so the rows of one
point differ only in which function the smaller network computes.

Models the feed-forward chain importer refuses (residual streams, LSTM/GRU,
attention, LayerNorm) go through the hypergraph path,
:mod:`importers.compare_dag`: the same points and methods, chosen per column
class of the hypergraph at exactly the fibration base's node counts.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from fibgraph.baselines import METHODS, baseline, node_counts
from fibgraph.errors import InputError

from .api import _check_eps, count_params, evaluate, load_data, read_eps_table
from .onnx_in import import_onnx
from .onnx.load import load_onnx
from .onnx_out import write_base_onnx
from .tuning import ModelCompressor

__all__ = ["compare_methods", "plot_comparison", "DEFAULT_EPS", "METHOD_LABELS"]

DEFAULT_EPS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)

METHOD_LABELS = {"fibration": "fibration (quasi-fibers)", "random": "random pruning",
                 "l2": "L2-norm pruning (input weights)", "l1": "L1 structured pruning",
                 "fold": "folding (k-means, data-free)"}


def _read_eps_file(path, names):
    """Per-layer eps of the tunable layers ``names`` from an eps file."""
    table = read_eps_table(path, names)
    out = {}
    default = table.get("*")
    for n in names:
        if table.get(n, default) is not None:
            out[n] = _check_eps(table.get(n, default), f"{path}[{n!r}]")
    return out


def compare_methods(model, data, eps_list=DEFAULT_EPS, eps_files=(), linkage="average",
                    metric="cosine", rescale=True, methods=METHODS, seed=0, on_point=None,
                    compressor=None):
    """Rows ``{method, point, eps, nodes, params, params_kept, accuracy, loss}``
    for the original model, every fibration point and every baseline at the
    fibration point's node counts.  ``data``: npz path or ``(x, y)``."""
    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for e in eps_list:
        if not np.isfinite(e) or not (0 <= e < 2):
            raise InputError(f"--eps: each eps must be in [0, 2), got {e}")
    xy = load_data(data, need_y=True) if not isinstance(data, tuple) else data
    mc = compressor
    if mc is None:
        res, imp = _import(model, data)
        if imp is not None:
            from .compare_dag import compare_dag_methods

            out = compare_dag_methods(model, imp, data, xy, eps_list, eps_files, linkage, metric,
                                      methods, seed, on_point)
            return {"model": _name(model), "data": _name(data), "n": int(xy[0].shape[0]), "linkage": linkage,
                    "metric": "euclidean" if any(e > 0 for e in eps_list) or eps_files else metric,
                    "requested_metric": metric, "rescale": False, "seed": seed, **out}
        mc = ModelCompressor(model, linkage, metric, rescale, imported=res)
    names = mc.tunable
    p0 = mc.params_before
    r0 = evaluate(mc.model, xy)
    rows = [{"method": "original", "point": "original", "eps": None,
             "nodes": node_counts(mc.network), "params": p0, "params_kept": 1.0,
             "accuracy": r0["accuracy"], "loss": r0["loss"]}]
    points = [(f"eps={e:g}", float(e), {n: float(e) for n in names}) for e in eps_list]
    for p in eps_files:
        table = _read_eps_file(p, names)
        points.append((f"eps-file {os.path.basename(p)}", table, table))
    for label, eps_report, eps in points:
        base, _ = mc.base(eps)
        counts = node_counts(base)
        variants = [("fibration", base)] + [(m, None) for m in methods]
        for meth, b in variants:
            if b is None:
                b = baseline(mc.network, meth, counts, seed=seed)
            assert node_counts(b) == counts
            m2 = write_base_onnx(mc.model, b, check=False)
            r = evaluate(m2, xy)
            pk = count_params(m2)
            rows.append({"method": meth, "point": label, "eps": eps_report, "nodes": counts,
                         "params": pk, "params_kept": pk / p0,
                         "accuracy": r["accuracy"], "loss": r["loss"]})
            if on_point is not None:
                on_point(rows[-1])
    return {"model": _name(model), "data": _name(data), "graph": "chain",
            "n": int(xy[0].shape[0]), "linkage": linkage, "metric": metric, "rescale": bool(rescale),
            "seed": seed, "params_before": p0, "rows": rows}


def _name(x):
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    return "<ModelProto>" if isinstance(x, onnx.ModelProto) else "<arrays>"


def _import(model, data):
    """``(ImportResult, None)`` for a feed-forward chain, else ``(None, DagImport)``."""
    from .api import probe_feeds
    from .onnx.importer import import_dag

    label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    m = load_onnx(model) if label is not None else model
    try:
        return import_onnx(m, label), None
    except InputError:
        return None, import_dag(m, feeds=probe_feeds(data, m), label=label)


def plot_comparison(result, path, title=None, ax=None):
    """Accuracy against the fraction of parameters kept, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    rows = result["rows"]
    orig = next(r for r in rows if r["method"] == "original")
    styles = {"fibration": ("tab:red", "o", "-"), "random": ("tab:blue", "v", "--"),
              "l2": ("tab:pink", "s", "--"), "l1": ("tab:purple", "D", "--"),
              "fold": ("tab:green", "^", ":")}
    for meth in ["fibration"] + [m for m in METHODS]:
        pts = sorted((r["params_kept"], r["accuracy"]) for r in rows if r["method"] == meth)
        if not pts:
            continue
        c, mk, ls = styles.get(meth, ("k", "x", "-"))
        ax.plot([p[0] * 100 for p in pts], [p[1] * 100 for p in pts], ls, marker=mk, color=c,
                label=METHOD_LABELS.get(meth, meth), ms=4)
    ax.axhline(orig["accuracy"] * 100, color="k", lw=0.8, ls="-.", label="original")
    ax.set_xlabel("parameters kept (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    per = "weight (hypergraph)" if result.get("graph") == "hypergraph" else "layer"
    ax.set_title(title or f"{os.path.basename(str(result.get('model', '')))}: equal nodes per {per}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if own:
        fig.tight_layout()
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise InputError(f"{path}: folder {d} does not exist")
        fig.savefig(path)
        plt.close(fig)
    return ax
