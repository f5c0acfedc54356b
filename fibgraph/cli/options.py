"""Options shared by several commands: one definition, one default, one help text each.

``linkage_option`` and ``metric_option`` are the clustering choices for eps > 0
(every command that clusters takes the same defaults from here);
``quiet_option`` turns off the progress bars on stderr
(:mod:`fibgraph.progress`), ``json_option`` names a JSON output file.
"""
from __future__ import annotations

import click

__all__ = ["DEFAULT_LINKAGE", "DEFAULT_METRIC", "linkage_option", "metric_option", "quiet_option",
           "json_option"]

DEFAULT_LINKAGE = "complete"
DEFAULT_METRIC = "cosine"


def linkage_option(f):
    return click.option("--linkage", type=click.Choice(["complete", "average"]), default=DEFAULT_LINKAGE,
                        show_default=True,
                        help="Agglomerative linkage for eps > 0 (complete, the paper's, keeps more accuracy at every size "
                             "measured in BENCHMARKS.md; average is the authors' code).")(f)


def metric_option(f):
    return click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default=DEFAULT_METRIC,
                        show_default=True,
                        help="Distance between signature rows for eps > 0 (cosine only where the activation "
                             "is positively homogeneous; elsewhere the magnitude-aware distance).")(f)


def quiet_option(*aliases):
    """``--quiet`` (and ``aliases``, e.g. tune's old ``--no-progress``): no progress on stderr."""
    def deco(f):
        return click.option("-q", "--quiet", *aliases, "quiet", is_flag=True,
                            help="No progress bars on stderr (results, notes and errors still print).")(f)
    return deco


def json_option(what="the report"):
    def deco(f):
        return click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
                            help=f"Also write {what} as JSON to this file.")(f)
    return deco
