"""The rescaling merge on the hypergraph path (docs/design.md section 4).

The importer marks a node set positively homogeneous only where its values
reach every consumer through ReLU-family activations, pooling, reshapes and
constant factors, ending in linear layers (or a bias add that is itself such
a set).  There ``--metric cosine`` clusters rows by angle and the writer folds
each node's scale into the base, so proportional rows merge EXACTLY; a
sigmoid, a LayerNorm, a residual sum or an unfolded BatchNorm in the way
blocks it (cosine is then replaced by the magnitude-aware distance)."""
import numpy as np
import pytest
from onnx import TensorProto, helper

from helpers import cli, finish, mlp_onnx, read_json, run_onnx, save


def _init(name, arr):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _proportional(rng, act, form):
    """x(5) -> W1 (6) act -> W2 (4) act -> W3 (3): W1 row 4 = 2 * row 1 (bias
    too), W2 row 3 = 0.5 * row 0 (bias too)."""
    W1, b1 = rng.normal(0, 1, (6, 5)), rng.normal(0, 0.5, 6)
    W1[4], b1[4] = 2 * W1[1], 2 * b1[1]
    W2, b2 = rng.normal(0, 1, (4, 6)), rng.normal(0, 0.5, 4)
    W2[3], b2[3] = 0.5 * W2[0], 0.5 * b2[0]
    W3, b3 = rng.normal(0, 1, (3, 4)), rng.normal(0, 0.5, 3)
    return mlp_onnx([W1, W2, W3], [b1, b2, b3], act=act, form=form)


def _run(capsys, tmp_path, path, *opts):
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    rc, _, err = cli(capsys, "compress", path, "-o", out, "--verify", "--report", rep, *opts)
    assert rc == 0, err
    return str(out), read_json(rep)


def _max_diff(a, b, n_in, seed=1):
    x = np.random.default_rng(seed).normal(0, 2, (9, n_in))
    ya, yb = run_onnx(a, x)[0], run_onnx(b, x)[0]
    return float(np.max(np.abs(ya - yb)))


@pytest.mark.parametrize("form", ["matmul", "matmul_rev", "gemm_ab"])
def test_bias_add_encodings_merge_proportional_rows_exactly(capsys, tmp_path, form):
    """MatMul + Add(bias): the layer and its bias add are both homogeneous; the
    bias add divides its constant by the scales."""
    path = save(_proportional(np.random.default_rng(5), "Relu", form), tmp_path / "m.onnx")
    small, rep = _run(capsys, tmp_path, path, "--eps", "0.05", "--metric", "cosine")
    assert [ly["fibers"] for ly in rep["layers"][:2]] == [[[0], [1, 4], [2], [3], [5]], [[0, 3], [1], [2]]]
    for ly in rep["layers"][:2]:
        assert ly["homogeneous"] and ly["criterion"]["metric"] == "cosine" and ly["criterion"]["rescale"] is True
    assert rep["params_after"] == 5 * 5 + 5 + 3 * 5 + 3 + 3 * 3 + 3
    assert _max_diff(path, small, 5) < 1e-4
    assert rep["verify"]["max_abs_diff"] < 1e-4


def test_no_rescale_keeps_cosine_without_scales(capsys, tmp_path):
    """--no-rescale: the same cosine clusters, merged by plain averaging (not
    exact: the output moves), and the report says so."""
    path = save(_proportional(np.random.default_rng(5), "Relu", "gemm"), tmp_path / "m.onnx")
    small, rep = _run(capsys, tmp_path, path, "--eps", "0.05", "--metric", "cosine", "--no-rescale")
    assert rep["layers"][0]["fibers"] == [[0], [1, 4], [2], [3], [5]]
    assert rep["layers"][0]["criterion"]["rescale"] is False and rep["layers"][0]["criterion"]["metric"] == "cosine"
    assert _max_diff(path, small, 5) > 1e-2


@pytest.mark.parametrize("act", ["Tanh", "Sigmoid", "Elu"])
def test_non_homogeneous_activation_uses_the_magnitude_aware_distance(capsys, tmp_path, act):
    path = save(_proportional(np.random.default_rng(5), act, "gemm"), tmp_path / "m.onnx")
    _, rep = _run(capsys, tmp_path, path, "--eps", "0.05", "--metric", "cosine")
    ly = rep["layers"][0]
    assert not ly["homogeneous"] and ly["criterion"]["metric"] == "euclidean" and not ly["criterion"]["rescale"]
    assert [1, 4] not in ly["fibers"]


# ------------------------------------------------------------ which sets
def _homogeneous_weights(model):
    from fibgraph.importers.dag_api import weight_entries
    from fibgraph.importers.onnx.importer import import_dag

    imp = import_dag(model)
    return {w: bool(imp.graph.homogeneous[ids].all()) for w, _, ids, _ in weight_entries(imp)}


def _residual_mlp(rng, prop=None, bias_add=False):
    """x(5) -> A -> relu -> h;  h -> B -> relu -> C -> (+ h) -> D.  ``prop``:
    rows (i, j, t) of B with row j = t * row i (bias too).  ``bias_add``: B as
    MatMul + Add."""
    A, a = rng.normal(0, 1, (6, 5)), rng.normal(0, 0.3, 6)
    B, b = rng.normal(0, 1, (7, 6)), rng.normal(0, 0.3, 7)
    if prop:
        i, j, t = prop
        B[j], b[j] = t * B[i], t * b[i]
    C, c = rng.normal(0, 1, (6, 7)), rng.normal(0, 0.3, 6)
    D, d = rng.normal(0, 1, (3, 6)), rng.normal(0, 0.3, 3)
    nodes = [helper.make_node("Gemm", ["x", "A", "a"], ["za"], transB=1, name="A"),
             helper.make_node("Relu", ["za"], ["h"], name="ra")]
    if bias_add:
        nodes += [helper.make_node("MatMul", ["h", "Bt"], ["mb"], name="B"),
                  helper.make_node("Add", ["mb", "b"], ["zb"], name="B_bias")]
    else:
        nodes += [helper.make_node("Gemm", ["h", "B", "b"], ["zb"], transB=1, name="B")]
    nodes += [helper.make_node("Relu", ["zb"], ["rb"], name="rb"),
              helper.make_node("Gemm", ["rb", "C", "c"], ["zc"], transB=1, name="C"),
              helper.make_node("Add", ["zc", "h"], ["s"], name="residual"),
              helper.make_node("Gemm", ["s", "D", "d"], ["y"], transB=1, name="D")]
    inits = [_init("A", A), _init("a", a), _init("b", b), _init("C", C), _init("c", c), _init("D", D),
             _init("d", d), _init("Bt", B.T) if bias_add else _init("B", B)]
    return finish(helper.make_graph(nodes, "res", [_vi("x", ["N", 5])], [_vi("y", ["N", 3])], inits))


def test_residual_stream_blocks_and_inner_relu_layer_is_homogeneous():
    h = _homogeneous_weights(_residual_mlp(np.random.default_rng(0)))
    # A feeds the residual sum, C is summed into it: not homogeneous; B -> relu -> C is
    assert h == {"A": False, "Bt" if "Bt" in h else "B": True, "C": False, "D": True}


@pytest.mark.parametrize("bias_add", [False, True])
def test_rescaled_rows_inside_a_residual_block_merge_exactly(capsys, tmp_path, bias_add):
    """A model the chain path cannot read: the inner ReLU layer's rows 1 and 4
    are proportional (factor 3); cosine at a tiny eps merges them and the base
    computes the same function."""
    path = save(_residual_mlp(np.random.default_rng(1), prop=(1, 4, 3.0), bias_add=bias_add), tmp_path / "r.onnx")
    small, rep = _run(capsys, tmp_path, path, "--eps", "1e-6", "--metric", "cosine")
    layers = {ly["weight"]: ly for ly in rep["layers"]}
    inner = layers["Bt" if bias_add else "B"]
    assert inner["fibers"] == [[0], [1, 4], [2], [3], [5], [6]] and inner["criterion"]["rescale"] is True
    assert all(len(f) == 1 for f in layers["A"]["fibers"])
    assert _max_diff(path, small, 5) < 1e-4
    # euclidean: proportional is not equal
    _, rep2 = _run(capsys, tmp_path, path, "--eps", "1e-6", "--metric", "euclidean")
    assert all(len(f) == 1 for ly in rep2["layers"] for f in ly["fibers"])


def _conv_block(rng, blocker=None, prop=False):
    """x(2,6,6) -> conv1 -> relu -> conv2 -> [blocker] -> relu -> conv3 -> (+ relu conv1) ->
    relu -> GAP -> Flatten -> Gemm.  ``blocker``: 'Sigmoid', 'BatchNormalization' or None."""
    W1, W2, W3 = (rng.normal(0, 0.5, s) for s in ((4, 2, 3, 3), (5, 4, 3, 3), (4, 5, 3, 3)))
    Wf, bf = rng.normal(0, 0.5, (3, 4)), rng.normal(0, 0.3, 3)
    b2 = rng.normal(0, 0.3, 5)
    if prop:                       # conv2 channel 3 = 2.5 x channel 1 (kernel and bias)
        W2[3], b2[3] = 2.5 * W2[1], 2.5 * b2[1]
    p = dict(pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", **p),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], name="conv2", **p)]
    inits = [_init("W1", W1), _init("W2", W2), _init("b2", b2), _init("W3", W3), _init("Wf", Wf), _init("bf", bf)]
    x2 = "c2"
    if blocker == "Sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["c2"], ["bl"], name="blocker"))
        x2 = "bl"
    elif blocker == "BatchNormalization":
        for k, v in dict(g=rng.uniform(0.5, 1.5, 5), be=rng.normal(0, 0.3, 5), mu=rng.normal(0, 0.2, 5),
                         var=rng.uniform(0.5, 1.5, 5)).items():
            inits.append(_init(k, v))
        nodes.append(helper.make_node("BatchNormalization", ["c2", "g", "be", "mu", "var"], ["bl"], name="blocker"))
        x2 = "bl"
    nodes += [helper.make_node("Relu", [x2], ["r2"], name="r2"),
              helper.make_node("Conv", ["r2", "W3"], ["c3"], name="conv3", **p),
              helper.make_node("Add", ["c3", "r1"], ["s"], name="residual"),
              helper.make_node("Relu", ["s"], ["rs"], name="rs"),
              helper.make_node("GlobalAveragePool", ["rs"], ["g1"], name="gap"),
              helper.make_node("Flatten", ["g1"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], transB=1, name="fc")]
    return finish(helper.make_graph(nodes, "block", [_vi("x", ["N", 2, 6, 6])], [_vi("y", ["N", 3])], inits))


@pytest.mark.parametrize("blocker,want", [
    (None, {"W1": False, "W2": True, "W3": False, "Wf": True}),
    ("Sigmoid", {"W1": False, "W2": False, "W3": False, "Wf": True}),
    ("BatchNormalization", {"W1": False, "W2": False, "W3": False, "Wf": True})])
def test_relu_resnet_block_convs(blocker, want):
    """conv2 (relu -> conv3) is homogeneous in a ReLU residual block; conv1
    (its output is summed into the stream) and conv3 are not; a sigmoid or an
    unfolded BatchNorm after conv2 blocks it too."""
    assert _homogeneous_weights(_conv_block(np.random.default_rng(3), blocker)) == want


def test_relu_resnet_block_cosine_report(capsys, tmp_path):
    """--metric cosine on a ReLU residual block: cosine with the rescaling merge
    on conv2 (not silently euclidean), euclidean where it is not exact."""
    path = save(_conv_block(np.random.default_rng(3)), tmp_path / "b.onnx")
    small, rep = _run(capsys, tmp_path, path, "--eps", "0.3", "--metric", "cosine")
    crit = {ly["weight"]: ly["criterion"] for ly in rep["layers"]}
    assert crit["W2"]["metric"] == "cosine" and crit["W2"]["rescale"] is True
    assert crit["W1"]["metric"] == crit["W3"]["metric"] == "euclidean"
    assert not crit["W1"]["rescale"] and not crit["W3"]["rescale"]


def test_blockers_between_layers():
    """Sigmoid, LayerNorm, unfolded BatchNorm and a per-channel scale after a
    layer block it; MaxPool, Flatten and a positive scalar factor do not."""
    rng = np.random.default_rng(4)
    W1, b1, W2 = rng.normal(0, 1, (4, 3)), rng.normal(0, 0.3, 4), rng.normal(0, 1, (2, 4))

    def model(mid):
        nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z"], transB=1, name="l1")] + mid + \
                [helper.make_node("Gemm", [mid[-1].output[0] if mid else "z", "W2"], ["y"], transB=1, name="l2")]
        inits = [_init("W1", W1), _init("b1", b1), _init("W2", W2), _init("g", np.ones(4) * 1.5),
                 _init("be", np.zeros(4)), _init("two", np.array(2.0)), _init("ch", np.arange(1, 5.0))]
        return finish(helper.make_graph(nodes, "m", [_vi("x", ["N", 3])], [_vi("y", ["N", 2])], inits))

    mk = helper.make_node
    cases = {
        "relu": ([mk("Relu", ["z"], ["a"])], True),
        "relu_scalar_mul": ([mk("Relu", ["z"], ["a"]), mk("Mul", ["a", "two"], ["b"])], True),
        "leaky": ([mk("LeakyRelu", ["z"], ["a"], alpha=0.1)], True),
        "sigmoid": ([mk("Sigmoid", ["z"], ["a"])], False),
        "layernorm": ([mk("LayerNormalization", ["z", "g", "be"], ["a"], axis=-1)], False),
        "channel_scale": ([mk("Mul", ["z", "ch"], ["a"])], False),
        "scalar_add": ([mk("Add", ["z", "two"], ["a"])], False),
    }
    for name, (mid, want) in cases.items():
        assert _homogeneous_weights(model(mid))["W1"] is want, name


def test_rescaled_conv_channels_merge_exactly(capsys, tmp_path):
    """conv2's channel 3 is 2.5 times channel 1 (kernel and bias): cosine at a
    tiny eps merges them, conv3 reads the merged channel through the summed,
    rescaled kernels, and the base computes the same function."""
    path = save(_conv_block(np.random.default_rng(3), prop=True), tmp_path / "b.onnx")
    small, rep = _run(capsys, tmp_path, path, "--eps", "1e-6", "--metric", "cosine")
    layers = {ly["weight"]: ly for ly in rep["layers"]}
    assert layers["W2"]["fibers"] == [[0], [1, 3], [2], [4]] and layers["W2"]["nodes_after"] == 4
    x = np.random.default_rng(0).normal(0, 1, (4, 2, 6, 6))
    ya, yb = run_onnx(path, x)[0], run_onnx(small, x)[0]
    assert np.max(np.abs(ya - yb)) < 1e-4 * max(1.0, float(np.max(np.abs(ya))))
