"""Printing colouring and compression reports (rich tables)."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

__all__ = ["print_colour_report", "console", "layer_table", "LAYER_COLUMNS"]

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def _crit_text(c):
    if not c or c.get("exact"):
        return f"exact (rtol {c.get('rtol', 1e-5):g})" if c else "exact"
    s = f"eps {c['eps']:g} {c.get('linkage', '')} {c.get('metric', '')}"
    if c.get("rescale"):
        s += " +rescale"
    if c.get("note"):
        s += " *"
    return s


def print_colour_report(report):
    t = Table(title=f"{report.get('model', '')}: {report.get('symmetry', '')}", title_justify="left")
    for col in ("layer (weight)", "kind", "activation", "nodes", "fibers", "kept", "criterion"):
        t.add_column(col, justify="right" if col in ("nodes", "fibers", "kept") else "left")
    notes = set()
    for ly in report["layers"]:
        kept = f"{ly['nodes_after'] / max(ly['nodes_before'], 1):.0%}"
        c = ly.get("criterion", {})
        if c.get("note"):
            notes.add(c["note"])
        if ly.get("kept_whole"):
            notes.add(f"{ly['weight']}: units kept whole ({ly['kept_whole']})")
        t.add_row(ly["weight"], ly.get("kind", ly.get("op", "")), ly.get("activation", ""), str(ly["nodes_before"]),
                  str(len(ly["fibers"])) + (" (output kept)" if ly.get("output_layer") else ""),
                  kept, _crit_text(c))
    console.print(t)
    pb, pa = report["params_before"], report["params_after"]
    console.print(f"parameters: {pb:,} -> {pa:,} ({pa / max(pb, 1):.1%} kept)")
    for n in sorted(notes):
        console.print(f"* {n}")
    for b in report.get("barriers", []):
        console.print(f"barrier: {b['op']} at node {b['node']!r}: {b['why']}; its units are kept distinct "
                      f"(covers {b['params']:,} parameters, {b['share']:.1%})")
    if "verify" in report:
        v = report["verify"]
        fed = v["inputs"]
        if isinstance(fed, dict):
            fed = "; ".join(f"{k}: {d}" for k, d in fed.items())
            if "draws" in v:
                fed += f" ({v['draws']} draws, seed {v['seed']})"
            elif "seed" in v:
                fed += f" (seed {v['seed']})"
        console.print(f"verify: max |output difference| = {v['max_abs_diff']:.3g} on {fed}", markup=False)
    if "output" in report:
        console.print(f"wrote {report['output']}")


LAYER_COLUMNS = ["layer", "weight", "group", "op", "units", "classes", "kept", "kept_fraction",
                 "params_before", "params_after", "eps", "metric", "output_layer"]


def layer_table(report):
    """The per-layer results of a ``color``/``compress`` report as a pandas
    DataFrame, one row per layer entry (as WeightWatcher's ``analyze()``):

    ``layer`` the ONNX node reading the weight (a torch export's module path),
    ``weight`` its weight tensor, ``group`` the tied group it belongs to,
    ``op``, ``units`` (its output units), ``classes`` (fibers, or the classes
    of the chosen symmetry), ``kept`` (units in the base), ``kept_fraction``,
    ``params_before`` / ``params_after`` (elements of the weight tensor in
    the model and in its base), ``eps`` (0 = exact) and the ``metric`` that
    ran, ``output_layer``.  ``df.to_csv(path)`` gives the CSV of ``--csv``."""
    import pandas as pd

    rows = []
    for ly in report.get("layers", []):
        c = ly.get("criterion") or {}
        rows.append({"layer": ly.get("node", ly["weight"]), "weight": ly["weight"],
                     "group": ly.get("group", ly["weight"]), "op": ly.get("op", ly.get("kind", "")),
                     "units": int(ly["nodes_before"]), "classes": len(ly["fibers"]),
                     "kept": int(ly["nodes_after"]),
                     "kept_fraction": ly["nodes_after"] / max(ly["nodes_before"], 1),
                     "params_before": ly.get("weight_params"), "params_after": ly.get("weight_params_after"),
                     "eps": float(c.get("eps", 0.0)), "metric": "exact" if c.get("exact") or not c
                     else c.get("metric", ""), "output_layer": bool(ly.get("output_layer", False))})
    df = pd.DataFrame(rows, columns=LAYER_COLUMNS)
    for col in ("params_before", "params_after"):
        df[col] = df[col].astype("Int64")
    return df
