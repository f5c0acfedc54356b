"""Signature rows held as parts (fibgraph/engine/rowparts.py, seventh
session): a level where a big weight feeds only some of the nodes (an LSTM's
gates beside its cell and hidden nodes) keeps that weight's rows as they are
instead of a zero-filled or sparse copy (the tolerance split on them gives
the same partition as on the whole matrix: tests/onnx/test_dag_joint_eps.py)."""
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import pdist

from fibgraph.engine import cluster, rowparts, signatures
from fibgraph.engine.rowparts import RowParts


def _parts(rng):
    n = 12
    A = rng.normal(size=(5, 7)).astype(np.float32)          # rows 2, 3, 5, 8, 11 read a weight
    B = rng.normal(size=(4, 3)).astype(np.float32)     # rows 0..3 read another
    S = sp.random(n, 6, density=0.3, random_state=1, format="csr")
    rows_a, rows_b = np.array([2, 3, 5, 8, 11]), np.arange(4)
    full = np.zeros((n, 16))
    full[rows_a, :7] = A
    full[rows_b, 7:10] = B
    full[:, 10:] = S.toarray()
    return RowParts(n, [(rows_a, A), (rows_b, B)], S), full


@pytest.mark.parametrize("members", [[0, 1, 2, 3], [2, 5, 11], [0, 6, 7, 9, 10], list(range(12))])
def test_rows_of_members_are_the_matrix_rows_up_to_zero_columns(members):
    X, full = _parts(np.random.default_rng(0))
    members = np.array(members)
    got = X.rows(members)
    np.testing.assert_allclose(pdist(got), pdist(full[members]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(full[members], axis=1), rtol=1e-6)
    np.testing.assert_allclose(X.row_norms(), np.linalg.norm(full, axis=1), rtol=1e-6)
    assert X.shape == (12, 16)


def test_big_rows_of_float32_parts_stay_float32(monkeypatch):
    X, full = _parts(np.random.default_rng(1))
    assert X.rows(np.arange(12)).dtype == np.float64
    monkeypatch.setattr(rowparts, "F32_ROWS_MIN", 1)
    got = X.rows(np.arange(12))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:, :10], full[:, :10].astype(np.float32), rtol=1e-6)


def test_joint_rows_from_a_generator_equal_the_list_and_big_ones_are_float32(monkeypatch):
    rng = np.random.default_rng(2)
    blocks = [rng.normal(size=(30, k)) for k in (4, 9, 2)]
    want = cluster.joint_rows(list(blocks), "euclidean", [3.0, 2.0, 0.0])
    got = cluster.joint_rows((b for b in blocks), "euclidean", [3.0, 2.0, 0.0])
    np.testing.assert_array_equal(got, want)
    assert want.dtype == np.float64
    monkeypatch.setattr(cluster, "F32_ROWS_MIN", 1)
    small = cluster.joint_rows((b for b in blocks), "cosine")
    assert small.dtype == np.float32
    np.testing.assert_allclose(small, cluster.joint_rows(blocks, "cosine").astype(np.float32), rtol=1e-6)


def test_joint_rows_with_widths_scale_each_block_into_place_and_check_the_count():
    """Given the widths, every block is written into its own columns as it
    comes (equal to the list's result; the euclidean distance the root mean
    square of the blocks' scaled distances); a block of another width, or
    fewer blocks than widths, is an error, not uninitialised columns."""
    rng = np.random.default_rng(3)
    blocks = [rng.normal(size=(20, k)).astype(np.float32) for k in (5, 3, 7)]
    for metric, scales in (("euclidean", [2.0, 0.0, 5.0]), ("euclidean", None), ("cosine", None)):
        want = cluster.joint_rows(list(blocks), metric, scales)
        got = cluster.joint_rows((b for b in blocks), metric, scales, widths=[5, 3, 7])
        np.testing.assert_array_equal(got, want)
    scales = [2.0, 0.0, 5.0]
    got = cluster.joint_rows(iter(blocks), "euclidean", scales, widths=[5, 3, 7])
    sq = sum(pdist(b.astype(np.float64)) ** 2 / (s if s > 0 else 1.0) ** 2 for b, s in zip(blocks, scales))
    np.testing.assert_allclose(pdist(got.astype(np.float64)), np.sqrt(sq / 3), rtol=1e-6)
    with pytest.raises(ValueError, match="columns"):
        cluster.joint_rows(iter(blocks), "cosine", widths=[5, 4, 7])
    with pytest.raises(ValueError, match="blocks for"):
        cluster.joint_rows(iter(blocks[:2]), "cosine", widths=[5, 3, 7])


def test_the_width_of_members_is_the_width_of_their_rows():
    X, full = _parts(np.random.default_rng(4))
    for members in ([0], [1, 3], list(range(12)), [2, 5, 7]):
        m = np.array(members)
        assert X.width(m) == X.rows(m).shape[1]
        S = sp.csr_matrix(full)
        assert signatures.dense_width(S, m) == signatures.dense_rows(S, m).shape[1]
        assert signatures.dense_width(full, m) == full.shape[1]


@pytest.mark.parametrize("seed", range(5))
def test_sparse_rows_are_the_rows_over_their_used_columns(seed):
    """Rows gathered with numpy equal scipy's dense rows restricted to the
    columns they store: unsorted members, an empty row, duplicate entries
    (summed), CSC input."""
    rng = np.random.default_rng(seed)
    A = sp.random(15, 9, density=0.25, random_state=seed).toarray()
    A[3] = 0.0                                          # an empty row
    S = sp.csr_matrix(A)
    cut = S.indptr[6]                                   # row 5 holds column 4 twice more: not canonical
    dup = sp.csr_matrix((np.r_[S.data[:cut], 1.0, 2.0, S.data[cut:]],
                         np.r_[S.indices[:cut], 4, 4, S.indices[cut:]],
                         S.indptr + 2 * (np.arange(16) >= 6)), shape=S.shape)
    assert not dup.has_canonical_format and dup.toarray()[5, 4] == A[5, 4] + 3.0
    for X in (S, dup, S.tocsc()):
        members = rng.permutation(15)[: int(rng.integers(1, 15))]
        used = np.unique(sp.csr_matrix(X)[members].tocoo().col)
        got = rowparts.sparse_rows(X, members)
        np.testing.assert_allclose(got, X.toarray()[members][:, used])
        assert rowparts.sparse_width(X, members) == got.shape[1] == used.size
