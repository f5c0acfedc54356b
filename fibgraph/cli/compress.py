"""CLI commands for compression studies: ``tune`` (greedy per-layer eps,
Algorithm 3), ``compare-methods`` (fibration against pruning and folding
at equal node counts) and ``retune`` (compress-retune, Algorithm 2).  Registered by :mod:`fibgraph.cli` through ``COMMANDS``.
"""
from __future__ import annotations

import os
import shlex

import click

from ..errors import InputError
from .checks import check_io
from .options import json_option, linkage_option, metric_option, quiet_option

__all__ = ["COMMANDS", "tune", "compare_methods_cmd", "retune_cmd"]


def _check_model(model):
    if not os.path.isfile(model):
        raise InputError(f"{model}: no such file")


def _parse_eps_list(text, what="--eps"):
    vals = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise InputError(f"{what}: {part!r} is not a number "
                             "(give a comma-separated list, e.g. 0.05,0.1,0.2)") from None
        vals.append(v)
    if not vals:
        raise InputError(f"{what}: give at least one value")
    return vals


@click.command("tune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), required=True,
              help="Calibration .npz with arrays x, y.")
@click.option("--tau", type=float, default=0.01, show_default=True,
              help="Allowed relative loss increase: loss <= (1 + tau) * original loss.")
@click.option("--steps", type=int, default=8, show_default=True,
              help="Bisection steps per layer (resolution 2 / 2**steps; the same default as retune's).")
@linkage_option
@metric_option
@click.option("--no-rescale", is_flag=True, help="Disable the rescaling merge of proportional rows.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True,
              help="Eps file to write (JSON {layer weight name: eps}).")
@click.option("--report", "report_out", type=click.Path(dir_okay=False), default=None,
              help="Write the full report (every evaluation) here.")
@click.option("--keep", type=float, default=None,
              help="Instead of --tau: the per-layer eps keeping this fraction of the parameters (0, 1] at the "
                   "least calibration loss (within 2%).")
@quiet_option("--no-progress")
def tune(model, data, tau, steps, linkage, metric, no_rescale, out, report_out, keep, quiet):
    """Greedy per-layer eps of MODEL (Algorithm 3): for each layer in turn, the largest
    eps keeping the calibration loss <= (1 + tau) * the original loss; with
    --keep F, the eps keeping the fraction F of the parameters where the
    calibration loss rises least."""
    from fibgraph.importers.api import atomic_write_json
    from fibgraph.importers.tuning import make_compressor, tune_model

    from ..progress import shown, task
    from ..report import console

    _check_model(model)
    check_io(models=[model], reads=[("--data", data)], writes=[("-o", out), ("--report", report_out)])
    if steps < 0 or steps > 40:
        raise InputError(f"--steps must be in 0..40, got {steps}")
    if not (tau >= 0):
        raise InputError(f"--tau must be >= 0, got {tau}")
    if keep is not None:
        from fibgraph.importers.keep import check_keep

        check_keep(keep)
    with shown(quiet):
        mc = make_compressor(model, linkage, metric, not no_rescale, data=data)
        if not mc.tunable:
            raise InputError(f"{model}: no compressible (non-output) layer to tune")
        total = len(mc.tunable) * (steps + 1)
        done = [0]
        what = "keeping the fraction of parameters" if keep is not None else "ok = loss <= (1+tau) x original"
        with task(f"tuning {len(mc.tunable)} layers ({what})", total=total) as advance:

            def on_step(layer, k, eps, loss, ok=None):
                if ok is None:       # --keep: a greedy move (loss = the fraction kept)
                    now = min(k + 1, total)
                    advance(max(0, now - done[0]), f"tuning {layer}: eps {eps:.3g} keeps {loss:.1%}")
                    done[0] = max(done[0], now)
                    return
                # k = 0: the probe at the top of the range; 1..steps: bisection steps
                now = mc.tunable.index(layer) * (steps + 1) + k + 1
                advance(now - done[0], f"tuning {layer}: eps {eps:.3g} loss {loss:.4g} {'ok' if ok else 'over'}"
                                       " (ok = <= (1+tau) x original)")
                done[0] = now

            report = tune_model(model, data, tau=tau, steps=steps, linkage=linkage, metric=metric,
                                rescale=not no_rescale, on_step=on_step, compressor=mc, keep=keep)
    from rich.table import Table

    if report["notes"]:
        how = f"{linkage} linkage; " + "; ".join(report["notes"])
    else:
        how = f"{linkage} linkage, {metric}" + (", rescaling merge" if not no_rescale else "")
    what = f"keep {keep:g}" if keep is not None else f"tau {tau:g}"
    console.print(f"{model}: greedy eps ({report['graph']}; {what}, {how})", soft_wrap=True)
    t = Table()
    for c in ("layer (weight)", "eps", "nodes", "kept"):
        t.add_column(c, justify="left" if c.startswith("layer") else "right")
    for ly in report["layers"]:
        tied = ly.get("tied") or []
        name = ly["weight"] + (f" (+ {tied[0]})" if len(tied) == 1 else f" (+ {len(tied)} tied)" if tied else "")
        eps_cell = "output" if ly["output_layer"] else "kept whole" if ly.get("kept_whole") else f"{ly['eps']:.4g}"
        t.add_row(name, eps_cell,
                  f"{ly['nodes_before']} -> {ly['nodes_after']}",
                  f"{ly['nodes_after'] / max(ly['nodes_before'], 1):.0%}")
    console.print(t)
    pb, pa = report["params_before"], report["params_after"]
    console.print(f"parameters: {pb:,} -> {pa:,} ({pa / max(pb, 1):.1%} kept)")
    limit = "" if report["limit"] is None else f" (limit {report['limit']:.4f})"
    if keep is not None:
        print_keep(report["keep"])
    console.print(f"calibration loss {report['loss_before']:.4f} -> {report['loss_after']:.4f}"
                  f"{limit}; accuracy {report['accuracy_before']:.4f} -> "
                  f"{report['accuracy_after']:.4f}; {report['evaluations']} evaluations, "
                  f"{report['distinct_models_run']} distinct models, {report['seconds']:.1f} s")
    atomic_write_json(out, report["eps"])
    if report_out:
        atomic_write_json(report_out, report)
    # the metric that ran: with cosine asked for and no layer where it is exact,
    # every layer ran euclidean, and the command says so
    ran = "euclidean" if metric == "cosine" and getattr(mc, "cosine_layers", 1) == 0 else metric
    flags = f" --linkage {linkage} --metric {ran}" + (" --no-rescale" if no_rescale else "")
    console.print(f"wrote {out}; use it with:", soft_wrap=True)
    click.echo(f"  fibgraph compress {shlex.quote(model)} --eps-file {shlex.quote(out)}{flags} -o SMALL.onnx")


def print_keep(found):
    """One line on what ``--keep`` got (:func:`fibgraph.importers.keep.keep_search`)."""
    from ..report import console

    names = found.get("names", {})
    eps = ", ".join(f"{names.get(g, g)} {e:.4g}" for g, e in found["group_eps"].items()) or "none (exact fibers only)"
    landed = "within" if found["landed"] else "NOT within"
    console.print(f"--keep {found['target']:g} ({found['mode']}): {found['params_after']:,} of "
                  f"{found['params_before']:,} parameters kept ({found['kept']:.1%}, {landed} "
                  f"{found['tolerance']:g} of the target); eps per group: {eps}")
    if found.get("note"):
        console.print(f"note: {found['note']}")


def print_repair(info):
    """One line per layer the repair re-fitted (:mod:`fibgraph.importers.repair`)."""
    from ..report import console

    done = [r for r in info["layers"] if "error_after" in r]
    bn = [r["node"] for r in info["layers"] if r.get("batchnorm")]
    if not done and not bn:
        console.print("repair: no layer reads merged units")
    for r in done:
        rel = r["error_after"] / r["error_before"] if r["error_before"] > 0 else 1.0
        console.print(f"repair {r['node']} ({r['op']}, {r['inputs_before']} -> {r['inputs_after']} inputs): "
                      f"pre-activation error on the calibration data x{rel:.3g}")
    if bn:
        console.print("repair: BatchNorm statistics re-estimated: " + ", ".join(bn))
    for r in info["layers"]:
        if "skipped" in r:
            console.print(f"repair: {r['node']} left as merged ({r['skipped']})")


@click.command("compare-methods")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), required=True, help="Test .npz with arrays x, y.")
@click.option("--eps", "eps_text", default=None,
              help="Comma-separated tolerances, one fibration point each; a tolerance giving the same base "
                   "as the one before is dropped, and the output says so "
                   "[default: 0.02,0.05,0.1,0.2,0.3,0.4,0.5,0.7 unless --keep is given].")
@click.option("--keep", "keep_text", default=None,
              help="Comma-separated fractions of the parameters (e.g. 0.5,0.3,0.2,0.1): one point each, the "
                   "fibration base found by --keep sets the units per group for every method.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration .npz (x, y; separate from --data): data-aware --keep, and a '+repair' row "
                   "per method (the same closed-form repair for fibration, pruning and folding).")
@click.option("--finetune-epochs", type=int, default=0, show_default=True,
              help="With --calib: also every model after this many epochs of Adam (lr 1e-3, batch 100) on "
                   "--calib, the same for every method (needs torch).")
@click.option("--eps-file", "eps_files", multiple=True, type=click.Path(dir_okay=False),
              help="Also a point per eps file (e.g. from 'fibgraph tune'); repeatable.")
@linkage_option
@metric_option
@click.option("--no-rescale", is_flag=True, help="Disable the rescaling merge of proportional rows.")
@click.option("--methods", default="random,l2,l1,fold", show_default=True,
              help="Baselines, comma-separated: random, l2, l1, fold.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random pruning and k-means.")
@click.option("-o", "--output", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Plot of accuracy against parameters kept (.png or .svg).")
@json_option("every row")
@quiet_option()
def compare_methods_cmd(model, data, eps_text, keep_text, calib, finetune_epochs, eps_files, linkage, metric,
                        no_rescale, methods, seed, plot_out, json_out, quiet):
    """Fibration compression of MODEL against random, L2 and L1 pruning and k-means
    folding, all at the fibration base's node counts per layer."""
    from fibgraph.importers.api import atomic_write_json
    from fibgraph.importers.compare import METHOD_LABELS, compare_methods, plot_comparison
    from rich.table import Table

    from ..report import console

    _check_model(model)
    if plot_out and os.path.splitext(plot_out)[1].lower() not in (".png", ".svg", ".pdf"):
        raise InputError(f"{plot_out}: the plot must end in .png, .svg or .pdf")
    check_io(models=[model], reads=[("--data", data), ("--calib", calib)] + [("--eps-file", f) for f in eps_files],
             writes=[("-o", plot_out), ("--json", json_out)])
    keeps = []
    if keep_text is not None:
        from fibgraph.importers.keep import check_keep

        keeps = [check_keep(v, "--keep") for v in _parse_eps_list(keep_text, "--keep")]
    if finetune_epochs < 0 or (finetune_epochs and calib is None):
        raise InputError("--finetune-epochs needs --calib (the data to fine-tune on) and must be >= 0")
    if eps_text is None:
        eps_text = "" if keeps else "0.02,0.05,0.1,0.2,0.3,0.4,0.5,0.7"
    eps_list = _parse_eps_list(eps_text) if eps_text else []
    meths = tuple(m for m in methods.replace(" ", "").split(",") if m)
    from ..progress import shown

    with shown(quiet):
        res = compare_methods(model, data, eps_list, eps_files, linkage, metric, not no_rescale,
                              meths, seed, keeps=keeps, calib=calib, finetune_epochs=finetune_epochs)
    dag = res.get("graph") == "hypergraph"
    how = f"{linkage}, {res['metric']}" + (", rescale" if res["rescale"] else "")
    t = Table(title=f"{model}: equal nodes per {'weight (hypergraph)' if dag else 'layer'} ({how}); "
                    f"n = {res['n']}", title_justify="left")
    for c in ("point", "method", "nodes", "params kept", "accuracy", "loss"):
        t.add_column(c, justify="left" if c in ("point", "method") else "right")
    for r in res["rows"]:
        base_m = r["method"].replace("+ft", "").replace("+repair", "")
        label = METHOD_LABELS.get(base_m, base_m) + (" + repair" if "+repair" in r["method"] else "") + \
            (" + fine-tuned" if r["method"].endswith("+ft") else "")
        t.add_row(r["point"], label,
                  "-".join(str(c) for c in r["nodes"]),
                  f"{r['params']:,} ({r['params_kept']:.1%})", f"{r['accuracy']:.4f}", f"{r['loss']:.4f}")
    console.print(t)
    dropped = res.get("dropped") or []
    if dropped:
        same = "; ".join(f"{d['point']} = {d['same_as']}" for d in dropped)
        console.print(f"{len(dropped)} of {len(eps_list)} eps points dropped: the same base as the eps before "
                      f"({same})", soft_wrap=True)
    for point, k in res.get("keep", {}).items():
        console.print(f"{point} ({k['mode']}): the fibration base keeps {k['kept']:.1%}"
                      + ("" if k["landed"] else f" (not within {k['tolerance']:g}: {k.get('note', '')})"))
    if dag:
        console.print("nodes per weight: " + ", ".join(res["layers"]))
        for note in res.get("notes", []):
            console.print(note)
    if plot_out:
        plot_comparison(res, plot_out)
        console.print(f"wrote {plot_out}")
    if json_out:
        atomic_write_json(json_out, res)
        console.print(f"wrote {json_out}")


@click.command("retune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--train", "train_path", type=click.Path(dir_okay=False), required=True,
              help="Training .npz with arrays x, y.")
@click.option("--val", "val_path", type=click.Path(dir_okay=False), required=True,
              help="Held-out .npz (x, y): early stopping, and the loss test unless --check.")
@click.option("--check", "check_path", type=click.Path(dir_okay=False), default=None,
              help="Data of the loss test L <= (1 + rho) * L0 and of the greedy eps (default: --val).")
@click.option("--rho", type=float, default=0.05, show_default=True, help="Allowed relative loss increase per round.")
@click.option("--tau", type=float, default=0.01, show_default=True, help="Greedy eps tolerance (Algorithm 3).")
@click.option("--q", type=float, default=1.05, show_default=True, help="Over-compression factor of the eps.")
@click.option("--eps-floor", type=float, default=0.0, show_default=True,
              help="Over-compress every layer with at least this eps (0: as the paper).")
@click.option("--max-iters", type=int, default=10, show_default=True,
              help="Most compress-retune rounds.")
@click.option("--steps", type=int, default=8, show_default=True,
              help="Bisection steps per layer of each round's greedy eps (resolution 2 / 2**steps; the same "
                   "default as tune's).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate of the retuning.")
@click.option("--batch", type=int, default=100, show_default=True, help="Mini-batch size of the retuning.")
@click.option("--max-epochs", type=int, default=50, show_default=True, help="Most epochs of retuning per round.")
@click.option("--patience", type=int, default=3, show_default=True,
              help="Early stopping: epochs without a better --val loss.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the mini-batch order.")
@linkage_option
@metric_option
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True,
              help="The compressed, retuned ONNX model.")
@click.option("--report", "report_out", type=click.Path(dir_okay=False), default=None,
              help="Write every round (eps, parameters, losses) here as JSON.")
@quiet_option()
def retune_cmd(model, train_path, val_path, check_path, rho, tau, q, eps_floor, max_iters, steps, lr, batch,
               max_epochs, patience, seed, linkage, metric, out, report_out, quiet):
    """Compress-retune of MODEL (Algorithm 2): greedy eps, over-compress by q, retune the
    base (as a torch module of the base's shapes) with early stopping; repeat
    while the loss stays within (1 + rho) of the original's."""
    from fibgraph.importers.api import atomic_write_bytes, atomic_write_json, load_data

    from ..report import console

    _check_model(model)
    check_io(models=[model], reads=[("--train", train_path), ("--val", val_path), ("--check", check_path)],
             writes=[("-o", out), ("--report", report_out)])
    for name, v, lo in (("--max-iters", max_iters, 1), ("--batch", batch, 1), ("--max-epochs", max_epochs, 1),
                        ("--patience", patience, 1), ("--steps", steps, 0)):
        if v < lo:
            raise InputError(f"{name} must be >= {lo}, got {v}")
    if not (0 <= tau) or not (lr > 0) or not (0 <= eps_floor < 2):
        raise InputError("--tau must be >= 0, --lr > 0 and --eps-floor in [0, 2)")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError("retune needs torch: pip install torch==2.13.0 (CPU build)") from None
    from fibgraph.importers.retune_onnx import compress_retune_onnx

    train = load_data(train_path, need_y=True)
    val = load_data(val_path, need_y=True)
    check = load_data(check_path, need_y=True) if check_path else None

    from ..progress import shown, task

    with shown(quiet), task(f"compress-retune: at most {max_iters} rounds (greedy eps, over-compress, "
                            "retune)", total=max_iters) as advance:
        def log(h):
            console.print(f"round {h['iter']}: {h['params_start']:,} -> {h['params_over']:,} params; check loss "
                          f"{h['loss_over']:.4f} over-compressed, {h['loss_retuned']:.4f} retuned ({h['epochs']} "
                          f"epochs): {'accepted' if h['accepted'] else 'rejected'}")
            advance(1, f"compress-retune: round {h['iter']} done")

        res = compress_retune_onnx(model, train, val, check=check, rho=rho, tau=tau, q=q, steps=steps,
                                   max_iters=max_iters, linkage=linkage, metric=metric, eps_floor=eps_floor,
                                   retune_kw=dict(lr=lr, batch=batch, max_epochs=max_epochs, patience=patience,
                                                  seed=seed), log=log)
    console.print(f"stopped: {res.stopped}")
    console.print(f"parameters: {res.params0:,} -> {res.params:,} ({res.params / max(res.params0, 1):.1%} kept); "
                  f"check loss {res.loss0:.4f} -> {res.loss:.4f}, accuracy {res.accuracy0:.4f} -> {res.accuracy:.4f}")
    atomic_write_bytes(out, res.model.SerializeToString())
    if report_out:
        atomic_write_json(report_out, {"model": model, "output": out, "rho": rho, "tau": tau, "q": q,
                                       "eps_floor": eps_floor, "params_before": res.params0,
                                       "params_after": res.params, "loss_before": res.loss0, "loss_after": res.loss,
                                       "accuracy_before": res.accuracy0, "accuracy_after": res.accuracy,
                                       "eps": res.eps, "stopped": res.stopped, "history": res.history})
    console.print(f"wrote {out}")


COMMANDS = [tune, compare_methods_cmd, retune_cmd]
