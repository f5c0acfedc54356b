"""Baselines at the fibration base's node counts: pruning (random, L2, L1) and
k-means folding; ONNX write-back; the ``compare-methods`` command."""
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fibgraph.baselines import (METHODS, baseline, fold_partition, node_counts, partition_base,
                                prune_to_counts, unit_scores)
from helpers import _init, assert_one_line_error, cli, finish, mlp_onnx, read_json, run_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "fibgraph", "data", "digits_mlp.onnx")
DATA = os.path.join(ROOT, "fibgraph", "data", "digits_test.npz")


def _random_mlp(seed=0, sizes=(12, 20, 16, 5)):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(0, 1 / np.sqrt(a), (b, a)) * rng.uniform(0.2, 2.0, (b, 1))
          for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(0, 0.3, b) for b in sizes[1:]]
    return Ws, bs


def _tiny_cnn(seed=0):
    """Conv(1->6, 3x3) - Relu - MaxPool 2 - Conv(6->8, 3x3, pad 1) - Relu -
    Flatten - Gemm(8*3*3 -> 4), input (N, 1, 8, 8)."""
    rng = np.random.default_rng(seed)
    W1, b1 = rng.normal(0, 0.5, (6, 1, 3, 3)), rng.normal(0, 0.1, 6)
    W2, b2 = rng.normal(0, 0.3, (8, 6, 3, 3)), rng.normal(0, 0.1, 8)
    W3, b3 = rng.normal(0, 0.2, (4, 72)), rng.normal(0, 0.1, 4)
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "W2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "W3", "b3"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [_init("W1", W1), _init("b1", b1), _init("W2", W2), _init("b2", b2),
                           _init("W3", W3), _init("b3", b3)])
    return finish(g)


def _numpy_mlp(Ws, bs, x):
    h = x.astype(np.float64)
    for l, (W, b) in enumerate(zip(Ws, bs)):
        h = h @ W.T + b
        if l < len(Ws) - 1:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("method", ["random", "l2", "l1"])
def test_pruned_onnx_equals_numpy_forward_of_the_pruned_weights(method):
    from importers.onnx_in import import_onnx
    from importers.onnx_out import write_base_onnx

    Ws, bs = _random_mlp(1)
    model = mlp_onnx(Ws, bs)
    net = import_onnx(model).network
    counts = [7, 5, 5]
    small = prune_to_counts(net, counts, method, seed=3)
    assert node_counts(small) == counts
    keep = [ly.meta["rep"] for ly in small.layers]
    # the numpy forward pass of the pruned weights, built from the ORIGINAL arrays
    Wp = [Ws[0][keep[0]], Ws[1][np.ix_(keep[1], keep[0])], Ws[2][:, keep[1]]]
    bp = [bs[0][keep[0]], bs[1][keep[1]], bs[2]]
    x = np.random.default_rng(0).normal(size=(32, 12)).astype(np.float32)
    m2 = write_base_onnx(model, small, check=True)
    got = run_onnx(m2, x)[0]
    np.testing.assert_allclose(got, _numpy_mlp(Wp, bp, x), rtol=1e-4, atol=1e-5)


def test_norm_pruning_keeps_the_largest_input_weight_norms():
    Ws, bs = _random_mlp(2)
    from importers.onnx_in import import_onnx

    net = import_onnx(mlp_onnx(Ws, bs)).network
    for method, norm in (("l2", lambda W: np.linalg.norm(W, axis=1)), ("l1", lambda W: np.abs(W).sum(1))):
        small = prune_to_counts(net, [6, 4, 5], method)
        for l, k in enumerate([6, 4]):
            expect = np.sort(np.argsort(-norm(Ws[l]))[:k])
            np.testing.assert_array_equal(small.layers[l].meta["rep"], expect)
    r1 = prune_to_counts(net, [6, 4, 5], "random", seed=7)
    r2 = prune_to_counts(net, [6, 4, 5], "random", seed=7)
    r3 = prune_to_counts(net, [6, 4, 5], "random", seed=8)
    assert all(np.array_equal(a.meta["rep"], b.meta["rep"]) for a, b in zip(r1.layers, r2.layers))
    assert not all(np.array_equal(a.meta["rep"], b.meta["rep"]) for a, b in zip(r1.layers, r3.layers))
    assert np.allclose(unit_scores(net, "l2")[0], np.linalg.norm(Ws[0], axis=1))


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_every_baseline_has_exactly_the_fibration_node_counts(eps):
    from importers.api import count_params
    from importers.onnx_out import write_base_onnx
    from importers.tuning import ModelCompressor

    mc = ModelCompressor(MODEL)
    fib, _ = mc.base({n: eps for n in mc.tunable})
    counts = node_counts(fib)
    p_fib = count_params(write_base_onnx(mc.model, fib))
    for method in METHODS:
        b = baseline(mc.network, method, counts, seed=0)
        assert node_counts(b) == counts, method
        m2 = write_base_onnx(mc.model, b, check=True)
        assert count_params(m2) == p_fib, method


@pytest.mark.parametrize("method", METHODS)
def test_baselines_on_a_cnn_write_back_and_run(method):
    from importers.onnx_in import import_onnx
    from importers.onnx_out import write_base_onnx

    model = _tiny_cnn()
    net = import_onnx(model).network
    counts = [3, 5, 4]
    b = baseline(net, method, counts, seed=1)
    assert node_counts(b) == counts
    m2 = write_base_onnx(model, b, check=True)
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    y = run_onnx(m2, x)[0]
    assert y.shape == (5, 4) and np.all(np.isfinite(y))
    if method != "fold":
        # pruning a conv net: kept channels' kernels untouched
        keep1, keep2 = b.layers[0].meta["rep"], b.layers[1].meta["rep"]
        W2 = [t for t in m2.graph.initializer if t.name == "W2"][0]
        W2o = [t for t in model.graph.initializer if t.name == "W2"][0]
        a, o = onnx.numpy_helper.to_array(W2), onnx.numpy_helper.to_array(W2o)
        np.testing.assert_array_equal(a, o[np.ix_(keep2, keep1)])


def test_folding_merges_as_mean_of_inputs_and_sum_of_outputs():
    from importers.onnx_in import import_onnx

    Ws, bs = _random_mlp(4, sizes=(6, 8, 3))
    net = import_onnx(mlp_onnx(Ws, bs)).network
    lab = np.array([0, 1, 0, 2, 1, 0, 3, 3])
    base, maps = partition_base(net, [lab, None])
    W1h, b1h, W2h = base.layers[0].weight[:, :, 0], base.layers[0].bias, base.layers[1].weight[:, :, 0]
    for c in range(4):
        m = lab == c
        np.testing.assert_allclose(W1h[c], Ws[0][m].mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b1h[c], bs[0][m].mean(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(W2h[:, c], Ws[1][:, m].sum(1), rtol=1e-6, atol=1e-7)


def test_folding_merges_duplicate_units_exactly():
    """Units that are exact copies (same input weights) merge without loss when
    k-means is asked for the number of distinct units."""
    from importers.onnx_in import import_onnx
    from importers.onnx_out import write_base_onnx

    rng = np.random.default_rng(5)
    rows = rng.normal(0, 1, (4, 6))
    W1 = rows[[0, 1, 2, 3, 0, 1, 2, 3]] + 0.0
    b1 = rng.normal(0, 0.2, 4)[[0, 1, 2, 3, 0, 1, 2, 3]]
    W2 = np.zeros((3, 8))
    W2[:, :4] = rng.normal(0, 1, (3, 4))
    W2[:, 4:] = W2[:, :4]          # duplicates also share output columns
    model = mlp_onnx([W1, W2], [b1, rng.normal(0, 0.1, 3)])
    net = import_onnx(model).network
    lab = fold_partition(net, [4, 3])[0]
    assert len(set(lab.tolist())) == 4 and np.array_equal(lab[:4], lab[4:])
    m2 = write_base_onnx(model, baseline(net, "fold", [4, 3]))
    x = rng.normal(size=(10, 6)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(m2, x)[0], run_onnx(model, x)[0], rtol=1e-5, atol=1e-5)


def test_bad_counts_are_refused():
    from importers.onnx_in import import_onnx

    Ws, bs = _random_mlp(0)
    net = import_onnx(mlp_onnx(Ws, bs)).network
    with pytest.raises(ValueError):
        prune_to_counts(net, [5, 5], "l2")          # one count per layer
    with pytest.raises(ValueError):
        prune_to_counts(net, [5, 5, 3], "l2")       # the output layer keeps all units
    with pytest.raises(ValueError):
        prune_to_counts(net, [0, 5, 5], "l2")
    with pytest.raises(ValueError):
        baseline(net, "magic", [5, 5, 5])


def test_cli_compare_methods_writes_plot_and_json(tmp_path, capsys):
    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "--eps", "0.05,0.3",
                       "-o", png, "--json", js)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    res = read_json(js)
    rows = res["rows"]
    assert rows[0]["method"] == "original"
    assert {r["method"] for r in rows} == {"original", "fibration", *METHODS}
    for point in {r["point"] for r in rows if r["method"] != "original"}:
        pr = [r for r in rows if r["point"] == point]
        assert len(pr) == 1 + len(METHODS)
        assert len({tuple(r["nodes"]) for r in pr}) == 1 and len({r["params"] for r in pr}) == 1
        assert all(0 <= r["accuracy"] <= 1 for r in pr)
    assert "L2-norm pruning" in out and "folding" in out


def test_cli_compare_methods_bad_input(tmp_path, capsys):
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "--eps", "0.1,abc")
    assert_one_line_error(rc, err, "--eps")
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "--eps", "2.5")
    assert_one_line_error(rc, err, "eps")
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "--methods", "l2,magic")
    assert_one_line_error(rc, err, "magic")
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "-o", tmp_path / "p.txt")
    assert_one_line_error(rc, err, ".png")
