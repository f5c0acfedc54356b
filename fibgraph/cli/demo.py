"""``fibgraph demo``: the whole job on the bundled digits model.

The model (``fibgraph/data/digits_mlp.onnx``) is a small ReLU MLP trained on
scikit-learn's digits by ``examples/train_digits_mlp.py``; its held-out test
split ships beside it.  The demo colours it at several tolerances, compresses
each to its base, verifies the base against the original on the test inputs,
evaluates both, prints one table and draws the coloured graph.
"""
from __future__ import annotations

import os
import time
from importlib import resources

from rich.table import Table

from ..report import console

__all__ = ["run_demo", "demo_outputs", "bundled_model", "bundled_data", "EPS_GRID"]

EPS_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)


def bundled_model() -> str:
    return str(resources.files("fibgraph") / "data" / "digits_mlp.onnx")


def bundled_data() -> str:
    return str(resources.files("fibgraph") / "data" / "digits_test.npz")


def _base_path(out_dir, eps):
    return os.path.join(out_dir, f"digits_base_eps{eps:g}.onnx")


def _picture_path(out_dir, draw_eps):
    return os.path.join(out_dir, f"digits_fibers_eps{draw_eps:g}.png")


def demo_outputs(out_dir="fibgraph-demo", eps_grid=EPS_GRID, draw_eps=0.1):
    """The files :func:`run_demo` writes into ``out_dir``."""
    return [_base_path(out_dir, eps) for eps in eps_grid] + [_picture_path(out_dir, draw_eps)]


def run_demo(out_dir="fibgraph-demo", eps_grid=EPS_GRID, draw_eps=0.1):
    from fibgraph.importers.api import compress_model, evaluate

    from ..draw import draw_layered
    from ..fileio import make_output_dir

    model, data = bundled_model(), bundled_data()
    make_output_dir(out_dir)
    console.print(f"[bold]fibgraph demo[/bold]: {model}\n  test data: {data}")
    base_scores = evaluate(model, data)
    t = Table(title="fibration compression of the bundled digits MLP (test split)", title_justify="left")
    for c in ("eps", "linkage/metric", "hidden units", "params kept", "max |diff| vs original",
              "accuracy", "loss", "seconds"):
        t.add_column(c, justify="right")
    t.add_row("original", "", "", "100%", "", f"{base_scores['accuracy']:.4f}",
              f"{base_scores['loss']:.4f}", "")
    rows = []
    for eps in eps_grid:
        out = _base_path(out_dir, eps)
        t0 = time.perf_counter()
        # the bundled data is the TEST split: verify on it, never repair on it
        rep = compress_model(model, out, "fibration", eps, linkage="complete", metric="cosine",
                             verify=True, data=data, repair=False)
        secs = time.perf_counter() - t0
        sc = evaluate(out, data)
        hidden = [f"{ly['nodes_before']}->{ly['nodes_after']}" for ly in rep["layers"] if not ly["output_layer"]]
        kept = rep["params_after"] / rep["params_before"]
        t.add_row(f"{eps:g}", "exact" if eps == 0 else "complete/cosine", " ".join(hidden),
                  f"{kept:.1%}", f"{rep['verify']['max_abs_diff']:.2g}", f"{sc['accuracy']:.4f}",
                  f"{sc['loss']:.4f}", f"{secs:.2f}")
        rows.append((eps, rep, sc))
    console.print(t)
    from fibgraph.importers.api import color_model

    from fibgraph.importers.onnx.groups import space_display_names

    _, imp, col = color_model(model, "fibration", draw_eps)
    png = _picture_path(out_dir, draw_eps)
    draw_layered(col.graph, col.labels, png, max_edges=2, dpi=100, names=space_display_names(imp),
                 title=f"digits MLP: fibers at eps={draw_eps:g} (complete linkage, cosine)")
    console.print(f"compressed models and the picture are in {out_dir}/ (picture: {png})")
    console.print("eps = 0: exact fibers (equal up to float rounding); eps > 0: quasi-fibers "
                  "(agglomerative clustering of aggregated rows), outputs change by the 'max |diff|' shown.")
    return rows
