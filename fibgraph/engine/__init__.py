"""The one refinement engine: coarsest balanced colourings by signature rounds.

Definitions (docs/design.md sections 2-4).  A colouring ``c`` of the nodes is
*in-balanced* (a fibration's fibers) iff for every two nodes ``i ~ j`` and
every colour ``a``::

    sum_{k: c(k) = a} W[i, k] == sum_{k: c(k) = a} W[j, k]

*Out-balanced* (opfibration) is the same on outgoing weights; *balanced both
ways* is the strict covering.  :func:`refine` computes the coarsest such
colouring that refines a given initial colouring.

The parts, one module each (no module imports another's private names):

- :mod:`~fibgraph.engine.criteria`: :class:`Exact` and :class:`Tolerance`
  (what "equal signatures" means), :func:`make_criterion`, ``DEFAULT_RTOL``;
- :mod:`~fibgraph.engine.signatures`: per-colour weight sums, the exact split
  (grouping up to rounding, hashing);
- :mod:`~fibgraph.engine.sparse`: the vectorised grouping and hashing, and
  the fast path for graphs whose blocks are all sparse;
- :mod:`~fibgraph.engine.tolerance`: the tolerance split (clusters per old
  class, the rescaling merge's scales, tied columns clustered jointly, the
  AND rule ``AND_KINDS``, the metric choice);
- :mod:`~fibgraph.engine.cluster`: threshold agglomerative clustering
  (linkages, metrics, joint rows);
- :mod:`~fibgraph.engine.schedule`: the levelled and round schedules, cyclic
  levels, the driver :func:`refine` and its result :class:`Refinement`.

Example::

    >>> from fibgraph.graph import WeightedDigraph
    >>> refine(WeightedDigraph.from_edges([0, 0, 1, 2], [1, 2, 3, 4])).labels
    array([0, 1, 1, 2, 2])
"""
from .criteria import DEFAULT_RTOL, Exact, Tolerance, make_criterion
from .schedule import Refinement, refine
from .tolerance import AND_KINDS

__all__ = ["refine", "Refinement", "Exact", "Tolerance", "make_criterion", "DEFAULT_RTOL", "AND_KINDS"]
