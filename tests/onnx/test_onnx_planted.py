"""Planted fibers in MLPs (hand-built ONNX and torch exports): recovered
exactly, compressed exactly, with the bias MEAN formula.

Tolerance for "the compressed model computes the same function":
max |y_orig - y_comp| <= 1e-5 * max(1, max |y_orig|) in float32 (``TOL``).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (cli, initializer, io_signature, max_rel_diff, mlp_onnx, planted_mlp, read_json,
                     run_onnx, save, torch_export, torch_mlp)

TOL = 1e-5

# layer 0: fibers {0,1}, {2}, {3,4}, {5}; fiber {5} has the base row of {2}
#          (identical weights) but its own bias: it must NOT merge.
# layer 1: fibers {0,3}, {1,2}, {4}, {5,6}: balanced, NOT duplicated rows;
#          {5,6} has the base row of {4} but another bias.
HIDDEN = [[0, 0, 1, 2, 2, 3], [0, 1, 1, 0, 2, 3, 3]]
SAME_ROW = {0: {3: 1}, 1: {3: 2}}
N_IN, N_OUT = 6, 3


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(1234)
    p = planted_mlp(rng, N_IN, HIDDEN, N_OUT, same_row_as=SAME_ROW)
    # the builder's promises, checked once so the tests below mean what they say
    W2 = p.Ws[1]
    assert not np.allclose(W2[0], W2[3]) and not np.allclose(W2[1], W2[2])     # not duplicated
    assert np.allclose(p.Ws[0][2], p.Ws[0][5]) and abs(p.bs[0][2] - p.bs[0][5]) > 0.05
    assert abs(p.bs[1][4] - p.bs[1][5]) > 0.05
    for cls in ([0, 1], [3, 4]):                                                 # balanced, bias apart
        assert np.isclose(W2[4, cls].sum(), W2[5, cls].sum()) and not np.allclose(W2[4, cls], W2[5, cls])
    assert all(np.all(np.abs(b) > 0.05) for b in p.bs)                          # nonzero biases
    return p


@pytest.fixture(scope="module")
def hand_models(planted, tmp_path_factory):
    d = tmp_path_factory.mktemp("planted_hand")
    return {form: save(mlp_onnx(planted.Ws, planted.bs, act="Relu", form=form), d / f"mlp_{form}.onnx")
            for form in ("gemm", "gemm_ab", "matmul")}


@pytest.fixture(scope="module")
def torch_models(planted, tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("planted_torch")
    net = torch_mlp(planted)
    x = torch.randn(2, N_IN)
    return {dyn: torch_export(net, x, d / f"mlp_dynamo_{dyn}.onnx", dynamo=dyn) for dyn in (True, False)}


def _weight_names(path):
    import onnx

    m = onnx.load(path)
    return [n.input[1] for n in m.graph.node if n.op_type in ("Gemm", "MatMul")]


def _compress(capsys, path, tmp_path, *opts):
    out, rep = tmp_path / "small.onnx", tmp_path / "report.json"
    rc, so, err = cli(capsys, "compress", path, "-o", out, "--verify", "--report", rep, *opts)
    assert rc == 0, err
    return str(out), read_json(rep)


def _check_report(report, planted, names):
    assert [ly["weight"] for ly in report["layers"]] == names
    assert [ly["fibers"] for ly in report["layers"]] == planted.fibers()
    assert [ly["nodes_before"] for ly in report["layers"]] == [W.shape[0] for W in planted.Ws]
    assert [ly["nodes_after"] for ly in report["layers"]] == [len(f) for f in planted.fibers()]
    assert report["params_before"] == planted.params_before()
    assert report["params_after"] == planted.params_after()
    assert isinstance(report["params_before"], int) and isinstance(report["params_after"], int)
    assert report["verify"]["max_abs_diff"] <= 1e-4


def _check_same_function(orig, small, n_in):
    rng = np.random.default_rng(7)
    for batch in (1, 7):
        x = rng.normal(0, 2, (batch, n_in)).astype(np.float32)
        a, b = run_onnx(orig, x)[0], run_onnx(small, x)[0]
        assert a.shape == b.shape == (batch, N_OUT)
        assert max_rel_diff(a, b) <= TOL, max_rel_diff(a, b)


@pytest.mark.parametrize("form", ["gemm", "gemm_ab", "matmul"])
def test_hand_built_planted_fibers_recovered_and_compressed(capsys, tmp_path, planted, hand_models, form):
    path = hand_models[form]
    small, report = _compress(capsys, path, tmp_path)
    _check_report(report, planted, ["W1", "W2", "W3"])
    _check_same_function(path, small, N_IN)


@pytest.mark.parametrize("form,dtype,constants", [
    ("gemm", np.float32, True), ("matmul", np.float32, True), ("matmul_rev", np.float32, False),
    ("gemm", np.float64, False), ("matmul", np.float64, False), ("gemm_ab", np.float64, True)])
def test_other_encodings(capsys, tmp_path, planted, form, dtype, constants):
    """Weights as Constant nodes (parameters counted, the compressed weights
    written in their place), Add(bias, product), float64 models (dtype
    preserved)."""
    import onnx
    from onnx import numpy_helper

    path = save(mlp_onnx(planted.Ws, planted.bs, form=form, dtype=dtype, constants=constants),
                tmp_path / "m.onnx")
    small, report = _compress(capsys, path, tmp_path)
    _check_report(report, planted, ["W1", "W2", "W3"])
    _check_same_function(path, small, N_IN)
    a, b = onnx.load(path), onnx.load(small)
    assert io_signature(a) == io_signature(b)
    onnx.checker.check_model(b, full_check=True)
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in b.graph.node if n.op_type == "Constant"}
    inits = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    tensors = {**inits, **consts}
    # the weight each linear node reads now: the compressed one, same dtype;
    # the original (uncompressed) Constant weights are gone
    linear = [n for n in b.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(linear) == 3
    n_units = [len(f) for f in planted.fibers()]
    fan_in = [N_IN] + n_units[:-1]
    for l, node in enumerate(linear):
        W = tensors[node.input[1]] if node.input[1] in tensors else tensors[node.input[0]]
        assert W.dtype == dtype
        assert sorted(W.shape) == sorted((n_units[l], fan_in[l]))
    for l in range(2):
        assert f"W{l + 1}" not in consts or consts[f"W{l + 1}"].size == n_units[l] * fan_in[l]
    assert report["params_after"] == sum(v.size for v in tensors.values() if v.dtype.kind == "f")


@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_color_json_reports_planted_partition(capsys, tmp_path, planted, hand_models, form):
    out = tmp_path / "col.json"
    rc, _, err = cli(capsys, "color", hand_models[form], "--json", out)
    assert rc == 0, err
    rep = read_json(out)
    assert [ly["fibers"] for ly in rep["layers"]] == planted.fibers()
    assert rep["params_before"] == planted.params_before()
    assert "verify" not in rep


def test_base_weights_and_bias_mean_formula(capsys, tmp_path, planted, hand_models):
    """The written base holds W_hat = row-mean of column-class sums and
    b_hat = MEAN of the fiber's biases (the papers' SUM would be |c'| times it)."""
    import onnx

    small, _ = _compress(capsys, hand_models["gemm"], tmp_path)
    m = onnx.load(small)
    for l in range(3):
        W = initializer(m, f"W{l + 1}")
        b = initializer(m, f"b{l + 1}")
        np.testing.assert_allclose(W, planted.base_Ws[l], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, planted.base_bs[l], rtol=1e-5, atol=1e-6)
    # with these biases the sum formula is far from the mean formula
    for l in range(2):
        sizes = np.bincount(planted.labels[l])
        assert np.max(np.abs(sizes * planted.base_bs[l] - planted.base_bs[l])) > 0.05


def test_bias_only_difference_does_not_merge_at_eps0_in_api(planted, hand_models):
    from fibgraph.importers.api import color_model

    rep, imp, col = color_model(hand_models["gemm"], eps=0.0)
    f0, f1 = rep["layers"][0]["fibers"], rep["layers"][1]["fibers"]
    assert [2] in f0 and [5] in f0
    assert [4] in f1 and [5, 6] in f1
    assert [ly["weight"] for ly in rep["layers"]] == ["W1", "W2", "W3"]
    assert [ly["output_layer"] for ly in rep["layers"]] == [False, False, True]
    # the colouring itself, not only the report: rows 2 and 5 of W1 are equal, their biases not
    sp = {s.weight: s for s in imp.spaces if s.kind == "linear"}
    lab = col.labels[sp["W1"].ids]
    assert lab[2] != lab[5] and lab[0] == lab[1] and lab[3] == lab[4]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_export_planted_fibers(capsys, tmp_path, planted, torch_models, dynamo):
    import onnx

    path = torch_models[dynamo]
    names = _weight_names(path)
    assert len(names) == 3
    small, report = _compress(capsys, path, tmp_path)
    _check_report(report, planted, names)
    _check_same_function(path, small, N_IN)
    a, b = onnx.load(path), onnx.load(small)
    assert io_signature(a) == io_signature(b)


# ----------------------------------------------------- proportional rows
def _proportional(rng, act):
    """x(5) -> W1 (6) act -> W2 (4) act -> W3 (3).  W1 row 4 = 2 * row 1 and
    b1[4] = 2 * b1[1]; W2 row 3 = 0.5 * row 0, b2[3] = 0.5 * b2[0]."""
    W1, b1 = rng.normal(0, 1, (6, 5)), rng.normal(0, 0.5, 6)
    W1[4], b1[4] = 2 * W1[1], 2 * b1[1]
    W2, b2 = rng.normal(0, 1, (4, 6)), rng.normal(0, 0.5, 4)
    W2[3], b2[3] = 0.5 * W2[0], 0.5 * b2[0]
    W3, b3 = rng.normal(0, 1, (3, 4)), rng.normal(0, 0.5, 3)
    return mlp_onnx([W1, W2, W3], [b1, b2, b3], act=act)


@pytest.fixture(scope="module")
def proportional_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("prop")
    return {act: save(_proportional(np.random.default_rng(5), act), d / f"prop_{act}.onnx")
            for act in ("Tanh", "Relu")}


def _fibers(capsys, tmp_path, path, *opts):
    out = tmp_path / "c.json"
    rc, _, err = cli(capsys, "color", path, "--json", out, *opts)
    assert rc == 0, err
    return [ly["fibers"] for ly in read_json(out)["layers"]]


SINGLETONS = [[[i] for i in range(6)], [[i] for i in range(4)], [[0], [1], [2]]]


@pytest.mark.parametrize("opts", [(), ("--eps", "0"), ("--eps", "0.05", "--metric", "cosine"),
                                  ("--eps", "0.05", "--metric", "cosine", "--linkage", "complete"),
                                  ("--eps", "0.05", "--metric", "euclidean")])
def test_tanh_proportional_rows_never_merge(capsys, tmp_path, proportional_models, opts):
    assert _fibers(capsys, tmp_path, proportional_models["Tanh"], *opts) == SINGLETONS


def test_tanh_cosine_compress_keeps_function(capsys, tmp_path, proportional_models):
    path = proportional_models["Tanh"]
    small, rep = _compress(capsys, path, tmp_path, "--eps", "0.05", "--metric", "cosine")
    assert rep["params_after"] == rep["params_before"]
    x = np.random.default_rng(0).normal(size=(7, 5))
    assert max_rel_diff(run_onnx(path, x)[0], run_onnx(small, x)[0]) <= TOL


def test_relu_proportional_rows_merge_exactly_with_cosine(capsys, tmp_path, proportional_models):
    path = proportional_models["Relu"]
    fib = _fibers(capsys, tmp_path, path, "--eps", "0.05", "--metric", "cosine")
    assert fib[0] == [[0], [1, 4], [2], [3], [5]]
    assert fib[1] == [[0, 3], [1], [2]]
    small, rep = _compress(capsys, path, tmp_path, "--eps", "0.05", "--metric", "cosine")
    assert [ly["nodes_after"] for ly in rep["layers"]] == [5, 3, 3]
    assert rep["params_after"] == 5 * 5 + 5 + 3 * 5 + 3 + 3 * 3 + 3
    assert rep["verify"]["max_abs_diff"] < 1e-4
    x = np.random.default_rng(1).normal(0, 2, (7, 5))
    a, b = run_onnx(path, x)[0], run_onnx(small, x)[0]
    assert np.max(np.abs(a - b)) < 1e-4


@pytest.mark.parametrize("opts", [("--eps", "0"), ("--eps", "0.05", "--metric", "euclidean")])
def test_relu_proportional_rows_do_not_merge_without_cosine(capsys, tmp_path, proportional_models, opts):
    assert _fibers(capsys, tmp_path, proportional_models["Relu"], *opts) == SINGLETONS


# -------------------------------------------------------- property test
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_planted_partition_compresses_exactly(tmp_path_factory, data):
    from fibgraph.importers.api import compress_model

    seed = data.draw(st.integers(0, 2 ** 32 - 1), label="seed")
    n_in = data.draw(st.integers(1, 6), label="n_in")
    n_hidden = data.draw(st.integers(1, 3), label="n_hidden")
    hidden = []
    for _ in range(n_hidden):
        n = data.draw(st.integers(1, 8))
        k = data.draw(st.integers(1, n))
        hidden.append(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    n_out = data.draw(st.integers(1, 4), label="n_out")
    split = data.draw(st.sampled_from([0.0, 0.3, 1.0, 2.0]), label="split")
    form = data.draw(st.sampled_from(["gemm", "gemm_ab", "matmul", "matmul_rev"]), label="form")
    act = data.draw(st.sampled_from(["Relu", "Tanh", "Sigmoid", "LeakyRelu"]), label="act")

    rng = np.random.default_rng(seed)
    p = planted_mlp(rng, n_in, hidden, n_out, split=split)
    d = tmp_path_factory.mktemp("prop")
    path = save(mlp_onnx(p.Ws, p.bs, act=act, form=form), d / "m.onnx")
    rep = compress_model(path, str(d / "small.onnx"), verify=True)
    assert rep["verify"]["max_abs_diff"] < 1e-4
    expected = p.fibers()
    assert [ly["nodes_after"] for ly in rep["layers"]] == [len(f) for f in expected]
    assert [ly["fibers"] for ly in rep["layers"]] == expected
    assert rep["params_after"] == p.params_after()
    x = rng.normal(0, 1, (5, n_in))
    a, b = run_onnx(path, x)[0], run_onnx(str(d / "small.onnx"), x)[0]
    assert np.max(np.abs(a - b)) < 1e-4
    # the base of the coarsest fibration is minimal: compressing it again changes nothing
    rep2 = compress_model(str(d / "small.onnx"), str(d / "smaller.onnx"))
    assert [ly["nodes_after"] for ly in rep2["layers"]] == [ly["nodes_before"] for ly in rep2["layers"]]
    assert rep2["params_after"] == rep2["params_before"] == rep["params_after"]


def test_hidden_layer_that_is_also_an_output_keeps_its_units(capsys, tmp_path, planted):
    """A graph output exposing a hidden activation: that layer keeps all its
    units (like the output layer), so the next layer's balanced-but-not-
    duplicated rows are no longer fibers (its columns are now all distinct
    colours); both outputs keep their shapes."""
    import onnx

    m = mlp_onnx(planted.Ws, planted.bs)
    m.graph.output.append(onnx.helper.make_tensor_value_info("a1", onnx.TensorProto.FLOAT, ["N", 6]))
    path = save(m, tmp_path / "two_out.onnx")
    small, rep = _compress(capsys, path, tmp_path)
    assert rep["layers"][0]["fibers"] == [[i] for i in range(6)]
    assert rep["layers"][1]["fibers"] == [[i] for i in range(7)]   # no planted row is duplicated
    b = onnx.load(small)
    assert io_signature(onnx.load(path)) == io_signature(b)
    x = np.random.default_rng(2).normal(size=(7, N_IN))
    for p, q in zip(run_onnx(path, x), run_onnx(small, x)):
        assert p.shape == q.shape and max_rel_diff(p, q) <= TOL


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_rescaled_fibers_merge_exactly_with_cosine(tmp_path_factory, data):
    """Planted fibers whose members are rescaled by random positive factors t_k
    (row and bias times t_k, the next layer's column divided by t_k: the same
    function).  With a positively homogeneous activation, cosine at a tiny eps
    recovers exactly the planted fibers and the rescaling merge is exact."""
    from fibgraph.importers.api import compress_model

    seed = data.draw(st.integers(0, 2 ** 32 - 1), label="seed")
    n_in = data.draw(st.integers(2, 6), label="n_in")
    hidden = []
    for _ in range(data.draw(st.integers(1, 3), label="n_hidden")):
        n = data.draw(st.integers(1, 7))
        k = data.draw(st.integers(1, n))
        hidden.append(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    act = data.draw(st.sampled_from(["Relu", "LeakyRelu"]), label="act")
    linkage = data.draw(st.sampled_from(["average", "complete"]), label="linkage")

    rng = np.random.default_rng(seed)
    p = planted_mlp(rng, n_in, hidden, 2, split=0.5)
    Ws, bs = [W.copy() for W in p.Ws], [b.copy() for b in p.bs]
    for l in range(len(hidden)):
        t = rng.uniform(0.4, 2.5, Ws[l].shape[0])
        Ws[l] *= t[:, None]
        bs[l] *= t
        Ws[l + 1] /= t[None, :]
    d = tmp_path_factory.mktemp("rescaled")
    path = save(mlp_onnx(Ws, bs, act=act), d / "m.onnx")
    rep = compress_model(path, str(d / "small.onnx"), eps=1e-6, metric="cosine", linkage=linkage, verify=True)
    assert [ly["fibers"] for ly in rep["layers"]] == p.fibers()
    assert rep["params_after"] == p.params_after()
    x = rng.normal(0, 1, (6, n_in))
    a, b = run_onnx(path, x)[0], run_onnx(str(d / "small.onnx"), x)[0]
    assert np.max(np.abs(a - b)) < 1e-4 * max(1.0, float(np.max(np.abs(a))))
    assert rep["verify"]["max_abs_diff"] < 1e-4
