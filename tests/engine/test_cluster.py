"""Threshold clustering (fibgraph/engine/cluster.py): the per-component computation
equals the paper's Algorithm 1 run plainly; the neighbour components are the
same whatever the block size (memory bound); a component too large for
linkage is a clear error, not an out-of-memory kill."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibgraph.engine import cluster
from fibgraph.engine.cluster import _neighbour_components, algorithm1, prepare_rows, threshold_clusters
from fibgraph.errors import InputError
from fibgraph.partition import canonical


def _planted_rows(seed, k=6, per=5, dim=4, noise=0.02):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    X = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(k * per, dim))
    return X[rng.permutation(X.shape[0])]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.01, 0.05, 0.2, 0.5]),
       link=st.sampled_from(["average", "complete"]), metric=st.sampled_from(["cosine", "euclidean"]))
def test_threshold_clusters_equal_algorithm1(seed, eps, link, metric):
    X = _planted_rows(seed)
    assert np.array_equal(threshold_clusters(X, eps, link, metric), algorithm1(X, eps, link, metric))
    X[[3, 11]] = 0.0               # zero rows: one class of their own under cosine, in both
    got = threshold_clusters(X, eps, link, metric)
    assert np.array_equal(got, algorithm1(X, eps, link, metric))
    if metric == "cosine":
        assert got[3] == got[11] and np.sum(got == got[3]) == 2


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), radius=st.sampled_from([0.05, 0.3, 1.0]), block=st.sampled_from([1, 7, 64]))
def test_neighbour_components_do_not_depend_on_the_block_size(seed, radius, block):
    # block_elems 1..64 forces one row per block and a fold of the held pairs
    # after nearly every block
    Y, _, _ = prepare_rows(_planted_rows(seed), "euclidean")
    whole = _neighbour_components(Y, radius, block_elems=1 << 24)
    small = _neighbour_components(Y, radius, block_elems=block)
    assert np.array_equal(canonical(whole), canonical(small))


def test_a_huge_component_of_equal_rows_is_clustered_as_its_distinct_rows(monkeypatch):
    monkeypatch.setattr(cluster, "EXACT_LINKAGE_ROWS", 50)      # blocked complete linkage
    X = np.repeat(np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), 200, axis=0)
    lab = threshold_clusters(X, 0.1, "complete", "euclidean")
    assert np.array_equal(lab, canonical(np.repeat([0, 0, 1], 200)))


def test_a_component_too_large_for_linkage_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cluster, "MAX_LINKAGE_ROWS", 50)
    X = np.random.default_rng(0).normal(scale=1e-3, size=(120, 3)) + 1.0
    with pytest.raises(InputError, match="smaller eps"):
        threshold_clusters(X, 0.5, "average", "euclidean")


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.01, 0.05, 0.2]),
       link=st.sampled_from(["average", "complete"]), metric=st.sampled_from(["cosine", "euclidean"]),
       whole=st.booleans())
def test_gram_distances_give_algorithm1s_clusters(seed, eps, link, metric, whole):
    # GRAM_MIN_WORK 1: distances from BLAS Gram products, either for the whole
    # dendrogram at once (kept, then cut again at a second eps) or per component
    X = _planted_rows(seed, k=8, per=6, dim=40)
    X[::7] = X[1::7][: X[::7].shape[0]]                   # exact duplicates: distance 0
    old = cluster.GRAM_MIN_WORK, cluster.FULL_LINKAGE_ROWS
    cluster.GRAM_MIN_WORK, cluster.FULL_LINKAGE_ROWS = 1, (4096 if whole else 2)
    try:
        got = [threshold_clusters(X, e, link, metric) for e in (eps, 2 * eps)]
    finally:
        cluster.GRAM_MIN_WORK, cluster.FULL_LINKAGE_ROWS = old
    assert np.array_equal(got[0], algorithm1(X, eps, link, metric))
    assert np.array_equal(got[1], algorithm1(X, 2 * eps, link, metric))


def test_condensed_gram_distances_equal_pdist():
    from scipy.spatial.distance import pdist
    Z = np.random.default_rng(3).normal(size=(301, 70))
    Z[5] = Z[200]
    for cosine in (False, True):
        ref = pdist(Z, "euclidean")
        ref = 0.5 * ref * ref if cosine else ref
        got = cluster._condensed(Z, cosine)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-6)
        assert got[np.flatnonzero(ref == 0)].max() < 1e-6   # the duplicate pair stays (near) 0


def test_one_neighbour_component_stops_early():
    # every row within the radius of every other: one component after the first fold
    Y = np.ones((500, 4)) / 2.0 + np.random.default_rng(0).normal(scale=1e-4, size=(500, 4))
    assert np.all(_neighbour_components(Y, 0.1, block_elems=500) == _neighbour_components(Y, 0.1)[0])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.01, 0.05, 0.2]),
       link=st.sampled_from(["average", "complete"]), metric=st.sampled_from(["cosine", "euclidean"]),
       whole=st.booleans())
def test_float32_rows_give_the_clusters_of_their_float64_values(seed, eps, link, metric, whole):
    # big float32 rows (signature rows of float32 weights) stay float32; norms and
    # Gram products accumulate in float64, so the clusters are those of the same
    # values held in float64, at every path (whole dendrogram or per component)
    X = _planted_rows(seed, k=8, per=6, dim=40).astype(np.float32)
    X[::7] = X[1::7][: X[::7].shape[0]]
    old = cluster.F32_ROWS_MIN, cluster.GRAM_MIN_WORK, cluster.FULL_LINKAGE_ROWS
    cluster.F32_ROWS_MIN, cluster.GRAM_MIN_WORK, cluster.FULL_LINKAGE_ROWS = 1, 1, (4096 if whole else 2)
    try:
        Y, norms, _ = prepare_rows(X, metric)
        assert Y.dtype == np.float32 and norms.dtype == np.float64
        got = threshold_clusters(X, eps, link, metric)
    finally:
        cluster.F32_ROWS_MIN, cluster.GRAM_MIN_WORK, cluster.FULL_LINKAGE_ROWS = old
    assert np.array_equal(got, algorithm1(X.astype(np.float64), eps, link, metric))
    Z = np.random.default_rng(seed).normal(size=(40, 30)).astype(np.float32)
    np.testing.assert_allclose(cluster._condensed(Z, False), cluster._condensed(Z.astype(np.float64), False),
                               rtol=1e-12, atol=1e-12)


def test_signature_rows_of_big_float32_weights_stay_float32(monkeypatch):
    from fibgraph.engine import signatures
    from fibgraph.graph import Block, WeightedDigraph

    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 4, 1)).astype(np.float32)          # 4 inputs -> 6 outputs, dense float32
    blk = Block(src=np.arange(4), dst=np.arange(4, 10), weight=W)
    bias = Block(src=np.array([10]), dst=np.arange(4, 10), rows=np.arange(6), cols=np.zeros(6),
                 values=rng.normal(size=6))
    g = WeightedDigraph(n=11, blocks=[blk, bias], initial=np.r_[np.arange(4), np.full(6, 4), 5])
    colours, scales = np.r_[np.arange(4), np.full(6, 4), 5], np.ones(11)
    nodes = np.arange(4, 10)
    X64, _ = signatures.signature_matrix(g, nodes, ["in"], colours, scales)
    monkeypatch.setattr(signatures, "F32_ROWS_MIN", 1)
    X32, _ = signatures.signature_matrix(g, nodes, ["in"], colours, scales)
    assert X64.dtype == np.float64 and X32.dtype == np.float32 and X32.shape == X64.shape == (6, 5)
    np.testing.assert_allclose(X32, X64, rtol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_wide_rows_cluster_without_a_scaled_copy(metric):
    # a layer whose rows are a transposed view of a float32 table (an embedding:
    # 96 features x 100,000 rows): the whole dendrogram scales its Gram products,
    # never the rows, so no array of the rows' size is made (the old path made two:
    # the scaled rows, then a C-contiguous copy), and the clusters are Algorithm 1's
    import tracemalloc

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(12, 100_000)).astype(np.float32)
    table = np.ascontiguousarray((np.repeat(centres, 8, axis=0)
                                  * rng.uniform(0.5, 2.0, size=(96, 1)).astype(np.float32)).T)
    rows = table.T                                   # F-ordered view, 38 MB
    assert rows.flags.f_contiguous and not rows.flags.c_contiguous
    cluster._DENDROGRAMS.clear()
    tracemalloc.start()
    try:
        got = threshold_clusters(rows, 0.05, "average", metric)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * rows.nbytes
    want = algorithm1(rows.astype(np.float64), 0.05, "average", metric)
    assert np.array_equal(got, want)
    # cosine: equal up to a positive factor, so the 12 planted directions; euclidean sees the factors
    assert (got.max() + 1 == 12) == (metric == "cosine")


def test_wide_rows_with_zero_rows_and_the_dendrogram_cache():
    # all-zero rows form one cosine class of their own; a second eps on the same
    # rows is a cut of the remembered dendrogram and equals a fresh run
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 60_000)).astype(np.float32)
    X[5] = 0.0
    X[17] = 0.0
    X[9] = 3.0 * X[2]
    cluster._DENDROGRAMS.clear()
    a = threshold_clusters(X, 0.01, "complete", "cosine")
    assert a[5] == a[17] and a[9] == a[2] and a.max() + 1 == 38
    b = threshold_clusters(X, 0.995, "complete", "cosine")
    assert len(cluster._DENDROGRAMS) == 1
    cluster._DENDROGRAMS.clear()
    assert np.array_equal(b, threshold_clusters(X, 0.995, "complete", "cosine"))
    nz = np.flatnonzero(X.any(axis=1))
    assert b[5] == b[17] and b[5] not in b[nz]
    assert np.array_equal(canonical(b[nz]), algorithm1(X[nz].astype(np.float64), 0.995, "complete", "cosine"))
    assert 1 < b.max() < 38
