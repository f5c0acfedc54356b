"""A LayerNorm written out op by op (as TF/JAX converters write it, e.g.
magika): ``y = (x - mean) * (rsqrt(var + e) * gamma) + beta``.  The product
of the per-sample statistic and the per-unit gamma carries the units: gamma
must split fibers where it differs and be shrunk with the stream."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run_onnx

D_IN, D, D_OUT = 5, 6, 3
FIBERS = [[0, 3], [1, 4], [2], [5]]          # planted hidden fibers


def _model(gamma, seed=0):
    rng = np.random.default_rng(seed)
    W1s = rng.normal(size=(len(FIBERS), D_IN))
    W1 = np.zeros((D, D_IN))
    b1 = np.zeros(D)
    b1s = rng.normal(size=len(FIBERS))
    for f, members in enumerate(FIBERS):
        W1[members] = W1s[f]
        b1[members] = b1s[f]
    beta = np.zeros(D)
    for f, members in enumerate(FIBERS):
        beta[members] = 0.1 * f
    W2 = rng.normal(size=(D_OUT, D))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             [(W1.T, "W1"), (b1, "b1"), (gamma.reshape(1, D), "gamma"), (beta.reshape(1, D), "beta"),
              (W2.T, "W2"), (np.array(1e-5), "eps"), (np.array(1.0 / D), "inv_d")]]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
        helper.make_node("ReduceSum", ["h", "axes"], ["s"], name="sum", keepdims=1),
        helper.make_node("Mul", ["s", "inv_d"], ["mean"], name="mean"),
        helper.make_node("Sub", ["h", "mean"], ["xc"], name="center"),
        helper.make_node("Mul", ["xc", "xc"], ["sq"], name="square"),
        helper.make_node("ReduceSum", ["sq", "axes"], ["ss"], name="sum_sq", keepdims=1),
        helper.make_node("Mul", ["ss", "inv_d"], ["var"], name="var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="var_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="sd"),
        helper.make_node("Reciprocal", ["sd"], ["rs"], name="rsqrt"),
        helper.make_node("Mul", ["rs", "gamma"], ["scale"], name="gamma_mul"),   # (B, 1) x (1, D)
        helper.make_node("Mul", ["xc", "scale"], ["n"], name="normed"),
        helper.make_node("Add", ["n", "beta"], ["nb"], name="beta_add"),
        helper.make_node("MatMul", ["nb", "W2"], ["y"], name="fc2"),
    ]
    g = helper.make_graph(nodes, "decomposed_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D_IN])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D_OUT])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _fc1_fibers(report):
    ly = next(r for r in report["layers"] if r["weight"] == "W1")
    return sorted(sorted(f) for f in ly["fibers"])


@pytest.mark.parametrize("case", ["gamma equal on fibers", "gamma splits a fiber"])
def test_gamma_of_a_written_out_layernorm_splits_and_shrinks(case, tmp_path):
    from fibgraph.importers.api import compress_model

    gamma = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 4.0])
    want = FIBERS
    if case == "gamma splits a fiber":
        gamma[4] = 2.5                       # units 1 and 4 get different gammas: not a fiber
        want = [[0, 3], [1], [2], [4], [5]]
    m = _model(gamma)
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    out = tmp_path / "small.onnx"
    rep = compress_model(str(path), str(out), verify=True)
    assert rep["graph"] == "hypergraph"
    assert _fc1_fibers(rep) == sorted(want)
    small = onnx.load(str(out))
    g_hat = next(numpy_helper.to_array(t) for t in small.graph.initializer if t.name.startswith("gamma"))
    assert g_hat.size == len(want)           # gamma shrunk with the stream
    x = np.random.default_rng(1).normal(size=(7, D_IN)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(small, x), run_onnx(m, x), rtol=1e-5, atol=1e-5)
