"""``fibgraph sweep``: every (model, symmetry, eps) on Dask, one tidy table, plots.

Registered by :mod:`fibgraph.cli` through :data:`COMMANDS`.  The work is
:func:`fibgraph.importers.sweep.run_sweep`; the figures :func:`fibgraph.sweep_plots.plot_sweep`.
stdout: one tab-separated line per (model, setting) under a header; stderr:
progress (rich), the files written and how many tasks failed.  Exit status 0,
1 when some task failed (the table is written all the same), 2 on bad input.
"""
from __future__ import annotations

import math
import os

import click

from ..errors import InputError
from ..fileio import check_output_path

__all__ = ["COMMANDS", "sweep"]

SUMMARY = ["model", "symmetry", "eps", "nodes_before", "nodes_after", "params_before", "params_after",
           "accuracy", "loss", "seconds", "error"]


def _symmetries(text):
    from fibgraph.importers.sweep import SWEEP_SYMMETRIES

    syms = [s.strip() for s in text.split(",")]
    bad = [s for s in syms if s not in SWEEP_SYMMETRIES]
    if bad or not syms:
        raise InputError(f"--symmetry {text!r}: expected a comma-separated list of "
                         f"{', '.join(SWEEP_SYMMETRIES)}")
    return list(dict.fromkeys(syms))


def _check_plots_dir(plots, inputs):
    if plots is None:
        return
    if os.path.exists(plots) and not os.path.isdir(plots):
        raise InputError(f"{plots}: --plots must be a folder, not a file")
    if any(os.path.abspath(plots) == os.path.abspath(p) for p in inputs):
        raise InputError(f"{plots}: --plots path equals an input path")
    parent = os.path.dirname(os.path.abspath(plots))
    if not os.path.isdir(parent):
        raise InputError(f"{plots}: folder {parent} does not exist")


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("\t", " ").replace("\n", " ")


def _summary_line(model, setting, res):
    layers = res.get("layers") or []
    vals = {"model": model, "symmetry": setting[0], "eps": setting[1],
            "nodes_before": sum(ly["nodes_before"] for ly in layers) if layers else None,
            "nodes_after": sum(ly["nodes_after"] for ly in layers) if layers else None,
            **{k: res.get(k) for k in ("params_before", "params_after", "accuracy", "loss", "seconds", "error")}}
    return "\t".join(_fmt(vals[k]) for k in SUMMARY)


@click.command("sweep")
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--eps", "eps_list", required=True,
              help="Comma-separated tolerances in [0, 2), e.g. 0,0.05,0.1 (0 = exact fibers).")
@click.option("--symmetry", "symmetries", default="fibration", show_default=True,
              help="Comma-separated symmetries (fibration, opfibration, opfibration-flavoured, covering, "
                   "covering-strict, automorphism).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz with x, y: accuracy and loss of every compressed model (in-balanced symmetries).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="A running Dask scheduler (tcp://host:8786); default: a local cluster.")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Worker processes of the local cluster (one thread each).")
@click.option("--linkage", type=click.Choice(["complete", "average"]), default="complete", show_default=True)
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True,
              help="TABLE.csv (or TABLE.parquet, with pyarrow).")
@click.option("--plots", type=click.Path(file_okay=False), default=None,
              help="Folder for the figures (SVG and PNG): units kept vs eps, and across checkpoints.")
@click.option("--quiet", is_flag=True, help="No progress or notes on stderr (errors still).")
def sweep(models, eps_list, symmetries, data, scheduler, workers, linkage, metric, out, plots, quiet):
    """Colour (and compress) every MODEL at every --symmetry and --eps on Dask;
    write one tidy table (one row per model, setting and layer).  Model paths
    must be readable by the workers (a shared file system on a real cluster)."""
    from fibgraph.importers.sweep import check_data, check_table_path, make_settings, parse_eps_list, run_sweep, write_table

    if not models:
        raise InputError("no models given (fibgraph sweep MODEL... --eps 0,0.1 -o table.csv)")
    settings = make_settings(_symmetries(symmetries), parse_eps_list(eps_list))
    inputs = list(models) + ([data] if data else [])
    check_output_path(out, inputs, "table")
    check_table_path(out)
    _check_plots_dir(plots, inputs + [out])
    if scheduler is None and workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if not any(os.path.isfile(m) for m in models):
        raise InputError(f"none of the models is a file: {', '.join(models)}")
    check_data(data)                         # x and y, before anything starts

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    err = Console(stderr=True, quiet=quiet)
    failed = 0
    # the header and the bar come with the first finished task: an error
    # before that (a scheduler that cannot be reached) stays one line
    progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("tasks"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err,
                        redirect_stdout=False, redirect_stderr=False)
    bar = progress.add_task("sweep", total=len(models) * len(settings))

    def on_done(done, total, model, setting, res):
        nonlocal failed
        failed += res.get("error") is not None
        if not progress.live.is_started:
            click.echo("\t".join(SUMMARY))
            progress.start()
        progress.update(bar, completed=done, total=total)
        click.echo(_summary_line(model, setting, res))

    try:
        df = run_sweep(models, settings, scheduler=scheduler, workers=workers, data=data, on_done=on_done,
                       linkage=linkage, metric=metric)
    finally:
        if progress.live.is_started:
            progress.stop()
    write_table(df, out)
    err.print(f"wrote {out} ({len(df)} rows)", highlight=False)
    if plots:
        from ..sweep_plots import plot_sweep

        paths = plot_sweep(df, plots)
        err.print(f"wrote {len(paths)} figures to {plots}", highlight=False)
    if failed:
        click.echo(f"fibgraph: {failed} of {len(set(zip(df['model'], df['symmetry'], df['eps'])))} sweep tasks "
                   f"failed (see the error column of {out})", err=True)
        return 1
    return 0


COMMANDS = [sweep]
