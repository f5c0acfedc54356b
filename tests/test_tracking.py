"""The training tracker and the torch -> Network converter."""
from __future__ import annotations

import csv

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fibgraph.errors import InputError  # noqa: E402
from fibgraph.planted import planted_mlp  # noqa: E402
from fibgraph.theorems import torch_mlp  # noqa: E402
from fibgraph.tracking import FIELDS, FiberTracker, layer_stats  # noqa: E402
from importers.torch_net import network_from_torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(seed=0, widths=(6, 8, 7, 3), act=nn.ReLU):
    torch.manual_seed(seed)
    mods = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), act()]
    return nn.Sequential(*mods[:-1])


# ------------------------------------------------------------------ converter
def test_converter_mlp_matches_the_module():
    m = _mlp(act=nn.Tanh)
    net = network_from_torch(m)
    assert net.input_units == 6 and [ly.n_out for ly in net.layers] == [8, 7, 3]
    assert [ly.name for ly in net.layers] == ["0.weight", "2.weight", "4.weight"]
    assert [ly.is_output for ly in net.layers] == [False, False, True]
    assert not net.layers[0].homogeneous and net.layers[0].activation == "Tanh"
    np.testing.assert_array_equal(net.layers[1].weight[:, :, 0], m[2].weight.detach().double().numpy())
    np.testing.assert_array_equal(net.layers[1].bias, m[2].bias.detach().double().numpy())
    assert network_from_torch(_mlp()).layers[0].homogeneous


def test_converter_cnn_layout_and_batchnorm_fold():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.Tanh()), nn.Flatten(),
                        nn.Linear(3 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-1, 1)
        cnn[1].running_var.uniform_(0.5, 2)
        cnn[1].weight.uniform_(0.5, 2)
    cnn.eval()
    net = network_from_torch(cnn)
    assert net.input_units == 2
    assert [ly.kind for ly in net.layers] == ["conv", "conv", "dense", "dense"]
    assert [ly.weight.shape for ly in net.layers] == [(4, 2, 9), (3, 4, 9), (5, 3, 9), (2, 5, 1)]
    assert net.layers[1].name == "4.0.weight"
    assert net.layers[0].homogeneous and not net.layers[1].homogeneous
    # folded BN: the layer's pre-activation equals BN(conv(x)) (per channel, at every position)
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        ref = cnn[1](cnn[0](x)).double().numpy()
    ly = net.layers[0]
    patches = nn.functional.unfold(x.double(), 3)                       # (N, 2*9, positions)
    z = np.einsum("ok,nkp->nop", ly.weight.reshape(4, -1), patches.numpy()) + ly.bias[None, :, None]
    np.testing.assert_allclose(z.reshape(ref.shape), ref, atol=1e-5)
    # dense after flatten: feature (c, p) belongs to unit c (torch flattens channel-major)
    W = cnn[6].weight.detach().double().numpy()
    np.testing.assert_array_equal(net.layers[2].weight[:, 1, :], W[:, 9:18])


@pytest.mark.parametrize("model, needle", [
    (nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4)), "LSTM"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU()), "groups=2"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(6, 2)), "not flattened"),
    (nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 2)), "Softmax"),
    (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)), "5 features"),
    (nn.Sequential(nn.ReLU()), "no Linear"),
])
def test_converter_refuses_what_it_cannot_map(model, needle):
    with pytest.raises(InputError, match=needle):
        network_from_torch(model)


def test_converter_refuses_custom_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) + x

    with pytest.raises(InputError, match="nn.Sequential"):
        network_from_torch(Net())


# -------------------------------------------------------------------- tracker
def test_layer_stats():
    s = layer_stats([0, 0, 1, 2, 2, 2, 3])
    assert s == {"units": 7, "classes": 4, "nontrivial_classes": 2, "nontrivial_units": 5,
                 "nontrivial_fraction": 5 / 7, "largest_class": 3}


def test_tracker_recovers_planted_symmetries(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [6, 8, 7, 3]
    F = [None, [0, 0, 0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4, 5], None]      # fibers only
    P = [None, [0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 5], None]      # strict covers
    fib_model = torch_mlp(planted_mlp(rng, sizes, F, None), "relu").float()
    cov_model = torch_mlp(planted_mlp(rng, sizes, P, P), "relu").float()
    tr = FiberTracker(eps=(0, 0.1), symmetries=("fibration", "opfibration", "covering", "covering-strict"))
    tr(fib_model, 0, accuracy=0.5)
    tr(cov_model, 1, accuracy=0.75)
    assert len(tr.rows) == 2 * 2 * 4 * 2            # calls x hidden layers x symmetries x eps
    row = lambda e, sym, eps, l: tr.table(sym, eps, l)[[r["epoch"] for r in tr.table(sym, eps, l)].index(e)]  # noqa: E731
    assert row(0, "fibration", 0, 1)["classes"] == 6 and row(0, "fibration", 0, 1)["largest_class"] == 3
    assert row(0, "fibration", 0, 2)["nontrivial_units"] == 2
    assert row(0, "covering-strict", 0, 1)["classes"] == 8      # fibers only: no covers
    for sym in ("fibration", "opfibration", "covering", "covering-strict"):
        assert row(1, sym, 0, 1)["classes"] == 7, sym
        assert row(1, sym, 0, 2)["nontrivial_fraction"] == pytest.approx(2 / 7), sym
    np.testing.assert_array_equal(tr.labels[(1, 1, "covering-strict", 0.0)], P[1])
    # CSV: tidy, one row per epoch x layer x symmetry x eps, extra values appended
    path = tr.to_csv(tmp_path / "t.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FIELDS + ["accuracy"]
    assert len(rows) == len(tr.rows)
    assert {(r["epoch"], r["layer"], r["symmetry"], r["eps"]) for r in rows}.__len__() == len(rows)
    assert rows[-1]["accuracy"] == "0.75"
    png = tr.plot(tmp_path / "t.png", metric_key="accuracy")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tracker_during_training_sees_the_cover_persist_and_fibers_coarsen():
    rng = np.random.default_rng(1)
    sizes = [5, 6, 5, 3]
    P = [None, [0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1], None]
    model = torch_mlp(planted_mlp(rng, sizes, P, P), "tanh")
    X, T = torch.as_tensor(rng.normal(size=(32, 5))), torch.as_tensor(rng.normal(size=(32, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tr = FiberTracker(eps=0, symmetries=("covering-strict",))
    for epoch in range(6):
        tr(model, epoch)
        opt.zero_grad()
        (0.5 * ((model(X) - T) ** 2).sum()).backward()
        opt.step()
    cls = [r["classes"] for r in tr.rows]
    assert cls == [3, 2] * 6
    assert [r["coarsens_previous"] for r in tr.rows[2:]] == [True] * 10


def test_tracker_takes_a_network_and_rejects_bad_settings():
    net = network_from_torch(_mlp())
    tr = FiberTracker(eps=0.05, symmetries="fibration")
    assert len(tr(net, 0)) == 2
    with pytest.raises(InputError, match="unknown symmetry"):
        FiberTracker(symmetries=("fibrations",))
    with pytest.raises(InputError, match="eps"):
        FiberTracker(eps=(0, 2.5))
    with pytest.raises(InputError, match="nn.Sequential"):
        FiberTracker()(nn.Linear(3, 3), 0)
    with pytest.raises(InputError, match="nothing recorded"):
        FiberTracker().plot("x.png")


def test_converter_agrees_with_the_onnx_importer(tmp_path):
    """The same model read from torch and from its ONNX export gives the same Network."""
    import warnings

    from importers.onnx_in import import_onnx

    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1),
                        nn.Tanh(), nn.Flatten(), nn.Linear(27, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    path = str(tmp_path / "cnn.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cnn, (torch.zeros(1, 2, 8, 8),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    a, b = network_from_torch(cnn), import_onnx(path).network
    assert a.input_units == b.input_units
    for la, lb in zip(a.layers, b.layers):
        assert (la.kind, la.weight.shape, la.homogeneous, la.is_output) == \
            (lb.kind, lb.weight.shape, lb.homogeneous, lb.is_output)
        np.testing.assert_allclose(la.weight, lb.weight, rtol=1e-6)
        np.testing.assert_allclose(la.bias, lb.bias, rtol=1e-6)
