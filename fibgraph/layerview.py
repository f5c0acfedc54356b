"""A weighted digraph with its weight layers named: the format-free input of
the analysis modules (:mod:`fibgraph.compare`, :mod:`fibgraph.tracking`,
:mod:`fibgraph.activity`, :mod:`fibgraph.theorems`).

A :class:`LayerView` is a :class:`~fibgraph.graph.WeightedDigraph` plus

- ``layers``: one :class:`ViewLayer` per weight layer, in topological order:
  the weight's name (an ONNX initializer name; torch's legacy exporter keeps
  parameter names such as ``0.weight``), its kind (the op), the node ids of
  its units in unit order, and whether it is an output layer (its units are
  tied to a model output, so they start with distinct colours);
- ``tie`` (optional): a component id per node; nodes at the same position
  of one unit (the unit's node, its bias add, activation aliases, a residual
  stream column, an LSTM unit's gates and cell) share an id.  Used to move a
  unit permutation from a layer to the nodes tied to it (``compare --align``)
  and to group output units (:func:`fibgraph.theorems.grouped_initial`).

The importers build views (``fibgraph.importers.dag_units.layer_view`` from the
hypergraph import, ``fibgraph.importers.torch_analysis`` from torch modules); nothing
here reads a file format.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import WeightedDigraph
from .partition import canonical
from .symmetry import colour

__all__ = ["ViewLayer", "LayerView"]


@dataclass
class ViewLayer:
    """One weight layer: ``nodes[j]`` is the node of unit ``j``."""

    name: str
    kind: str
    nodes: np.ndarray
    output: bool = False

    def __post_init__(self):
        self.nodes = np.asarray(self.nodes, dtype=np.int64).reshape(-1)

    @property
    def units(self) -> int:
        return int(self.nodes.size)


@dataclass
class LayerView:
    """A graph and its named weight layers (see the module doc)."""

    graph: WeightedDigraph
    layers: list
    tie: np.ndarray | None = None
    name: str = "model"

    def __post_init__(self):
        n = int(self.graph.n)
        self.tie = np.arange(n, dtype=np.int64) if self.tie is None else np.asarray(self.tie, dtype=np.int64)
        if self.tie.shape != (n,):
            raise ValueError(f"tie has shape {self.tie.shape}, the graph has {n} nodes")
        for ly in self.layers:
            if ly.nodes.size and (ly.nodes.min() < 0 or ly.nodes.max() >= n):
                raise ValueError(f"layer {ly.name!r}: node ids outside 0..{n - 1}")

    def names(self) -> list:
        return [ly.name for ly in self.layers]

    def index(self, name) -> int:
        """Position of the layer named ``name``."""
        for k, ly in enumerate(self.layers):
            if ly.name == name:
                return k
        raise KeyError(name)

    def hidden(self) -> list:
        """Positions of the layers that are not output layers."""
        return [k for k, ly in enumerate(self.layers) if not ly.output]

    def colour(self, symmetry="fibration", criterion=None, initial=None) -> np.ndarray:
        """Labels of every node of the graph (the engine's colouring)."""
        return colour(self.graph, symmetry, criterion, initial=initial).labels

    def layer_labels(self, labels, k) -> np.ndarray:
        """Canonical labels of layer ``k``'s units under the node labels ``labels``."""
        return canonical(np.asarray(labels)[self.layers[k].nodes])

    def unit_map(self):
        """``(layer, unit)`` per node: the weight layer and unit a node is tied to
        (-1 where none), and a mask of nodes tied to more than one unit (a
        residual stream column written by several layers, q and k of one head)."""
        n = int(self.graph.n)
        tl = np.full(int(self.tie.max()) + 1 if n else 0, -1, dtype=np.int64)
        tu = tl.copy()
        shared = np.zeros(tl.size, dtype=bool)
        for k, ly in enumerate(self.layers):
            c = self.tie[ly.nodes]
            taken = tl[c] >= 0
            shared[c[taken]] = True
            if np.unique(c).size != c.size:            # two units of one layer tied together
                u, cnt = np.unique(c, return_counts=True)
                shared[u[cnt > 1]] = True
            tl[c[~taken]] = k
            tu[c[~taken]] = np.arange(c.size)[~taken]
        return tl[self.tie], tu[self.tie], shared[self.tie]
