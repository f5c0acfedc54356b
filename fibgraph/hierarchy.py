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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import HierarchyViolation
from .orbits import format_group_size
from .partition import meet, num_classes, refines
from .engine import Exact, refine

__all__ = ["HierarchyReport", "hierarchy", "LEVELS", "CHECKS"]

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


def hierarchy(graph, criterion=None, initial=None, raise_on_violation=True) -> HierarchyReport:
    """Compute every level and check the refinements (see module doc)."""
    import time

    from .orbits import OrbitsTooLarge, automorphism_orbits

    crit = criterion or Exact()
    init = graph.initial if initial is None else np.asarray(initial)
    secs = {}
    t0 = time.perf_counter()
    fib = refine(graph, "in", crit, init).labels
    secs["fibers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    op = refine(graph, "out", crit, init).labels
    secs["opfibers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    flav = refine(graph, "out", crit, meet(init, fib)).labels
    secs["flavoured opfibers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    strict = refine(graph, "both", crit, init).labels
    secs["strict covers"] = time.perf_counter() - t0
    inter = meet(fib, op)
    t0 = time.perf_counter()
    notes = []
    try:
        orb = automorphism_orbits(graph, initial=init)
        orb_labels, gsize = orb.labels, orb.group_size
    except OrbitsTooLarge as e:
        orb_labels, gsize = None, None
        notes.append(str(e))
    secs["orbits"] = time.perf_counter() - t0
    labels = {"orbits": orb_labels, "strict covers": strict, "flavoured opfibers": flav,
              "intersection covers": inter, "fibers": fib, "opfibers": op}
    counts = {k: None if v is None else num_classes(v) for k, v in labels.items()}
    checks = [(f, c, None if labels[f] is None or labels[c] is None
               else refines(labels[f], labels[c])) for f, c in CHECKS]
    rep = HierarchyReport(graph.n, graph.n_edges, labels, counts, checks, gsize, secs, notes)
    if raise_on_violation and not rep.ok:
        what = "; ".join(f"{f} do not refine {c}" for f, c in rep.violations)
        err = HierarchyViolation(f"hierarchy violated: {what}")
        err.report = rep
        raise err
    return rep
