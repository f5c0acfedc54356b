"""Symmetries of a weighted digraph, strict to loose, all from the one engine.

- fibration: the coarsest in-balanced colouring refining the initial one;
  nodes in a fiber have isomorphic input trees and identical activations.
- opfibration: the coarsest out-balanced colouring; identical error signals
  when activations are linear.  *Flavoured*: additionally refines the fibers
  (with a nonlinear activation the slope sigma'(z) depends on the activity),
  so that errors synchronise.
- covering ``intersection``: the meet of the fibration and opfibration
  colourings (what the research code computes, once).
- covering ``strict``: the coarsest colouring balanced in both directions
  (refined until stable in both); it refines the intersection.
- automorphism orbits: see :mod:`fibgraph.orbits`.
"""
from __future__ import annotations

from .partition import meet
from .engine import Exact, refine

__all__ = ["SYMMETRIES", "fibration", "opfibration", "covering", "colour"]

SYMMETRIES = ("fibration", "opfibration", "opfibration-flavoured", "covering",
              "covering-strict", "automorphism")


def fibration(graph, criterion=None, initial=None):
    return refine(graph, "in", criterion or Exact(), initial)


def opfibration(graph, criterion=None, initial=None, flavoured=False):
    if flavoured:
        fib = fibration(graph, criterion, initial)
        start = fib.labels if initial is None else meet(initial, fib.labels)
        r = refine(graph, "out", criterion or Exact(), start)
        r.info = {**fib.info, **{f"out:{k}": v for k, v in r.info.items()}}
        return r
    return refine(graph, "out", criterion or Exact(), initial)


def covering(graph, criterion=None, initial=None, kind="intersection"):
    if kind == "intersection":
        fib = fibration(graph, criterion, initial)
        op = opfibration(graph, criterion, initial)
        fib.labels = meet(fib.labels, op.labels)
        fib.rounds += op.rounds
        return fib
    if kind == "strict":
        # Start from the intersection: with exact criteria the result is the
        # coarsest colouring balanced both ways (it refines the intersection
        # anyway); with a tolerance this keeps the levels nested.
        inter = covering(graph, criterion, initial, "intersection")
        r = refine(graph, "both", criterion or Exact(), inter.labels)
        r.info = {**inter.info, **r.info}
        return r
    raise ValueError(f"covering kind must be 'intersection' or 'strict', got {kind!r}")


def colour(graph, symmetry="fibration", criterion=None, initial=None):
    """Dispatch by symmetry name (see :data:`SYMMETRIES`); returns a Refinement."""
    if symmetry == "fibration":
        return fibration(graph, criterion, initial)
    if symmetry == "opfibration":
        return opfibration(graph, criterion, initial)
    if symmetry == "opfibration-flavoured":
        return opfibration(graph, criterion, initial, flavoured=True)
    if symmetry == "covering":
        return covering(graph, criterion, initial, "intersection")
    if symmetry == "covering-strict":
        return covering(graph, criterion, initial, "strict")
    if symmetry == "automorphism":
        from .orbits import automorphism_orbits
        from .engine import Refinement
        import numpy as np

        labels = automorphism_orbits(graph, initial=initial).labels
        return Refinement(labels, np.ones(graph.n), 0, {})
    raise ValueError(f"unknown symmetry {symmetry!r}; choose from {', '.join(SYMMETRIES)}")
