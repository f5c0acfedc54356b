"""BatchNormalization left unfolded (Conv -> BatchNormalization -> Relu, as
hand-built graphs, torch exports without constant folding or in training mode,
and tf2onnx write it) on the hypergraph path (issue 11, item 7):
``fibgraph.importers.dag_api.compress_dag_model`` / ``color_dag_model``.

* Planted channel fibers (identical filters, bias AND BatchNorm parameters)
  are recovered exactly; the base keeps one BatchNorm entry per fiber, passes
  ``onnx.checker`` (full_check), loads in onnxruntime and computes the
  original's outputs within 1e-5 (relative) at a batch size other than the
  probe's.  Nameless nodes (the onnx.helper default) included: the writer
  used to find nodes by name, so a nameless BatchNorm was never shrunk and the
  base failed with "BatchNormalization: Dimension mismatch ... 16 and 6".
* Equal filters whose BatchNorm maps differ stay apart; equal maps written
  with different raw (scale, B, mean, var) merge and stay exact.
* BatchNorm1d after Gemm, InstanceNormalization, training-mode BatchNorm
  (batch statistics; unused running-statistics outputs).
* torch: legacy exporter without constant folding and in training mode, the
  dynamo exporter with ``optimize=False`` (both keep BatchNormalization),
  BatchNorm1d after Linear.
* eps > 0: the base BatchNorm of a group is the group's mean map
  (mean of scale / sqrt(var + epsilon) and of B - mul * mean), not the map
  of the averaged raw parameters.
"""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from fibgraph.importers.dag_api import color_dag_model, compress_dag_model
from fibgraph.importers.onnx.importer import import_dag

RTOL = 1e-5
BN_EPS = 1e-5
FIB = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 5, 5, 5])     # 16 channels, 6 fibers


def _as_set(classes):
    return {frozenset(int(u) for u in c) for c in classes}


def _classes(labels):
    labels = np.asarray(labels)
    return _as_set(np.nonzero(labels == v)[0] for v in np.unique(labels))


def _meet(a, b):
    return _classes(np.unique(np.stack([a, b], 1), axis=0, return_inverse=True)[1].reshape(-1))


def _bn_params(rng, fib, n):
    """(scale, B, mean, var) constant on the classes of ``fib`` (``n`` classes)."""
    return [rng.uniform(0.5, 1.5, n)[fib], rng.standard_normal(n)[fib],
            rng.standard_normal(n)[fib], rng.uniform(0.5, 2.0, n)[fib]]


def _model(seed=0, fib=FIB, bn=None, op="BatchNormalization", names=False, opset=17, stem="conv",
           training=False, stats_output=False):
    """stem -> ``op`` -> Relu -> head, with planted fibers ``fib`` in the stem.

    stem "conv": x (N, 3, 8, 8) -> Conv 3x3 pad 1 (with bias) -> (N, C, 8, 8),
    head Conv 3x3 -> (N, 4, 6, 6); stem "gemm": x (N, 5) -> Gemm -> (N, C),
    head Gemm -> (N, 4).  ``bn``: the BatchNorm parameters (default: planted
    on ``fib``).  ``names``: name the nodes (onnx.helper leaves them empty)."""
    rng = np.random.default_rng(seed)
    nf = int(fib.max()) + 1
    C = fib.size
    f32 = (lambda a: np.asarray(a, np.float32))
    inits = {}
    if stem == "conv":
        inits["W"] = rng.standard_normal((nf, 3, 3, 3))[fib]
        inits["b"] = rng.standard_normal(nf)[fib]
        x_shape, y_shape = ["N", 3, 8, 8], ["N", 4, 6, 6]
        first = helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1])
        inits["W2"] = rng.standard_normal((4, C, 3, 3))
        last = helper.make_node("Conv", ["r", "W2"], ["y"])
    else:
        inits["W"] = rng.standard_normal((nf, 5))[fib]
        inits["b"] = rng.standard_normal(nf)[fib]
        x_shape, y_shape = ["N", 5], ["N", 4]
        first = helper.make_node("Gemm", ["x", "W", "b"], ["c"], transB=1)
        inits["W2"] = rng.standard_normal((4, C))
        inits["b2"] = rng.standard_normal(4)
        last = helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)]
    if op == "InstanceNormalization":
        sc, B = (bn or _bn_params(rng, fib, nf))[:2]
        inits.update(sc=sc, B=B)
        norm = helper.make_node(op, ["c", "sc", "B"], ["n"])
    else:
        sc, B, mu, var = bn or _bn_params(rng, fib, nf)
        inits.update(sc=sc, B=B, mu=mu, var=var)
        outs = ["n"]
        kw = {}
        if training:
            kw["training_mode"] = 1
            outs = ["n", "run_mean", "run_var"]
            if stats_output:
                outputs.append(helper.make_tensor_value_info("run_mean", TensorProto.FLOAT, [C]))
        norm = helper.make_node(op, ["c", "sc", "B", "mu", "var"], outs, epsilon=BN_EPS, **kw)
    nodes = [first, norm, helper.make_node("Relu", ["n"], ["r"]), last]
    if names:
        for k, n in enumerate(nodes):
            if names is True or k >= 2:
                n.name = f"{n.op_type.lower()}{k}"
    g = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          outputs, [numpy_helper.from_array(f32(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})


def _compress(model, tmp_path, **kw):
    """compress_dag_model on ``model``; the base is checked (full_check) and loaded."""
    src, dst = tmp_path / "m.onnx", tmp_path / "base.onnx"
    onnx.save(model, str(src))
    report = compress_dag_model(str(src), str(dst), **kw)
    base = onnx.load(str(dst))
    onnx.checker.check_model(base, full_check=True)
    ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"])
    return report, base


def _assert_same_outputs(a, b, batch=3, seed=1):
    """Outputs equal within RTOL relative at ``batch`` (the probe ran at batch 1)."""
    i = a.graph.input[0].type.tensor_type.shape.dim
    shape = [batch] + [d.dim_value for d in i[1:]]
    for r in range(2):
        x = np.random.default_rng(seed + r).standard_normal(shape)
        for p, q in zip(_run(a, x), _run(b, x)):
            assert p.shape == q.shape
            diff = float(np.max(np.abs(np.asarray(p, np.float64) - q)))
            assert diff <= RTOL * float(np.max(np.abs(p))), (diff, float(np.max(np.abs(p))))


def _fibers(report, weight="W"):
    return _as_set(next(ly for ly in report["layers"] if ly["weight"] == weight)["fibers"])


def _norm_params(base, op="BatchNormalization"):
    node = next(n for n in base.graph.node if n.op_type == op)
    vals = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    return [vals[x].astype(np.float64) for x in node.input[1:]]


def _map(sc, B, mu, var):
    mul = np.asarray(sc, np.float64) / np.sqrt(np.asarray(var, np.float64) + BN_EPS)
    return mul, np.asarray(B, np.float64) - mul * np.asarray(mu, np.float64)


# ------------------------------------------------------------ hand-built graphs
@pytest.mark.parametrize("names", [False, True, "head"])
@pytest.mark.parametrize("opset", [9, 15, 17])
def test_planted_conv_bn_fibers(tmp_path, names, opset):
    """names="head" is the issue's case: before the fix the nameless BatchNorm's
    record found the (nameless) Conv, the BatchNorm kept 16 entries and the base
    failed with "Dimension mismatch in unification between 16 and 6"."""
    m = _model(seed=opset, names=names, opset=opset)
    report, base = _compress(m, tmp_path)
    assert _fibers(report) == _classes(FIB)
    assert report["params_after"] < report["params_before"]
    # one BatchNorm entry per fiber, and the conv keeps one filter per fiber
    nf = int(FIB.max()) + 1
    assert all(p.shape == (nf,) for p in _norm_params(base))
    conv = next(n for n in base.graph.node if n.op_type == "Conv")
    W = next(numpy_helper.to_array(t) for t in base.graph.initializer if t.name == conv.input[1])
    assert W.shape[0] == nf
    _assert_same_outputs(m, base)


def test_bn_params_differ_keep_channels_apart(tmp_path):
    """Equal filters (and biases) in FIB, but the BatchNorm maps of channels 2
    (scale), 7 (B) and 13, 14 (running mean) differ from their fiber-mates':
    the base keeps the meet, not FIB."""
    rng = np.random.default_rng(3)
    sc, B, mu, var = _bn_params(rng, FIB, int(FIB.max()) + 1)
    sc, B, mu = sc.copy(), B.copy(), mu.copy()
    sc[2] *= 1.5
    B[7] += 0.7
    mu[13:15] -= 0.4
    bn_lab = np.arange(16)
    bn_lab[[0, 1]] = 0
    bn_lab[[3, 4]] = 3
    bn_lab[[5, 6, 8]] = 5
    bn_lab[[10, 11]] = 10
    bn_lab[[12, 15]] = 12
    bn_lab[14] = 13
    m = _model(seed=3, bn=[sc, B, mu, var], names=True)
    report, base = _compress(m, tmp_path)
    want = _meet(FIB, bn_lab)
    assert _fibers(report) == want
    assert len(want) == 9 and all(p.shape == (9,) for p in _norm_params(base))
    _assert_same_outputs(m, base)


def test_equal_map_different_raw_params_merge_exactly(tmp_path):
    """Channels whose (scale, B, mean, var) differ but whose map
    mul * x + add is the same compute the same function: they merge, and the
    base's BatchNorm applies their map (averaging the raw parameters one by
    one would not: mean(scale) / sqrt(mean(var) + eps) != mul)."""
    rng = np.random.default_rng(4)
    nf = int(FIB.max()) + 1
    sc, B, mu, var = _bn_params(rng, FIB, nf)
    mul, add = _map(sc, B, mu, var)
    var2 = var * rng.uniform(0.25, 4.0, 16)                 # other raw parameters, same map
    mu2 = mu + rng.standard_normal(16)
    sc2 = mul * np.sqrt(var2 + BN_EPS)
    B2 = add + mul * mu2
    m = _model(seed=4, bn=[sc2, B2, mu2, var2], names=True)
    report, base = _compress(m, tmp_path)
    assert _fibers(report) == _classes(FIB)
    mul_h, add_h = _map(*_norm_params(base))
    fibers = sorted(_fibers(report), key=min)
    assert np.allclose(mul_h, [mul[min(f)] for f in fibers], rtol=1e-5)
    assert np.allclose(add_h, [add[min(f)] for f in fibers], rtol=1e-5, atol=1e-6)
    _assert_same_outputs(m, base)


def test_batchnorm1d_after_gemm(tmp_path):
    m = _model(seed=5, stem="gemm", names=False)
    report, base = _compress(m, tmp_path)
    assert _fibers(report) == _classes(FIB)
    assert all(p.shape == (6,) for p in _norm_params(base))
    _assert_same_outputs(m, base, batch=7)


def test_instance_norm(tmp_path):
    """InstanceNormalization: per-sample statistics of each channel, then
    (scale, B): a fiber shares them; a channel whose scale differs stays apart."""
    rng = np.random.default_rng(6)
    sc, B = _bn_params(rng, FIB, int(FIB.max()) + 1)[:2]
    sc = sc.copy()
    sc[15] *= 0.5
    m = _model(seed=6, op="InstanceNormalization", bn=[sc, B])
    report, base = _compress(m, tmp_path)
    lab = FIB.copy()
    lab[15] = 99
    assert _fibers(report) == _classes(lab)
    assert all(p.shape == (7,) for p in _norm_params(base, "InstanceNormalization"))
    _assert_same_outputs(m, base)


def test_training_mode_bn(tmp_path):
    """training_mode=1: each channel is normalised by its own batch statistics
    (a function of that channel alone), so fibers share (scale, B) only: the
    running mean/var (which only feed the unused running-statistics outputs)
    may differ.  Exact at batch 3 although the probe ran at batch 1."""
    rng = np.random.default_rng(7)
    sc, B, mu, var = _bn_params(rng, FIB, int(FIB.max()) + 1)
    mu = mu + rng.standard_normal(16)
    m = _model(seed=7, bn=[sc, B, mu, var], training=True, opset=15, names=True)
    report, base = _compress(m, tmp_path)
    assert not report["barriers"]
    assert _fibers(report) == _classes(FIB)
    _assert_same_outputs(m, base)


def test_training_mode_bn_with_used_statistics_is_a_barrier(tmp_path):
    """A running-statistics output that is read is a second stream over the
    channels: the BatchNorm is a barrier, its channels are kept, the model is
    written unchanged in size and valid."""
    m = _model(seed=8, training=True, stats_output=True, opset=15)
    report, base = _compress(m, tmp_path)
    assert [b["op"] for b in report["barriers"]] == ["BatchNormalization"]
    assert len(_fibers(report)) == 16
    _assert_same_outputs(m, base)


# ------------------------------------------------------------ eps > 0
def test_eps_bn_base_is_the_mean_map(tmp_path):
    """Fiber-mates' BatchNorm maps differ by ~0.5% while their raw scale and
    var differ a lot: at eps = 0 they stay apart; at eps = 0.05 the planted
    fibers come back and the base BatchNorm of each is the MEAN MAP of its
    channels (raw averaging would be off by several percent).  An eps file
    entry for the conv alone gives the BatchNorm the conv's criterion."""
    rng = np.random.default_rng(9)
    nf = int(FIB.max()) + 1
    sc, B, mu, var = _bn_params(rng, FIB, nf)
    mul, add = _map(sc, B, mu, var)
    mul = mul * (1 + 0.005 * rng.standard_normal(16))
    var2 = var * rng.uniform(0.25, 4.0, 16)
    sc2 = mul * np.sqrt(var2 + BN_EPS)
    B2 = add + mul * mu
    m = _model(seed=9, bn=[sc2, B2, mu, var2], names=True)
    mul, add = _map(*(np.asarray(v, np.float32) for v in (sc2, B2, mu, var2)))    # as stored
    rep0, _, _ = color_dag_model("m", eps=0.0, imp=import_dag(m))
    assert len(_fibers(rep0)) == 16
    for kw in ({"eps": 0.05}, {"eps": 0.0, "eps_table": {"W": 0.05}}):
        rep, _, col = color_dag_model("m", imp=import_dag(m), **kw)
        fibers = sorted(_fibers(rep), key=min)
        assert set(fibers) == _classes(FIB), kw
        base = col.base[0]
        onnx.checker.check_model(base, full_check=True)
        mul_h, add_h = _map(*_norm_params(base))
        want_mul = np.array([mul[sorted(f)].mean() for f in fibers])
        want_add = np.array([add[sorted(f)].mean() for f in fibers])
        assert np.allclose(mul_h, want_mul, rtol=1e-5), kw
        assert np.allclose(add_h, want_add, rtol=1e-5, atol=1e-6), kw


# ------------------------------------------------------------ torch exports
def _torch_cnn(seed, linear=False):
    import torch

    torch.manual_seed(seed)
    fib = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    if linear:
        net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                  torch.nn.Linear(8, 4))
        x = torch.randn(2, 5)
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 4, 3))
        x = torch.randn(2, 3, 8, 8)
    lin, bn = net[0], net[1]
    with torch.no_grad():
        lin.weight.copy_(lin.weight[fib])
        lin.bias.copy_(lin.bias[fib])
        bn.weight.copy_((torch.rand(4) + 0.5)[fib])
        bn.bias.copy_(torch.randn(4)[fib])
        bn.running_mean.copy_(torch.randn(4)[fib])
        bn.running_var.copy_((torch.rand(4) + 0.5)[fib])
    return net.eval(), x, _classes(fib.numpy())


def _export(net, x, path, how):
    import contextlib
    import io
    import warnings

    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if how == "dynamo":
            torch.onnx.export(net, (x,), str(path), dynamo=True, optimize=False, input_names=["x"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        else:
            kw = ({"training": torch.onnx.TrainingMode.TRAINING} if how == "training"
                  else {"do_constant_folding": False})
            torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, **kw)
    return onnx.load(str(path))


@pytest.mark.parametrize("how,linear", [("nofold", False), ("training", False), ("dynamo", False),
                                        ("nofold", True)])
def test_torch_unfolded_batchnorm(tmp_path, how, linear):
    pytest.importorskip("torch")
    if how == "dynamo":
        pytest.importorskip("onnxscript")
    net, x, want = _torch_cnn(10, linear=linear)
    m = _export(net, x, tmp_path / "export.onnx", how)
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1                                   # BatchNorm kept, not folded into the layer
    report, base = _compress(m, tmp_path)
    assert not report["barriers"]
    first = next(ly for ly in report["layers"] if ly["nodes_before"] == 8)
    assert _as_set(first["fibers"]) == want
    assert all(p.shape == (4,) for p in _norm_params(base))
    _assert_same_outputs(m, base, batch=5)
