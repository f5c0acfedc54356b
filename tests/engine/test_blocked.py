"""Blocked complete linkage (fibgraph/engine/blocked.py): Algorithm 1 itself
when the rows fit one block; beyond, every class of diameter <= eps, planted
clusters recovered exactly, and memory bounded by the block, not the rows."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibgraph.engine import cluster
from fibgraph.engine.blocked import blocked_complete, item_diameters
from fibgraph.engine.cluster import algorithm1, prepare_rows, threshold_clusters
from fibgraph.errors import InputError
from fibgraph.partition import canonical


def _dist(Y, cosine):
    sq = ((Y[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
    return 0.5 * sq if cosine else np.sqrt(sq)


def _planted(seed, k=12, per=15, dim=6, noise=0.003):
    rng = np.random.default_rng(seed)
    X = np.repeat(rng.normal(size=(k, dim)), per, axis=0) + noise * rng.normal(size=(k * per, dim))
    perm = rng.permutation(X.shape[0])
    return X[perm], canonical(np.repeat(np.arange(k), per)[perm])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.05, 0.3, 0.8]), metric=st.sampled_from(["cosine", "euclidean"]))
def test_rows_within_one_block_are_algorithm1(seed, eps, metric):
    X = np.random.default_rng(seed).normal(size=(60, 5))
    Y = prepare_rows(X, metric)[0]
    assert np.array_equal(blocked_complete(Y, eps, metric == "cosine", 60), algorithm1(X, eps, "complete", metric))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.1, 0.4, 1.0]), block=st.integers(2, 40),
       metric=st.sampled_from(["cosine", "euclidean"]))
def test_every_class_has_diameter_at_most_eps(seed, eps, block, metric):
    X = np.random.default_rng(seed).normal(size=(150, 4))
    Y = prepare_rows(X, metric)[0]
    lab = blocked_complete(Y, eps, metric == "cosine", block)
    assert lab.shape == (150,) and np.array_equal(lab, canonical(lab))
    same = lab[:, None] == lab[None, :]
    assert _dist(Y, metric == "cosine")[same].max() <= eps + 1e-9
    assert lab.max() + 1 < 150 or eps < 0.2      # it merges: not a partition into singletons


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), block=st.integers(12, 40), metric=st.sampled_from(["cosine", "euclidean"]))
def test_planted_clusters_are_recovered_exactly_with_small_blocks(seed, block, metric):
    # 12 planted clusters of 15 rows, runs of 12 to 40 items (not 180)
    X, planted = _planted(seed)
    Y = prepare_rows(X, metric)[0]
    d = _dist(Y, metric == "cosine")
    inside = d[planted[:, None] == planted[None, :]].max()
    across = d[planted[:, None] != planted[None, :]].min()
    eps = float(np.sqrt(inside * across)) if inside < across else inside
    if inside >= across:
        return                                      # the draw planted no separated clusters
    assert np.array_equal(blocked_complete(Y, eps, metric == "cosine", block), planted)


def test_item_diameters_are_the_largest_row_distances():
    rng = np.random.default_rng(3)
    Y = rng.normal(size=(40, 3))
    item = rng.integers(0, 7, 40)
    item = np.unique(item, return_inverse=True)[1]
    k = int(item.max()) + 1
    D = item_diameters(Y, np.arange(40), item, k, cosine=False)
    d = _dist(Y, False)
    want = np.array([[d[np.ix_(item == a, item == b)].max() if a != b else 0.0 for b in range(k)] for a in range(k)])
    np.testing.assert_allclose(D, want, rtol=1e-10, atol=1e-10)


def test_threshold_clusters_runs_blocked_beyond_the_exact_rows(monkeypatch):
    X = np.random.default_rng(7).normal(size=(300, 3)) * 0.01 + 1.0      # one eps-component
    monkeypatch.setattr(cluster, "EXACT_LINKAGE_ROWS", 64)
    stats = {}
    lab = threshold_clusters(X, 0.005, "complete", "euclidean", stats=stats)
    assert list(stats) == ["blocked_rows"] and 250 < stats["blocked_rows"] <= 300
    Y = prepare_rows(X, "euclidean")[0]
    assert _dist(Y, False)[lab[:, None] == lab[None, :]].max() <= 0.005 and 1 < lab.max() + 1 < 300
    stats = {}
    assert np.array_equal(threshold_clusters(X[:60], 0.005, "complete", "euclidean", stats=stats),
                          algorithm1(X[:60], 0.005, "complete", "euclidean"))
    assert stats == {}                              # within the exact rows: the exact linkage


def test_the_environment_asks_for_the_exact_linkage(monkeypatch):
    X = np.random.default_rng(1).normal(size=(200, 3))
    monkeypatch.setattr(cluster, "EXACT_LINKAGE_ROWS", 16)
    monkeypatch.setenv("FIBGRAPH_EXACT_LINKAGE_ROWS", "1000")
    stats = {}
    assert np.array_equal(threshold_clusters(X, 0.5, "complete", "cosine", stats=stats),
                          algorithm1(X, 0.5, "complete", "cosine"))
    assert stats == {}
    monkeypatch.setenv("FIBGRAPH_EXACT_LINKAGE_ROWS", "many")
    with pytest.raises(InputError, match="FIBGRAPH_EXACT_LINKAGE_ROWS"):
        threshold_clusters(X, 0.5, "complete", "cosine")
    monkeypatch.setenv("FIBGRAPH_EXACT_LINKAGE_ROWS", "50")      # average linkage: beyond it, an error
    with pytest.raises(InputError, match="smaller eps"):
        threshold_clusters(X, 1.5, "average", "cosine")


def test_one_big_component_takes_memory_of_the_block_not_of_the_rows(monkeypatch):
    """5,000 rows all within eps of each other: the exact linkage would hold
    5,000^2 / 2 distances twice (200 MB); blocked, the peak stays below 16 MB."""
    X = np.random.default_rng(0).normal(size=(5000, 4)) * 0.01 + 1.0
    monkeypatch.setattr(cluster, "EXACT_LINKAGE_ROWS", 512)
    tracemalloc.start()
    try:
        stats = {}
        lab = threshold_clusters(X, 1e-3, "complete", "euclidean", stats=stats)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats == {"blocked_rows": 5000}
    assert peak < 16 << 20, peak
    Y = prepare_rows(X, "euclidean")[0]
    for c in range(0, int(lab.max()) + 1, 97):      # classes of diameter <= eps (a sample of them)
        members = Y[lab == c]
        assert _dist(members, False).max() <= 1e-3 + 1e-12


def test_compress_says_when_a_layer_was_clustered_in_blocks(tmp_path, capsys, monkeypatch):
    from helpers import cli, read_json, save, small_planted_mlp

    _, m = small_planted_mlp(2)
    src = save(m, tmp_path / "m.onnx")
    monkeypatch.setenv("FIBGRAPH_EXACT_LINKAGE_ROWS", "4")
    rc, out, err = cli(capsys, "compress", src, "-o", tmp_path / "b.onnx", "--eps", "1.5", "--report", tmp_path / "r.json")
    assert rc == 0, err
    rep = read_json(tmp_path / "r.json")
    blocked = [ly for ly in rep["layers"] if ly["criterion"].get("blocked_rows")]
    assert blocked and all(ly["criterion"]["blocked_rows"] > 4 for ly in blocked)
    assert "blocked complete linkage" in out and "FIBGRAPH_EXACT_LINKAGE_ROWS" in out
    monkeypatch.delenv("FIBGRAPH_EXACT_LINKAGE_ROWS")
    rc, out, err = cli(capsys, "compress", src, "-o", tmp_path / "c.onnx", "--eps", "1.5", "--report", tmp_path / "s.json")
    assert rc == 0, err
    assert not any(ly["criterion"].get("blocked_rows") for ly in read_json(tmp_path / "s.json")["layers"])


def test_a_bad_exact_linkage_setting_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    from helpers import assert_one_line_error, cli, save, small_planted_mlp

    src = save(small_planted_mlp(1)[1], tmp_path / "m.onnx")
    for bad in ("abc", "1"):
        monkeypatch.setenv("FIBGRAPH_EXACT_LINKAGE_ROWS", bad)
        rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "b.onnx")
        assert_one_line_error(rc, err, "FIBGRAPH_EXACT_LINKAGE_ROWS")
        assert not (tmp_path / "b.onnx").exists()
