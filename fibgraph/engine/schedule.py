"""The refinement engine's schedules and driver (docs/design.md section 3).

The engine computes the coarsest colouring that refines a given initial
colouring and is balanced (:mod:`fibgraph.engine.signatures`: in, out or
both ways): each step replaces a node's colour by ``(old colour, signature)``
where the signature is the vector of its per-colour weight sums, compared
under a criterion (:mod:`fibgraph.engine.criteria`: exact, or clustered at a
tolerance by :mod:`fibgraph.engine.tolerance`).

Two schedules, one engine:

- levelled (a DAG given in topological levels, e.g. a feed-forward network):
  each level is refined once, in order (reverse order for out-balance) - the
  paper's layer-by-layer procedure, O(m) in all.  A *cyclic* level (its nodes
  also read each other: a recurrence) is refined repeatedly, each time keyed
  by its old colours, until no class splits; ``'both'`` alternates the in and
  out sweeps until the number of colours is stable;
- rounds (any digraph, cycles included): synchronous rounds, each O(m log m)
  vectorised, until the number of colours stops growing.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from ..graph import WeightedDigraph
from ..partition import canonical
from ..progress import task
from .criteria import DEFAULT_RTOL, Exact, Tolerance, criterion_for
from .signatures import split_exact
from .tolerance import split_tolerance

__all__ = ["Refinement", "refine"]


@dataclass
class Refinement:
    """Result of :func:`refine`: canonical ``labels``, per-node ``scales`` (1 unless
    the rescaling merge applied), the number of sweeps or rounds, and per-level
    notes (criterion actually used)."""

    labels: np.ndarray
    scales: np.ndarray
    rounds: int
    info: dict = field(default_factory=dict)


def _level_views(graph, direction):
    """Per level: the graph restricted to the blocks whose targets (dst for
    'in', src for 'out') lie in that level, so that a level's split reads its
    own blocks only (O(m) per sweep, not O(levels x blocks))."""
    node_level = np.full(graph.n, -1, dtype=np.int64)
    for k, lv in enumerate(graph.levels):
        node_level[np.asarray(lv, dtype=np.int64)] = k
    per = [[] for _ in graph.levels]
    for b in graph.blocks:
        targets = b.dst if direction == "in" else b.src
        for k in np.unique(node_level[targets]):
            if k >= 0:
                per[int(k)].append(b)
    views = []
    for blocks in per:
        v = copy.copy(graph)
        v.__dict__.pop("_edge_matrix_cache", None)
        v.blocks = blocks
        views.append(v)
    return views


def refine(graph: WeightedDigraph, direction="in", criterion=None, initial=None,
           schedule="auto", scales=None, max_rounds=None, tie=None) -> Refinement:
    """Coarsest colouring refining ``initial`` that is balanced in ``direction``.

    A colouring ``c`` is *in-balanced* (its classes are the fibers of a
    fibration) iff any two nodes ``i ~ j`` of one colour have, for every
    colour ``a``, equal sums ``sum_{k: c(k) = a} W[i, k]`` of their incoming
    weights; *out-balanced* (opfibration) is the same on outgoing weights,
    balanced both ways is the strict covering.  The result is the coarsest
    such colouring below ``initial`` (default ``graph.initial``).

    ``direction``: ``'in'`` (fibration), ``'out'`` (opfibration) or ``'both'``
    (strict covering).  ``criterion``: :class:`Exact` (default),
    :class:`Tolerance`, or a dict ``{level name: criterion, None: default}``.
    ``schedule``: ``'levels'`` (one sweep per direction over ``graph.levels``;
    'both' alternates sweeps until stable), ``'rounds'`` (synchronous rounds to
    a fixed point), or ``'auto'`` (levels when the graph has them).
    ``scales``: incoming per-node scales (rescaling merge); returned updated.
    ``tie``: column id per node (-1: untied; default ``graph.tie``).  Under
    :class:`Tolerance`, the nodes of one column that lie in one level are
    clustered jointly (one item, features concatenated over their node sets,
    see :func:`fibgraph.engine.tolerance.split_tolerance`), so the
    quasi-fibration partition of the column's node sets is one and the same;
    :class:`Exact` ignores ties (exact equality is transitive: the meet of
    exact partitions already is the joint one), so eps = 0 results do not
    depend on them.

    Example: node 0 feeds nodes 1 and 2, which feed 3 and 4.  With unit
    weights 1 and 2 are one fiber, and so are 3 and 4; a weight of 2 on the
    edge 2 -> 4 separates 3 from 4 (not 1 from 2: in-balance reads inputs);
    under a tolerance, a weight of 1.05 does not::

        >>> from fibgraph.graph import WeightedDigraph
        >>> g = WeightedDigraph.from_edges([0, 0, 1, 2], [1, 2, 3, 4])
        >>> refine(g).labels
        array([0, 1, 1, 2, 2])
        >>> g = WeightedDigraph.from_edges([0, 0, 1, 2], [1, 2, 3, 4], [1.0, 1.0, 1.0, 2.0])
        >>> refine(g).labels
        array([0, 1, 1, 2, 3])
        >>> refine(g, "out").labels             # out-balance: 1 and 2 now differ
        array([0, 1, 2, 3, 3])
        >>> g = WeightedDigraph.from_edges([0, 0, 1, 2], [1, 2, 3, 4], [1.0, 1.0, 1.0, 1.05])
        >>> refine(g).labels
        array([0, 1, 1, 2, 3])
        >>> refine(g, criterion=Tolerance(0.1, metric="euclidean")).labels   # 1 and 1.05: within eps
        array([0, 1, 1, 2, 2])
    """
    if direction not in ("in", "out", "both"):
        raise ValueError(f"direction must be 'in', 'out' or 'both', got {direction!r}")
    criterion = Exact() if criterion is None else criterion
    tie = getattr(graph, "tie", None) if tie is None else tie
    n = graph.n
    colours = canonical(graph.initial if initial is None else initial)
    scales = np.ones(n) if scales is None else np.asarray(scales, dtype=np.float64).copy()
    info: dict = {}
    use_levels = graph.levels is not None and schedule in ("auto", "levels")
    if schedule == "levels" and graph.levels is None:
        raise ValueError("graph has no levels; use schedule='rounds'")
    what = {"in": "colouring (fibers)", "out": "colouring (opfibers)", "both": "colouring (covers)"}[direction]
    if use_levels:
        busy = sum(1 for lv in graph.levels if len(lv))
        with task(what, total=busy * (1 if direction != "both" else 2)) as advance:
            return _refine_levels(graph, direction, criterion, tie, colours, scales, info, advance, what)
    with task(what) as advance:
        return _refine_rounds(graph, direction, criterion, tie, colours, scales, info, max_rounds, advance)


def _refine_levels(graph, direction, criterion, tie, colours, scales, info, advance, what):
    n = graph.n
    rounds = 0
    dirs = ["in"] if direction == "in" else ["out"] if direction == "out" else ["in", "out"]
    views = {d: _level_views(graph, d) for d in dirs}
    busy = sum(1 for lv in graph.levels if len(lv))
    sweep = 0
    while True:
        if sweep:
            advance(0, total=busy * 2 * (sweep + 1))
        sweep += 1
        before = colours.max() + 1 if n else 0
        for d in dirs:
            levels = graph.levels if d == "in" else list(reversed(graph.levels))
            order = range(len(graph.levels)) if d == "in" else range(len(graph.levels) - 1, -1, -1)
            for li, lv in zip(order, levels):
                lv = np.asarray(lv, dtype=np.int64)
                if lv.size == 0:
                    continue
                name = graph.layer_names[graph.layer[lv[0]]]
                advance(1, f"{what}: {name}")
                crit = criterion_for(criterion, name)
                loop = bool(graph.cyclic) and li in graph.cyclic
                k_before = np.unique(colours[lv]).size
                view = views[d][li]
                while True:
                    if isinstance(crit, Tolerance) and crit.eps > 0:
                        new, sc = split_tolerance(view, lv, [d], colours, scales, crit,
                                                   name, info, tie)
                        scales[lv] = scales[lv] * sc if d == "out" else sc
                    else:
                        new = split_exact(view, lv, [d], colours, scales,
                                           getattr(crit, "rtol", DEFAULT_RTOL))
                    # a loop level: its nodes' new colours refine the old ones
                    # (the old colour is part of the key) until nothing splits
                    if loop:
                        new = canonical(np.stack([colours[lv], new], 1))
                    colours[lv] = colours.max() + 1 + new
                    k_after = int(new.max()) + 1
                    if not loop or k_after == k_before:
                        break
                    k_before = k_after
                if graph.relieve is not None:   # e.g. the pages of a mapped weight file, read again when touched
                    graph.relieve()
            colours = canonical(colours)
            rounds += 1
        after = colours.max() + 1 if n else 0
        if direction != "both" or after == before:
            break
    return Refinement(colours, scales, rounds, info)


def _refine_rounds(graph, direction, criterion, tie, colours, scales, info, max_rounds, advance):
    n = graph.n
    rounds = 0
    dirs = ["in"] if direction == "in" else ["out"] if direction == "out" else ["in", "out"]
    allnodes = np.arange(n, dtype=np.int64)
    ncol = colours.max() + 1 if n else 0
    while max_rounds is None or rounds < max_rounds:
        crit = criterion_for(criterion, graph.layer_names[0] if graph.layer_names else None)
        if isinstance(crit, Tolerance) and crit.eps > 0:
            new, _ = split_tolerance(graph, allnodes, dirs, colours, scales, crit, "graph", info, tie)
        else:
            new = split_exact(graph, allnodes, dirs, colours, scales,
                               getattr(crit, "rtol", DEFAULT_RTOL))
        rounds += 1
        advance(1)
        new_n = new.max() + 1 if n else 0
        colours = new
        if new_n == ncol:
            break
        ncol = new_n
    return Refinement(colours, scales, rounds, info)
