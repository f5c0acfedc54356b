"""Fibration symmetry breaking on torch modules (fibgraph.importers.torch_break).

Planted covers (rows copied, columns divided equally: in- and out-balanced,
so they are covers, not only fibers) must be found and broken with the
function unchanged (< 1e-5), the representative holding the cover's summed
outgoing column, the other members fresh input rows and zero outgoing
columns; shapes unchanged; the CNN version on channels; the export route
for modules that are not Sequential chains agrees with the direct route."""
import copy
import sys
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import canonical, planted_layer  # noqa: E402

from fibgraph.breaking import lift_weight, plan_layer  # noqa: E402
from fibgraph.errors import InputError  # noqa: E402
from fibgraph.importers.torch_break import break_symmetry, find_covers, reinit_units  # noqa: E402

def _maxdiff(a, b):
    return float((a - b).detach().abs().max())


L1 = canonical([0, 1, 0, 2, 1, 0, 3])      # covers {0, 2, 5}, {1, 4}
L2 = canonical([0, 0, 1, 1, 2])            # covers {0, 1}, {2, 3}


def cover_mlp(seed=0, noise=0.0):
    """6 -> 7 -> 5 -> 3 ReLU MLP with planted covers L1, L2 (``noise``: each
    weight perturbed by that relative amount: near-covers)."""
    rng = np.random.default_rng(seed)
    W1, b1, _, _ = planted_layer(rng, np.arange(6), L1, split=0.0)
    W2, b2, _, _ = planted_layer(rng, L1, L2, split=0.0)
    W3, b3, _, _ = planted_layer(rng, L2, np.arange(3), split=0.0)
    net = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    for m, W, b in zip([net[0], net[2], net[4]], [W1, W2, W3], [b1, b2, b3]):
        W = W * (1 + noise * rng.standard_normal(W.shape))
        m.weight.data = torch.tensor(W, dtype=torch.float32)
        m.bias.data = torch.tensor(b, dtype=torch.float32)
    return net


class Wrapped(nn.Module):
    """The same MLP, not a Sequential: breaking goes through the ONNX export."""

    def __init__(self, seq):
        super().__init__()
        self.a, self.b, self.c = seq[0], seq[2], seq[4]

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_core_lift_sums_columns_and_averages_rows():
    W = np.arange(12.0).reshape(3, 4)
    out, b = lift_weight(W, plan_layer([0, 1, 0, 2]), plan_layer([0, 0, 1]), bias=np.array([1.0, 3.0, 5.0]))
    # rows {0, 1} averaged into row 0, row 1 zeroed (the caller re-initialises it);
    # columns {0, 2} summed into column 0, column 2 zero
    assert out.tolist() == [[2 + 4, 3, 0, 5], [0, 0, 0, 0], [8 + 10, 9, 0, 11]]
    assert b.tolist() == [2.0, 0.0, 5.0]


@pytest.mark.usefixtures("one_torch_thread")
def test_planted_covers_broken_function_unchanged():
    net = cover_mlp()
    old = copy.deepcopy(net)
    x = torch.randn(200, 6)
    y0 = old(x)
    rep = break_symmetry(net, x, eps=0.0, seed=1)
    assert rep["route"] == "chain"
    assert [ly["cover_sizes"] for ly in rep["layers"]] == [[3, 2], [2, 2], []]
    assert [ly["reinit"] for ly in rep["layers"]] == [[2, 4, 5], [1, 3], []]
    assert rep["max_output_change"] < 1e-5
    assert _maxdiff(net(x), y0) < 1e-5
    for a, b in zip(net.parameters(), old.parameters()):
        assert a.shape == b.shape
    W1o, W1 = old[0].weight.detach(), net[0].weight.detach()
    # the members' input rows now differ from the representative's and from before
    for rep_u, members in ((0, [2, 5]), (1, [4])):
        for m in members:
            assert not torch.allclose(W1[m], W1[rep_u], atol=1e-3)
            assert not torch.allclose(W1[m], W1o[m], atol=1e-3)
    # representative's outgoing column = the cover's summed columns; members' = 0
    W3o, W3 = old[4].weight.detach(), net[4].weight.detach()
    assert torch.allclose(W3[:, 0], W3o[:, [0, 1]].sum(1), atol=1e-6)
    assert torch.allclose(W3[:, 2], W3o[:, [2, 3]].sum(1), atol=1e-6)
    assert torch.all(W3[:, [1, 3]] == 0)
    W2o, W2 = old[2].weight.detach(), net[2].weight.detach()
    for r in (0, 2, 4):                          # the representatives' rows of layer 2
        assert torch.allclose(W2[r, 0], W2o[r, [0, 2, 5]].sum(), atol=1e-6)
        assert torch.allclose(W2[r, 1], W2o[r, [1, 4]].sum(), atol=1e-6)
        assert torch.all(W2[r, [2, 4, 5]] == 0)
    # fresh rows follow the default initialiser's bound 1/sqrt(fan_in)
    assert float(W1[[2, 4, 5]].abs().max()) <= 1 / np.sqrt(6) + 1e-7


@pytest.mark.usefixtures("one_torch_thread")
def test_fibration_option_and_covers_reported_without_change():
    net = cover_mlp()
    before = [p.detach().clone() for p in net.parameters()]
    plans = find_covers(net, symmetry="fibration")
    assert [p.cover_sizes() for p in plans] == [[3, 2], [2, 2], []]
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.usefixtures("one_torch_thread")
def test_seed_reproducible():
    a, b, c = cover_mlp(), cover_mlp(), cover_mlp()
    x = torch.randn(8, 6)
    break_symmetry(a, x, seed=7)
    break_symmetry(b, x, seed=7)
    break_symmetry(c, x, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)


@pytest.mark.usefixtures("one_torch_thread")
def test_export_route_agrees_with_chain_route():
    x = torch.randn(64, 6)
    seq, wrapped = cover_mlp(), Wrapped(cover_mlp())
    y0 = wrapped(x).detach()
    r1 = break_symmetry(seq, x, seed=0)
    r2 = break_symmetry(wrapped, x, seed=0)
    assert r2["route"] == "onnx"
    assert [ly["reinit"] for ly in r2["layers"]] == [ly["reinit"] for ly in r1["layers"]]
    assert _maxdiff(wrapped(x), y0) < 1e-5
    assert torch.allclose(wrapped.c.weight, seq[4].weight, atol=1e-6)


@pytest.mark.usefixtures("one_torch_thread")
def test_eps_near_covers_report_change_and_loss():
    net = cover_mlp(noise=1e-3)
    x = torch.randn(128, 6)
    y = torch.randint(0, 3, (128,))
    assert break_symmetry(copy.deepcopy(net), x, eps=0.0)["reinit"] == 0   # not exact covers
    rep = break_symmetry(net, x, eps=0.05, seed=0, data=(x, y))
    assert rep["reinit"] == 5
    assert 0 < rep["max_output_change"] < 0.05
    assert abs(rep["loss_after"] - rep["loss_before"]) < 0.05


@pytest.mark.usefixtures("one_torch_thread")
def test_cnn_channel_covers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    with torch.no_grad():
        net[0].weight[2] = net[0].weight[0]          # channels 0 and 2: one cover
        net[0].bias[2] = net[0].bias[0]
        net[3].weight[:, 2] = net[3].weight[:, 0]    # equal outgoing kernels (out-balanced)
    old = copy.deepcopy(net)
    x = torch.randn(16, 2, 10, 10)
    rep = break_symmetry(net, x, eps=0.0, seed=0)
    assert [ly["reinit"] for ly in rep["layers"]] == [[2], [], []]
    assert _maxdiff(net(x), old(x)) < 1e-5
    assert torch.allclose(net[3].weight[:, 0], 2 * old[3].weight[:, 0], atol=1e-6)
    assert torch.all(net[3].weight[:, 2] == 0)
    assert not torch.allclose(net[0].weight[2], old[0].weight[2])
    # a Linear after Flatten: its columns are grouped per channel
    with torch.no_grad():
        net2 = copy.deepcopy(old)
        net2[3].weight[1] = net2[3].weight[0]
        net2[3].bias[1] = net2[3].bias[0]
        Wl = net2[6].weight.view(2, 3, 4)
        Wl[:, 1] = Wl[:, 0]
    y0 = net2(x)
    rep = break_symmetry(net2, x, eps=0.0, seed=0)
    assert [ly["reinit"] for ly in rep["layers"]] == [[2], [1], []]
    assert _maxdiff(net2(x), y0) < 1e-5
    assert torch.all(net2[6].weight.view(2, 3, 4)[:, 1] == 0)


def test_reinit_units_and_bad_inputs():
    net = cover_mlp()
    reinit_units(net, {0: [3]}, seed=0)
    assert torch.all(net[2].weight[:, 3] == 0)
    with pytest.raises(InputError):
        reinit_units(net, {2: [0]})                      # the output layer
    with pytest.raises(InputError):
        break_symmetry(net, torch.randn(2, 6), symmetry="orbits")
    with pytest.raises(InputError):
        break_symmetry(net, torch.randn(2, 6), eps=3.0)


class WrappedCNN(nn.Module):
    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        return self.seq(x) * 1.0


@pytest.mark.usefixtures("one_torch_thread")
def test_cnn_export_route_and_refusals():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    with torch.no_grad():
        seq[0].weight[2] = seq[0].weight[0]
        seq[0].bias[2] = seq[0].bias[0]
        seq[3].weight[:, 2] = seq[3].weight[:, 0]
    net = WrappedCNN(seq)
    x = torch.randn(8, 2, 10, 10)
    y0 = net(x)
    rep = break_symmetry(net, x, eps=0.0, seed=0)
    assert rep["route"] == "onnx" and rep["reinit"] == 1
    assert _maxdiff(net(x), y0) < 1e-5
    assert torch.all(seq[3].weight[:, 2] == 0)
    # covers that reach an LSTM (planted fibers) are refused with one line, the module untouched
    from planted_nets import example_input, planted_lstm

    lstm, info = planted_lstm(0)
    before = [p.detach().clone() for p in lstm.parameters()]
    with pytest.raises(InputError, match="LSTM"):
        break_symmetry(lstm, example_input(info), symmetry="fibration")
    assert all(torch.equal(a, b) for a, b in zip(before, lstm.parameters()))
