"""Torch modules compressed to real smaller modules on the one (hypergraph)
path: export to ONNX in memory, colour and compress, rebuild the module with
the base's shapes; greedy eps (Algorithm 3) and compress-retune (Algorithm 2)
on torch modules."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fibgraph.errors import InputError  # noqa: E402
from fibgraph.retune import RetuneResult  # noqa: E402
from fibgraph.importers.torch_base import (compress_module, compress_retune, module_from_onnx,  # noqa: E402
                                  module_loss, n_params, retune, tune_module)
from fibgraph.importers.torch_export import export_model  # noqa: E402


def _duplicated_mlp(seed=0, scales=(1.0, 1.0, 1.0)):
    """64-24-16-10 ReLU MLP whose first hidden layer is 8 distinct units, each
    three times (copies scaled by ``scales``), and whose second is 16 random
    units."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        rows = torch.randn(8, 64, generator=g) * 0.3
        b = torch.randn(8, generator=g) * 0.1
        s = torch.tensor(scales).repeat_interleave(8)
        m[0].weight.copy_(rows.repeat(3, 1) * s[:, None])
        m[0].bias.copy_(b.repeat(3) * s)
    return m.eval()


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    p = rng.permutation(len(y))
    tr, va = p[:1000], p[1000:1400]
    return (x[tr], y[tr]), (x[va], y[va])


def test_exact_compression_gives_smaller_linear_shapes_and_the_same_function():
    m = _duplicated_mlp(0)
    small, base, col = compress_module(m)
    assert isinstance(small, nn.Sequential) and small is not m
    lin = [mod for mod in small if isinstance(mod, nn.Linear)]
    assert [tuple(li.weight.shape) for li in lin] == [(8, 64), (16, 8), (10, 16)]
    assert all(isinstance(small[i], nn.ReLU) for i in (1, 3))
    assert n_params(small) < n_params(m)
    assert n_params(m) == 64 * 24 + 24 + 24 * 16 + 16 + 16 * 10 + 10          # the original is untouched
    x = torch.randn(50, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-4, atol=1e-5)
    # the base ONNX model has the module's shapes
    shapes = {t.name.split("__base")[0]: tuple(t.dims) for t in base.graph.initializer}
    assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == shapes


def test_scaled_copies_merge_exactly_when_the_path_rescales():
    """Copies scaled by 2 and 0.5 are a fiber only through the rescaling merge
    (relu(s z) = s relu(z): the outgoing weights take the factor).  Whether
    the hypergraph path rescales is what its compressor reports; either way
    the rebuilt module computes the original function."""
    from fibgraph.importers.tuning import DagCompressor

    m = _duplicated_mlp(0, (1.0, 2.0, 0.5))
    rescales = "no rescaling merge on the hypergraph" not in DagCompressor(export_model(m, torch.zeros(1, 64))).notes
    small, _, _ = compress_module(m, {"0.weight": 1e-9})
    n = 8 if rescales else 24
    assert [tuple(li.weight.shape) for li in small if isinstance(li, nn.Linear)] == [(n, 64), (16, n), (10, 16)]
    x = torch.randn(20, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-4, atol=1e-5)


def test_a_cnn_compresses_to_smaller_conv_layers():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(72, 4)).eval()
    with torch.no_grad():
        cnn[0].weight[3:] = cnn[0].weight[:3]
        cnn[0].bias[3:] = cnn[0].bias[:3]
    with pytest.raises(InputError, match="example="):
        compress_module(cnn)
    small, _, _ = compress_module(cnn, example=torch.zeros(2, 1, 8, 8))
    assert [type(mod) for mod in small] == [type(mod) for mod in cnn]
    assert tuple(small[0].weight.shape) == (3, 1, 3, 3) and tuple(small[3].weight.shape) == (8, 3, 3, 3)
    assert small[3].padding == (1, 1)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), cnn(x), rtol=1e-4, atol=1e-5)


class _TwoLinear(nn.Module):
    """A module with its own forward on (batch, T, features): exported as
    MatMul with transposed weight copies (not named by the state dict)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_matmul_exports_with_transposed_weights_are_rebuilt():
    torch.manual_seed(0)
    t = _TwoLinear().eval()
    with torch.no_grad():
        t.a.weight[3:] = t.a.weight[:3]
        t.a.bias[3:] = t.a.bias[:3]
    ex = torch.zeros(1, 4, 5)
    assert "MatMul" in [n.op_type for n in export_model(t, ex).graph.node]
    small, _, _ = compress_module(t, example=ex)
    assert isinstance(small, _TwoLinear)
    assert tuple(small.a.weight.shape) == (3, 5) and tuple(small.b.weight.shape) == (3, 3)
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(small(x), t(x), rtol=1e-4, atol=1e-5)


def test_compressed_module_exports_to_onnx_and_runs(tmp_path):
    import onnxruntime as ort

    m = _duplicated_mlp(1)
    small, base, _ = compress_module(m, {"2.weight": 0.4})
    path = str(tmp_path / "small.onnx")
    with torch.no_grad():
        torch.onnx.export(small.eval(), (torch.zeros(1, 64),), path, dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}},
                          opset_version=17)
    x = np.random.default_rng(0).normal(size=(7, 64)).astype(np.float32)
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = s.run(None, {"x": x})[0]
    with torch.no_grad():
        want = small(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the base computes what the module computes
    b = ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(b.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    lin = [mod for mod in small if isinstance(mod, nn.Linear)]
    assert lin[0].out_features == 8 and lin[1].out_features < 16


def test_what_cannot_be_rebuilt_is_refused():
    # a base with nodes of its own (LayerNorm over merged units needs multiplicities)
    m = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        m[0].weight[4:] = m[0].weight[:4]
        m[0].bias[4:] = m[0].bias[:4]
    with pytest.raises(InputError, match="OnnxModule"):
        compress_module(m, fallback=False, pin=False)
    # without pinning the base comes back as the ONNX interpreter, and the report says which module blocks
    from fibgraph.importers.onnx.to_torch import OnnxModule

    res = compress_module(m, pin=False)
    assert isinstance(res.module, OnnxModule) and "module '1'" in res.report["fallback"]
    assert res.report["params_after"] < n_params(m)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), m(x), rtol=1e-4, atol=1e-5)
    # by default the units the LayerNorm reads would be kept whole, but that leaves every
    # parameter here (nothing else merges): the interpreter of the smaller base, and why
    res = compress_module(m)
    assert isinstance(res.module, OnnxModule) and res.report["exact_for_torch"] == []
    assert "kept whole" in res.report["fallback"] and "leave every parameter" in res.report["fallback"]
    assert res.report["params_after"] < n_params(m)
    with pytest.raises(InputError, match="nn.Module"):
        compress_module("model.onnx")
    with pytest.raises(InputError, match="not in the model"):
        compress_module(_duplicated_mlp(0), {"9.weight": 0.1})


def test_import_torch_reads_the_module_as_a_hypergraph(tmp_path):
    from fibgraph.importers.dag_api import colour_dag, weight_entries
    from fibgraph.importers.onnx.importer import DagImport
    from fibgraph.importers.torch_export import import_torch

    m = _duplicated_mlp(3)
    keep = tmp_path / "m.onnx"
    imp = import_torch(m, torch.zeros(2, 64), keep=str(keep))
    assert isinstance(imp, DagImport) and keep.exists()
    ents = weight_entries(imp)
    assert [(w, ids.size) for w, _, ids, _ in ents] == [("0.weight", 24), ("2.weight", 16), ("4.weight", 10)]
    col = colour_dag(imp, "fibration")
    assert np.unique(col.labels[ents[0][2]]).size == 8            # the planted copies: 8 fibers of 3


def test_module_from_onnx_round_trip_keeps_weights():
    m = _duplicated_mlp(2)
    again = module_from_onnx(export_model(m, torch.zeros(1, 64)), m)
    assert again is not m
    for (na, a), (nb, b) in zip(m.named_parameters(), again.named_parameters()):
        assert na == nb
        torch.testing.assert_close(a, b)


def test_retune_restores_the_best_state(digits):
    train, val = digits
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    start = module_loss(m, val)[0]
    info = retune(m, train, val, lr=1e-2, max_epochs=6, patience=2)
    assert info["val_loss"] == pytest.approx(module_loss(m, val)[0], rel=1e-6)
    assert info["val_loss"] <= start and info["val_loss"] == pytest.approx(min(info["val_loss"], start))


def test_compress_retune_returns_a_smaller_module_within_the_tolerances(digits, tmp_path):
    train, val = digits
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))
    retune(m, train, val, lr=1e-2, max_epochs=15, patience=3)
    rho, tau = 0.1, 0.02
    res = compress_retune(m, train, val, q=1.05, rho=rho, tau=tau, steps=5, max_iters=2,
                          retune_kw=dict(lr=1e-3, max_epochs=3, patience=1))
    assert isinstance(res, RetuneResult) and res.module is res.model
    assert res.history and res.params < res.params0 == n_params(m)
    assert res.params == n_params(res.model)
    lin = [mod for mod in res.model if isinstance(mod, nn.Linear)]
    assert lin[0].in_features == 64 and lin[-1].out_features == 10
    assert lin[0].out_features < 48 or lin[1].out_features < 48
    for a, b in zip(lin[:-1], lin[1:]):
        assert a.out_features == b.in_features
    # the returned model is an accepted model compressed within tau: loss bound
    assert res.loss <= (1 + rho) * (1 + tau) * res.loss0 + 1e-9
    assert res.loss == pytest.approx(module_loss(res.model, val)[0], rel=1e-5)
    for h in res.history:
        assert h["accepted"] == (h["loss_retuned"] <= (1 + rho) * res.loss0)
    path = str(tmp_path / "r.onnx")
    torch.onnx.export(res.model, (torch.zeros(1, 64),), path, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    import onnxruntime as ort

    x = val[0][:9]
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    base = ort.InferenceSession(res.onnx.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = res.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(base, want, rtol=1e-4, atol=1e-5)          # result.onnx is result.model


def test_tune_module_respects_tau(digits):
    train, val = digits
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    retune(m, train, val, lr=1e-2, max_epochs=8, patience=2)
    r = tune_module(m, val, tau=0.01, steps=6)
    assert set(r.eps) == {"0.weight"} and r.loss <= r.limit
    small, _, _ = compress_module(m, r.eps)
    assert module_loss(small, val)[0] <= 1.01 * module_loss(m, val)[0] + 1e-5
    assert r.loss == pytest.approx(module_loss(small, val)[0], rel=1e-5)


class _Residual(nn.Module):
    """h = relu(fc1 x); out(h + back(relu(mid h))): a residual stream."""

    def __init__(self):
        super().__init__()
        self.fc1, self.mid, self.back, self.out = nn.Linear(6, 8), nn.Linear(8, 10), nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(h + self.back(torch.relu(self.mid(h))))


def test_a_residual_module_with_its_own_forward_is_rebuilt():
    """The stream's writers (fc1, back) keep one partition: planted copies in
    both merge, mid's copies merge; the rebuilt module computes the original."""
    torch.manual_seed(0)
    r = _Residual().eval()
    with torch.no_grad():
        for lin, k in ((r.fc1, 4), (r.back, 4), (r.mid, 5)):
            lin.weight[k:2 * k] = lin.weight[:k]
            lin.bias[k:2 * k] = lin.bias[:k]
        r.mid.weight[:, 4:] = 0.0                # mid reads the stream's copies alike
        r.back.weight[:, 5:] = 0.0               # back reads mid's copies alike
    small, _, _ = compress_module(r)
    assert isinstance(small, _Residual)
    assert [tuple(getattr(small, n).weight.shape) for n in ("fc1", "mid", "back", "out")] == \
        [(4, 6), (5, 4), (4, 5), (3, 4)]
    x = torch.randn(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(x), r(x), rtol=1e-4, atol=1e-5)
