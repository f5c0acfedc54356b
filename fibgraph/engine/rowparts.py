"""Signature rows held as their parts, assembled for a few rows at a time.

A level whose nodes read a weight in part (an LSTM's cyclic level: the four
gates read ``W`` and ``R``, the cell and hidden nodes only a few products)
has signature rows that are one dense block over some rows beside sparse
rows for the rest.  As one matrix they are either dense (zeros for every
row the weight does not feed) or sparse (about 12 bytes per weight): two or
three times the weight.  :class:`RowParts` keeps the dense blocks as they
are (float32 views of the weight where they are) and the rest as one sparse
matrix, and gives the dense rows of the members the tolerance split asks
for (:func:`fibgraph.engine.tolerance.split_tolerance`).

Example
-------
>>> import numpy as np
>>> import scipy.sparse as sp
>>> A = np.arange(6.0).reshape(2, 3)                 # rows 1 and 3 read a weight
>>> S = sp.csr_matrix(np.array([[1.0], [0.0], [2.0], [0.0]]))
>>> X = RowParts(4, [(np.array([1, 3]), A)], S)
>>> X.shape
(4, 4)
>>> X.rows(np.array([0, 1])).tolist()
[[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 2.0, 0.0]]
"""
from __future__ import annotations

import numpy as np

from ..lazy import lazy_module
from ..pages import read

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy

__all__ = ["RowParts", "sparse_rows", "sparse_width"]

#: signature rows of at least this many entries built from float32 weights
#: are kept in float32 (8 MB of float64 and more), merged column sums too;
#: the clustering computes in float64 from them (fibgraph.engine.cluster)
F32_ROWS_MIN = 1 << 20


def _gather(S, members):
    """(local row, column, value) of the entries of rows ``members`` of the
    CSR matrix ``S``, gathered with numpy (scipy's row indexing builds two
    matrices per call: the tolerance split asks for thousands of small
    classes per colouring)."""
    members = np.asarray(members, dtype=np.int64)
    starts = S.indptr[members].astype(np.int64)
    lens = S.indptr[members + 1].astype(np.int64) - starts
    row = np.repeat(np.arange(members.size), lens)
    pos = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
    return row, S.indices[pos], S.data[pos]


def _csr(S):
    S = S if S.format == "csr" else S.tocsr()
    if not S.has_canonical_format:
        S = S.copy()
        S.sum_duplicates()
    return S


def sparse_rows(S, members, dtype=np.float64):
    """The rows ``members`` of the sparse matrix ``S`` as a dense array over
    only the columns they use (in column order)."""
    row, col, val = _gather(_csr(S), members)
    used, inv = np.unique(col, return_inverse=True)
    out = np.zeros((np.size(members), used.size), dtype=dtype)
    out[row, inv.reshape(-1)] = val
    return out


def sparse_width(S, members):
    """The number of columns :func:`sparse_rows` gives for ``members``."""
    return int(np.unique(_gather(_csr(S), members)[1]).size)


class RowParts:
    """The signature rows of ``n`` nodes: ``dense`` = [(rows, A)] (local row
    ids, and their rows over the part's own columns), ``sparse`` a CSR matrix
    of all ``n`` rows over the remaining columns (or None)."""

    def __init__(self, n, dense, sparse=None):
        self.n = int(n)
        self.dense = [(np.asarray(r, dtype=np.int64), A) for r, A in dense]
        self.sparse = None if sparse is None else _csr(sparse)
        self._at = []
        for r, _ in self.dense:
            at = np.full(self.n, -1, dtype=np.int64)
            at[r] = np.arange(r.size)
            self._at.append(at)
        width = sum(A.shape[1] for _, A in self.dense) + (0 if sparse is None else sparse.shape[1])
        self.shape = (self.n, width)
        self.float32 = bool(self.dense) and all(A.dtype == np.float32 for _, A in self.dense)

    def width(self, members):
        """The number of columns :meth:`rows` gives for ``members``."""
        members = np.asarray(members, dtype=np.int64)
        w = sum(A.shape[1] for (_, A), at in zip(self.dense, self._at) if np.any(at[members] >= 0))
        if self.sparse is not None:
            w += sparse_width(self.sparse, members)
        return w

    def rows(self, members):
        """The rows ``members`` as a new dense array over the columns they use
        (each dense part's columns where a member reads it, the sparse part's
        nonzero columns); float32 where the dense parts are and the rows are
        big (:data:`F32_ROWS_MIN` entries), else float64."""
        members = np.asarray(members, dtype=np.int64)
        parts = []
        for (_, A), at in zip(self.dense, self._at):
            pos = at[members]
            if np.any(pos >= 0):
                parts.append((pos, A))
        tail = None
        if self.sparse is not None:
            tail = sparse_rows(self.sparse, members)
        width = sum(A.shape[1] for _, A in parts) + (0 if tail is None else tail.shape[1])
        small = members.size * width < F32_ROWS_MIN
        out = np.zeros((members.size, width), dtype=np.float64 if small or not self.float32 else np.float32)
        k = 0
        for pos, A in parts:
            hit = pos >= 0
            out[hit, k:k + A.shape[1]] = A[pos[hit]]
            k += A.shape[1]
        if tail is not None:
            out[:, k:] = tail
        return out

    def row_norms(self):
        """Euclidean norms of every row, in float64 (a dense part read a block
        of rows at a time, its mapped pages handed back after each)."""
        sq = np.zeros(self.n)
        for r, A in self.dense:
            step = max(1, (1 << 20) // max(A.shape[1], 1))
            for s in range(0, A.shape[0], step):
                c = read(A[s:s + step])
                sq[r[s:s + step]] += np.einsum("ij,ij->i", c, c)
        if self.sparse is not None:
            S = self.sparse
            sq += np.asarray(S.multiply(S).sum(axis=1)).reshape(-1)
        return np.sqrt(sq)
