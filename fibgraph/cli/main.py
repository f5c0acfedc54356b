"""The ``fibgraph`` command line.

Exit status: 0 on success, 2 on bad input or usage (one line on stderr, no
traceback, nothing written), 1 when ``hierarchy`` finds a violation.
"""
from __future__ import annotations

import os
import sys

import click

from ..errors import InputError
from ..progress import shown
from .checks import check_io, check_rtol
from .options import DEFAULT_METRIC, json_option, linkage_option, quiet_option

SYM_MODEL = ["fibration", "opfibration", "opfibration-flavoured", "covering", "covering-strict",
             "automorphism"]
GRAPH_EXT = (".edgelist", ".txt", ".graphml", ".gml")


def _colouring_options(f):
    f = click.option("--rtol", type=float, default=1e-5, show_default=True, callback=check_rtol,
                     help="eps=0: relative tolerance of 'equal up to float rounding'.")(f)
    f = click.option("--no-rescale", is_flag=True,
                     help="Disable the rescaling merge of proportional rows (cosine, ReLU family).")(f)
    f = click.option("--metric", type=click.Choice(["cosine", "euclidean", "activation"]), default=DEFAULT_METRIC,
                     show_default=True, help="Distance between signature rows for eps > 0 (cosine only where the "
                                             "activation is positively homogeneous, elsewhere the magnitude-aware "
                                             "distance; activation: euclidean on rows weighted by the inputs' RMS "
                                             "activation on --data).")(f)
    f = linkage_option(f)
    f = click.option("--eps-file", type=click.Path(dir_okay=False), default=None,
                     help="JSON {layer weight name: eps} overriding --eps per layer.")(f)
    f = click.option("--eps", type=float, default=0.0, show_default=True,
                     help="Tolerance in [0, 2): 0 = exact fibers.")(f)
    return f


def _max_memory_option(group):
    """``--max-memory SIZE``: the memory limit of :mod:`fibgraph.limits` (the group's
    resets it on every run; a command's, given after the command, overrides it)."""
    def set_limit(ctx, param, value):
        from ..limits import set_max_memory

        if group or value is not None:
            set_max_memory(value)
        if group:                       # the limit lasts one run (in-process callers, tests)
            ctx.call_on_close(set_max_memory)
        return value

    return click.Option(["--max-memory"], metavar="SIZE", expose_value=False, is_eager=True, callback=set_limit,
                        envvar="FIBGRAPH_MAX_MEMORY" if group else None,
                        help="Largest allocation an input may ask for (e.g. 16G, 500M; default a quarter of the "
                             "physical memory; env FIBGRAPH_MAX_MEMORY); anything larger is refused before "
                             "it is allocated.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fibgraph")
def cli():
    """fibgraph: fibrations, opfibrations, coverings and orbits of trained networks,
    and exact compression to the base network."""
    from ..limits import linkage_rows_env

    linkage_rows_env()      # a bad FIBGRAPH_EXACT_LINKAGE_ROWS: one line before any work


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@json_option("the layers and what is supported")
@quiet_option()
def inspect(model, json_out, quiet):
    """Layers, op types, parameter count of MODEL (.onnx) and what is supported."""
    from fibgraph.importers.inspect import inspect_model

    check_io(models=[model], writes=[("--json", json_out)])
    with shown(quiet):
        info = inspect_model(model)
    if json_out:
        from fibgraph.importers.api import atomic_write_json

        atomic_write_json(json_out, info)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--symmetry", type=click.Choice(SYM_MODEL), default="fibration", show_default=True,
              help="Which symmetry colours the nodes (fibers, opfibers, covers, orbits).")
@_colouring_options
@json_option("the per-layer report")
@click.option("--graphml", "graphml_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the coloured graph as GraphML (node attributes layer, index, kind, colour; edge weight).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz with sample inputs (one array per input name, or x) for models read as a hypergraph.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-layer table (layer, group, units, classes, kept, params, eps) as CSV.")
@quiet_option()
def color(model, symmetry, eps, eps_file, linkage, metric, no_rescale, rtol, json_out, graphml_out, data, csv_out,
          quiet):
    """Colour MODEL (.onnx) or a graph (.edgelist/.txt/.graphml/.gml) by a symmetry."""
    if not model.lower().endswith(".onnx"):
        if model.lower().endswith(GRAPH_EXT):
            check_io(models=[("graph", model)], reads=[("--eps-file", eps_file), ("--data", data)],
                     writes=[("--json", json_out), ("--graphml", graphml_out)])
            from .graphs import color_graph_file

            if csv_out:
                raise InputError("--csv: the per-layer table is for models (.onnx); use --json for a graph file")
            if metric == "activation":
                raise InputError("--metric activation needs an ONNX model and --data (a graph file has no activations)")

            color_graph_file(model, symmetry, eps=eps, json_out=json_out, linkage=linkage, metric=metric,
                             rtol=rtol, graphml_out=graphml_out)
            return
        raise InputError(f"{model}: unknown file type (expected .onnx, .edgelist, .txt, .graphml or .gml)")
    from fibgraph.importers.api import atomic_write_json, color_model
    from ..report import print_colour_report

    check_io(models=[model], reads=[("--eps-file", eps_file), ("--data", data)],
             writes=[("--json", json_out), ("--graphml", graphml_out), ("--csv", csv_out)])
    with shown(quiet):
        report, _, col = color_model(model, symmetry, eps, eps_file, linkage, metric, not no_rescale, rtol,
                                     data=data)
    print_colour_report(report)
    if json_out:
        atomic_write_json(json_out, report)
    _write_csv(csv_out, report)
    if graphml_out:
        from ..fileio import atomic_path

        with atomic_path(graphml_out, suffix=".graphml") as tmp:
            col.graph.write_graphml(tmp, col.labels)


def _padded(module, multiple):
    """``(module, zeros added)``: a chain padded to ``multiple``; an
    interpreter as it is (``None``)."""
    from torch import nn

    from fibgraph.importers.torch_out import pad_widths

    if not isinstance(module, nn.Sequential):
        return module, None
    return pad_widths(module, multiple)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True,
              help="The compressed (base) model, ONNX.")
@click.option("--symmetry", type=click.Choice(["fibration", "covering", "covering-strict", "automorphism"]),
              default="fibration", show_default=True,
              help="In-balanced symmetry whose classes are merged (these preserve the function).")
@_colouring_options
@click.option("--verify", is_flag=True, help="Run both models and report the largest output difference.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Calibration .npz with x (and y): --verify runs on it, the repair re-fits on it (use data "
                   "apart from your test set), --keep is data-aware on it.")
@click.option("--report", "report_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-layer report (and the verification) as JSON to this file.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-layer table (layer, group, units, classes, kept, params, eps) as CSV.")
@click.option("--torch", "torch_out", type=click.Path(dir_okay=False), default=None,
              help="Also save the base as a torch module (torch.save; load with torch.load(p, weights_only=False)).")
@click.option("--pad-to", "pad_to", type=click.IntRange(min=1), default=None,
              help="With --torch: round the torch base's hidden widths up to a multiple of N with zero units "
                   "(the same function; matrix kernels run faster at widths like 144 than 142).")
@click.option("--keep", type=float, default=None,
              help="Fraction of the parameters to keep, in (0, 1]: per-layer eps found to land within 2% "
                   "(with --data: spent where the calibration loss rises least; else data-free).")
@click.option("--repair/--no-repair", default=None,
              help="Re-fit the layers reading merged units on --data (ridge least squares) and shift BatchNorm "
                   "statistics; default: on when --data is given.")
@click.option("--external-data", "external_data", is_flag=True, default=None,
              help="Write the weights to OUT.data beside OUT (automatic above 2 GB).")
@quiet_option()
def compress(model, out, symmetry, eps, eps_file, linkage, metric, no_rescale, rtol, verify, data, report_out,
             csv_out, torch_out, pad_to, keep, repair, external_data, quiet):
    """Compress MODEL to its base network and write it to OUT (ONNX)."""
    from fibgraph.importers.api import atomic_write_json, compress_model
    from ..report import print_colour_report

    check_io(models=[model], reads=[("--eps-file", eps_file), ("--data", data)],
             writes=[("-o", out), ("--report", report_out), ("--csv", csv_out), ("--torch", torch_out)])
    if pad_to is not None and not torch_out:
        raise InputError("--pad-to rounds the torch base's widths: give --torch OUT.pt too")
    with shown(quiet):
        report = compress_model(model, out, symmetry, eps, eps_file, linkage, metric, not no_rescale, rtol,
                                verify=verify, data=data, keep=keep, repair=repair,
                                external_data=external_data)
        if torch_out:
            from fibgraph.importers.torch_out import onnx_to_torch, save_torch

            module, how = onnx_to_torch(out)
            report["torch"] = {"path": os.fspath(torch_out), "module": type(module).__name__, "how": how}
            if pad_to is not None:
                module, added = _padded(module, pad_to)
                report["torch"].update(pad_to=pad_to, zero_params_added=added)
                how += f", widths padded to multiples of {pad_to} (+{added:,} zero parameters)" if added is not None \
                    else f", not padded ({type(module).__name__} is not a chain of layers)"
            save_torch(module, torch_out)
    print_colour_report(report)
    if "keep" in report:
        from .compress import print_keep

        print_keep(report["keep"])
    if report.get("repair"):
        from .compress import print_repair

        print_repair(report["repair"])
    if torch_out:
        click.echo(f"torch module: {type(module).__name__} ({how}) -> {torch_out}")
    if report_out:
        atomic_write_json(report_out, report)
    _write_csv(csv_out, report)
    for line in _next_steps(model, out, report, eps, eps_file, verify or data is not None, data, csv_out,
                            report_out):
        click.echo(line)


def _next_steps(model, out, report, eps, eps_file, verified, data, csv_out, report_out):
    """What the compression gave and what to run next, as lines never wrapped
    (the commands in them are ready to paste)."""
    import shlex

    q = shlex.quote
    pb, pa = report["params_before"], report["params_after"]
    written = [p for p in (report_out, csv_out) if p]
    lines = [f"wrote {out}" + (f" (and {', '.join(written)})" if written else "")]
    if eps == 0 and not eps_file and pa >= 0.995 * pb:
        what = "no exact fibers" if pa >= pb else f"almost no exact fibers (only {1 - pa / max(pb, 1):.2%} smaller)"
        lines.append(f"{what}: try --keep F or `fibgraph tune {q(model)} --data CAL.npz -o eps.json` "
                     f"(then `fibgraph compress {q(model)} --eps-file eps.json -o {q(out)} --verify`), "
                     "or a tolerance: --eps 0.1")
    elif not verified:
        lines.append(f"next: check it with `fibgraph compress {q(model)} -o {q(out)} --verify` (outputs "
                     f"compared) or `fibgraph eval {q(out)} --data TEST.npz` (accuracy and loss)")
    elif data is None:
        lines.append(f"next: accuracy and loss with `fibgraph eval {q(out)} --data TEST.npz`")
    return lines

def _write_csv(path, report):
    if path:
        from ..fileio import write_atomic
        from ..report import layer_table

        write_atomic(path, layer_table(report).to_csv(index=False).encode())


@cli.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), required=True, help=".npz with arrays x, y.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu, or cuda: onnxruntime's CUDA provider when installed, else torch on CUDA.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Rows per call (scores and timing).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="float16/bfloat16: torch autocast.")
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed calls (median).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed calls before timing.")
@json_option("the scores")
@quiet_option()
def eval_cmd(model, data, device, batch_size, dtype, repeats, warmup, json_out, quiet):
    """Accuracy, mean cross-entropy, latency and throughput of MODEL (.onnx or
    a torch.save'd .pt module) on DATA: onnxruntime (its CUDA provider for
    --device cuda when installed), else torch (CUDA graph on cuda)."""
    from fibgraph.importers.api import atomic_write_json
    from fibgraph.importers.device_eval import evaluate_on

    check_io(models=[model], reads=[("--data", data)], writes=[("--json", json_out)])
    with shown(quiet):
        res = evaluate_on(model, data, device=device, batch_size=batch_size, dtype=dtype, repeats=repeats,
                          warmup=warmup)
    what = f"output {res['output']!r} as {res['output_kind']}" if "output" in res else res.get("module", "")
    click.echo(f"accuracy {res['accuracy']:.4f}  loss {res['loss']:.4f}  n {res['n']}  "
               f"({what}, {res['engine']} on {device}, {dtype})")
    graph = "  cuda graph" if res["cuda_graph"] is True else ""
    click.echo(f"latency {res['latency_ms']:.3f} ms per batch of {batch_size} (median of {repeats})  "
               f"throughput {res['throughput']:.1f} rows/s{graph}")
    if json_out:
        atomic_write_json(json_out, res)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True,
              help="FILE.svg or FILE.pdf (vector), FILE.png (--dpi) or FILE.dot (Graphviz text).")
@click.option("--symmetry", type=click.Choice(SYM_MODEL), default="fibration", show_default=True,
              help="Which symmetry colours the nodes.")
@_colouring_options
@click.option("--max-edges", type=int, default=3, show_default=True,
              help="Strongest incoming edges drawn per unit.")
@click.option("--layers", default=None,
              help="Draw only these layers: START:STOP of the column numbers (0 = inputs; STOP excluded) "
                   "or comma-separated layer names.")
@click.option("--aggregate/--no-aggregate", default=None,
              help="One box per class with its size, edges summed between classes  [default: automatic "
                   "above 600 units or 96 in one layer].")
@click.option("--dpi", type=int, default=200, show_default=True, help="Resolution of a PNG.")
def draw(model, out, symmetry, eps, eps_file, linkage, metric, no_rescale, rtol, max_edges, layers, aggregate, dpi):
    """Layered picture of MODEL, one colour per fiber (singletons grey), layers by module name."""
    from .draw import draw_model

    check_io(models=[model], reads=[("--eps-file", eps_file)], writes=[("-o", out)])
    info = draw_model(model, out, symmetry, eps, eps_file, linkage, metric, not no_rescale, rtol, max_edges,
                      layers, aggregate, dpi)
    click.echo(f"wrote {out} ({info['columns']} layers, {info['nodes']} units"
               + (", aggregated" if info["aggregated"] else "")
               + (f", {info['size_px'][0]}x{info['size_px'][1]} px" if info.get("size_px") else "") + ")")


@cli.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default="fibgraph-demo", show_default=True,
              help="Folder for the demo's models, reports and pictures.")
@quiet_option()
def demo(out_dir, quiet):
    """The whole job on the bundled digits model: colour at several tolerances,
    compress, verify, evaluate, print a table, draw the coloured graph."""
    from .demo import bundled_data, bundled_model, demo_outputs, run_demo

    check_io(models=[bundled_model()], reads=[("test data", bundled_data())],
             writes=[("demo output", p) for p in demo_outputs(out_dir)], write_dirs=[("--out-dir", out_dir)])
    with shown(quiet):
        run_demo(out_dir)


def _register_extra_commands():
    """Commands defined in their own modules (analysis, compression studies)."""
    import importlib

    for mod in ("fibgraph.cli.analysis", "fibgraph.cli.compress", "fibgraph.cli.sweep", "fibgraph.cli.hierarchy",
                "fibgraph.cli.break_"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        for c in getattr(m, "COMMANDS", []):
            cli.add_command(c)


_register_extra_commands()
cli.params.append(_max_memory_option(group=True))
for _c in cli.commands.values():
    _c.params.append(_max_memory_option(group=False))


def main(argv=None):
    """Entry point: one-line errors, exit 2 on bad input or usage."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # no command: the help, on stdout
        with click.Context(cli, info_name="fibgraph") as ctx:
            click.echo(cli.get_help(ctx))
        return 0
    import warnings

    import numpy as np

    from ..fileio import output_transaction

    try:
        # warnings (numpy, onnx, onnxruntime) are held back: on failure the one
        # error line is all, on success each is shown once, on one line
        with warnings.catch_warnings(record=True) as caught, np.errstate(all="warn", under="ignore"):
            with output_transaction():       # all outputs or none
                rv = cli.main(args=args, prog_name="fibgraph", standalone_mode=False)
        for w in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
            click.echo(f"fibgraph: warning: {_one_line(w)}", err=True)
        return rv if isinstance(rv, int) else 0
    except InputError as e:
        click.echo(f"fibgraph: error: {_one_line(str(e))}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("fibgraph: aborted", err=True)
        return 1
    except click.exceptions.UsageError as e:
        msg = _one_line(e.format_message().replace("\n", " "))
        click.echo(f"fibgraph: usage error: {msg} (see 'fibgraph {'' if e.ctx is None else e.ctx.info_name + ' '}--help')".replace("fibgraph fibgraph", "fibgraph"), err=True)
        return 2
    except click.exceptions.ClickException as e:
        click.echo(f"fibgraph: error: {_one_line(e.format_message())}", err=True)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except MemoryError:
        click.echo("fibgraph: error: out of memory", err=True)
        return 1
    except Exception as e:  # a bug: still one line, the traceback only on request
        if os.environ.get("FIBGRAPH_DEBUG"):
            raise
        click.echo(f"fibgraph: internal error: {type(e).__name__}: {_one_line(str(e).splitlines()[0]) if str(e) else ''} "
                   "(set FIBGRAPH_DEBUG=1 for a traceback)", err=True)
        return 1


def _one_line(text):
    """``text`` with control characters (a newline in a file name, say)
    escaped as Python writes them, so that a message stays one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def entry():
    sys.exit(main())


if __name__ == "__main__":
    entry()
