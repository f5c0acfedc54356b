"""Analysis commands of the CLI: ``compare`` and ``symmetry-metrics``.

Registered by :mod:`fibgraph.cli` through :data:`COMMANDS`.  Errors are
:class:`~fibgraph.errors.InputError` (one line, exit 2); JSON is written
atomically.
"""
from __future__ import annotations

import os

import click
import numpy as np

from ..errors import InputError
from ..fileio import check_output_path

__all__ = ["COMMANDS", "compare", "symmetry_metrics_cmd"]

SYM_COMPARE = ["fibration", "opfibration", "opfibration-flavoured", "covering", "covering-strict"]


def _check_out(inputs, out):
    check_output_path(out, inputs)


def _load(path):
    """The :class:`~fibgraph.layerview.LayerView` of an ONNX model (hypergraph import)."""
    from fibgraph.importers.dag_units import layer_view
    from fibgraph.importers.onnx.importer import import_dag

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    if not os.fspath(path).lower().endswith(".onnx"):
        raise InputError(f"{path}: expected an .onnx model")
    return layer_view(import_dag(path), name=os.path.basename(os.fspath(path)))


def _criterion(eps, linkage, metric, rtol):
    import math

    from ..engine import make_criterion

    if not math.isfinite(eps) or eps < 0 or eps >= 2:
        raise InputError(f"--eps: eps must be in [0, 2) (0 = exact fibers), got {eps}")
    return make_criterion(eps, linkage, metric, True, rtol)


def _yn(b):
    return "yes" if b else "no"


@click.command("compare")
@click.argument("model_a", type=click.Path(dir_okay=False))
@click.argument("model_b", type=click.Path(dir_okay=False))
@click.option("--symmetry", type=click.Choice(SYM_COMPARE), default="fibration", show_default=True,
              help="Partitions compared by ARI / VI (counts are always given for fibers, opfibers, strict covers).")
@click.option("--eps", type=float, default=0.0, show_default=True, help="Tolerance in [0, 2): 0 = exact.")
@click.option("--linkage", type=click.Choice(["complete", "average"]), default="complete", show_default=True)
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="eps=0: relative rounding tolerance.")
@click.option("--align", is_flag=True,
              help="Match B's hidden units to A's first (Hungarian on incoming weights); "
                   "needed for independently trained models.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the comparison here.")
def compare(model_a, model_b, symmetry, eps, linkage, metric, rtol, align, json_out):
    """Compare the symmetries of two ONNX models of the same architecture, weight layer by
    weight layer: adjusted Rand index and variation of information of the partitions,
    refinement, counts."""
    from ..compare import compare_views
    from ..fileio import write_json_atomic
    from ..report import console
    from rich.table import Table

    _check_out([model_a, model_b], json_out)
    crit = _criterion(eps, linkage, metric, rtol)
    va, vb = _load(model_a), _load(model_b)
    res = compare_views(va, vb, symmetry, crit, align=align,
                        names=(os.path.basename(model_a), os.path.basename(model_b)))
    res.update({"model_a": os.fspath(model_a), "model_b": os.fspath(model_b),
                "criterion": {"eps": eps, **({"linkage": linkage, "metric": metric} if eps else {"rtol": rtol})}})
    t = Table(title=f"{os.path.basename(model_a)} (A) vs {os.path.basename(model_b)} (B): {symmetry}, eps={eps:g}"
              + (", B aligned to A" if align else ""), title_justify="left")
    for c in ("layer", "units", "A", "B", "ARI", "VI", "A refines B", "B refines A", "fibers A/B",
              "opfibers A/B", "strict covers A/B"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for r in res["layers"]:
        cnt = r["counts"]
        t.add_row(f"{r['layer']} {r['name_a']}" + (" (output)" if r["output_layer"] else ""), str(r["units"]),
                  str(r["classes_a"]), str(r["classes_b"]), f"{r['ari']:.3f}", f"{r['vi']:.3f}",
                  _yn(r["a_refines_b"]), _yn(r["b_refines_a"]),
                  *(f"{cnt[lev]['a']}/{cnt[lev]['b']}" for lev in res["levels"]))
    console.print(t)
    hidden = [r for r in res["layers"] if not r["output_layer"]]
    same = sum(r["equal"] for r in hidden)
    console.print(f"{same} of {len(hidden)} hidden layers have equal partitions; "
                  f"mean ARI {sum(r['ari'] for r in hidden) / max(1, len(hidden)):.3f}, "
                  f"mean VI {sum(r['vi'] for r in hidden) / max(1, len(hidden)):.3f} nats "
                  "(VI = 0 iff equal; units compared by index" + (" after alignment)" if align else ")"))
    if json_out:
        write_json_atomic(json_out, res)


@click.command("symmetry-metrics")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="Delta threshold(s) for the degree of symmetry (repeatable; default 0.05 0.1 0.15 0.2).")
@click.option("--normalise", type=click.Choice(["layer", "pair", "none"]), default="layer", show_default=True,
              help="Scale of Delta_ij: the layer's RMS unit norm, the pair's norm, or raw.")
@click.option("--warn-threshold", type=float, default=0.1, show_default=True)
@click.option("--warn-fraction", type=float, default=0.25, show_default=True,
              help="Warn when at least this fraction of a layer's units (a head's directions) are symmetric.")
@click.option("--heads", type=int, default=1, show_default=True,
              help="Attention heads per Q/K weight pair recognised by name only (double rotation per head); "
                   "attention found in the graph is split into its heads automatically.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def symmetry_metrics_cmd(model, thresholds, normalise, warn_threshold, warn_fraction, heads, json_out):
    """Per-layer parameter-symmetry metrics (position paper A.1): degree of permutation
    symmetry N_dos, near-duplicate units, spectral norm and stable rank of dense layers;
    double rotation per attention head (attention found in the graph: score MatMul ->
    Softmax -> MatMul with V, traced back to the Q/K projections) and for Q/K weight
    pairs recognised by name."""
    from fibgraph.importers.dag_units import find_qk_pairs
    from fibgraph.importers.onnx.attention_blocks import attention_metrics, linear_weights
    from fibgraph.importers.onnx.load import load_onnx

    from ..fileio import write_json_atomic
    from ..report import console
    from ..symmetry_metrics import DEFAULT_THRESHOLDS, double_rotation_deltas
    from rich.table import Table

    _check_out([model], json_out)
    thresholds = tuple(thresholds) or DEFAULT_THRESHOLDS
    for t in thresholds + (warn_threshold,):
        if not t > 0:
            raise InputError(f"thresholds must be positive, got {t:g}")
    if not 0 < warn_fraction <= 1:
        raise InputError(f"--warn-fraction must be in (0, 1], got {warn_fraction:g}")
    if heads < 1:
        raise InputError(f"--heads must be at least 1, got {heads}")
    if not os.path.isfile(model):
        raise InputError(f"{model}: no such file")
    onnx_model = load_onnx(model)
    am = attention_metrics(onnx_model, thresholds, relative=True, warn_threshold=warn_threshold,
                           warn_fraction=warn_fraction)
    qk = [p for p in find_qk_pairs(onnx_model) if not {p[0], p[1]} <= am["weights"]]
    att = list(am["attention"])
    keys = [f"{t:g}" for t in thresholds]
    for nq, nk, WQ, WK in qk:
        if WQ.shape[1] % heads:
            raise InputError(f"--heads {heads} does not divide the {WQ.shape[1]} columns of {nq!r}")
        k = WQ.shape[1] // heads
        d = np.concatenate([double_rotation_deltas(WQ[:, h * k:(h + 1) * k], WK[:, h * k:(h + 1) * k], True)
                            for h in range(heads)])
        att.append({"layer": f"{nq} / {nk}" + (f" ({heads} heads)" if heads > 1 else ""),
                    "metric": "double rotation", "source": "names", "q": nq, "k": nk, "shape": list(WQ.shape),
                    "heads": heads, "n": int(WQ.shape[1]), "relative": True,
                    "n_dos": {key: int((d < t).sum()) for key, t in zip(keys, thresholds)},
                    "n_dosb": {key: int(d.size - (d < t).sum()) for key, t in zip(keys, thresholds)},
                    "min_delta": float(d.min()) if d.size else None,
                    "median_delta": float(np.median(d)) if d.size else None})
    rep, dag_why = _dag_symmetry_metrics(model, thresholds, normalise, warn_threshold, warn_fraction,
                                         onnx_model)
    if rep is None:
        if not att:
            raise InputError(f"{model}: {dag_why}")
        measured = am["weights"] | {x for p in qk for x in p[:2]}
        skipped = [w for w in linear_weights(onnx_model) if w not in measured]
        if skipped:
            names = ", ".join(skipped[:6]) + (f", ... ({len(skipped) - 6} more)" if len(skipped) > 6 else "")
            msg = (f"dense-layer metrics skipped for {len(skipped)} weight layer{'s' * (len(skipped) != 1)} "
                   f"({names}): the hypergraph importer refuses the model: {dag_why}")
        else:
            msg = f"dense-layer metrics skipped: {dag_why}"
        rep = {"layers": [], "summary": {}, "warnings": [msg]}
    rep["warnings"].extend(am["warnings"])
    rep["attention"] = att
    rep["attention_summary"] = {
        "blocks": am["summary"]["blocks"], "heads": int(sum(a["heads"] for a in att)),
        "directions": int(sum(a["n"] for a in att)),
        "n_dos": {key: int(sum(a["n_dos"][key] for a in att)) for key in keys}}
    rep["model"] = os.fspath(model)

    t = Table(title=f"{os.path.basename(model)}: parameter symmetry (Delta normalised by {normalise})",
              title_justify="left")
    cols = ["layer", "kind", "units"] + [f"N_dos<{x:g}" for x in thresholds] + \
        [f"dup% <{warn_threshold:g}", "min Delta", "sigma_max", "stable rank"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("layer", "kind") else "right")
    for r in rep["layers"]:
        if r["output_layer"]:
            t.add_row(f"{r['layer']} {r['name']} (output)", r["kind"], str(r["units"]),
                      *(["-"] * (len(thresholds) + 2)), f"{r['spectral_norm']:.3g}", f"{r['stable_rank']:.2f}")
            continue
        wk = f"{warn_threshold:g}"
        t.add_row(f"{r['layer']} {r['name']}", r["kind"], str(r["units"]),
                  *(str(r["n_dos"][f"{x:g}"]) for x in thresholds),
                  f"{r['near_duplicate_fraction'][wk]:.0%}",
                  "-" if r["min_delta"] is None else f"{r['min_delta']:.3g}",
                  f"{r['spectral_norm']:.3g}", f"{r['stable_rank']:.2f}")
    if rep["layers"]:
        console.print(t)
        console.print("(layers from the hypergraph importer: unit vector = incoming rows, bias, outgoing "
                      "columns of every dense reader of the nodes tied to the unit)")
        s = rep["summary"]
        console.print(f"summary: {s['hidden_units']} hidden units; N_dos "
                      + ", ".join(f"{v} (<{k})" for k, v in s["n_dos"].items())
                      + "; near-duplicate units "
                      + ", ".join(f"{v:.0%} (<{k})" for k, v in s["near_duplicate_fraction"].items()))
    if att:
        ta = Table(title="attention: double rotation of (W_Q, W_K), Delta relative to the largest Gram eigenvalue",
                   title_justify="left")
        for c in ["layer", "metric", "n"] + [f"N_dos<{x:g}" for x in thresholds] + ["min Delta", "median Delta"]:
            ta.add_column(c, justify="left" if c in ("layer", "metric") else "right")
        for a in att:
            ta.add_row(a["layer"], a["metric"], str(a["n"]), *(str(a["n_dos"][key]) for key in keys),
                       "-" if a["min_delta"] is None else f"{a['min_delta']:.3g}",
                       "-" if a["median_delta"] is None else f"{a['median_delta']:.3g}")
        console.print(ta)
        s = rep["attention_summary"]
        console.print(f"attention summary: {s['blocks']} block{'s' * (s['blocks'] != 1)} found in the graph, "
                      f"{s['heads']} head{'s' * (s['heads'] != 1)}, {s['directions']} directions; N_dos "
                      + ", ".join(f"{v} (<{k})" for k, v in s["n_dos"].items()))
    for w in rep["warnings"]:
        console.print(f"warning: {w}")
    if json_out:
        write_json_atomic(json_out, rep)


def _dag_symmetry_metrics(path, thresholds, normalise, warn_threshold, warn_fraction, onnx_model=None):
    """(report, None): permutation rows from the hypergraph importer
    (:mod:`fibgraph.importers.dag_units`); (None, why) when that importer refuses the
    model or finds no weight layer."""
    from fibgraph.importers.dag_units import dag_layers
    from fibgraph.importers.onnx.importer import import_dag

    from ..symmetry_metrics import symmetry_metrics_units

    try:
        imp = import_dag(path) if onnx_model is None else import_dag(onnx_model, label=os.fspath(path))
    except InputError as e:
        why = str(e)
        return None, why[len(os.fspath(path)) + 2:] if why.startswith(os.fspath(path) + ": ") else why
    layers = []
    for ly in dag_layers(imp):
        extra = {"source": "hypergraph", "vector": {"incoming": int(ly["incoming"].shape[1]),
                                                    "bias": int(ly["bias"].shape[1]),
                                                    "outgoing": int(ly["outgoing"].shape[1])}}
        if ly["uses"] > 1:
            extra["uses"] = ly["uses"]
        if not ly["output_layer"] and not ly["has_reader"].all():
            extra["units_without_dense_reader"] = int((~ly["has_reader"]).sum())
        layers.append({**ly, "kind": ly["op"], "extra": extra})
    if not layers:
        return None, "no weight layer found"
    rep = symmetry_metrics_units(layers, thresholds, normalise, warn_threshold, warn_fraction)
    rep["graph"] = "hypergraph"
    return rep, None

COMMANDS = [compare, symmetry_metrics_cmd]
