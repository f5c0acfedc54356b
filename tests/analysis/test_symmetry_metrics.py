"""Parameter-symmetry metrics (position paper A.1) and `fibgraph symmetry-metrics`."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_one_line_error, cli, finish, mlp_onnx, read_json, save

from fibgraph.errors import InputError
from fibgraph.symmetry_metrics import (double_rotation_deltas, double_rotation_dos, permutation_deltas,
                                       permutation_dos, spectral_stats, symmetry_metrics_units)
from fibgraph.importers.dag_units import dag_layers, find_qk_pairs
from fibgraph.importers.onnx.importer import import_dag


def _net(Ws, bs):
    """Per-unit parts of the weight layers of a float64 ONNX MLP (hypergraph import)."""
    layers = dag_layers(import_dag(mlp_onnx(Ws, bs, dtype=np.float64)))
    for ly in layers:
        ly["kind"] = ly["op"]
    return layers


def unit_vectors(layers, l):
    return layers[l].vectors()


def _duplicated_mlp(rng, n_in=8, n_hid=10, n_out=4, dups=((0, 1), (2, 3), (4, 5)), noise=0.0):
    W1 = rng.normal(size=(n_hid, n_in))
    b1 = rng.normal(size=n_hid)
    W2 = rng.normal(size=(n_out, n_hid))
    for i, j in dups:
        W1[j] = W1[i] + noise * rng.normal(size=n_in)
        b1[j] = b1[i]
        W2[:, j] = W2[:, i] + noise * rng.normal(size=n_out)
    return [W1, W2], [b1, rng.normal(size=n_out)]


# -------------------------------------------------------------- permutation
def test_planted_duplicates_are_counted():
    rng = np.random.default_rng(0)
    Ws, bs = _duplicated_mlp(rng)
    U = unit_vectors(_net(Ws, bs), 0)
    assert U.shape == (10, 8 + 1 + 4)
    np.testing.assert_allclose(U, np.hstack([Ws[0], bs[0][:, None], Ws[1].T]), rtol=1e-12)
    d = permutation_dos(U, thresholds=(0.05, 0.2))
    assert d["n_dos"] == {"0.05": 3, "0.2": 3}
    assert d["near_duplicate_units"]["0.05"] == 6 and d["near_duplicate_fraction"]["0.05"] == 0.6
    assert d["n_dosb"]["0.05"] == 7 and d["pairs"] == 9
    assert d["min_delta"] == 0.0
    # small noise: counted at 0.2 but not at 0.005 (Delta ~ noise * sqrt(dim / 2) / RMS unit norm)
    Ws, bs = _duplicated_mlp(np.random.default_rng(0), noise=0.03)
    d = permutation_dos(unit_vectors(_net(Ws, bs), 0), thresholds=(0.005, 0.2))
    assert d["n_dos"] == {"0.005": 0, "0.2": 3}


def test_random_units_are_not_symmetric_and_metric_is_permutation_invariant():
    rng = np.random.default_rng(1)
    U = rng.normal(size=(30, 20))
    d = permutation_dos(U)
    assert all(v == 0 for v in d["n_dos"].values())
    assert 0.5 < d["median_delta"] < 1.5               # ~1 for unrelated units (layer normalisation)
    p = rng.permutation(30)
    assert permutation_dos(U[p])["n_dos"] == d["n_dos"]
    assert permutation_dos(U[p])["median_delta"] == pytest.approx(d["median_delta"])
    scaled = permutation_dos(3.7 * U)                   # scale-free
    assert scaled["n_dos"] == d["n_dos"] and scaled["median_delta"] == pytest.approx(d["median_delta"])
    _, raw = permutation_deltas(3.7 * U, normalise="none")
    _, lay = permutation_deltas(3.7 * U)
    assert raw.max() > lay.max()
    with pytest.raises(InputError):
        permutation_deltas(U, normalise="bogus")


def test_shrunken_units_are_near_duplicates_under_layer_normalisation():
    rng = np.random.default_rng(2)
    U = rng.normal(size=(12, 10))
    U[:4] *= 1e-3                                         # four "useless" units near zero
    d = permutation_dos(U, thresholds=(0.05,))
    assert d["n_dos"]["0.05"] == 3 and d["near_duplicate_units"]["0.05"] == 4
    p = permutation_dos(U, thresholds=(0.05,), normalise="pair")
    assert p["n_dos"]["0.05"] == 0                        # per pair they are unrelated directions


def test_spectral_stats():
    s = spectral_stats(np.outer([1.0, 2.0], [3.0, 0.0, 4.0])[:, :, None])
    assert s["spectral_norm"] == pytest.approx(np.sqrt(5) * 5) and s["stable_rank"] == pytest.approx(1.0)
    assert spectral_stats(np.eye(4))["stable_rank"] == pytest.approx(4.0)


def test_symmetry_metrics_report_and_warnings():
    rng = np.random.default_rng(3)
    Ws, bs = _duplicated_mlp(rng, dups=((0, 1), (2, 3), (4, 5), (6, 7)))
    Ws[1][:, 9] = 0.0                                    # a dead unit (no outgoing weights)
    rep = symmetry_metrics_units(_net(Ws, bs), thresholds=(0.05, 0.1))
    hid, out = rep["layers"]
    assert hid["units"] == 10 and hid["n_dos"]["0.1"] == 4 and hid["near_duplicate_fraction"]["0.1"] == 0.8
    assert hid["zero_out_units"] == 1
    assert out["output_layer"] and "n_dos" not in out
    assert rep["summary"]["hidden_units"] == 10 and rep["summary"]["n_dos"] == {"0.05": 4, "0.1": 4}
    assert any("80% of units are near-duplicates" in w for w in rep["warnings"])
    assert any("all-zero outgoing" in w for w in rep["warnings"])
    with pytest.raises(InputError):
        symmetry_metrics_units(_net(Ws, bs), thresholds=(-1,))


# ------------------------------------------------------------ double rotation
def _shared_null(rng, d=12, k=6, shared=2):
    N = np.linalg.qr(rng.normal(size=(k, k)))[0][:, :shared]   # directions n with WQ n = WK n = 0
    P = np.eye(k) - N @ N.T
    return rng.normal(size=(d, k)) @ P, rng.normal(size=(d, k)) @ P


def test_double_rotation_counts_shared_null_directions():
    rng = np.random.default_rng(0)
    WQ, WK = _shared_null(rng)
    assert double_rotation_dos(WQ, WK, thr=1e-8) == 2
    assert double_rotation_dos(WQ, WK, thr=1e-8, relative=True) == 2
    R, S = rng.normal(size=(2, 12, 6))
    assert double_rotation_dos(R, S, thr=1e-8) == 0
    # a common orthogonal rotation M (W -> W M) leaves the count and the deltas unchanged
    M = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    np.testing.assert_allclose(np.sort(double_rotation_deltas(WQ @ M, WK @ M)),
                               np.sort(double_rotation_deltas(WQ, WK)), atol=1e-9)
    assert double_rotation_dos(WQ @ M, WK @ M, thr=1e-8) == 2
    # identical Q and K: every direction is "symmetric"
    assert double_rotation_dos(R, R, thr=1e-8) == 6
    # per head: two heads of 3 columns, a shared null direction only in the second head
    WQ2, WK2 = rng.normal(size=(2, 12, 6))
    n = np.linalg.qr(rng.normal(size=(3, 1)))[0]
    for W in (WQ2, WK2):
        W[:, 3:] = W[:, 3:] @ (np.eye(3) - n @ n.T)
    assert double_rotation_dos(WQ2, WK2, thr=1e-8, heads=2) == 1
    with pytest.raises(InputError):
        double_rotation_dos(WQ2, WK2, heads=4)
    with pytest.raises(InputError):
        double_rotation_deltas(WQ, WK[:, :5])


def test_find_qk_pairs_by_name_and_orientation():
    rng = np.random.default_rng(0)
    WQ, WK = rng.normal(size=(2, 8, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(WQ, "blk.attn.q_proj.weight"),
             numpy_helper.from_array(WK.T.copy(), "blk.attn.k_proj.weight")]
    nodes = [helper.make_node("MatMul", ["x", "blk.attn.q_proj.weight"], ["q"]),
             helper.make_node("Gemm", ["x", "blk.attn.k_proj.weight"], ["k"], transB=1),
             helper.make_node("Add", ["q", "k"], ["y"])]
    g = helper.make_graph(nodes, "qk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], inits)
    pairs = find_qk_pairs(helper.make_model(g))
    assert [(a, b) for a, b, _, _ in pairs] == [("blk.attn.q_proj.weight", "blk.attn.k_proj.weight")]
    np.testing.assert_allclose(pairs[0][2], WQ)
    np.testing.assert_allclose(pairs[0][3], WK)          # Gemm transB=1 weight transposed back


# --------------------------------------------------------------------- CLI
def test_cli_symmetry_metrics(capsys, tmp_path):
    Ws, bs = _duplicated_mlp(np.random.default_rng(4))
    path = save(mlp_onnx(Ws, bs), tmp_path / "m.onnx")
    out = tmp_path / "s.json"
    rc, so, err = cli(capsys, "symmetry-metrics", path, "--threshold", "0.05", "--threshold", "0.2",
                      "--json", out)
    assert rc == 0, err
    r = read_json(out)
    assert [ly["name"] for ly in r["layers"]] == ["W1", "W2"]
    assert [ly["source"] for ly in r["layers"]] == ["hypergraph"] * 2            # the only source
    assert r["layers"][0]["vector"] == {"incoming": 8, "bias": 1, "outgoing": 4}
    assert r["layers"][0]["n_dos"] == {"0.05": 3, "0.2": 3}
    assert r["summary"]["n_dos"]["0.05"] == 3 and r["attention"] == []
    assert "N_dos<0.05" in so and "W1" in so and "60% of units are near-duplicates" in so
    rc, _, err = cli(capsys, "symmetry-metrics", path, "--threshold", "0")
    assert_one_line_error(rc, err, "positive")
    rc, _, err = cli(capsys, "symmetry-metrics", tmp_path / "nope.onnx")
    assert_one_line_error(rc, err, "nope.onnx")
    rc, _, err = cli(capsys, "symmetry-metrics", path, "--json", path)
    assert_one_line_error(rc, err, "input")


def test_cli_symmetry_metrics_attention_only(capsys, tmp_path):
    """A model that is not a feed-forward chain: Q/K pairs are still measured."""
    rng = np.random.default_rng(5)
    WQ, WK = _shared_null(rng, d=8, k=4, shared=1)
    inits = [numpy_helper.from_array(WQ.astype(np.float32), "wq"),
             numpy_helper.from_array(WK.astype(np.float32), "wk")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("Mul", ["q", "k"], ["y"])]
    g = helper.make_graph(nodes, "att", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    path = save(finish(g), tmp_path / "att.onnx")
    out = tmp_path / "a.json"
    rc, so, err = cli(capsys, "symmetry-metrics", path, "--json", out)
    assert rc == 0, err
    r = read_json(out)
    assert r["attention"][0]["q"] == "wq"
    assert r["attention"][0]["n_dos"]["0.05"] >= 1
    # the hypergraph rows: both weights write the output y = q * k
    assert [(ly["name"], ly["output_layer"], ly["source"]) for ly in r["layers"]] == [
        ("wq", True, "hypergraph"), ("wk", True, "hypergraph")]
    assert not any("skipped" in w for w in r["warnings"])
