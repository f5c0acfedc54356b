"""Printing colouring and compression reports (rich tables)."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

__all__ = ["print_colour_report", "verify_lines", "console", "layer_table", "LAYER_COLUMNS"]

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


def verify_lines(v):
    """The verification in words: the largest absolute output difference,
    the relative one (over the largest absolute output of the original), what
    was fed; and, with labelled data, accuracy and loss of original and base."""
    n = v.get("n")
    fed = v["inputs"]
    if isinstance(fed, dict):
        what = "; ".join(f"{k}: {d}" for k, d in fed.items())
        draws = v.get("draws", 1)
        count = f"{draws} x {n}" if draws > 1 and n else f"{n}" if n else "made-up"
        where = f"{count} made-up inputs ({what}" + (f"; seed {v['seed']})" if "seed" in v else ")")
    else:
        where = f"the {n} samples of --data" if n else "--data"
    d, top = v["max_abs_diff"], v.get("max_abs_output")
    rel = v.get("rel_diff", d / top if top else None)
    text = f"verify: max |output difference| {d:.3g}"
    if rel is not None and top is not None:
        text += f", relative {rel:.3g} (of max |output| {top:.3g})"
    lines = [text + f", on {where}"]
    sc = v.get("scores")
    if sc and "error" in sc:
        lines.append(f"verify: no accuracy on --data: {sc['error']}")
    elif sc:
        a, b = sc["original"], sc["base"]
        lines.append(f"verify on --data ({a['n']} labelled samples): accuracy {a['accuracy']:.4f} -> "
                     f"{b['accuracy']:.4f}, loss {a['loss']:.4f} -> {b['loss']:.4f} (original -> base)")
    return lines


def empty_report_sentence(report):
    """Why a model gave no layer rows, and what to do (instead of an empty table)."""
    model = report.get("model", "the model")
    bars = report.get("barriers") or []
    if bars:
        where = ", ".join(f"{b['op']} at {b['node']!r} ({b['why']})" for b in bars[:3]) + \
            (f" and {len(bars) - 3} more" if len(bars) > 3 else "")
        return (f"{model}: no weight layer to colour: its parameters sit behind {where}, whose units fibgraph "
                "keeps whole. Export the model without them (e.g. control flow traced out with fixed "
                f"inputs), or see `fibgraph inspect {model}`.")
    return (f"{model}: no weight layer (linear, conv, embedding, LSTM/GRU) found, so nothing to colour; "
            f"see `fibgraph inspect {model}` for what the model holds.")


def print_colour_report(report):
    if not report.get("layers"):
        console.print(empty_report_sentence(report), soft_wrap=True, markup=False)
        pb, pa = report["params_before"], report["params_after"]
        console.print(f"parameters: {pb:,} -> {pa:,}")
        return
    t = Table(title=f"{report.get('model', '')}: {report.get('symmetry', '')}", title_justify="left")
    for col in ("layer (weight)", "kind", "activation", "nodes", "fibers", "kept", "criterion"):
        t.add_column(col, justify="right" if col in ("nodes", "fibers", "kept") else "left")
    notes = set()
    for ly in report["layers"]:
        kept = f"{ly['nodes_after'] / max(ly['nodes_before'], 1):.0%}"
        c = ly.get("criterion", {})
        if c.get("note"):
            notes.add(c["note"])
        name = ly.get("torch_name", ly["weight"])     # a torch export's copy: the tensor it stands for
        if ly.get("kept_whole"):
            notes.add(f"{name}: units kept whole ({ly['kept_whole']})")
        t.add_row(name, ly.get("kind", ly.get("op", "")), ly.get("activation", ""), str(ly["nodes_before"]),
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
        for line in verify_lines(report["verify"]):
            console.print(line, markup=False, soft_wrap=True)



LAYER_COLUMNS = ["layer", "weight", "group", "op", "units", "classes", "kept", "kept_fraction",
                 "params_before", "params_after", "eps", "metric", "output_layer"]


def layer_table(report):
    """The per-layer results of a ``color``/``compress`` report as a pandas
    DataFrame, one row per layer entry (as WeightWatcher's ``analyze()``):

    ``layer`` the ONNX node reading the weight (a torch export's module path,
    also for the dynamo exporter's ``node_MatMul_12``),
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
        tn = ly.get("torch_name")
        rows.append({"layer": tn.rsplit(".", 1)[0] if tn else ly.get("node", ly["weight"]), "weight": ly["weight"],
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
