"""Analysis commands of the CLI: ``compare`` and ``symmetry-metrics``.

Registered by :mod:`fibgraph.cli` through :data:`COMMANDS`.  Errors are
:class:`~fibgraph.errors.InputError` (one line, exit 2); JSON is written
atomically.
"""
from __future__ import annotations

import os

import click

from .errors import InputError
from .fileio import check_output_path

__all__ = ["COMMANDS", "compare", "symmetry_metrics_cmd"]

SYM_COMPARE = ["fibration", "opfibration", "opfibration-flavoured", "covering", "covering-strict"]


def _check_out(inputs, out):
    check_output_path(out, inputs)


def _load(path):
    from importers.onnx_in import import_onnx

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    if not path.lower().endswith(".onnx"):
        raise InputError(f"{path}: expected an .onnx model")
    return import_onnx(path)


def _yn(b):
    return "yes" if b else "no"


@click.command("compare")
@click.argument("model_a", type=click.Path(dir_okay=False))
@click.argument("model_b", type=click.Path(dir_okay=False))
@click.option("--symmetry", type=click.Choice(SYM_COMPARE), default="fibration", show_default=True,
              help="Partitions compared by ARI / VI (counts are always given for fibers, opfibers, strict covers).")
@click.option("--eps", type=float, default=0.0, show_default=True, help="Tolerance in [0, 2): 0 = exact.")
@click.option("--linkage", type=click.Choice(["complete", "average"]), default="average", show_default=True)
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="eps=0: relative rounding tolerance.")
@click.option("--align", is_flag=True,
              help="Match B's hidden units to A's first (Hungarian on incoming weights); "
                   "needed for independently trained models.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the comparison here.")
def compare(model_a, model_b, symmetry, eps, linkage, metric, rtol, align, json_out):
    """Compare the symmetries of two ONNX models of the same architecture, layer by layer:
    adjusted Rand index and variation of information of the partitions, refinement, counts."""
    from importers.api import atomic_write_json, make_criteria

    from .compare import compare_networks
    from .report import console
    from rich.table import Table

    _check_out([model_a, model_b], json_out)
    ra, rb = _load(model_a), _load(model_b)
    crit = make_criteria(ra.network, eps, None, linkage, metric, True, rtol)
    res = compare_networks(ra.network, rb.network, symmetry, crit, align=align,
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
        atomic_write_json(json_out, res)


@click.command("symmetry-metrics")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="Delta threshold(s) for the degree of symmetry (repeatable; default 0.05 0.1 0.15 0.2).")
@click.option("--normalise", type=click.Choice(["layer", "pair", "none"]), default="layer", show_default=True,
              help="Scale of Delta_ij: the layer's RMS unit norm, the pair's norm, or raw.")
@click.option("--warn-threshold", type=float, default=0.1, show_default=True)
@click.option("--warn-fraction", type=float, default=0.25, show_default=True,
              help="Warn when at least this fraction of a layer's units are near-duplicates.")
@click.option("--heads", type=int, default=1, show_default=True,
              help="Attention heads per Q/K weight pair (double rotation per head).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def symmetry_metrics_cmd(model, thresholds, normalise, warn_threshold, warn_fraction, heads, json_out):
    """Per-layer parameter-symmetry metrics (position paper A.1): degree of permutation
    symmetry N_dos, near-duplicate units, spectral norm and stable rank; double rotation
    for recognised Q/K weight pairs."""
    from importers.api import atomic_write_json
    from importers.onnx_load import load_onnx

    from .report import console
    from .symmetry_metrics import DEFAULT_THRESHOLDS, double_rotation_dos, find_qk_pairs, symmetry_metrics
    from rich.table import Table

    _check_out([model], json_out)
    thresholds = tuple(thresholds) or DEFAULT_THRESHOLDS
    for t in thresholds + (warn_threshold,):
        if not t > 0:
            raise InputError(f"thresholds must be positive, got {t:g}")
    if not 0 < warn_fraction <= 1:
        raise InputError(f"--warn-fraction must be in (0, 1], got {warn_fraction:g}")
    if not os.path.isfile(model):
        raise InputError(f"{model}: no such file")
    onnx_model = load_onnx(model)
    qk = find_qk_pairs(onnx_model)
    try:
        res = _load(model)
        rep = symmetry_metrics(res.network, thresholds, normalise, warn_threshold, warn_fraction)
    except InputError as e:
        if not qk:
            raise
        rep = {"layers": [], "summary": {}, "warnings": [f"dense-layer metrics skipped: {e}"]}
    att = []
    for nq, nk, WQ, WK in qk:
        if WQ.shape[1] % heads:
            raise InputError(f"--heads {heads} does not divide the {WQ.shape[1]} columns of {nq!r}")
        att.append({"q": nq, "k": nk, "shape": list(WQ.shape), "heads": heads,
                    "n_dos": {f"{t:g}": double_rotation_dos(WQ, WK, t, relative=True, heads=heads)
                              for t in thresholds}})
    rep["attention"] = att
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
        s = rep["summary"]
        console.print(f"summary: {s['hidden_units']} hidden units; N_dos "
                      + ", ".join(f"{v} (<{k})" for k, v in s["n_dos"].items())
                      + "; near-duplicate units "
                      + ", ".join(f"{v:.0%} (<{k})" for k, v in s["near_duplicate_fraction"].items()))
    if att:
        ta = Table(title="double rotation (W_Q, W_K), relative Delta", title_justify="left")
        for c in ["Q", "K", "shape", "heads"] + [f"N_dos<{x:g}" for x in thresholds]:
            ta.add_column(c)
        for a in att:
            ta.add_row(a["q"], a["k"], "x".join(map(str, a["shape"])), str(a["heads"]),
                       *(str(a["n_dos"][f"{x:g}"]) for x in thresholds))
        console.print(ta)
    for w in rep["warnings"]:
        console.print(f"warning: {w}")
    if json_out:
        atomic_write_json(json_out, rep)


COMMANDS = [compare, symmetry_metrics_cmd]
