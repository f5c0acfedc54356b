"""Torch MLPs compressed to real smaller modules; compress-retune (Algorithm 2)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from importers.torch_base import (compress_module, compress_retune, module_from_base,  # noqa: E402
                                  module_loss, n_params, network_from_mlp, retune, tune_module)


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


@pytest.mark.parametrize("scales,eps", [((1.0, 1.0, 1.0), {}),                     # exact fibers
                                        ((1.0, 2.0, 0.5), {"0.weight": 1e-9})])  # rescaling merge
def test_exact_compression_gives_smaller_linear_shapes_and_the_same_function(scales, eps):
    m = _duplicated_mlp(0, scales)
    small, base, _ = compress_module(m, eps)
    assert isinstance(small, nn.Sequential)
    lin = [mod for mod in small if isinstance(mod, nn.Linear)]
    assert [tuple(li.weight.shape) for li in lin] == [(8, 64), (16, 8), (10, 16)]
    assert all(isinstance(small[i], nn.ReLU) for i in (1, 3))
    assert n_params(small) < n_params(m)
    x = torch.randn(50, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-4, atol=1e-5)


def test_compressed_module_exports_to_onnx_and_runs(tmp_path):
    import onnxruntime as ort

    from importers.onnx_in import import_onnx

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
    net = import_onnx(path).network
    assert [ly.n_out for ly in net.layers] == [ly.n_out for ly in base.layers]
    assert net.layers[0].n_out == 8 and net.layers[1].n_out < 16


def test_network_from_mlp_refuses_what_it_cannot_map():
    from fibgraph.errors import InputError

    with pytest.raises(InputError):
        network_from_mlp(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    with pytest.raises(InputError):
        network_from_mlp(nn.Linear(4, 2))
    net = network_from_mlp(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    assert [ly.name for ly in net.layers] == ["1.weight", "3.weight"]
    assert not net.layers[0].homogeneous and net.layers[1].is_output


def test_module_from_base_round_trip_keeps_weights():
    m = _duplicated_mlp(2)
    net = network_from_mlp(m)
    again = module_from_base(net, m)
    for a, b in zip(m.parameters(), again.parameters()):
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
    assert res.history and res.params < res.params0
    lin = [mod for mod in res.model if isinstance(mod, nn.Linear)]
    assert lin[0].in_features == 64 and lin[-1].out_features == 10
    assert lin[0].out_features < 48 or lin[1].out_features < 48
    for a, b in zip(lin[:-1], lin[1:]):
        assert a.out_features == b.in_features
    # the returned model is an accepted model compressed within tau: loss bound
    assert res.loss <= (1 + rho) * (1 + tau) * res.loss0 + 1e-9
    assert res.loss == pytest.approx(module_loss(res.model, val)[0])
    path = str(tmp_path / "r.onnx")
    torch.onnx.export(res.model, (torch.zeros(1, 64),), path, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    import onnxruntime as ort

    x = val[0][:9]
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, res.model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_tune_module_respects_tau(digits):
    train, val = digits
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    retune(m, train, val, lr=1e-2, max_epochs=8, patience=2)
    r = tune_module(m, val, tau=0.01, steps=6)
    small, _, _ = compress_module(m, r.eps)
    assert module_loss(small, val)[0] <= 1.01 * module_loss(m, val)[0] + 1e-9
