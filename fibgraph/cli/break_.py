"""``fibgraph break``: fibration symmetry breaking of an ONNX model (main paper 3.4).

Registered by :mod:`fibgraph.cli` through :data:`COMMANDS`.  The work is
:func:`fibgraph.importers.onnx_break.break_onnx_model` (definitions in
:mod:`fibgraph.breaking`); this module reads the options, measures the
output change and the calibration loss with onnxruntime, prints one summary
and writes the report.
"""
from __future__ import annotations

import click

from ..errors import InputError
from .options import quiet_option

__all__ = ["COMMANDS", "break_cmd"]


def _summary(rep):
    from ..report import console

    covers = sum(len(ly["cover_sizes"]) for ly in rep["layers"])
    line = (f"break ({rep['symmetry']}, eps={rep['eps']:g}): {covers} covers, {rep['reinit']} units "
            f"re-initialised; largest output change {rep['max_output_change']:.3g}")
    if "loss_before" in rep:
        line += f"; loss {rep['loss_before']:.4g} -> {rep['loss_after']:.4g}"
    console.print(line)


@click.command("break")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None, help="Lifted model (.onnx).")
@click.option("--eps", type=float, default=0.0, show_default=True,
              help="Tolerance of the covers in [0, 2): 0 = exact covers, the function is unchanged.")
@click.option("--symmetry", type=click.Choice(["covering", "fibration"]), default="covering", show_default=True,
              help="covering = fibers meet flavoured opfibers (the paper's covers); fibration = fibers.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fresh weights.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz calibration data: x (and y for the loss before/after); default random inputs.")
@click.option("--report", "report_out", type=click.Path(dir_okay=False), default=None,
              help="Write the report (JSON) here.")
@quiet_option()
def break_cmd(model, out, eps, symmetry, seed, data, report_out, quiet):
    """Break the covers of MODEL: per cover one unit keeps the summed outgoing
    weights, the others get fresh input weights and zero outgoing weights."""
    from fibgraph.importers.api import atomic_write_bytes, atomic_write_json, check_options, evaluate, import_any
    from fibgraph.importers.dag_api import verify_dag
    from fibgraph.importers.onnx.runtime import load_data
    from fibgraph.importers.onnx_break import break_onnx_model

    from ..progress import shown
    from .checks import check_io

    if not model.lower().endswith(".onnx"):
        raise InputError(f"{model}: expected an .onnx model")
    if out is None:
        raise InputError("an output path is required (-o OUT.onnx)")
    check_io(models=[model], reads=[("--data", data)], writes=[("-o", out), ("--report", report_out)])
    eps = check_options(eps, "complete", "cosine")
    xy = load_data(data) if data is not None else None
    with shown(quiet):
        _, imp = import_any(model, data)
        lifted, rep = break_onnx_model(imp, eps=eps, symmetry=symmetry, seed=seed)
        rep["model"], rep["out"] = model, out
        v = verify_dag(imp.model, lifted, imp, data=data, seed=seed)
    rep["max_output_change"] = v["max_abs_diff"]
    rep["measured_on"] = "data" if data is not None else {"inputs": v["inputs"], "draws": v["draws"], "seed": seed}
    if xy is not None and xy[1] is not None:
        rep["loss_before"] = evaluate(imp.model, xy)["loss"]
        rep["loss_after"] = evaluate(lifted, xy)["loss"]
    atomic_write_bytes(out, lifted.SerializeToString())
    if report_out:
        atomic_write_json(report_out, rep)
    _summary(rep)


COMMANDS = [break_cmd]
