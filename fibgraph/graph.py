"""The format-free graph type: a weighted directed graph stored as edge blocks.

A trained network is a directed weighted graph (docs/design.md section 1): one node
per input feature, neuron, conv channel or gate unit; an edge ``k -> i`` with
weight ``W[i, k]``.  A conv edge carries a whole kernel and a dense edge that
reads a flattened ``C x H x W`` tensor carries the vector of its weights over
the positions, so every edge weight is a vector of length ``D`` (``D = 1`` for
plain scalar weights) and weights are compared as vectors.

Edges are stored in *blocks* so that a dense layer is never expanded into an
edge list: a :class:`Block` holds the edges from an ordered set of source nodes
to an ordered set of destination nodes, either as a dense tensor
``weight[n_dst, n_src, D]`` or as a sparse COO list.  Multi-edges in a sparse
block add up.  A bias is an edge from a constant node that has a colour of its
own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Block", "WeightedDigraph", "FACTOR", "NORM", "PER_UNIT", "AND_KINDS"]

#: node kinds (``WeightedDigraph.kind``) whose colour is the tuple of their
#: operands' colours (the AND rule, docs/design.md section 6): a sum or product
#: of streams, a norm over units, a per-unit constant op (bias add, scale)
FACTOR, NORM, PER_UNIT = "factor", "norm", "per-unit"
AND_KINDS = (FACTOR, NORM, PER_UNIT)


@dataclass
class Block:
    """Edges from ``src`` nodes to ``dst`` nodes (global node ids).

    Dense form: ``weight`` of shape ``(len(dst), len(src), D)``; a zero entry
    (over all ``D``) is no edge.  Sparse form: ``rows``/``cols`` index into
    ``dst``/``src`` and ``values`` has shape ``(m, D)``; ``etype`` optionally
    gives each edge an integer category that is compared exactly.
    ``exact`` marks integer weights, compared without tolerance.
    """

    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray | None = None
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    values: np.ndarray | None = None
    etype: np.ndarray | None = None
    exact: bool = False
    name: str = ""

    def __post_init__(self):
        self.src = np.asarray(self.src, dtype=np.int64)
        self.dst = np.asarray(self.dst, dtype=np.int64)
        if self.weight is not None:
            w = np.asarray(self.weight)
            if w.ndim == 2:
                w = w[:, :, None]
            if w.shape[:2] != (self.dst.size, self.src.size):
                raise ValueError(f"block {self.name!r}: weight shape {w.shape} does not match "
                                 f"{self.dst.size} dst x {self.src.size} src")
            self.weight = w
        else:
            if self.rows is None or self.cols is None or self.values is None:
                raise ValueError("a block needs a dense weight or rows/cols/values")
            self.rows = np.asarray(self.rows, dtype=np.int64)
            self.cols = np.asarray(self.cols, dtype=np.int64)
            v = np.asarray(self.values)
            if v.ndim == 1:
                v = v[:, None]
            self.values = v
            if self.etype is not None:
                self.etype = np.asarray(self.etype, dtype=np.int64)

    @property
    def dense(self) -> bool:
        return self.weight is not None

    @property
    def dim(self) -> int:
        return int((self.weight if self.dense else self.values).shape[-1])

    @property
    def n_edges(self) -> int:
        if self.dense:
            return int(np.count_nonzero(np.any(self.weight != 0, axis=2)))
        return int(self.rows.size)

    def coo(self):
        """Global ``(src, dst, values[m, D], etype or None)`` of the block's edges."""
        if self.dense:
            nz = np.any(self.weight != 0, axis=2)
            r, c = np.nonzero(nz)
            return self.src[c], self.dst[r], self.weight[r, c, :], None
        return self.src[self.cols], self.dst[self.rows], self.values, self.etype


@dataclass
class WeightedDigraph:
    """A weighted digraph on nodes ``0..n-1`` built from :class:`Block` s.

    ``levels`` (optional) lists node-id arrays in topological order: when given,
    every edge goes from an earlier level to a later one, and the refinement
    engine colours level by level in one sweep (the paper's per-layer
    procedure).  ``initial`` is the starting colouring (in a network: one class
    per layer, every input and output node distinct, every bias node distinct).
    ``homogeneous[i]`` says that node ``i``'s activation is positively
    homogeneous (ReLU family, identity), which licenses the rescaling merge.
    ``cyclic`` names levels whose nodes also read each other (a recurrence,
    e.g. an LSTM's gates, cell and hidden state): such a level is refined
    repeatedly until its colouring is a fixed point.
    ``relieve`` (optional, no arguments) is called by the engine after each
    level it refines: an importer's way to hand back memory the level's
    weights held (the ONNX importer drops the resident pages of a mapped
    weight file; they are read again when touched).
    ``tie`` (optional, int per node, -1 = untied) groups nodes of one level
    that sit at the same position in several node sets (``layer``), e.g. the
    gates, cell and hidden node of one LSTM unit: under a tolerance criterion
    such a *column* is clustered as one item on the concatenation of its
    nodes' rows (see :func:`fibgraph.engine.refine`); exact criteria ignore it.
    """

    n: int
    blocks: list = field(default_factory=list)
    levels: list | None = None
    initial: np.ndarray | None = None
    layer: np.ndarray | None = None          # level/layer number of each node
    index: np.ndarray | None = None          # index within its layer
    kind: np.ndarray | None = None           # 'input', 'dense', 'conv', 'bias', 'node', ...
    layer_names: list | None = None
    node_ids: list | None = None             # ids as in the input file
    homogeneous: np.ndarray | None = None
    cyclic: set | None = None                # indices of levels with edges inside them (a loop)
    tie: np.ndarray | None = None            # column id per node (-1: none), for joint clustering
    relieve: object = None                   # called after each level is refined: an importer's hook
    #                                          handing back memory the level's weights held (mapped pages)

    def __post_init__(self):
        n = self.n
        if self.initial is None:
            self.initial = np.zeros(n, dtype=np.int64)
        self.initial = np.asarray(self.initial, dtype=np.int64)
        if self.layer is None:
            self.layer = np.zeros(n, dtype=np.int64)
        if self.index is None:
            self.index = np.arange(n, dtype=np.int64)
        if self.kind is None:
            self.kind = np.array(["node"] * n, dtype=object)
        if self.layer_names is None:
            self.layer_names = ["graph"]
        if self.homogeneous is None:
            self.homogeneous = np.zeros(n, dtype=bool)

    # ------------------------------------------------------------------ basics
    @property
    def n_edges(self) -> int:
        return sum(b.n_edges for b in self.blocks)

    def node_label(self, i: int) -> str:
        if self.node_ids is not None:
            return str(self.node_ids[i])
        return f"{self.layer_names[self.layer[i]]}:{self.index[i]}"

    def edges(self):
        """All edges as global COO arrays ``(src, dst, weight[m, D])``.

        Blocks of different ``D`` are padded to the largest ``D``.
        """
        parts = [b.coo() for b in self.blocks]
        if not parts:
            return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 1)))
        dmax = max(p[2].shape[1] for p in parts)
        vals = [np.pad(p[2], ((0, 0), (0, dmax - p[2].shape[1]))) for p in parts]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate(vals))

    @classmethod
    def from_edges(cls, src, dst, weight=None, n=None, etype=None, exact=None, node_ids=None,
                   initial=None):
        """Graph from an edge list; multi-edges add, self-loops and cycles allowed."""
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if n is None:
            n = int(max(src.max(initial=-1), dst.max(initial=-1)) + 1)
        if weight is None:
            weight = np.ones(src.size)
        weight = np.asarray(weight)
        if exact is None:
            exact = np.issubdtype(weight.dtype, np.integer)
        nodes = np.arange(n, dtype=np.int64)
        blk = Block(src=nodes, dst=nodes, rows=dst, cols=src, values=weight.astype(np.float64),
                    etype=etype, exact=bool(exact), name="edges")
        return cls(n=n, blocks=[blk] if src.size else [], node_ids=node_ids, initial=initial)

    # ---------------------------------------------------------------- exports
    def to_networkx(self, colours=None):
        """``networkx.DiGraph`` with node attributes layer, index, kind (and colour)
        and edge attribute ``weight`` (the sum over a vector weight) plus
        ``kernel`` (the vector, comma-separated) when ``D > 1``."""
        import networkx as nx

        g = nx.DiGraph()
        for i in range(self.n):
            attrs = dict(layer=str(self.layer_names[self.layer[i]]), index=int(self.index[i]),
                         kind=str(self.kind[i]))
            if colours is not None:
                attrs["colour"] = int(colours[i])
            g.add_node(self.node_label(i), **attrs)
        labels = [self.node_label(i) for i in range(self.n)]
        for b in self.blocks:
            s, d, v, _ = b.coo()
            wsum = v.sum(axis=1)
            for k in range(s.size):
                u, w = labels[s[k]], labels[d[k]]
                attrs = {"weight": float(wsum[k])}
                if v.shape[1] > 1:
                    attrs["kernel"] = ",".join(f"{x:.9g}" for x in v[k])
                if g.has_edge(u, w) and not b.dense:
                    g[u][w]["weight"] += attrs["weight"]
                else:
                    g.add_edge(u, w, **attrs)
        return g

    def to_igraph(self, colours=None):
        """``igraph.Graph`` (directed) with the same attributes as :meth:`to_networkx`."""
        import igraph as ig

        src, dst, vals = self.edges()
        g = ig.Graph(n=self.n, edges=np.stack([src, dst], 1).tolist(), directed=True)
        g.vs["name"] = [self.node_label(i) for i in range(self.n)]
        g.vs["layer"] = [str(self.layer_names[x]) for x in self.layer]
        g.vs["index"] = [int(x) for x in self.index]
        g.vs["kind"] = [str(x) for x in self.kind]
        if colours is not None:
            g.vs["colour"] = [int(c) for c in colours]
        g.es["weight"] = vals.sum(axis=1).tolist()
        return g

    def write_graphml(self, path, colours=None):
        import networkx as nx

        nx.write_graphml(self.to_networkx(colours), path)
