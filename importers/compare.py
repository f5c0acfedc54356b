"""Fibration compression against pruning and folding at equal node counts.

For each tolerance (or eps file) the fibration base of the model fixes the
number of kept units of every column class of its hypergraph (a layer's
units, an LSTM's units, a residual stream's features, a head's dims); every
baseline (random, L2 and L1 pruning, k-means folding) then keeps exactly as
many units of each class, is written back to ONNX in memory and evaluated
(accuracy, mean cross-entropy) with onnxruntime.  Every model goes through
the hypergraph path: :mod:`fibgraph.importers.compare_dag` does the work; this module
is the public entry and the plot.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from fibgraph.baselines import METHODS
from fibgraph.errors import InputError

from .api import load_data
from .onnx.load import load_onnx

__all__ = ["compare_methods", "plot_comparison", "DEFAULT_EPS", "METHOD_LABELS"]

DEFAULT_EPS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)

METHOD_LABELS = {"fibration": "fibration (quasi-fibers)", "random": "random pruning",
                 "l2": "L2-norm pruning (input weights)", "l1": "L1 structured pruning",
                 "fold": "folding (k-means, data-free)"}


def compare_methods(model, data, eps_list=DEFAULT_EPS, eps_files=(), linkage="complete",
                    metric="cosine", rescale=True, methods=METHODS, seed=0, on_point=None, imp=None,
                    keeps=(), calib=None, finetune_epochs=0):
    """Rows ``{method, point, eps, nodes, params, params_kept, accuracy, loss}``
    for the original model, every fibration point and every baseline at the
    fibration point's node counts (``nodes``: kept units per weight, in the
    order of ``result["layers"]``).  ``model``: ONNX path or ``ModelProto``;
    ``data``: npz path or ``(x, y)``; ``imp``: the model's
    :class:`~fibgraph.importers.onnx.importer.DagImport` when the caller has it.  As
    everywhere on the hypergraph path, there is no rescaling merge and eps > 0
    clusters with the magnitude-aware distance (``rescale`` is accepted and
    reported as not applied)."""
    from .api import probe_feeds
    from .compare_dag import compare_dag_methods
    from .onnx.importer import import_dag

    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for e in eps_list:
        if not np.isfinite(e) or not (0 <= e < 2):
            raise InputError(f"--eps: each eps must be in [0, 2), got {e}")
    xy = load_data(data, need_y=True) if not isinstance(data, tuple) else data
    if imp is None:
        label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        m = load_onnx(model) if label is not None else model
        imp = import_dag(m, feeds=probe_feeds(data, m), label=label)
    out = compare_dag_methods(model, imp, data, xy, eps_list, eps_files, linkage, metric, methods, seed, on_point,
                              keeps=keeps, calib=calib, finetune_epochs=finetune_epochs)
    return {"model": _name(model), "data": _name(data), "n": int(xy[0].shape[0]), "linkage": linkage,
            "metric": "euclidean" if any(e > 0 for e in eps_list) or eps_files or keeps else metric,
            "requested_metric": metric, "rescale": False, "seed": seed, **out}


def _name(x):
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    return "<ModelProto>" if isinstance(x, onnx.ModelProto) else "<arrays>"


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
    for meth in [m + rep for rep in ("", "+repair") for m in ["fibration"] + list(METHODS)]:
        pts = sorted((r["params_kept"], r["accuracy"]) for r in rows if r["method"] == meth)
        if not pts:
            continue
        c, mk, ls = styles.get(meth.replace("+repair", ""), ("k", "x", "-"))
        if meth.endswith("+repair"):
            ls = "-."
        label = METHOD_LABELS.get(meth.replace("+repair", ""), meth) + (" + repair" if "+repair" in meth else "")
        ax.plot([p[0] * 100 for p in pts], [p[1] * 100 for p in pts], ls, marker=mk, color=c, label=label, ms=4)
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
        from fibgraph.fileio import atomic_path

        with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
            fig.savefig(tmp, format=os.path.splitext(path)[1][1:].lower() or None)
        plt.close(fig)
    return ax
