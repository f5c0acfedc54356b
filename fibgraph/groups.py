"""Groups: the units of a model that are tied position by position.

Definition.  A *join* ``(a, b)`` says that node ``a[i]`` and node ``b[i]`` sit
at the same position (an element-wise op reads or writes both: a bias add,
a residual sum, an LSTM unit's gates, cell and hidden state, the score
contraction ``q . k`` of one head dim).  The connected components of the nodes
under the joins are the *columns*: a base model keeps or drops a column
whole.  The connected components of the *node sets* under the joins (two sets
are joined when a join ties any of their nodes), merged further when two of
them hold uses of one weight (an unrolled loop reads one weight at every
step), are the *groups*: the one object that compression (one criterion per
group), the eps file (one eps per group, keyed by its first weight), tuning
(one tunable layer per group), the baselines (columns chosen inside a group)
and the report (``"group"`` and ``"tied"`` per weight row) all use.  Only
components holding a compressible weight are groups.

A group's columns are coloured by the meet of its node sets' colourings (the
AND rule): two columns stay apart unless every node set gives them the same
colour at every slot, :func:`group_partition`.

Example: an MLP ``x -> W1 -> (+b1) -> relu -> W2 -> y`` has the joins
``(W1 out, b1 add)`` and ``(b1 add, relu)`` (relu aliases), so W1's units,
the bias add and the activation form one LAYER group named ``"W1"`` whose
columns are the hidden units::

    >>> import numpy as np
    >>> tie_columns(6, [(np.array([0, 1]), np.array([2, 3]))])
    array([0, 1, 0, 1, 2, 3])
    >>> set_components(np.array([0, 0, 1, 1, 2, 2]), [(np.array([0, 1]), np.array([2, 3]))], 3)
    array([0, 0, 1])

Format-free (numpy / scipy only): the importer builds the groups
(:func:`fibgraph.importers.onnx.groups.groups_of`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from .lazy import lazy_module

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = [
    "Group",
    "GroupKind",
    "WeightUse",
    "group_partition",
    "kept_counts",
    "set_components",
    "tie_columns",
]


class GroupKind(str, Enum):
    """What ties a group's units together."""

    LAYER = "layer"            # one weight's units (with its bias add, scale, activation)
    RECURRENT = "recurrent"    # an LSTM/GRU/RNN's W and R: gates, cell and hidden state of each unit
    STREAM = "stream"          # a residual stream, or any component with several writers
    ATTENTION = "attention"    # q and k of the heads (tied by the score contraction)
    EMBEDDING = "embedding"    # an embedding table's rows alone


@dataclass(frozen=True, eq=False)
class WeightUse:
    """One use of a compressible weight: its name, op, the node ids of its
    output units (an LSTM's hidden nodes), the names of its node sets, whether
    all its units are the model's outputs and whether all are kept (they feed
    a barrier); ``index``: position in the uses (record order, the report's);
    ``set_ids``: indices of its node sets; ``kind``: 'linear', 'embedding' or
    'recurrent' (the uses of one recurrent op, ``W`` then ``R``, are adjacent)."""

    weight: str
    op: str
    units: np.ndarray
    node_sets: tuple
    is_output: bool
    keep: bool
    index: int = 0
    set_ids: tuple = ()
    kind: str = "linear"


@dataclass(frozen=True, eq=False)
class Group:
    """A tied component of node sets holding at least one compressible weight.

    ``name``: its first weight (the eps-file key); ``weights``: every weight
    tied into it (one eps for all); ``uses``: its weights' uses in record
    order; ``node_sets`` / ``node_set_names``: indices and names of its node
    sets; ``units``: node ids of its weights' output units (sorted, the ones a
    report counts); ``nodes``: every node of its node sets, ``columns`` the
    column id of each (nodes tied position by position share one) and ``sets``
    the node set of each; ``is_output``: every use's units are graph outputs;
    ``kept_whole``: why its units are all kept (they feed a barrier), or None
    (always None for an output group: its units are kept as outputs)."""

    name: str
    kind: GroupKind
    weights: tuple
    uses: tuple
    node_sets: tuple
    node_set_names: tuple
    units: np.ndarray
    nodes: np.ndarray
    columns: np.ndarray
    sets: np.ndarray
    is_output: bool
    kept_whole: str | None = None
    index: int = field(default=0)

    @property
    def tunable(self) -> bool:
        """Its eps matters: neither the model's output nor kept whole."""
        return not self.is_output and self.kept_whole is None


def _pairs(joins):
    a, b = [], []
    for p, q in joins:
        p, q = np.asarray(p, dtype=np.int64).reshape(-1), np.asarray(q, dtype=np.int64).reshape(-1)
        if p.size and p.size == q.size:
            a.append(p)
            b.append(q)
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a), np.concatenate(b)


def _components(n, a, b):
    if n == 0:
        return np.zeros(0, np.int64)
    g = sp.coo_matrix((np.ones(a.size), (a, b)), shape=(n, n))
    return sp.csgraph.connected_components(g, directed=False)[1].astype(np.int64)


def tie_columns(n_nodes, joins) -> np.ndarray:
    """Column id per node: connected components of the nodes under ``joins``
    (pairs of equally long node id arrays tied position by position), numbered
    in order of first appearance."""
    a, b = _pairs(joins)
    return _components(int(n_nodes), a, b)


def set_components(space_of, joins, n_sets) -> np.ndarray:
    """Component id per node set: sets any of whose nodes a join ties are one component."""
    a, b = _pairs(joins)
    space_of = np.asarray(space_of, dtype=np.int64)
    return _components(int(n_sets), space_of[a], space_of[b])


def group_partition(group: Group, labels) -> tuple:
    """The meet of the group's node sets' colourings on its columns.

    Returns ``(cols, cls)``: the group's column ids (sorted) and a class id per
    column; two columns share a class iff they hold the same colour at every
    (node set, slot) -- a slot being the rank of a node among the nodes of its
    node set in its column (q and k of one packed projection are two slots)."""
    labels = np.asarray(labels, dtype=np.int64)
    cols, ci = np.unique(group.columns, return_inverse=True)
    if not cols.size:
        return cols, np.zeros(0, np.int64)
    n = group.nodes.size
    order = np.lexsort((group.nodes, group.sets, ci))
    run = np.ones(n, dtype=bool)
    run[1:] = (ci[order][1:] != ci[order][:-1]) | (group.sets[order][1:] != group.sets[order][:-1])
    start = np.maximum.accumulate(np.where(run, np.arange(n), 0))
    slot = np.empty(n, dtype=np.int64)
    slot[order] = np.arange(n) - start
    _, key = np.unique(np.stack([group.sets, slot], 1), axis=0, return_inverse=True)
    key = key.reshape(-1)
    table = np.full((cols.size, int(key.max()) + 1), -1, dtype=np.int64)
    table[ci, key] = labels[group.nodes]
    _, first, cls = np.unique(table, axis=0, return_index=True, return_inverse=True)
    # classes numbered in order of their first column
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return cols, rank[cls.reshape(-1)]


def kept_counts(group: Group, kept) -> list:
    """Kept units per use of the group's weights (``kept``: bool per node)."""
    kept = np.asarray(kept, dtype=bool)
    return [int(kept[u.units].sum()) for u in group.uses]
