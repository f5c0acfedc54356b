"""The compressed view of one unit axis (docs/design.md section 5).

For kept positions ``q`` each standing for a group ``G(q)``:

- rows (outputs) are averaged over the group: ``mean_matrix``; columns
  (inputs) are summed over it: ``sum_matrix``; so a linear weight becomes
  ``W_hat[r, q] = mean_{i in G(r)} sum_{k in G(q)} W[i, k]`` (rows: the mean
  over the output fiber, the papers' sum is wrong for biases);
- the rescaling merge (``scales``, docs/design.md section 4): a node ``i`` with
  scale ``s_i`` carries ``s_i`` times its base node's value, so its row and
  bias enter the base divided by ``s_i`` (the mean of normalised rows) and
  the next layer's columns are summed with the factors ``s_k``:
  ``W_hat[r, q] = mean_{i in G(r)} (1/s_i) sum_{k in G(q)} s_k W[i, k]``.
  One scale per column (the nodes a bias add ties to its layer's): the
  scale of the column's last node set, the one the next layer reads
  (:func:`column_scales`);
- sums over a unit axis weight each kept position by its group size ``m``
  (:meth:`Axis.weights_along`), so the compressed model sums what the
  original summed.
"""
from __future__ import annotations

import numpy as np

from .groups import join_components, nodes_along, unit_axes
from fibgraph.lazy import lazy_module

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = ["Axis", "column_scales", "two_sided"]

#: float64 entries of one working block of a weight (4 MB) in :func:`two_sided` and the writers
CHUNK = 1 << 19


def two_sided(Rm, W, C, dtype=np.float64):
    """``Rm @ W @ C.T`` along the first two axes of ``W``, a 2-D weight
    (n_out, n_in) or a kernel (n_out, n_in, *kernel) of any float dtype
    (maybe a view of the mapped file), computed in float64 and stored as
    ``dtype``.  Bounded memory whatever the shapes: the output is made a
    block of rows at a time (``acc``, at most :data:`CHUNK` float64
    entries), each from the weight rows that block averages, taken a few at
    a time (``S``: their float64 copy and their columns through ``C``, at
    most :data:`CHUNK` entries together).  No float64 copy of the whole
    weight and no whole intermediate (a 512 x 512 x 3 x 3 kernel once took
    five copies at once; a 2,048 x 2,048 layer's intermediate 17 MB).

    >>> import scipy.sparse as sp
    >>> Rm = sp.csr_matrix([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])    # rows 0 and 1 merge
    >>> C = sp.csr_matrix([[1.0, 1.0]])                          # both columns merge
    >>> two_sided(Rm, np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), C).tolist()
    [[5.0], [11.0]]
    """
    n_out, n_in = W.shape[:2]
    m, c = Rm.shape[0], C.shape[0]
    k = int(np.prod(W.shape[2:]))
    W3 = W.reshape(n_out, n_in, k)                  # a view of a contiguous (mapped) weight
    Rm = sp.csr_matrix(Rm)
    out = np.empty((m, c, k), dtype=dtype)
    rb = max(1, CHUNK // max(c * k, 1))              # output rows per block
    sb = max(1, CHUNK // max((n_in + c) * k, 1))     # weight rows per step
    for r0 in range(0, m, rb):
        blk = Rm[r0:r0 + rb]
        used = np.unique(blk.indices)
        acc = np.zeros((blk.shape[0], c * k))
        for s0 in range(0, len(used), sb):
            S = used[s0:s0 + sb]
            Ws = np.asarray(W3[S], dtype=np.float64)                    # (s, n_in, k)
            Zs = C @ np.ascontiguousarray(Ws.transpose(1, 0, 2)).reshape(n_in, -1)     # (c, s * k)
            Zs = np.asarray(Zs).reshape(c, len(S), k).transpose(1, 0, 2).reshape(len(S), c * k)
            acc += blk[:, S] @ Zs
        out[r0:r0 + rb] = acc.reshape(-1, c, k)
    return out.reshape(m, c, *W.shape[2:])


class Axis:
    """The compressed view of one tensor's unit axis: ``target[p]`` = kept index
    standing for position ``p``; ``L_hat`` kept positions; ``m`` group sizes.

    ``prune``: the kept position of a group stands for itself only (the other
    members are dropped, not merged): ``sum_matrix`` and ``mean_matrix`` select
    the kept positions and every multiplicity ``m`` is 1."""

    def __init__(self, ids, gid, kept, prune=False, scale=None):
        ua = unit_axes(ids)
        self.axis = ua[0] if ua else None
        self.prune = prune
        if self.axis is None:
            self.L = self.L_hat = 1
            self.target = np.zeros(1, np.int64)
            self.keep_pos = np.zeros(1, np.int64)
            self.m = np.ones(1)
            self.s = np.ones(1) if scale is None else np.asarray(scale, np.float64)[np.asarray(ids).reshape(-1)[:1]]
            self.identity = True
            self.scaled = bool(np.any(self.s != 1))
            return
        nodes = nodes_along(ids, self.axis)
        # per position: the rescaling merge's scale of its node (1 where none)
        self.s = np.ones(nodes.size) if scale is None or prune else np.asarray(scale, np.float64)[nodes]
        self.scaled = bool(np.any(self.s != 1))
        self.L = nodes.size
        g = gid[nodes]
        # occurrence index of each position among positions of the same node
        occ = np.zeros(self.L, np.int64)
        seen = {}
        for p, v in enumerate(nodes):
            occ[p] = seen.get(int(v), 0)
            seen[int(v)] = occ[p] + 1
        keep_pos = np.nonzero(kept[nodes])[0]
        self.L_hat = keep_pos.size
        index = {(int(g[p]), int(occ[p])): q for q, p in enumerate(keep_pos)}
        self.target = np.array([index[(int(g[p]), int(occ[p]))] for p in range(self.L)], dtype=np.int64)
        self.keep_pos = keep_pos
        self.m = (np.ones(self.L_hat) if prune else
                  np.bincount(self.target, minlength=self.L_hat).astype(np.float64))
        self.identity = self.L_hat == self.L

    def sum_matrix(self, scaled=False):
        """(L_hat, L) indicator: columns of a group add up (prune: only the kept one);
        ``scaled``: column ``p`` enters times its node's scale ``s_p``."""
        if self.prune:
            return sp.csr_matrix((np.ones(self.L_hat), (np.arange(self.L_hat), self.keep_pos)),
                                 shape=(self.L_hat, self.L))
        v = self.s if scaled else np.ones(self.L)
        return sp.csr_matrix((v, (self.target, np.arange(self.L))), shape=(self.L_hat, self.L))

    def mean_matrix(self, scaled=False):
        """(L_hat, L): the mean over each group; ``scaled``: of the rows divided
        by their nodes' scales (the rescaling merge's base row)."""
        if scaled and not self.prune:
            S = sp.csr_matrix((1.0 / self.s, (self.target, np.arange(self.L))), shape=(self.L_hat, self.L))
            return sp.diags(1.0 / self.m) @ S
        return sp.diags(1.0 / self.m) @ self.sum_matrix()

    def mean_along(self, v, axis, scaled=False):
        """``v`` with its ``axis`` (of length L) replaced by the mean over each group
        (``scaled``: of ``v`` divided by the scales)."""
        vh = np.moveaxis(np.asarray(v, dtype=np.float64), axis, 0)
        sh = vh.shape
        return np.moveaxis((self.mean_matrix(scaled) @ vh.reshape(sh[0], -1)).reshape((self.L_hat,) + sh[1:]),
                           0, axis)

    def weights_along(self, rank, scale):
        """The group sizes ``m`` times ``scale``, shaped to broadcast along this
        axis of a rank-``rank`` tensor."""
        shape = [1] * rank
        shape[self.axis] = self.L_hat
        return (self.m * scale).reshape(shape)


def column_scales(imp, scales):
    """Per node: the rescaling merge's scale of its column (the nodes joins tie
    position by position: a layer and the bias add after it).  A column takes
    the scale of its LAST node set (the largest space index: the one the next
    layer reads); columns with no scale are 1.  Only node sets the importer
    marks homogeneous carry scales, and a column holding one holds only such
    sets (see ``fibgraph.importers.onnx.importer._homogeneous_spaces``), so for exact fibers every
    node set of a column is scaled alike and any choice is exact."""
    scales = np.asarray(scales, dtype=np.float64)
    n = imp.graph.n
    if n == 0 or np.all(scales == 1):
        return None
    comp = join_components(imp)
    order = np.lexsort((np.arange(n), imp.space_of, comp))        # last of each column: its head
    last = np.ones(n, dtype=bool)
    last[:-1] = comp[order][1:] != comp[order][:-1]
    head = np.empty(int(comp.max()) + 1, dtype=np.int64)
    head[comp[order][last]] = order[last]
    return scales[head[comp]]

