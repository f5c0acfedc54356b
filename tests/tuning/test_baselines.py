"""Baselines at the fibration base's unit counts on the hypergraph path
(importers/compare_dag.py with fibgraph/baselines.py): pruning (random, L2,
L1) and k-means folding of MLPs and CNNs, the ONNX they write, and the
``compare-methods`` command on an MLP and a CNN.  (Residual streams, LSTMs
and Transformers: tests/test_compare_dag.py.)"""
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fibgraph.baselines import METHODS, kmeans_labels, prune_scores
from fibgraph.partition import canonical
from helpers import _init, assert_one_line_error, cli, finish, mlp_onnx, read_json, run_onnx, save
from fibgraph.importers.compare_dag import DagMethods
from fibgraph.importers.dag_api import colour_dag
from fibgraph.importers.onnx.importer import import_dag
from fibgraph.importers.onnx.write import write_dag_base

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "fibgraph", "data", "digits_mlp.onnx")
DATA = os.path.join(ROOT, "fibgraph", "data", "digits_test.npz")


def _random_mlp(seed=0, sizes=(12, 20, 16, 5)):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(0, 1 / np.sqrt(a), (b, a)) * rng.uniform(0.2, 2.0, (b, 1))
          for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(0, 0.3, b) for b in sizes[1:]]
    return Ws, bs


def _tiny_cnn(seed=0, W1=None, b1=None, W2=None):
    """Conv(1->6, 3x3) - Relu - MaxPool 2 - Conv(6->8, 3x3, pad 1) - Relu -
    Flatten - Gemm(8*3*3 -> 4), input (N, 1, 8, 8)."""
    rng = np.random.default_rng(seed)
    W1 = rng.normal(0, 0.5, (6, 1, 3, 3)) if W1 is None else W1
    b1 = rng.normal(0, 0.1, 6) if b1 is None else b1
    W2 = rng.normal(0, 0.3, (8, 6, 3, 3)) if W2 is None else W2
    b2 = rng.normal(0, 0.1, 8)
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


def _layer(dm, weight):
    """(column class, node ids) of the units of ``weight``."""
    ids = next(i for w, i in dm.entries if w == weight)
    c = np.unique(dm.cls[dm.col[ids]])
    assert c.size == 1, "one layer's units are one column class"
    return int(c[0]), ids


def _counts(dm, per_weight):
    counts = dm.cls_size.copy()
    for w, k in per_weight.items():
        counts[_layer(dm, w)[0]] = k
    return counts


def _base_init(model, name):
    """The value of initializer ``name`` as the writer left it (renamed ``name__base<k>`` when rewritten)."""
    t = [t for t in model.graph.initializer if t.name == name or t.name.startswith(name + "__base")]
    assert len(t) == 1, name
    return numpy_helper.to_array(t[0])


# ------------------------------------------------------------------ pruning
@pytest.mark.parametrize("method", ["random", "l2", "l1"])
def test_pruned_onnx_equals_numpy_forward_of_the_pruned_weights(method):
    Ws, bs = _random_mlp(1)
    model = mlp_onnx(Ws, bs)
    dm = DagMethods(import_dag(model))
    m2, kept = dm.write(method, _counts(dm, {"W1": 7, "W2": 5}), seed=3)
    assert dm.entry_counts(kept) == [7, 5, 5]
    k1, k2 = (np.flatnonzero(kept[_layer(dm, w)[1]]) for w in ("W1", "W2"))
    # the numpy forward pass of the pruned weights, built from the ORIGINAL arrays
    Wp = [Ws[0][k1], Ws[1][np.ix_(k2, k1)], Ws[2][:, k2]]
    bp = [bs[0][k1], bs[1][k2], bs[2]]
    x = np.random.default_rng(0).normal(size=(32, 12)).astype(np.float32)
    onnx.checker.check_model(m2)
    np.testing.assert_allclose(run_onnx(m2, x)[0], _numpy_mlp(Wp, bp, x), rtol=1e-4, atol=1e-5)


def test_norm_pruning_keeps_the_largest_input_weight_norms():
    Ws, bs = _random_mlp(2)
    dm = DagMethods(import_dag(mlp_onnx(Ws, bs)))
    counts = _counts(dm, {"W1": 6, "W2": 4})

    def kept_units(method, seed=0):
        _, kept = dm.write(method, counts, seed=seed)
        return [np.flatnonzero(kept[_layer(dm, w)[1]]) for w in ("W1", "W2")]

    for method, norm in (("l2", lambda W: np.linalg.norm(W, axis=1)), ("l1", lambda W: np.abs(W).sum(1))):
        for l, (k, got) in enumerate(zip([6, 4], kept_units(method))):
            np.testing.assert_array_equal(got, np.sort(np.argsort(-norm(Ws[l]))[:k]))
    r1, r2, r3 = kept_units("random", 7), kept_units("random", 7), kept_units("random", 8)
    assert all(np.array_equal(a, b) for a, b in zip(r1, r2))
    assert not all(np.array_equal(a, b) for a, b in zip(r1, r3))
    R = np.random.default_rng(0).normal(size=(5, 3))
    np.testing.assert_allclose(prune_scores(R, "l2"), np.linalg.norm(R, axis=1))
    np.testing.assert_allclose(prune_scores(R, "l1"), np.abs(R).sum(1))
    with pytest.raises(ValueError):
        prune_scores(R, "magic")


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_every_baseline_has_exactly_the_fibration_node_counts(eps):
    from fibgraph.importers.api import count_params

    imp = import_dag(MODEL)
    dm = DagMethods(imp)
    m_fib, _, kept, _ = write_dag_base(imp, colour_dag(imp, "fibration", eps).labels)
    counts = dm.class_counts(kept)
    assert (counts < dm.cls_size).any()
    p_fib = count_params(m_fib)
    for method in METHODS:
        m2, k2 = dm.write(method, counts, seed=0)
        assert dm.entry_counts(k2) == dm.entry_counts(kept), method
        onnx.checker.check_model(m2)
        assert count_params(m2) == p_fib, method          # an MLP's base has no multiplicity constants


@pytest.mark.parametrize("method", METHODS)
def test_baselines_on_a_cnn_write_back_and_run(method):
    model = _tiny_cnn()
    dm = DagMethods(import_dag(model))
    m2, kept = dm.write(method, _counts(dm, {"W1": 3, "W2": 5}), seed=1)
    assert dm.entry_counts(kept) == [3, 5, 4]
    onnx.checker.check_model(m2)
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    y = run_onnx(m2, x)[0]
    assert y.shape == (5, 4) and np.all(np.isfinite(y))
    assert _base_init(m2, "W2").shape == (5, 3, 3, 3) and _base_init(m2, "W3").shape == (4, 5 * 9)
    if method != "fold":
        # pruning a conv net: the kept channels' kernels untouched
        keep1, keep2 = (np.flatnonzero(kept[_layer(dm, w)[1]]) for w in ("W1", "W2"))
        o = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W2"))
        np.testing.assert_array_equal(_base_init(m2, "W2"), o[np.ix_(keep2, keep1)])


# ------------------------------------------------------------------ folding
def test_folding_merges_as_mean_of_inputs_and_sum_of_outputs():
    Ws, bs = _random_mlp(4, sizes=(6, 8, 3))
    imp = import_dag(mlp_onnx(Ws, bs))
    dm = DagMethods(imp)
    lab = np.array([0, 1, 0, 2, 1, 0, 3, 3])
    _, ids = _layer(dm, "W1")
    cols = dm.col[ids]
    group = np.arange(dm.n_col)
    group[cols] = cols[np.unique(lab, return_index=True)[1]][lab]
    m2, _, kept, _ = write_dag_base(imp, group[dm.col], mode="merge")
    assert kept[ids].sum() == 4
    W1h, b1h, W2h = _base_init(m2, "W1"), _base_init(m2, "b1"), _base_init(m2, "W2")
    for c in range(4):
        m = lab == c
        np.testing.assert_allclose(W1h[c], Ws[0][m].mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b1h[c], bs[0][m].mean(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(W2h[:, c], Ws[1][:, m].sum(1), rtol=1e-6, atol=1e-6)


def _planted_dups(kind):
    """Hidden units 4..7 (MLP) / channels 3..5 (CNN) copy 0..3 / 0..2 in their
    input weights, biases and output weights: exact fibers that folding with
    k = the number of distinct units must find."""
    rng = np.random.default_rng(5)
    if kind == "mlp":
        idx = [0, 1, 2, 3, 0, 1, 2, 3]
        W1 = rng.normal(0, 1, (4, 6))[idx]
        b1 = rng.normal(0, 0.2, 4)[idx]
        W2 = rng.normal(0, 1, (3, 4))[:, idx]
        model = mlp_onnx([W1, W2], [b1, rng.normal(0, 0.1, 3)])
        return model, rng.normal(size=(10, 6)).astype(np.float32), [4, 3]
    idx = [0, 1, 2, 0, 1, 2]
    W1 = rng.normal(0, 0.5, (3, 1, 3, 3))[idx]
    b1 = rng.normal(0, 0.1, 3)[idx]
    W2 = rng.normal(0, 0.3, (8, 3, 3, 3))[:, idx]
    model = _tiny_cnn(1, W1, b1, W2)
    return model, rng.normal(size=(6, 1, 8, 8)).astype(np.float32), [3, 8, 4]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fold_at_the_exact_fiber_counts_is_the_fibration_base(kind):
    model, x, nodes = _planted_dups(kind)
    imp = import_dag(model)
    dm = DagMethods(imp)
    m_fib, gid, kept, _ = write_dag_base(imp, colour_dag(imp, "fibration", 0.0).labels)
    assert dm.entry_counts(kept) == nodes
    counts = dm.class_counts(kept)
    group, _ = dm.partition("fold", counts)
    _, ids = _layer(dm, "W1")
    half = ids.size // 2
    lab = canonical(group[dm.col[ids]])
    assert np.array_equal(lab[:half], lab[half:]) and len(set(lab.tolist())) == half
    m_fold, k2 = dm.write("fold", counts)
    assert dm.entry_counts(k2) == nodes
    y0 = run_onnx(model, x)[0]
    np.testing.assert_allclose(run_onnx(m_fold, x)[0], y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_onnx(m_fib, x)[0], y0, rtol=1e-5, atol=1e-5)


def test_kmeans_labels_gives_exactly_k_clusters():
    X = np.vstack([np.zeros((5, 2)), np.ones((3, 2))])     # 2 distinct points, k = 4
    lab = kmeans_labels(X, 4, seed=0)
    assert len(set(lab.tolist())) == 4 and np.array_equal(lab, canonical(lab))
    assert not (set(lab[:5].tolist()) & set(lab[5:].tolist()))     # never mixes distinct points
    np.testing.assert_array_equal(kmeans_labels(X, 8), np.arange(8))
    np.testing.assert_array_equal(kmeans_labels(X, 1), np.zeros(8))


def test_bad_counts_are_refused():
    Ws, bs = _random_mlp(0)
    dm = DagMethods(import_dag(mlp_onnx(Ws, bs)))
    with pytest.raises(ValueError, match="one count per column class"):
        dm.write("l2", [5, 5])
    with pytest.raises(ValueError, match="fewer than 1"):
        dm.write("l2", _counts(dm, {"W1": 0}))
    with pytest.raises(ValueError, match="unknown method"):
        dm.write("magic", dm.cls_size)


# ---------------------------------------------------------------------- CLI
def _check_rows(res, nodes0, equal_params=True):
    rows = res["rows"]
    assert res["graph"] == "hypergraph" and rows[0]["method"] == "original" and rows[0]["nodes"] == nodes0
    assert {r["method"] for r in rows} == {"original", "fibration", *METHODS}
    shrunk = 0
    for point in {r["point"] for r in rows if r["method"] != "original"}:
        pr = [r for r in rows if r["point"] == point]
        assert [r["method"] for r in pr] == ["fibration", *METHODS]
        assert len({tuple(r["nodes"]) for r in pr}) == 1
        if equal_params:
            assert len({r["params"] for r in pr}) == 1
        assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["loss"]) for r in pr)
        assert pr[0]["nodes"][-1] == nodes0[-1]                   # the output layer keeps its units
        shrunk += pr[0]["params_kept"] < 1
    return shrunk


def test_cli_compare_methods_on_an_mlp_writes_plot_and_json(tmp_path, capsys):
    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "--eps", "0.05,0.3",
                       "-o", png, "--json", js)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    res = read_json(js)
    assert res["layers"] == ["0.weight", "2.weight", "4.weight"]
    assert _check_rows(res, [48, 48, 10]) == 2
    assert "L2-norm pruning" in out and "folding" in out and "0.weight" in out


def test_cli_compare_methods_on_a_cnn(tmp_path, capsys):
    path = save(_tiny_cnn(2), tmp_path / "cnn.onnx")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 8, 8)).astype(np.float32)
    y = run_onnx(onnx.load(str(path)), x)[0].argmax(1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    js = tmp_path / "cmp.json"
    rc, out, err = cli(capsys, "compare-methods", path, "--data", tmp_path / "d.npz", "--eps", "0.6,1.2",
                       "--json", js)
    assert rc == 0, err
    res = read_json(js)
    assert res["rows"][0]["accuracy"] == 1.0                      # labels are the model's own predictions
    assert _check_rows(res, [6, 8, 4]) >= 1
    assert "random pruning" in out


def test_cli_compare_methods_bad_input(tmp_path, capsys):
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "--eps", "0.1,abc")
    assert_one_line_error(rc, err, "--eps")
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "--eps", "2.5")
    assert_one_line_error(rc, err, "eps")
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "--methods", "l2,magic")
    assert_one_line_error(rc, err, "magic")
    rc, out, err = cli(capsys, "compare-methods", MODEL, "--data", DATA, "-o", tmp_path / "p.txt")
    assert_one_line_error(rc, err, ".png")
