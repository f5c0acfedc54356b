"""``fibgraph hierarchy``: the symmetry hierarchy of a model or a graph file.

For an ONNX model, per group of units (a layer: :mod:`fibgraph.groups`, its
columns coloured by the meet over its node sets) the number of classes of
every level of :mod:`fibgraph.hierarchy` side by side -- automorphism orbits,
strict covers, flavoured opfibers, (intersection) covers, fibers, opfibers --
and the inclusions that must hold, per layer and on the whole graph:

- eps = 0: orbits <= strict covers <= flavoured opfibers <= covers <= fibers,
  covers <= opfibers (:data:`fibgraph.hierarchy.CHECKS`);
- eps > 0: only what holds by construction, strict covers <= covers <=
  fibers, opfibers and flavoured opfibers <= fibers
  (:data:`fibgraph.hierarchy.TOLERANCE_CHECKS`); the orbits (exact) are shown
  for reference, not checked.

Exit status 0 when every inclusion holds, 1 on a violation, 2 on bad input.
Orbits run bliss (python-igraph) on the whole graph with one vertex per edge:
above ``--max-orbit-edges`` edges they are skipped with a note (``--no-orbits``
skips them always).  Graph files (.edgelist/.txt/.graphml/.gml) give the
whole-graph table only.  :func:`model_hierarchy` is the Python API;
:func:`side_by_side` is the two-model table of ``fibgraph compare --hierarchy``.
"""
from __future__ import annotations

import os
import sys

import click

from ..errors import HierarchyViolation, InputError
from .checks import check_rtol
from .options import linkage_option, metric_option

__all__ = ["COMMANDS", "hierarchy_cmd", "hierarchy_file", "model_hierarchy", "hierarchy_table", "side_by_side",
           "SHORT"]

SHORT = {"orbits": "orbits", "strict covers": "strict", "flavoured opfibers": "flavoured",
         "intersection covers": "covers", "fibers": "fibers", "opfibers": "opfibers"}
GRAPH_EXT = (".edgelist", ".txt", ".graphml", ".gml")
_SIGN = {True: "<=", False: "NOT <="}


def _console():
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _criterion_text(eps, linkage, metric, rtol):
    return {"eps": eps, **({"linkage": linkage, "metric": metric} if eps else {"rtol": rtol})}


def _check_list(checks):
    return [{"fine": f, "coarse": c, "ok": ok} for f, c, ok in checks]


def model_hierarchy(path, eps=0.0, linkage="complete", metric="cosine", rtol=None, rescale=True, data=None,
                    orbits=True, max_orbit_edges=None, imported=None) -> dict:
    """The hierarchy of the ONNX model at ``path`` as a JSON-ready dict:
    ``levels``, ``checks`` (the inclusions checked), ``graph`` (whole-graph
    counts and checks), ``layers`` (one row per group: ``name`` its module
    name, ``group`` its first weight, ``kind``, ``units``, ``counts``,
    ``checks``, ``ok``), ``group_size``, ``notes``, ``ok``."""
    from fibgraph.importers.api import check_options, import_any
    from fibgraph.importers.dag_api import dag_criteria
    from fibgraph.importers.onnx.groups import display_names, groups_of

    from ..engine import DEFAULT_RTOL
    from ..hierarchy import LEVELS, MAX_ORBIT_EDGES, checks_for, group_hierarchy, levels, run_checks
    from ..orbits import format_group_size
    from ..partition import num_classes

    eps = check_options(eps, linkage, metric)
    rtol = DEFAULT_RTOL if rtol is None else rtol
    imp = imported if imported is not None else import_any(path, data)[1]
    crit = dag_criteria(imp, eps, None, linkage, metric, rtol, rescale)
    checks = checks_for(crit)
    labels, gsize, secs, notes = levels(imp.graph, crit, orbits=orbits,
                                        max_orbit_edges=MAX_ORBIT_EDGES if max_orbit_edges is None
                                        else max_orbit_edges)
    if eps and orbits:
        notes.append("eps > 0: orbits are exact automorphisms, shown for reference and not checked")
    names = display_names(imp)
    groups = groups_of(imp)
    layers = []
    for g, row in zip(groups, group_hierarchy(labels, groups, checks)):
        row["group"] = row.pop("name")
        layers.append({"name": names[g.index], **row, "ok": all(ok is not False for _, _, ok in row["checks"]),
                       "checks": _check_list(row["checks"])})
    whole = run_checks(labels, checks)
    graph = {"nodes": int(imp.graph.n), "edges": int(imp.graph.n_edges),
             "counts": {k: None if v is None else num_classes(v) for k, v in labels.items()},
             "checks": _check_list(whole), "ok": all(ok is not False for _, _, ok in whole)}
    return {"model": os.fspath(path), "criterion": _criterion_text(eps, linkage, metric, rtol),
            "levels": list(LEVELS), "checks": [list(c) for c in checks], "graph": graph, "layers": layers,
            "group_size": format_group_size(gsize), "seconds": {k: round(v, 4) for k, v in secs.items()},
            "notes": notes, "ok": graph["ok"] and all(r["ok"] for r in layers)}


def _violations(checks):
    return [f"{SHORT[c['fine']]} {_SIGN[False]} {SHORT[c['coarse']]}" for c in checks if c["ok"] is False]


def _incl(row):
    bad = _violations(row["checks"])
    if bad:
        return "[bold red]VIOLATED: " + "; ".join(bad) + "[/]"
    return "ok" if any(c["ok"] for c in row["checks"]) else "not checked"


def _cnt(v):
    return "-" if v is None else str(v)


def hierarchy_table(rep):
    """A rich ``Table``: one row per layer and one for the whole graph."""
    from rich.table import Table

    crit = rep["criterion"]
    t = Table(title=f"{os.path.basename(rep['model'])}: symmetry hierarchy, eps={crit['eps']:g} "
              "(classes per layer)", title_justify="left")
    t.add_column("layer")
    t.add_column("units", justify="right")
    for lev in rep["levels"]:
        t.add_column(SHORT[lev], justify="right")
    t.add_column("inclusions")
    for r in rep["layers"]:
        t.add_row(r["name"] + (" (output)" if r["output_layer"] else ""), str(r["units"]),
                  *(_cnt(r["counts"][lev]) for lev in rep["levels"]), _incl(r))
    g = rep["graph"]
    t.add_row("[italic]whole graph[/]", str(g["nodes"]), *(_cnt(g["counts"][lev]) for lev in rep["levels"]),
              _incl(g), end_section=True)
    chain = ", ".join(f"{SHORT[f]} <= {SHORT[c]}" for f, c in rep["checks"])
    t.caption = f"checked: {chain}; automorphism group size {rep['group_size']}"
    t.caption_justify = "left"
    return t


def side_by_side(ra, rb, name_a="A", name_b="B"):
    """The hierarchies of two models in one table: ``A/B`` per level, layers
    paired in order (a layer one model lacks shows ``-``)."""
    from rich.table import Table

    t = Table(title=f"symmetry hierarchy: {name_a} (A) vs {name_b} (B), eps={ra['criterion']['eps']:g} "
              "(classes per layer, A/B)", title_justify="left")
    t.add_column("layer")
    t.add_column("units A/B", justify="right")
    for lev in ra["levels"]:
        t.add_column(SHORT[lev], justify="right")
    t.add_column("inclusions A / B")
    n = max(len(ra["layers"]), len(rb["layers"]))
    empty = {"name": "-", "units": None, "counts": dict.fromkeys(ra["levels"]), "checks": [], "output_layer": False}
    rows = [(ra["layers"][i] if i < len(ra["layers"]) else empty, rb["layers"][i] if i < len(rb["layers"]) else empty)
            for i in range(n)] + [(ra["graph"] | {"name": "[italic]whole graph[/]", "units": ra["graph"]["nodes"]},
                                   rb["graph"] | {"name": "", "units": rb["graph"]["nodes"]})]
    for a, b in rows:
        name = a["name"] if b["name"] in (a["name"], "") else f"{a['name']} / {b['name']}"
        t.add_row(name, f"{_cnt(a['units'])}/{_cnt(b['units'])}",
                  *(f"{_cnt(a['counts'][lev])}/{_cnt(b['counts'][lev])}" for lev in ra["levels"]),
                  f"{_incl(a) if a['checks'] else '-'} / {_incl(b) if b['checks'] else '-'}")
    return t


def _print_model(rep, con):
    con.print(hierarchy_table(rep))
    for note in rep["notes"]:
        con.print(f"note: {note}")
    _verdict(rep, con)


def _verdict(rep, con):
    if rep["ok"]:
        con.print("hierarchy holds: " + ", ".join(f"{SHORT[f]} <= {SHORT[c]}" for f, c in rep["checks"]))
        return
    bad = sorted({v for r in rep["layers"] + [rep["graph"]] for v in _violations(r["checks"])})
    con.print(f"[bold red]hierarchy violated: {'; '.join(bad)}[/] (a bug: please report it with the model)")


def hierarchy_file(path, criterion=None, json_out=None, max_orbit_edges=None, orbits=True) -> int:
    """Print the hierarchy table of the graph in ``path``; 0 if it holds, 1 on a violation."""
    from ..fileio import write_json_atomic
    from ..graphio import read_graph
    from ..hierarchy import MAX_ORBIT_EDGES, hierarchy

    g = read_graph(os.fspath(path))
    con = _console()
    try:
        rep = hierarchy(g, criterion, orbits=orbits,
                        max_orbit_edges=MAX_ORBIT_EDGES if max_orbit_edges is None else max_orbit_edges)
        rc = 0
    except HierarchyViolation as e:
        rep, rc = e.report, 1
    if json_out is not None:
        write_json_atomic(json_out, {"graph": os.fspath(path), **rep.as_dict()})
    con.print(rep.table())
    for note in rep.notes:
        con.print(f"note: {note}")
    if rc:
        what = "; ".join(f"{f} do not refine {c}" for f, c in rep.violations)
        con.print(f"[bold red]hierarchy violated: {what}[/]")
        return 1
    con.print("hierarchy holds: " + ", ".join(f"{f} <= {c}" for f, c, _ in rep.checks))
    return 0


@click.command("hierarchy")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--eps", type=float, default=0.0, show_default=True,
              help="Tolerance in [0, 2): 0 = exact; > 0 checks only the inclusions that hold by construction.")
@linkage_option
@metric_option
@click.option("--rtol", type=float, default=1e-5, show_default=True, callback=check_rtol,
              help="eps=0: relative tolerance of 'equal up to float rounding'.")
@click.option("--no-orbits", is_flag=True, help="Skip the automorphism orbits (bliss on the whole graph).")
@click.option("--max-orbit-edges", type=int, default=None,
              help="Skip the orbits (with a note) above this many edges "
                   "[default: 1,000,000; bliss takes about 10 s per 300,000 edges].")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz with sample inputs for the importer's probe (models only).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the per-layer counts and checks here (JSON).")
def hierarchy_cmd(path, eps, linkage, metric, rtol, no_orbits, max_orbit_edges, data, json_out):
    """Orbits, strict covers, covers, fibers and opfibers of PATH (.onnx model or graph
    file) side by side, per layer; checks the inclusions; exit 1 on a violation."""
    from ..fileio import write_json_atomic

    from .checks import check_io

    check_io(models=[path], reads=[("--data", data)], writes=[("--json", json_out)])
    if max_orbit_edges is not None and max_orbit_edges < 0:
        raise InputError(f"--max-orbit-edges must be at least 0, got {max_orbit_edges}")
    low = os.fspath(path).lower()
    if low.endswith(GRAPH_EXT):
        from ..engine import make_criterion

        if not 0 <= eps < 2:
            raise InputError(f"--eps: eps must be in [0, 2) (0 = exact fibers), got {eps}")
        sys.exit(hierarchy_file(path, make_criterion(eps, linkage, metric, rtol=rtol), json_out,
                                max_orbit_edges, orbits=not no_orbits))
    if not low.endswith(".onnx"):
        raise InputError(f"{path}: unknown file type (expected .onnx, .edgelist, .txt, .graphml or .gml)")
    rep = model_hierarchy(path, eps, linkage, metric, rtol, data=data, orbits=not no_orbits,
                          max_orbit_edges=max_orbit_edges)
    if json_out:
        write_json_atomic(json_out, rep)
    _print_model(rep, _console())
    sys.exit(0 if rep["ok"] else 1)


COMMANDS = [hierarchy_cmd]
