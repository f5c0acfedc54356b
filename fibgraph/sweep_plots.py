"""Plots of a sweep table (:func:`fibgraph.importers.sweep.run_sweep`): pandas + matplotlib.

Two kinds of figure, each written as SVG and as PNG (200 dpi), one font
(DejaVu Sans, shipped with matplotlib), a legend with one entry per layer:

* ``<checkpoint>-<symmetry>-eps``: units kept (``nodes_after / nodes_before``)
  against eps, one line per layer, for every model and symmetry;
* ``checkpoints-<symmetry>-eps<eps>``: units kept across checkpoints (models
  with the same layers, in natural order: ``step_2`` before ``step_10``), one
  line per layer, at every eps.  Drawn only for two or more such models.

Rows with an ``error`` are left out.  No pyplot: every figure is a
:class:`matplotlib.figure.Figure` of its own, so nothing global changes.
"""
from __future__ import annotations

import os
import re

from .errors import InputError
from .fileio import make_output_dir
from .figures import DPI, FONT, save_figure  # one font and resolution for every study figure

__all__ = ["plot_sweep", "natural_key"]


def natural_key(s):
    """Sort key that puts ``step_2`` before ``step_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", os.fspath(s))]


def _safe(name):
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("_") or "model"


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_DASHES = ["-", "--", "-.", ":"]


def _style(i):
    """Line style of the i-th layer: markers and dashes differ, so lines that
    coincide (layers keeping all their units) stay visible."""
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": _DASHES[(i // len(_MARKERS)) % len(_DASHES)],
            "ms": max(3.0, 7.5 - i), "lw": 1.5, "markerfacecolor": "none" if i % 2 else None}


def _eps_label(e):
    return f"{float(e):g}"


def _save(fig, stem, dpi):
    # laid out once: the SVG keeps the PNG's positions
    return save_figure(fig, f"{stem}.png", dpi, same_layout=True)


def _figure(n_lines):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 + (1.6 if n_lines > 8 else 0), 4.0), layout="constrained")
    return fig, fig.add_subplot()


def _finish(ax, title, xlabel):
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("units kept (fraction of the layer)")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(title="layer (units)", fontsize=8, title_fontsize=8,
              ncol=2 if len(ax.get_lines()) > 8 else 1, loc="best", frameon=False)


def _ok_rows(df):
    missing = {"model", "checkpoint", "symmetry", "eps", "layer", "nodes_before", "nodes_after"} - set(df.columns)
    if missing:
        raise InputError(f"sweep table lacks columns: {', '.join(sorted(missing))}")
    ok = df[df["error"].isna()] if "error" in df.columns else df
    ok = ok[ok["layer"].notna()].copy()
    ok["kept"] = ok["nodes_after"].astype("float64") / ok["nodes_before"].astype("float64").where(
        ok["nodes_before"] > 0)
    return ok


def _layers(rows):
    """Layers in the table's order with their unit counts."""
    seen = {}
    for name, n in zip(rows["layer"], rows["nodes_before"]):
        seen.setdefault(name, int(n))
    return list(seen.items())


def plot_sweep(df, out_dir, dpi=DPI):
    """Write the sweep's figures into ``out_dir`` (created); returns the paths."""
    from matplotlib import rc_context

    ok = _ok_rows(df)
    make_output_dir(out_dir)
    models = sorted(ok["model"].unique(), key=natural_key)
    syms = list(dict.fromkeys(ok["symmetry"]))
    stems, used = {}, set()
    for m in models:
        stem = _safe(ok.loc[ok["model"] == m, "checkpoint"].iloc[0])
        k, s = 2, stem
        while s in used:
            s, k = f"{stem}-{k}", k + 1
        used.add(s)
        stems[m] = s
    paths = []
    with rc_context({"font.family": FONT, "font.sans-serif": [FONT], "svg.fonttype": "path",
                     "svg.hashsalt": "fibgraph"}):
        for m in models:                      # units kept vs eps, one line per layer
            rows_m = ok[ok["model"] == m]
            for sym in syms:
                rows = rows_m[rows_m["symmetry"] == sym]
                if rows.empty:
                    continue
                layers = _layers(rows)
                fig, ax = _figure(len(layers))
                for i, (name, n) in enumerate(layers):
                    r = rows[rows["layer"] == name].sort_values("eps")
                    ax.plot(r["eps"], r["kept"], label=f"{name} ({n})", **_style(i))
                _finish(ax, f"{rows['checkpoint'].iloc[0]}: {sym}", "eps")
                paths += _save(fig, os.path.join(out_dir, f"{stems[m]}-{_safe(sym)}-eps"), dpi)
        # checkpoints of one run: models with the same layers (names and sizes)
        groups = {}
        for m in models:
            groups.setdefault(tuple(_layers(ok[ok["model"] == m])), []).append(m)
        groups = [g for g in groups.values() if len(g) >= 2]
        for gi, group in enumerate(groups):
            prefix = "checkpoints" if len(groups) == 1 else f"checkpoints{gi + 1}"
            rows_g = ok[ok["model"].isin(group)]
            x = {m: i for i, m in enumerate(group)}
            for sym in syms:
                rows_s = rows_g[rows_g["symmetry"] == sym]
                for eps in sorted(rows_s["eps"].unique()):
                    rows = rows_s[rows_s["eps"] == eps]
                    layers = _layers(rows)
                    fig, ax = _figure(len(layers))
                    for i, (name, n) in enumerate(layers):
                        r = rows[rows["layer"] == name]
                        r = r.assign(x=r["model"].map(x)).sort_values("x")
                        ax.plot(r["x"], r["kept"], label=f"{name} ({n})", **_style(i))
                    ax.set_xticks(range(len(group)))
                    ax.set_xticklabels([ok.loc[ok["model"] == m, "checkpoint"].iloc[0] for m in group],
                                       rotation=30 if len(group) > 4 else 0, ha="right" if len(group) > 4 else "center",
                                       fontsize=8)
                    _finish(ax, f"{sym}, eps = {_eps_label(eps)}", "checkpoint")
                    stem = f"{prefix}-{_safe(sym)}-eps{_eps_label(eps)}"
                    paths += _save(fig, os.path.join(out_dir, stem), dpi)
    return paths
