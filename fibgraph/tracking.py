"""Tracking fibers, opfibers and covers while a network trains.

A plain callable, no framework::

    from fibgraph.importers.torch_analysis import FiberTracker     # torch modules
    tracker = FiberTracker(eps=(0, 0.05, 0.1), symmetries=("fibration", "opfibration", "covering"))
    for epoch in range(epochs):
        train_one_epoch(model)
        tracker(model, epoch, accuracy=acc)       # extra keyword values are recorded too
    tracker.to_csv("emergence.csv")
    tracker.plot("emergence.png")

The tracker here is format-free: ``tracker(view, epoch)`` takes a
:class:`~fibgraph.layerview.LayerView` (a weighted digraph with named weight
layers), or anything its ``reader`` turns into one
(``fibgraph.importers.torch_analysis.FiberTracker`` reads torch modules and ONNX
models through the hypergraph import), and colours it once per (symmetry,
eps).  For every hidden weight layer it records the number of classes
(fibers, opfibers or covers), the number of non-trivial classes (size >= 2),
the fraction of units that lie in non-trivial classes, the largest class,
and whether the partition is a coarsening of the one recorded at the
previous call (the cover coarse-graining theorem says it is, for exact
covers under gradient descent; quasi-fibers at eps > 0 need not).

The output layer is left out by default: its units start with distinct
colours, so its classes are trivially singletons.
"""
from __future__ import annotations

import csv
import os
import time

import numpy as np

from .errors import InputError
from .layerview import LayerView
from .partition import class_sizes, refines
from .engine import Exact, Tolerance
from .symmetry import SYMMETRIES

__all__ = ["FiberTracker", "layer_stats", "FIELDS", "SYMMETRY_NOUN"]

SYMMETRY_NOUN = {"fibration": "fibers", "opfibration": "opfibers",
                 "opfibration-flavoured": "flavoured opfibers", "covering": "covers",
                 "covering-strict": "strict covers", "automorphism": "orbits"}

FIELDS = ["epoch", "layer", "layer_name", "kind", "symmetry", "eps", "units", "classes",
          "nontrivial_classes", "nontrivial_units", "nontrivial_fraction", "largest_class",
          "coarsens_previous"]


def layer_stats(labels) -> dict:
    """Counts of a partition of one layer's units."""
    labels = np.asarray(labels, dtype=np.int64)
    n = int(labels.size)
    if n == 0:
        return {"units": 0, "classes": 0, "nontrivial_classes": 0, "nontrivial_units": 0,
                "nontrivial_fraction": 0.0, "largest_class": 0}
    sizes = class_sizes(labels)
    big = sizes[sizes >= 2]
    return {"units": n, "classes": int(sizes.size), "nontrivial_classes": int(big.size),
            "nontrivial_units": int(big.sum()), "nontrivial_fraction": float(big.sum() / n),
            "largest_class": int(sizes.max())}


def _criterion(eps, linkage, metric, rescale, rtol):
    eps = float(eps)
    if eps == 0:
        return Exact(rtol)
    return Tolerance(eps, linkage, metric, rescale)


class FiberTracker:
    """Callable that records fiber statistics of a model at each call (see module doc).

    Parameters: ``eps`` tolerances (0 = exact up to float rounding),
    ``symmetries`` names from :data:`fibgraph.symmetry.SYMMETRIES`,
    ``linkage``/``metric``/``rescale`` for eps > 0, ``rtol`` for eps = 0,
    ``include_output`` to record the output layer too, ``keep_labels`` to keep
    every partition in :attr:`labels` (``{(epoch, layer, symmetry, eps): labels}``),
    ``reader`` a callable turning what the calls pass into a
    :class:`~fibgraph.layerview.LayerView` (a view is taken as is).
    Layers are numbered from 1 (the first weight layer), as in the other reports.
    ``rescale`` takes effect only on nodes the graph marks positively
    homogeneous (the hypergraph import marks none: eps > 0 then uses the
    magnitude-aware distance, see :mod:`fibgraph.engine.tolerance`).
    """

    def __init__(self, eps=(0.0, 0.05, 0.1), symmetries=("fibration", "opfibration", "covering"),
                 linkage="complete", metric="cosine", rescale=True, rtol=1e-5,
                 include_output=False, keep_labels=True, reader=None):
        if isinstance(eps, (int, float)):
            eps = (eps,)
        if isinstance(symmetries, str):
            symmetries = (symmetries,)
        self.eps = tuple(float(e) for e in eps)
        for e in self.eps:
            if not np.isfinite(e) or not (0 <= e < 2):
                raise InputError(f"eps must be in [0, 2), got {e}")
        self.symmetries = tuple(symmetries)
        for s in self.symmetries:
            if s not in SYMMETRIES:
                raise InputError(f"unknown symmetry {s!r}; choose from {', '.join(SYMMETRIES)}")
        if linkage not in ("average", "complete"):
            raise InputError(f"linkage must be average or complete, got {linkage!r}")
        if metric not in ("cosine", "euclidean"):
            raise InputError(f"metric must be cosine or euclidean, got {metric!r}")
        self.linkage, self.metric, self.rescale, self.rtol = linkage, metric, rescale, rtol
        self.include_output = include_output
        self.keep_labels = keep_labels
        self.reader = reader
        self.rows: list[dict] = []
        self.extras: list[dict] = []          # {epoch, **keyword values} per call
        self.labels: dict = {}
        self.seconds = 0.0
        self._prev: dict = {}

    # ------------------------------------------------------------------ call
    def view(self, model) -> LayerView:
        if isinstance(model, LayerView):
            return model
        if self.reader is None:
            raise InputError(f"FiberTracker reads a LayerView, got {type(model).__name__}; for torch modules "
                             "and ONNX models use fibgraph.importers.torch_analysis.FiberTracker")
        view = self.reader(model)
        if not isinstance(view, LayerView):
            raise TypeError(f"the tracker's reader returned {type(view).__name__}, not a LayerView")
        return view

    def __call__(self, model, epoch, **extra):
        """Colour ``model`` (a :class:`LayerView`, or what ``reader`` reads) and
        record one row per hidden weight layer x symmetry x eps; returns this call's rows."""
        t0 = time.perf_counter()
        view = self.view(model)
        out = []
        for sym in self.symmetries:
            for eps in self.eps:
                labels = view.colour(sym, _criterion(eps, self.linkage, self.metric, self.rescale, self.rtol))
                for l, ly in enumerate(view.layers):
                    if ly.output and not self.include_output:
                        continue
                    lab = view.layer_labels(labels, l)
                    key = (l + 1, sym, eps)
                    prev = self._prev.get(key)
                    coarsens = "" if prev is None or prev.shape != lab.shape else bool(refines(prev, lab))
                    self._prev[key] = lab
                    if self.keep_labels:
                        self.labels[(epoch, l + 1, sym, eps)] = lab
                    row = {"epoch": epoch, "layer": l + 1, "layer_name": ly.name, "kind": ly.kind,
                           "symmetry": sym, "eps": eps, **layer_stats(lab),
                           "coarsens_previous": coarsens}
                    out.append(row)
        self.rows.extend(out)
        if extra:
            self.extras.append({"epoch": epoch, **{k: (float(v) if np.isscalar(v) else v)
                                                   for k, v in extra.items()}})
        self.seconds += time.perf_counter() - t0
        return out

    # --------------------------------------------------------------- queries
    def table(self, symmetry=None, eps=None, layer=None) -> list[dict]:
        """Recorded rows, filtered."""
        return [r for r in self.rows
                if (symmetry is None or r["symmetry"] == symmetry)
                and (eps is None or r["eps"] == float(eps))
                and (layer is None or r["layer"] == layer)]

    def series(self, field="classes", symmetry="fibration", eps=0.0, layer=1):
        """(epochs, values) of one field for one layer (1 = the first weight layer), symmetry and eps."""
        rows = self.table(symmetry, eps, layer)
        return np.array([r["epoch"] for r in rows]), np.array([r[field] for r in rows])

    # --------------------------------------------------------------- output
    def to_csv(self, path):
        """Tidy CSV: one row per epoch x layer x symmetry x eps (columns :data:`FIELDS`,
        then any keyword values given to the calls, repeated on each row of that epoch)."""
        extra_keys = sorted({k for e in self.extras for k in e if k != "epoch"})
        by_epoch = {}
        for e in self.extras:
            by_epoch.setdefault(e["epoch"], {}).update(e)
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise InputError(f"{path}: folder {d} does not exist")
        from .fileio import atomic_path

        with atomic_path(path, suffix=".csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(FIELDS + extra_keys)
                for r in self.rows:
                    ex = by_epoch.get(r["epoch"], {})
                    w.writerow([_fmt(r[k]) for k in FIELDS] + [_fmt(ex.get(k, "")) for k in extra_keys])
        return path

    def plot(self, path=None, field="classes", title=None, metric_key=None, dpi=110, axes=None,
             legend=True):
        """Emergence figure (PNG/SVG/PDF by extension): one panel per symmetry,
        x = epoch, y = ``field`` as a fraction of the layer's units (``classes``:
        1 = all units distinct, lower = more symmetry; ``nontrivial_fraction``
        as is); a colour per layer, a line style per eps.  ``metric_key``:
        a keyword value given to the calls (e.g. ``'accuracy'``) drawn on a
        second axis in the last panel."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        if not self.rows:
            raise InputError("nothing recorded yet: call the tracker at least once")
        syms = [s for s in self.symmetries if any(r["symmetry"] == s for r in self.rows)]
        layers = sorted({(r["layer"], r["layer_name"]) for r in self.rows})
        styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
        cmap = plt.get_cmap("viridis")
        own = axes is None
        if own:
            if path is None:
                raise InputError("plot needs a path (or axes to draw into)")
            fig, axes = plt.subplots(1, len(syms), figsize=(3.6 * len(syms) + 0.6, 3.3), squeeze=False,
                                     sharey=True)
        else:
            axes = np.asarray(axes, dtype=object).reshape(1, -1)
            if axes.shape[1] < len(syms):
                raise InputError(f"{len(syms)} symmetries need {len(syms)} axes, got {axes.shape[1]}")
            fig = axes[0][0].figure
        for a, sym in zip(axes[0], syms):
            for li, (l, name) in enumerate(layers):
                colour = cmap(li / max(1, len(layers) - 1) * 0.85)
                for ei, eps in enumerate(self.eps):
                    rows = self.table(sym, eps, l)
                    if not rows:
                        continue
                    x = [r["epoch"] for r in rows]
                    if field == "classes":
                        y = [r["classes"] / max(1, r["units"]) for r in rows]
                    else:
                        y = [r[field] for r in rows]
                    a.plot(x, y, color=colour, linestyle=styles[ei % len(styles)], lw=1.6,
                           label=f"layer {l}, eps={eps:g}")
            a.set_title(SYMMETRY_NOUN.get(sym, sym))
            a.set_xlabel("epoch")
            a.grid(alpha=0.3)
        ylabel = "classes / units" if field == "classes" else field.replace("_", " ")
        axes[0][0].set_ylabel(ylabel)
        if field in ("classes", "nontrivial_fraction"):
            axes[0][0].set_ylim(-0.03, 1.05)
        if metric_key and any(metric_key in e for e in self.extras):
            ax2 = axes[0][-1].twinx()
            ex = [e for e in self.extras if metric_key in e]
            ax2.plot([e["epoch"] for e in ex], [e[metric_key] for e in ex], color="tab:red", lw=1.0,
                     alpha=0.7)
            ax2.set_ylabel(metric_key, color="tab:red")
            ax2.tick_params(axis="y", colors="tab:red")
        if not own:
            if title:
                axes[0][0].set_ylabel(f"{title}\n{ylabel}")
            return None
        handles, labs = axes[0][0].get_legend_handles_labels()
        if legend:
            fig.legend(handles, labs, loc="center right", fontsize=7, frameon=False)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0, 0.84 if legend else 1, 1))
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path


def _fmt(v):
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
