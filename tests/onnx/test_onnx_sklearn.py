"""A model from another producer: skl2onnx MLPClassifier on digits
(zipmap=False: outputs 'label' int64 and 'probabilities' float).

Hidden units 3 and 5 of the first layer are planted duplicates (exact fiber);
unit J is a near-duplicate of unit I (the unit with the largest weights, so
the difference is far above float rounding): merged only with eps > 0."""
import warnings

import numpy as np
import onnx
import pytest

from helpers import cli, io_signature, read_json, run_onnx


@pytest.fixture(scope="module")
def skl(tmp_path_factory):
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(24, 16), max_iter=150, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(X[:1200], y[:1200])
    W, b = clf.coefs_[0], clf.intercepts_[0]
    W[:, 5], b[5] = W[:, 3], b[3]
    rng = np.random.default_rng(0)
    norms = np.linalg.norm(W, axis=0)
    norms[[3, 5]] = 0
    i = int(np.argmax(norms))
    j = 9 if i != 9 else 7
    W[:, j] = W[:, i] + 1e-3 * np.abs(W).max() * rng.standard_normal(W.shape[0])
    b[j] = b[i]
    m = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    d = tmp_path_factory.mktemp("skl")
    path = str(d / "digits_mlp.onnx")
    onnx.save_model(m, path)
    data = str(d / "test.npz")
    np.savez(data, x=X[1200:], y=y[1200:])
    return {"path": path, "data": data, "clf": clf, "X": X[1200:], "y": y[1200:], "dir": d,
            "near": sorted([i, j])}


def test_import_layers(skl):
    from fibgraph.importers.dag_api import weight_entries
    from fibgraph.importers.onnx.importer import import_dag
    from fibgraph.importers.tuning import DagCompressor

    imp = import_dag(skl["path"])
    ents = weight_entries(imp)
    assert [(w, ids.size) for w, _, ids, _ in ents] == [("coefficient", 24), ("coefficient1", 16), ("coefficient2", 10)]
    assert imp.spaces[0].kind == "input" and imp.spaces[0].n == 64
    assert [b["op"] for b in imp.barriers] == ["ArgMax"] and imp.barriers[0]["params"] == 0   # the label output
    # the output layer keeps its units, whatever its eps
    m2 = DagCompressor(skl["path"]).compressed({"coefficient2": 1.9})[0]
    assert [o.shape for o in run_onnx(m2, skl["X"][:5])] == [(5,), (5, 10)]
    # the first layer's edges: its weight matrix, and its bias on the Add's units
    ids = ents[0][2]
    blk = next(b for b in imp.graph.blocks if b.dense and np.array_equal(b.dst, ids))
    np.testing.assert_array_equal(blk.src, imp.spaces[0].ids)
    np.testing.assert_allclose(blk.weight[:, :, 0], skl["clf"].coefs_[0].T, rtol=1e-6, atol=1e-6)
    add = next(b for b in imp.graph.blocks if not b.dense and np.array_equal(b.src, ids))
    bias = next(b for b in imp.graph.blocks if not b.dense and np.array_equal(b.dst, add.dst) and b is not add)
    v = np.zeros(ids.size)
    np.add.at(v, bias.rows, np.asarray(bias.values)[:, 0])
    np.testing.assert_allclose(v, skl["clf"].intercepts_[0], rtol=1e-6, atol=1e-6)


def _compress(capsys, skl, tmp_path, *opts):
    out, rep = tmp_path / "small.onnx", tmp_path / "rep.json"
    rc, _, err = cli(capsys, "compress", skl["path"], "-o", out, "--verify", "--report", rep, *opts)
    assert rc == 0, err
    return str(out), read_json(rep)


def _eval(capsys, model, data, tmp_path):
    out = tmp_path / "eval.json"
    rc, _, err = cli(capsys, "eval", model, "--data", data, "--json", out)
    assert rc == 0, err
    return read_json(out)


def test_compress_eps0_exact(capsys, tmp_path, skl):
    small, rep = _compress(capsys, skl, tmp_path)
    f0 = rep["layers"][0]["fibers"]
    i, j = skl["near"]
    assert [3, 5] in f0 and [i] in f0 and [j] in f0
    assert [ly["nodes_after"] for ly in rep["layers"]] == [23, 16, 10]
    assert rep["params_before"] == 64 * 24 + 24 + 24 * 16 + 16 + 16 * 10 + 10
    assert rep["params_after"] == rep["params_before"] - (64 + 1) - 16
    assert rep["verify"]["max_abs_diff"] < 1e-4
    a, b = onnx.load(skl["path"]), onnx.load(small)
    onnx.checker.check_model(b, full_check=True)
    assert io_signature(a) == io_signature(b)
    ra, rb = run_onnx(skl["path"], skl["X"]), run_onnx(small, skl["X"])
    np.testing.assert_array_equal(ra[0], rb[0])                     # labels
    assert np.max(np.abs(ra[1] - rb[1])) < 1e-5                     # probabilities


def test_compress_eps_positive_merges_near_duplicates(capsys, tmp_path, skl):
    small, rep = _compress(capsys, skl, tmp_path, "--eps", "0.01")
    f0 = rep["layers"][0]["fibers"]
    assert [3, 5] in f0 and skl["near"] in f0
    assert rep["layers"][0]["nodes_after"] <= 22
    assert rep["params_after"] < rep["params_before"] - (64 + 1) - 16
    assert 0 <= rep["verify"]["max_abs_diff"] < 0.05
    ev0 = _eval(capsys, skl["path"], skl["data"], tmp_path)
    ev1 = _eval(capsys, small, skl["data"], tmp_path)
    assert ev1["n"] == ev0["n"] == len(skl["y"])
    assert abs(ev1["accuracy"] - ev0["accuracy"]) <= 0.02


def test_eval_matches_sklearn(capsys, tmp_path, skl):
    from sklearn.metrics import log_loss

    ev = _eval(capsys, skl["path"], skl["data"], tmp_path)
    clf = skl["clf"]
    p = clf.predict_proba(skl["X"])
    acc = float(np.mean(p.argmax(1) == skl["y"]))
    assert ev["n"] == len(skl["y"])
    assert abs(ev["accuracy"] - acc) <= 1.0 / len(skl["y"]) + 1e-12
    assert ev["loss"] == pytest.approx(log_loss(skl["y"], p, labels=list(range(10))), rel=1e-3, abs=1e-4)
    # the compressed model (exact) evaluates the same
    small, _ = _compress(capsys, skl, tmp_path)
    ev2 = _eval(capsys, small, skl["data"], tmp_path)
    assert ev2["accuracy"] == ev["accuracy"]
    assert ev2["loss"] == pytest.approx(ev["loss"], abs=1e-5)
