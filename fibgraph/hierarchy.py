"""The hierarchy of symmetries of one graph, strict to loose, with its checks.

Levels (docs/design.md section 2), each a partition of the nodes:

- orbits: automorphism orbits (:mod:`fibgraph.orbits`);
- strict covers: the coarsest colouring balanced in both directions;
- flavoured opfibers: the coarsest out-balanced colouring refining the fibers;
- intersection covers: fibers AND opfibers (the meet);
- fibers: the coarsest in-balanced colouring;
- opfibers: the coarsest out-balanced colouring.

Every level starts from the same initial colouring.  What must hold, and is
checked (``fine`` refines ``coarse``: every class of ``fine`` lies in one
class of ``coarse``):

    orbits <= strict <= flavoured <= intersection <= fibers
                                     intersection <= opfibers

(strict is balanced both ways, so it refines the coarsest in-balanced
colouring and, being out-balanced and finer than the fibers, the flavoured
opfibers; flavoured is out-balanced, so it refines the opfibers.)  A failed
check raises :class:`~fibgraph.errors.HierarchyViolation`, whose ``report``
attribute holds the report with the failed checks marked.  When the
automorphism group is too large to list its generators
(:class:`~fibgraph.orbits.OrbitsTooLarge`) the orbits are reported as not
computed and their check as not checked.

Under a tolerance (eps > 0) the levels are the quasi-versions and only what
holds by construction is checked (:data:`TOLERANCE_CHECKS`): strict covers
<= intersection covers <= fibers, opfibers and flavoured opfibers <= fibers.
Per group of units (a layer) :func:`group_hierarchy` gives the same counts
and checks on the group's columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import HierarchyViolation
from .orbits import format_group_size
from .partition import meet, num_classes, refines
from .engine import Exact, refine

__all__ = ["HierarchyReport", "hierarchy", "levels", "group_hierarchy", "checks_for", "run_checks", "LEVELS",
           "CHECKS", "TOLERANCE_CHECKS"]

LEVELS = ("orbits", "strict covers", "flavoured opfibers", "intersection covers", "fibers",
          "opfibers")
CHECKS = (("orbits", "strict covers"), ("strict covers", "flavoured opfibers"),
          ("flavoured opfibers", "intersection covers"), ("strict covers", "intersection covers"),
          ("intersection covers", "fibers"), ("intersection covers", "opfibers"))


@dataclass
class HierarchyReport:
    """Counts and partitions per level, the refinement checks, the group size."""

    nodes: int
    edges: int
    labels: dict
    counts: dict
    checks: list                       # (fine, coarse, ok); ok None = not checked
    group_size: int | None = None
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok is not False for _, _, ok in self.checks)

    @property
    def violations(self) -> list:
        return [(f, c) for f, c, ok in self.checks if ok is False]

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "edges": self.edges, "counts": dict(self.counts),
                "group_size": format_group_size(self.group_size),
                "checks": [{"fine": f, "coarse": c, "ok": ok} for f, c, ok in self.checks],
                "ok": self.ok, "notes": list(self.notes)}

    def table(self):
        """A rich ``Table`` of the levels, their counts and the checks."""
        from rich.table import Table

        t = Table(title=f"symmetry hierarchy: {self.nodes} nodes, {self.edges} edges")
        t.add_column("level")
        t.add_column("classes", justify="right")
        t.add_column("refines", justify="left")
        for name in LEVELS:
            checks = [(c, ok) for f, c, ok in self.checks if f == name]
            word = {True: "ok", False: "VIOLATED", None: "not checked"}
            txt = ", ".join(f"{c} {word[ok]}" for c, ok in checks) or "-"
            if any(ok is False for _, ok in checks):
                txt = f"[bold red]{txt}[/]"
            cnt = self.counts[name]
            t.add_row(name, "-" if cnt is None else str(cnt), txt)
        if self.group_size is not None:
            t.caption = f"automorphism group size: {format_group_size(self.group_size)}"
        return t


TOLERANCE_CHECKS = (("strict covers", "intersection covers"), ("flavoured opfibers", "fibers"),
                    ("intersection covers", "fibers"), ("intersection covers", "opfibers"))
"""What still holds at eps > 0, by construction: the intersection is the meet of
fibers and opfibers; the flavoured opfibers start from the fibers and the strict
covers from the intersection, and refinement never merges the classes it
starts from.  Orbits (exact automorphisms), strict <= flavoured and
flavoured <= opfibers rest on exact balance and are not checked."""

MAX_ORBIT_EDGES = 1_000_000


def checks_for(criterion) -> tuple:
    """The inclusions that must hold under ``criterion`` (a criterion or a
    dict of them): :data:`CHECKS` when every criterion is exact, else
    :data:`TOLERANCE_CHECKS`."""
    crits = criterion.values() if isinstance(criterion, dict) else [criterion]
    exact = all(c is None or isinstance(c, Exact) for c in crits)
    return CHECKS if exact else TOLERANCE_CHECKS


def levels(graph, criterion=None, initial=None, orbits=True, max_orbit_edges=MAX_ORBIT_EDGES):
    """Labels of every level of :data:`LEVELS` (``None`` for orbits not
    computed), seconds per level, notes.  ``criterion``: a criterion or a dict
    ``{level name: criterion, None: default}`` as :func:`fibgraph.engine.refine`
    takes.  The strict covers are refined from the intersection (as
    :func:`fibgraph.symmetry.covering` does), so the levels stay nested under a
    tolerance; at eps = 0 that is the coarsest colouring balanced both ways.
    Orbits are skipped (with a note) when ``orbits`` is false or the graph has
    more than ``max_orbit_edges`` edges, or when the group is too large."""
    import time

    from . import orbits as _orbits

    crit = criterion or Exact()
    init = graph.initial if initial is None else np.asarray(initial)
    secs, notes = {}, []

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        secs[name] = time.perf_counter() - t0
        return out

    fib = timed("fibers", lambda: refine(graph, "in", crit, init).labels)
    op = timed("opfibers", lambda: refine(graph, "out", crit, init).labels)
    flav = timed("flavoured opfibers", lambda: refine(graph, "out", crit, meet(init, fib)).labels)
    inter = meet(fib, op)
    strict = timed("strict covers", lambda: refine(graph, "both", crit, inter).labels)
    orb_labels, gsize = None, None
    if not orbits:
        notes.append("orbits not computed (not asked for)")
    elif graph.n_edges > max_orbit_edges:
        notes.append(f"orbits not computed: {graph.n_edges} edges, more than the limit {max_orbit_edges} "
                     "(raise it with --max-orbit-edges; bliss needs one vertex per edge)")
    else:
        t0 = time.perf_counter()
        try:
            orb = _orbits.automorphism_orbits(graph, initial=init)
            orb_labels, gsize = orb.labels, orb.group_size
        except _orbits.OrbitsTooLarge as e:
            notes.append(str(e))
        secs["orbits"] = time.perf_counter() - t0
    labels = {"orbits": orb_labels, "strict covers": strict, "flavoured opfibers": flav,
              "intersection covers": inter, "fibers": fib, "opfibers": op}
    return labels, gsize, secs, notes


def run_checks(labels, checks=CHECKS) -> list:
    """``(fine, coarse, ok)`` per check; ok ``None`` when a level is missing."""
    return [(f, c, None if labels[f] is None or labels[c] is None else refines(labels[f], labels[c]))
            for f, c in checks]


def hierarchy(graph, criterion=None, initial=None, raise_on_violation=True,
              max_orbit_edges=MAX_ORBIT_EDGES, orbits=True) -> HierarchyReport:
    """Compute every level and check the refinements (see module doc; under a
    tolerance only :data:`TOLERANCE_CHECKS`)."""
    crit = criterion or Exact()
    labels, gsize, secs, notes = levels(graph, crit, initial, orbits=orbits, max_orbit_edges=max_orbit_edges)
    counts = {k: None if v is None else num_classes(v) for k, v in labels.items()}
    checks = run_checks(labels, checks_for(crit))
    rep = HierarchyReport(graph.n, graph.n_edges, labels, counts, checks, gsize, secs, notes)
    if raise_on_violation and not rep.ok:
        what = "; ".join(f"{f} do not refine {c}" for f, c in rep.violations)
        err = HierarchyViolation(f"hierarchy violated: {what}")
        err.report = rep
        raise err
    return rep


def group_hierarchy(labels, groups, checks=CHECKS) -> list:
    """Per group (:class:`fibgraph.groups.Group`): the number of classes of
    every level on its columns (:func:`fibgraph.groups.group_partition`, the
    meet over its node sets) and the checks on those column partitions.
    Returns one dict per group: ``name``, ``kind``, ``units`` (columns),
    ``counts`` {level: int or None}, ``checks`` [(fine, coarse, ok)]."""
    from .groups import group_partition

    rows = []
    for g in groups:
        part = {k: None if v is None else group_partition(g, v)[1] for k, v in labels.items()}
        n_cols = len(np.unique(g.columns))
        rows.append({"name": g.name, "kind": getattr(g.kind, "value", str(g.kind)), "units": n_cols,
                     "output_layer": bool(g.is_output),
                     "counts": {k: None if v is None else num_classes(v) for k, v in part.items()},
                     "checks": run_checks(part, checks)})
    return rows
