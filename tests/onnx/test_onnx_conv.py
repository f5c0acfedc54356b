"""CNNs: BatchNorm (folded by the exporter, folded by fibgraph, or unfolded
after the ReLU), pooling, flatten, depthwise convs.  Planted duplicate or
balanced channels are recovered, BN parameters are part of the criterion, the
compressed model is exact (``TOL``), passes the full ONNX check and keeps the
input/output names, dtypes and the dynamic batch (batch 1 and 7 run)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import (cli, finish, initializer, io_signature, max_rel_diff, node_by_op, read_json,
                     run_onnx, save, torch_export, _init)

TOL = 1e-5


def _compress(capsys, path, tmp_path, *opts):
    out, rep = tmp_path / "small.onnx", tmp_path / "report.json"
    rc, _, err = cli(capsys, "compress", path, "-o", out, "--verify", "--report", rep, *opts)
    assert rc == 0, err
    return str(out), read_json(rep)


def _count_float_params(m):
    from onnx import numpy_helper

    n = 0
    for t in m.graph.initializer:
        if numpy_helper.to_array(t).dtype.kind == "f":
            n += int(np.prod(t.dims))
    for nd in m.graph.node:
        if nd.op_type == "Constant":
            for a in nd.attribute:
                if a.name == "value" and a.t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
                    n += int(np.prod(a.t.dims))
    return n


def _check_written(orig_path, small_path, in_shape, report):
    a, b = onnx.load(orig_path), onnx.load(small_path)
    onnx.checker.check_model(b, full_check=True)
    assert io_signature(a) == io_signature(b)
    assert report["params_after"] == _count_float_params(b)
    assert report["params_before"] == _count_float_params(a)
    rng = np.random.default_rng(3)
    for batch in (1, 7):
        x = rng.normal(0, 1, (batch,) + tuple(in_shape)).astype(np.float32)
        ya, yb = run_onnx(orig_path, x), run_onnx(small_path, x)
        assert len(ya) == len(yb)
        for p, q in zip(ya, yb):
            assert p.shape == q.shape and p.dtype == q.dtype
            assert max_rel_diff(p, q) <= TOL, max_rel_diff(p, q)
    return b


# --------------------------------------------------------------- torch CNN
def _torch_cnn():
    import torch

    torch.manual_seed(0)

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(6)
            self.pool = torch.nn.MaxPool2d(2)
            self.conv2 = torch.nn.Conv2d(6, 5, 3, padding=1)
            self.fc = torch.nn.Linear(5 * 4 * 4, 4)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn1(self.conv1(x))))
            x = torch.relu(self.conv2(x))
            return self.fc(torch.flatten(x, 1))

    m = CNN().eval()
    with torch.no_grad():
        c1, bn, c2 = m.conv1, m.bn1, m.conv2
        bn.weight.copy_(torch.rand(6) + 0.5)
        bn.bias.copy_(torch.randn(6) * 0.3)
        bn.running_mean.copy_(torch.randn(6) * 0.2)
        bn.running_var.copy_(torch.rand(6) + 0.5)
        # channels 1 and 4: same conv AND same BN -> one fiber
        c1.weight[4] = c1.weight[1]
        c1.bias[4] = c1.bias[1]
        for p in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            p[4] = p[1]
        # channels 0 and 2: same conv, different BN gamma -> NOT a fiber
        c1.weight[2] = c1.weight[0]
        c1.bias[2] = c1.bias[0]
        bn.bias[2], bn.running_mean[2], bn.running_var[2] = bn.bias[0], bn.running_mean[0], bn.running_var[0]
        bn.weight[2] = bn.weight[0] * 1.7
        # conv2 channels 0 and 3: balanced over {1, 4}, not duplicated
        d = torch.randn(3, 3) * 0.3
        c2.weight[3] = c2.weight[0]
        c2.weight[3, 1] += d
        c2.weight[3, 4] -= d
        c2.bias[3] = c2.bias[0]
    return m


@pytest.fixture(scope="module")
def torch_cnns(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("cnn")
    m = _torch_cnn()
    x = torch.randn(2, 3, 8, 8)
    return {dyn: torch_export(m, x, d / f"cnn_{dyn}.onnx", dynamo=dyn) for dyn in (True, False)}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_cnn_bn_pool_planted_channels(capsys, tmp_path, torch_cnns, dynamo):
    path = torch_cnns[dynamo]
    small, rep = _compress(capsys, path, tmp_path)
    assert [ly["fibers"] for ly in rep["layers"]] == [
        [[0], [1, 4], [2], [3], [5]],
        [[0, 3], [1], [2], [4]],
        [[0], [1], [2], [3]]]
    assert [ly["nodes_after"] for ly in rep["layers"]] == [5, 4, 4]
    assert rep["verify"]["max_abs_diff"] <= 1e-4
    b = _check_written(path, small, (3, 8, 8), rep)
    convs = node_by_op(b, "Conv")
    assert [tuple(initializer(b, c.input[1]).shape) for c in convs] == [(5, 3, 3, 3), (4, 5, 3, 3)]
    fc = node_by_op(b, "Gemm")[0]
    w = initializer(b, fc.input[1])
    assert w.shape in ((4, 64), (64, 4))


# ---------------------------------------------------- hand-built BN models
def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _conv_bn_fold_model(rng):
    """x(N,3,8,8) -> Conv -> BN (unfolded in the file) -> Relu -> MaxPool ->
    Conv -> Relu -> Flatten -> Gemm.  Conv1 channels 1, 4: same conv and BN;
    0, 2: same conv, different gamma; 3, 5: same conv and BN but different
    running mean."""
    W1, b1 = rng.normal(0, 0.5, (6, 3, 3, 3)), rng.normal(0, 0.3, 6)
    g, be = rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.3, 6)
    mu, var = rng.normal(0, 0.2, 6), rng.uniform(0.5, 1.5, 6)
    for i, j in ((1, 4), (0, 2), (3, 5)):
        W1[j], b1[j], g[j], be[j], mu[j], var[j] = W1[i], b1[i], g[i], be[i], mu[i], var[i]
    g[2] = 1.7 * g[0]
    mu[5] = mu[3] + 0.4
    W2, b2 = rng.normal(0, 0.4, (5, 6, 3, 3)), rng.normal(0, 0.3, 5)
    W3, b3 = rng.normal(0, 0.3, (4, 5 * 16)), rng.normal(0, 0.3, 4)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"], name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "W2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["y"], name="fc", transB=1),
    ]
    inits = [_init(k, v) for k, v in dict(W1=W1, b1=b1, g=g, be=be, mu=mu, var=var, W2=W2, b2=b2,
                                         W3=W3, b3=b3).items()]
    return finish(helper.make_graph(nodes, "conv_bn", [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 4])], inits))


def _bn_after_relu_model(rng):
    """x(N,2,6,6) -> Conv(5) -> Relu -> BN -> Conv(4) -> Relu -> GAP -> Flatten -> Gemm(3).
    Conv1 {0,1}: equal conv and BN; {2,3}: equal conv, different gamma.
    Conv2 {0,2}: balanced over {0,1}, not duplicated."""
    W1, b1 = rng.normal(0, 0.5, (5, 2, 3, 3)), rng.normal(0, 0.3, 5)
    W1[1], b1[1] = W1[0], b1[0]
    W1[3], b1[3] = W1[2], b1[2]
    g, be = rng.uniform(0.5, 1.5, 5), rng.normal(0, 0.3, 5)
    mu, var = rng.normal(0, 0.2, 5), rng.uniform(0.5, 1.5, 5)
    for arr in (g, be, mu, var):
        arr[1] = arr[0]
        arr[3] = arr[2]
    g[3] = g[2] * 0.6
    W2, b2 = rng.normal(0, 0.4, (4, 5, 3, 3)), rng.normal(0, 0.3, 4)
    D = rng.normal(0, 0.5, (3, 3))
    W2[2], b2[2] = W2[0], b2[0]
    W2[2, 0] += D
    W2[2, 1] -= D
    W3, b3 = rng.normal(0, 0.5, (3, 4)), rng.normal(0, 0.3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("BatchNormalization", ["r1", "g", "be", "mu", "var"], ["n1"], name="bn1"),
        helper.make_node("Conv", ["n1", "W2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["y"], name="fc", transB=1),
    ]
    inits = [_init(k, v) for k, v in dict(W1=W1, b1=b1, g=g, be=be, mu=mu, var=var, W2=W2, b2=b2,
                                         W3=W3, b3=b3).items()]
    return finish(helper.make_graph(nodes, "bn_after_relu", [_vi("x", ["N", 2, 6, 6])], [_vi("y", ["N", 3])],
                                    inits))


def _depthwise_model(rng, variant):
    """x(N,3,6,6) -> Conv(4) -> Relu -> depthwise Conv (group 4) -> Relu -> GAP ->
    Flatten -> Gemm(2).  Conv1 channels 0, 2 duplicated.
    'same': depthwise kernels 0, 2 equal -> fiber; 'differ': they differ;
    'mult2': 8 depthwise outputs (multiplier 2), outputs 0,1 equal 4,5."""
    W1, b1 = rng.normal(0, 0.5, (4, 3, 3, 3)), rng.normal(0, 0.3, 4)
    W1[2], b1[2] = W1[0], b1[0]
    n_dw = 8 if variant == "mult2" else 4
    Wd, bd = rng.normal(0, 0.5, (n_dw, 1, 3, 3)), rng.normal(0, 0.3, n_dw)
    if variant == "same":
        Wd[2], bd[2] = Wd[0], bd[0]
    elif variant == "mult2":
        Wd[4:6], bd[4:6] = Wd[0:2], bd[0:2]
    W3, b3 = rng.normal(0, 0.5, (2, n_dw)), rng.normal(0, 0.3, 2)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "Wd", "bd"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["y"], name="fc", transB=1),
    ]
    inits = [_init(k, v) for k, v in dict(W1=W1, b1=b1, Wd=Wd, bd=bd, W3=W3, b3=b3).items()]
    return finish(helper.make_graph(nodes, f"dw_{variant}", [_vi("x", ["N", 3, 6, 6])], [_vi("y", ["N", 2])],
                                    inits))


def test_conv_then_unfolded_bn_is_folded_with_bn_params_in_criterion(capsys, tmp_path):
    path = save(_conv_bn_fold_model(np.random.default_rng(11)), tmp_path / "conv_bn.onnx")
    small, rep = _compress(capsys, path, tmp_path)
    assert [ly["weight"] for ly in rep["layers"]] == ["W1", "W2", "W3"]
    # 1~4 (same conv and BN); 0/2 differ in gamma, 3/5 in running mean
    assert rep["layers"][0]["fibers"] == [[0], [1, 4], [2], [3], [5]]
    assert rep["layers"][1]["nodes_after"] == 5
    b = _check_written(path, small, (3, 8, 8), rep)
    assert initializer(b, "W1").shape == (5, 3, 3, 3)
    assert initializer(b, "W2").shape == (5, 5, 3, 3)
    assert initializer(b, "W3").shape == (4, 80)


def test_bn_after_relu_params_are_part_of_the_criterion(capsys, tmp_path):
    path = save(_bn_after_relu_model(np.random.default_rng(12)), tmp_path / "bn_relu.onnx")
    small, rep = _compress(capsys, path, tmp_path)
    assert [ly["fibers"] for ly in rep["layers"]] == [
        [[0, 1], [2], [3], [4]],      # {2,3}: equal conv rows, different BN gamma
        [[0, 2], [1], [3]],
        [[0], [1], [2]]]
    b = _check_written(path, small, (2, 6, 6), rep)
    # BN stays (not foldable after the ReLU), sliced to one channel per fiber
    bn = node_by_op(b, "BatchNormalization")
    assert len(bn) == 1
    assert [initializer(b, x).shape for x in bn[0].input[1:5]] == [(4,)] * 4
    assert rep["params_after"] == (4 * 2 * 9 + 4) + 4 * 4 + (3 * 4 * 9 + 3) + (3 * 3 + 3)


def test_bn_after_relu_gamma_difference_also_blocks_eps_merge(capsys, tmp_path):
    """eps > 0 clusters conv rows, but channels with different BN parameters
    still cannot share a fiber."""
    path = save(_bn_after_relu_model(np.random.default_rng(12)), tmp_path / "bn_relu.onnx")
    out = tmp_path / "c.json"
    rc, _, err = cli(capsys, "color", path, "--eps", "0.01", "--json", out)
    assert rc == 0, err
    fib = read_json(out)["layers"][0]["fibers"]
    assert [2] in fib and [3] in fib


@pytest.mark.parametrize("variant,fibers,dw_out", [
    ("same", [[[0, 2], [1], [3]], [[0, 2], [1], [3]], [[0], [1]]], 3),
    ("differ", [[[0, 2], [1], [3]], [[0], [1], [2], [3]], [[0], [1]]], 4),
    ("mult2", [[[0, 2], [1], [3]], [[0, 4], [1, 5], [2], [3], [6], [7]], [[0], [1]]], 6),
])
def test_depthwise_conv(capsys, tmp_path, variant, fibers, dw_out):
    path = save(_depthwise_model(np.random.default_rng(13), variant), tmp_path / f"dw_{variant}.onnx")
    small, rep = _compress(capsys, path, tmp_path)
    assert [ly["fibers"] for ly in rep["layers"]] == fibers
    assert [ly["nodes_after"] for ly in rep["layers"]] == [3, dw_out, 2]
    b = _check_written(path, small, (3, 6, 6), rep)
    assert initializer(b, "W1").shape == (3, 3, 3, 3)
    assert initializer(b, "W3").shape == (2, dw_out)


# ------------------------------------------------ BatchNorm1d after Linear
@pytest.fixture(scope="module")
def torch_bn1d(tmp_path_factory):
    """Linear(5, 6) -> BatchNorm1d -> ReLU -> Linear(3).  Units 1, 4: same row,
    bias and BN; 0, 2: same row and bias, BN gamma differs."""
    import torch

    torch.manual_seed(1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.bn(self.fc1(x))))

    m = M().eval()
    with torch.no_grad():
        bn = m.bn
        bn.weight.copy_(torch.rand(6) + 0.5)
        bn.bias.copy_(torch.randn(6) * 0.3)
        bn.running_mean.copy_(torch.randn(6) * 0.2)
        bn.running_var.copy_(torch.rand(6) + 0.5)
        for i, j in ((1, 4), (0, 2)):
            m.fc1.weight[j], m.fc1.bias[j] = m.fc1.weight[i], m.fc1.bias[i]
            for p in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                p[j] = p[i]
        bn.weight[2] = bn.weight[0] * 1.5
    d = tmp_path_factory.mktemp("bn1d")
    x = torch.randn(2, 5)
    return {dyn: torch_export(m, x, d / f"bn1d_{dyn}.onnx", dynamo=dyn) for dyn in (True, False)}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_linear_batchnorm1d(capsys, tmp_path, torch_bn1d, dynamo):
    path = torch_bn1d[dynamo]
    small, rep = _compress(capsys, path, tmp_path)
    assert [ly["fibers"] for ly in rep["layers"]] == [[[0], [1, 4], [2], [3], [5]], [[0], [1], [2]]]
    # the base: Linear(5, 5) + Linear(3, 5), any BatchNorm folded or sliced
    assert rep["params_after"] in (5 * 5 + 5 + 3 * 5 + 3, 5 * 5 + 5 + 4 * 5 + 3 * 5 + 3)
    _check_written(path, small, (5,), rep)


# ------------------------------------------- conv bias as a separate Add
def _conv_add_model():
    """Conv without bias, then Add of a (1, C, 1, 1) constant; channels 1 and 3 planted equal."""
    rng = np.random.default_rng(17)
    W1 = rng.normal(0, 0.5, (4, 2, 3, 3))
    W1[3] = W1[1]
    b1 = rng.normal(0, 0.3, (1, 4, 1, 1))
    b1[0, 3] = b1[0, 1]
    W2, b2 = rng.normal(0, 0.5, (3, 4)), rng.normal(0, 0.3, 3)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b1"], ["cb"], name="conv_bias"),
             helper.make_node("Relu", ["cb"], ["r"], name="relu"),
             helper.make_node("GlobalMaxPool", ["r"], ["g"], name="gmp"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2", "b2"], ["y"], name="fc", transB=1)]
    inits = [_init("W1", W1), _init("b1", b1), _init("W2", W2), _init("b2", b2)]
    return finish(helper.make_graph(nodes, "conv_add", [_vi("x", ["N", 2, 5, 5])], [_vi("y", ["N", 3])], inits))


def test_conv_bias_as_broadcast_add(capsys, tmp_path):
    """Conv without bias, then Add of a (1, C, 1, 1) constant (a common export
    pattern): the Add is the layer's bias and is sliced with the fibers."""
    m = _conv_add_model()
    path = save(m, tmp_path / "conv_add.onnx")
    small, rep = _compress(capsys, path, tmp_path)
    assert rep["layers"][0]["fibers"] == [[0], [1, 3], [2]]
    assert rep["params_after"] == 3 * 2 * 9 + 3 + 3 * 3 + 3
    b = _check_written(path, small, (2, 5, 5), rep)
    assert initializer(b, "b1").shape == (1, 3, 1, 1)
