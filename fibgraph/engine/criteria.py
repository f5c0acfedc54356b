"""The two criteria of "equal signatures" (docs/design.md sections 3 and 4).

A node's *signature* is the vector of its per-colour weight sums (see
:mod:`fibgraph.engine.signatures`); the engine gives two nodes of one colour
the same new colour iff their signatures are equal under a criterion:

- :class:`Exact`: equal up to float rounding.  Each signature entry is
  compared with tolerance ``rtol * max(max|entry|, max|weight|)`` over the
  level (0 for integer weights); see :mod:`fibgraph.engine.signatures` and
  :mod:`fibgraph.engine.sparse` for the grouping rule.  The colourings are
  fibrations (in), opfibrations (out) or strict coverings (both).
- :class:`Tolerance`: quasi-fibrations (the paper's Algorithm 1): per level,
  agglomerative clustering of the signature rows at distance ``eps`` with a
  ``linkage`` (``complete`` or ``average``) and a ``metric`` (``cosine`` or
  the magnitude-aware ``euclidean``), see :mod:`fibgraph.engine.cluster` and
  :mod:`fibgraph.engine.tolerance`.  ``rescale`` enables the rescaling merge
  of proportional rows on positively homogeneous nodes.

:func:`make_criterion` maps ``eps == 0`` to :class:`Exact` and any other eps
to :class:`Tolerance`.

Example::

    >>> make_criterion(0)
    Exact(rtol=1e-05)
    >>> make_criterion(0.1, linkage="complete")
    Tolerance(eps=0.1, linkage='complete', metric='cosine', rescale=True)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cluster import LINKAGES, METRICS

__all__ = ["DEFAULT_RTOL", "Exact", "Tolerance", "make_criterion", "criterion_for"]

DEFAULT_RTOL = 1e-5


@dataclass(frozen=True)
class Exact:
    """Signatures equal up to ``rtol`` times the largest magnitude in the level."""

    rtol: float = DEFAULT_RTOL


@dataclass(frozen=True)
class Tolerance:
    """Quasi-fibration: signature rows clustered at distance ``eps``."""

    eps: float
    linkage: str = "complete"
    metric: str = "cosine"
    rescale: bool = True

    def __post_init__(self):
        if not (0.0 <= self.eps < 2.0) or not np.isfinite(self.eps):
            raise ValueError(f"eps must be in [0, 2), got {self.eps}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")


def make_criterion(eps=0.0, linkage="complete", metric="cosine", rescale=True, rtol=DEFAULT_RTOL):
    """``Exact`` for ``eps == 0``, else ``Tolerance``."""
    if eps is None or eps == 0:
        return Exact(rtol)
    return Tolerance(float(eps), linkage, metric, rescale)


def criterion_for(criterion, level_name):
    """The criterion of a level: ``criterion`` itself, or from a dict
    ``{level name: criterion, None: default}`` (default :class:`Exact`)."""
    if isinstance(criterion, dict):
        return criterion.get(level_name, criterion.get(None, Exact()))
    return criterion
