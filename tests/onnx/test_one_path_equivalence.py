"""The hypergraph path loses nothing against the feed-forward chain path
(issue 11, "one pipeline"): on every ONNX model of the test suite that both
importers read (planted MLPs in every encoding, the CNNs of test_onnx_conv,
a torch CNN export, the bundled digits MLP, an sklearn MLP), both colour
every layer into the SAME partition at eps = 0, and the written bases have
the same parameter count.  Chain layers and DAG node sets are matched by
their weight's name.  The bundled digits MLP (Gemm + ReLU) is also compared
at every eps the demo prints with cosine: the rescaling merge of the
hypergraph path gives the chain's partitions there too.

The chain path is deleted; its results were recorded by this file (run with
FIBGRAPH_RECORD_CHAIN=1 while the chain modules existed, commit "one path:
the chain path's results recorded") into ``data/chain_reference.json``, keyed
by test id and setting, and the hypergraph path is held to them.
"""
import json
import os

import numpy as np
import pytest

from helpers import mlp_onnx, planted_mlp, save

from fibgraph.importers.api import color_model, count_params

HIDDEN = [[0, 0, 1, 2, 2, 3], [0, 1, 1, 0, 2, 3, 3]]
SAME_ROW = {0: {3: 1}, 1: {3: 2}}


REF_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "chain_reference.json")
RECORD = os.environ.get("FIBGRAPH_RECORD_CHAIN") == "1"
_REF = {} if RECORD or not os.path.exists(REF_PATH) else json.load(open(REF_PATH))
_CURRENT = {}


@pytest.fixture(autouse=True)
def _test_id(request):
    _CURRENT["id"] = request.node.nodeid.split("::", 1)[1]
    yield
    if RECORD:
        os.makedirs(os.path.dirname(REF_PATH), exist_ok=True)
        with open(REF_PATH, "w") as f:
            json.dump(_REF, f, indent=0, sort_keys=True)


def _chain(path, eps=0.0, metric="cosine", linkage="average"):
    """{weight: fibers}, params after, as the chain path gave them (recorded)."""
    key = f"{_CURRENT['id']}|{os.path.basename(str(path))}|eps={eps}|{metric}|{linkage}"
    if not RECORD:
        ref = _REF[key]
        return dict(ref["fibers"]), ref["params"]        # [weight, fibers] pairs, in layer order
    fibers, params = _chain_run(path, eps, metric, linkage)
    _REF[key] = {"fibers": [[w, f] for w, f in fibers.items()], "params": params}
    return fibers, params


def _chain_run(path, eps=0.0, metric="cosine", linkage="average"):
    """{weight: fibers}, params after, on the chain path."""
    from fibgraph.network import colour_network, compress_network
    from fibgraph.engine import make_criterion
    from fibgraph.importers.onnx_in import import_onnx
    from fibgraph.importers.onnx_out import write_base_onnx

    res = import_onnx(path)
    col = colour_network(res.network, "fibration", make_criterion(eps, linkage, metric))
    fibers = {ly.name: [list(map(int, f)) for f in col.layer_fibers(l)] for l, ly in enumerate(res.network.layers)}
    base, _ = compress_network(col)
    return fibers, count_params(write_base_onnx(res.model, base, check=False))


def _dag(path, eps=0.0, metric="cosine", linkage="average"):
    rep, imp, col = color_model(path, "fibration", eps, linkage=linkage, metric=metric)
    assert rep["graph"] == "hypergraph"
    return {ly["weight"]: ly["fibers"] for ly in rep["layers"]}, rep["params_after"]


def _same(path, eps=0.0, metric="cosine", folded_bn=0):
    """``folded_bn``: parameters of BatchNorms the chain folds into their conv
    and the hypergraph writer keeps (sliced to the fibers) as a node."""
    fc, pc = _chain(path, eps, metric)
    fd, pd = _dag(path, eps, metric)
    assert list(fd) == list(fc), "the same layers, by weight name"
    for w in fc:
        assert fd[w] == fc[w], f"{path}: layer {w!r} at eps={eps}"
    assert pd == pc + folded_bn, f"{path}: params after {pd} (hypergraph) != {pc} (chain) at eps={eps}"
    return fc


# ------------------------------------------------------------------- MLPs
@pytest.fixture(scope="module")
def planted():
    return planted_mlp(np.random.default_rng(1234), 6, HIDDEN, 3, same_row_as=SAME_ROW)


@pytest.mark.parametrize("form", ["gemm", "gemm_ab", "matmul", "matmul_rev"])
@pytest.mark.parametrize("act", ["Relu", "Tanh"])
def test_planted_mlp_every_encoding(tmp_path, planted, form, act):
    path = save(mlp_onnx(planted.Ws, planted.bs, act=act, form=form), tmp_path / "m.onnx")
    fibers = _same(path)
    assert list(fibers.values()) == planted.fibers()       # and both are the planted partition


@pytest.mark.parametrize("form,dtype,constants", [("gemm", np.float32, True), ("matmul", np.float64, False),
                                                  ("gemm_ab", np.float64, True)])
def test_planted_mlp_constants_and_float64(tmp_path, planted, form, dtype, constants):
    path = save(mlp_onnx(planted.Ws, planted.bs, form=form, dtype=dtype, constants=constants), tmp_path / "m.onnx")
    assert list(_same(path).values()) == planted.fibers()


@pytest.mark.parametrize("seed", range(12))
def test_random_planted_mlps(tmp_path, seed):
    rng = np.random.default_rng(1000 + seed)
    n_in = int(rng.integers(1, 7))
    hidden = []
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.integers(1, 9))
        k = int(rng.integers(1, n + 1))
        hidden.append(rng.integers(0, k, n).tolist())
    form = ["gemm", "gemm_ab", "matmul", "matmul_rev"][seed % 4]
    act = ["Relu", "Tanh", "Sigmoid", "LeakyRelu"][(seed // 4) % 4]
    p = planted_mlp(rng, n_in, hidden, int(rng.integers(1, 5)), split=[0.0, 0.3, 1.0, 2.0][seed % 4])
    path = save(mlp_onnx(p.Ws, p.bs, act=act, form=form), tmp_path / "m.onnx")
    assert list(_same(path).values()) == p.fibers()


# ------------------------------------------------------------------- CNNs
def test_conv_models_of_the_conv_tests(tmp_path):
    from test_onnx_conv import _bn_after_relu_model, _conv_bn_fold_model, _depthwise_model

    models = {"conv_bn_fold": _conv_bn_fold_model(np.random.default_rng(11)),
              "bn_after_relu": _bn_after_relu_model(np.random.default_rng(12))}
    for v in ("same", "differ", "mult2"):
        models[f"dw_{v}"] = _depthwise_model(np.random.default_rng(13), v)
    for name, m in models.items():
        # conv_bn_fold: the chain folds the BatchNorm after conv 1 (5 fibers x 4
        # parameters gone); the hypergraph writer keeps it, sliced to the fibers
        fibers = _same(save(m, tmp_path / f"{name}.onnx"), folded_bn=20 if name == "conv_bn_fold" else 0)
        assert any(len(f) > 1 for fs in fibers.values() for f in fs), f"{name}: something merges"


def test_conv_bias_as_broadcast_add(tmp_path):
    from test_onnx_conv import _conv_add_model

    m = _conv_add_model()
    assert _same(save(m, tmp_path / "conv_add.onnx"))["W1"] == [[0], [1, 3], [2]]


def test_torch_cnn_export(tmp_path):
    torch = pytest.importorskip("torch")
    from helpers import torch_export
    from test_onnx_conv import _torch_cnn

    path = torch_export(_torch_cnn(), torch.randn(2, 3, 8, 8), tmp_path / "cnn.onnx", dynamo=False)
    fibers = _same(path)             # the exporter folds the BatchNorm into conv 1 itself
    assert [1, 4] in list(fibers.values())[0]


# ------------------------------------------------- bundled model, sklearn
def test_bundled_digits_mlp_every_demo_eps():
    from fibgraph.cli.demo import EPS_GRID, bundled_model

    for eps in EPS_GRID:
        _same(bundled_model(), eps, "cosine")


def test_sklearn_mlp(tmp_path):
    pytest.importorskip("skl2onnx")
    import warnings

    import onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(24, 16), max_iter=30, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(X[:600], y[:600])
    clf.coefs_[0][:, 5], clf.intercepts_[0][5] = clf.coefs_[0][:, 3], clf.intercepts_[0][3]
    m = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    path = str(tmp_path / "skl.onnx")
    onnx.save_model(m, path)
    fibers = _same(path)
    assert [3, 5] in list(fibers.values())[0]
