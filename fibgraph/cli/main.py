"""The ``fibgraph`` command line.

Exit status: 0 on success, 2 on bad input or usage (one line on stderr, no
traceback, nothing written), 1 when ``hierarchy`` finds a violation.
"""
from __future__ import annotations

import os
import sys

import click

from ..errors import InputError

SYM_MODEL = ["fibration", "opfibration", "opfibration-flavoured", "covering", "covering-strict",
             "automorphism"]
GRAPH_EXT = (".edgelist", ".txt", ".graphml", ".gml")


def _colouring_options(f):
    f = click.option("--rtol", type=float, default=1e-5, show_default=True,
                     help="eps=0: relative tolerance of 'equal up to float rounding'.")(f)
    f = click.option("--no-rescale", is_flag=True,
                     help="Disable the rescaling merge of proportional rows (cosine, ReLU family).")(f)
    f = click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine",
                     show_default=True, help="Distance between signature rows for eps > 0.")(f)
    f = click.option("--linkage", type=click.Choice(["complete", "average"]), default="average",
                     show_default=True, help="Agglomerative linkage for eps > 0 (paper: complete; authors' code: average).")(f)
    f = click.option("--eps-file", type=click.Path(dir_okay=False), default=None,
                     help="JSON {layer weight name: eps} overriding --eps per layer.")(f)
    f = click.option("--eps", type=float, default=0.0, show_default=True,
                     help="Tolerance in [0, 2): 0 = exact fibers.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fibgraph")
def cli():
    """fibgraph: fibrations, opfibrations, coverings and orbits of trained networks,
    and exact compression to the base network."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def inspect(model, json_out):
    """Layers, op types, parameter count and what is supported."""
    from fibgraph.importers.inspect import inspect_model

    _check_json_out(model, json_out)
    info = inspect_model(model)
    if json_out:
        from fibgraph.importers.api import atomic_write_json

        atomic_write_json(json_out, info)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--symmetry", type=click.Choice(SYM_MODEL), default="fibration", show_default=True)
@_colouring_options
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@click.option("--graphml", "graphml_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the coloured graph as GraphML (node attributes layer, index, kind, colour; edge weight).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz with sample inputs (one array per input name, or x) for models read as a hypergraph.")
def color(model, symmetry, eps, eps_file, linkage, metric, no_rescale, rtol, json_out, graphml_out, data):
    """Colour MODEL (.onnx) or a graph (.edgelist/.txt/.graphml/.gml) by a symmetry."""
    if not model.lower().endswith(".onnx"):
        if model.lower().endswith(GRAPH_EXT):
            from .graphs import color_graph_file

            color_graph_file(model, symmetry, eps=eps, json_out=json_out, linkage=linkage, metric=metric,
                             rtol=rtol, graphml_out=graphml_out)
            return
        raise InputError(f"{model}: unknown file type (expected .onnx, .edgelist, .txt, .graphml or .gml)")
    from fibgraph.importers.api import atomic_write_json, color_model
    from ..report import print_colour_report

    _check_json_out(model, json_out)
    _check_json_out(model, graphml_out)
    report, _, col = color_model(model, symmetry, eps, eps_file, linkage, metric, not no_rescale, rtol, data=data)
    print_colour_report(report)
    if json_out:
        atomic_write_json(json_out, report)
    if graphml_out:
        from ..fileio import atomic_path

        with atomic_path(graphml_out, suffix=".graphml") as tmp:
            col.graph.write_graphml(tmp, col.labels)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True)
@click.option("--symmetry", type=click.Choice(["fibration", "covering", "covering-strict", "automorphism"]),
              default="fibration", show_default=True)
@_colouring_options
@click.option("--verify", is_flag=True, help="Run both models and report the largest output difference.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help=".npz with x (and y) for --verify.")
@click.option("--report", "report_out", type=click.Path(dir_okay=False), default=None)
@click.option("--external-data", "external_data", is_flag=True, default=None,
              help="Write the weights to OUT.data beside OUT (automatic above 2 GB).")
def compress(model, out, symmetry, eps, eps_file, linkage, metric, no_rescale, rtol, verify, data, report_out,
             external_data):
    """Compress MODEL to its base network and write it to OUT (ONNX)."""
    from fibgraph.importers.api import atomic_write_json, compress_model
    from ..report import print_colour_report

    _check_json_out(model, report_out)
    if report_out and os.path.abspath(report_out) == os.path.abspath(out):
        raise InputError("--report and -o name the same file")
    report = compress_model(model, out, symmetry, eps, eps_file, linkage, metric, not no_rescale, rtol,
                            verify=verify, data=data, external_data=external_data)
    print_colour_report(report)
    if report_out:
        atomic_write_json(report_out, report)


@cli.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), required=True, help=".npz with arrays x, y.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def eval_cmd(model, data, device, json_out):
    """Accuracy and mean cross-entropy of MODEL on DATA (onnxruntime)."""
    from fibgraph.importers.api import atomic_write_json, evaluate

    _check_json_out(model, json_out)
    res = evaluate(model, data, device=device)
    click.echo(f"accuracy {res['accuracy']:.4f}  loss {res['loss']:.4f}  n {res['n']}  "
               f"(output {res['output']!r} as {res['output_kind']}, {device})")
    if json_out:
        atomic_write_json(json_out, res)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True,
              help="FILE.png, FILE.svg or FILE.dot")
@click.option("--symmetry", type=click.Choice(SYM_MODEL), default="fibration", show_default=True)
@_colouring_options
@click.option("--max-edges", type=int, default=3, show_default=True,
              help="Strongest incoming edges drawn per node.")
def draw(model, out, symmetry, eps, eps_file, linkage, metric, no_rescale, rtol, max_edges):
    """Layered picture of MODEL, one colour per fiber."""
    from fibgraph.importers.api import color_model
    from ..draw import draw_layered

    ext = os.path.splitext(out)[1].lower()
    if ext not in (".png", ".svg", ".dot"):
        raise InputError(f"{out}: output must end in .png, .svg or .dot")
    _check_json_out(model, out)
    _, _, col = color_model(model, symmetry, eps, eps_file, linkage, metric, not no_rescale, rtol)
    n = draw_layered(col.graph, col.labels, out, max_edges=max_edges,
                     title=f"{os.path.basename(model)}: {symmetry}, eps={eps}")
    click.echo(f"wrote {out} ({n} nodes drawn)")


@cli.command()
@click.argument("graph", type=click.Path(dir_okay=False))
def hierarchy(graph):
    """Orbits <= strict covers <= covers <= fibers, opfibers: counts; exit 1 on a violation."""
    from .graphs import hierarchy_file

    sys.exit(hierarchy_file(graph))


@cli.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default="fibgraph-demo", show_default=True)
def demo(out_dir):
    """The whole job on the bundled digits model: colour at several tolerances,
    compress, verify, evaluate, print a table, draw the coloured graph."""
    from .demo import run_demo

    run_demo(out_dir)


def _register_extra_commands():
    """Commands defined in their own modules (analysis, compression studies)."""
    import importlib

    for mod in ("fibgraph.cli.analysis", "fibgraph.cli.compress", "fibgraph.cli.sweep"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        for c in getattr(m, "COMMANDS", []):
            cli.add_command(c)


_register_extra_commands()


def _check_json_out(inp, out):
    from ..fileio import check_output_path

    check_output_path(out, inp)


def main(argv=None):
    """Entry point: one-line errors, exit 2 on bad input or usage."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # no command: the help, on stdout
        with click.Context(cli, info_name="fibgraph") as ctx:
            click.echo(cli.get_help(ctx))
        return 0
    try:
        rv = cli.main(args=args, prog_name="fibgraph", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except InputError as e:
        click.echo(f"fibgraph: error: {e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("fibgraph: aborted", err=True)
        return 1
    except click.exceptions.UsageError as e:
        msg = e.format_message().replace("\n", " ")
        click.echo(f"fibgraph: usage error: {msg} (see 'fibgraph {'' if e.ctx is None else e.ctx.info_name + ' '}--help')".replace("fibgraph fibgraph", "fibgraph"), err=True)
        return 2
    except click.exceptions.ClickException as e:
        click.echo(f"fibgraph: error: {e.format_message()}", err=True)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except MemoryError:
        click.echo("fibgraph: error: out of memory", err=True)
        return 1
    except Exception as e:  # a bug: still one line, the traceback only on request
        if os.environ.get("FIBGRAPH_DEBUG"):
            raise
        click.echo(f"fibgraph: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                   "(set FIBGRAPH_DEBUG=1 for a traceback)", err=True)
        return 1


def entry():
    sys.exit(main())


if __name__ == "__main__":
    entry()
