"""The training tracker, and the torch -> hypergraph view it reads (fibgraph.importers.torch_analysis)."""
from __future__ import annotations

import csv

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fibgraph.errors import InputError  # noqa: E402
from fibgraph.planted import planted_mlp  # noqa: E402
from fibgraph.tracking import FIELDS, layer_stats  # noqa: E402
from fibgraph.tracking import FiberTracker as ViewTracker  # noqa: E402
from fibgraph.importers.torch_analysis import FiberTracker, read_view, torch_mlp, torch_view  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(seed=0, widths=(6, 8, 7, 3), act=nn.ReLU):
    torch.manual_seed(seed)
    mods = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), act()]
    return nn.Sequential(*mods[:-1])


# ------------------------------------------------------------------ the torch view
def test_torch_view_mlp_matches_the_module():
    m = _mlp(act=nn.Tanh)
    view = torch_view(m)                        # input read off the first Linear
    assert [ly.name for ly in view.layers] == ["0.weight", "2.weight", "4.weight"]
    assert [ly.units for ly in view.layers] == [8, 7, 3]
    assert [ly.output for ly in view.layers] == [False, False, True]
    # the edge weights into layer 2's units are the module's weight and bias
    g = view.graph
    dense = [b for b in g.blocks if b.dense and np.isin(b.dst, view.layers[1].nodes).all()]
    assert len(dense) == 1
    np.testing.assert_allclose(dense[0].weight[:, :, 0], m[2].weight.detach().double().numpy(), rtol=1e-6)
    bias = [b for b in g.blocks if not b.dense and np.isin(b.dst, view.layers[1].nodes).all()]
    np.testing.assert_allclose(bias[0].values[np.argsort(bias[0].rows), 0], m[2].bias.detach().double().numpy(),
                               rtol=1e-6)
    assert m.training                           # the export put it in eval mode and back


def test_torch_view_cnn_names_and_batchnorm_fold():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.Tanh()), nn.Flatten(),
                        nn.Linear(3 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-1, 1)
        cnn[1].running_var.uniform_(0.5, 2)
        cnn[1].weight.uniform_(0.5, 2)
    cnn.eval()
    view = torch_view(cnn)                      # an 8 x 8 input found by trying sizes
    # the exporter folds the BatchNorm into the first conv; the layer keeps the conv's name
    assert [ly.name for ly in view.layers] == ["0.weight", "4.0.weight", "6.weight", "8.weight"]
    assert [ly.kind for ly in view.layers] == ["Conv", "Conv", "Gemm", "Gemm"]
    assert [ly.units for ly in view.layers] == [4, 3, 5, 2]
    kernel = [b for b in view.graph.blocks if b.dense and np.isin(b.dst, view.layers[0].nodes).all()][0]
    assert kernel.weight.shape == (4, 2, 9)
    # folded BN: the edge weights are the conv's kernels scaled per channel by gamma / sqrt(var + eps)
    scale = (cnn[1].weight / torch.sqrt(cnn[1].running_var + cnn[1].eps)).detach().double().numpy()
    W = cnn[0].weight.detach().double().numpy().reshape(4, 2, 9) * scale[:, None, None]
    np.testing.assert_allclose(kernel.weight, W, rtol=1e-5, atol=1e-6)
    # dense after flatten: the edge from channel c carries the 3 x 3 positions of its columns
    lin = [b for b in view.graph.blocks if b.dense and np.isin(b.dst, view.layers[2].nodes).all()][0]
    assert lin.weight.shape == (5, 3, 9)
    np.testing.assert_allclose(lin.weight[:, 1, :], cnn[6].weight.detach().double().numpy()[:, 9:18], rtol=1e-6)


def test_torch_view_reads_any_model_the_hypergraph_reads():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) + x

    view = torch_view(Net())
    assert [(ly.name, ly.output) for ly in view.layers] == [("a.weight", True)]
    with pytest.raises(InputError, match="input_shape"):
        torch_view(nn.Sequential(nn.ReLU()))
    with pytest.raises(InputError, match="cannot read"):
        read_view(3.5)


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


def test_tracker_takes_a_view_and_rejects_bad_settings(tmp_path):
    view = torch_view(_mlp())
    tr = FiberTracker(eps=0.05, symmetries="fibration")
    assert len(tr(view, 0)) == 2
    # the format-free tracker reads views only; an ONNX file through the torch-side reader
    assert [r["layer_name"] for r in ViewTracker(eps=0, symmetries="fibration")(view, 0)] == ["0.weight", "2.weight"]
    with pytest.raises(InputError, match="LayerView"):
        ViewTracker()(_mlp(), 0)
    from helpers import mlp_onnx, save

    rng = np.random.default_rng(0)
    path = save(mlp_onnx([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))], [np.zeros(4), np.zeros(2)]),
                tmp_path / "m.onnx")
    assert [r["layer_name"] for r in FiberTracker(eps=0, symmetries="fibration")(str(path), 0)] == ["W1"]
    with pytest.raises(InputError, match="unknown symmetry"):
        FiberTracker(symmetries=("fibrations",))
    with pytest.raises(InputError, match="eps"):
        FiberTracker(eps=(0, 2.5))
    with pytest.raises(InputError, match="cannot read"):
        FiberTracker()([nn.Linear(3, 3)], 0)
    with pytest.raises(InputError, match="nothing recorded"):
        FiberTracker().plot("x.png")


def test_tracker_on_a_hand_built_graph():
    """fibgraph.tracking needs no importer: a LayerView of a WeightedDigraph built by hand."""
    from fibgraph.graph import Block, WeightedDigraph
    from fibgraph.layerview import LayerView, ViewLayer

    rng = np.random.default_rng(2)
    W1, W2 = rng.normal(size=(3, 2)), rng.normal(size=(1, 3))
    W1[2] = W1[0]                              # units 0 and 2 of the hidden layer: one fiber
    g = WeightedDigraph(n=6, blocks=[Block([0, 1], [2, 3, 4], W1), Block([2, 3, 4], [5], W2)],
                        initial=[0, 1, 2, 2, 2, 3], levels=[np.array([0, 1]), np.array([2, 3, 4]), np.array([5])])
    view = LayerView(g, [ViewLayer("W1", "dense", [2, 3, 4]), ViewLayer("W2", "dense", [5], output=True)])
    tr = ViewTracker(eps=0, symmetries=("fibration",))
    (row,) = tr(view, 0)
    assert (row["layer_name"], row["classes"], row["largest_class"]) == ("W1", 2, 2)
    np.testing.assert_array_equal(tr.labels[(0, 1, "fibration", 0.0)], [0, 1, 0])


def test_torch_view_agrees_with_the_exported_file(tmp_path):
    """The same model read from torch (in-memory export) and from an ONNX file written
    by torch.onnx.export: the same weight layers, graph and partitions."""
    import warnings

    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1),
                        nn.Tanh(), nn.Flatten(), nn.Linear(27, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    with torch.no_grad():                  # a planted fiber: conv channels 0 and 1 equal
        cnn[0].weight[1] = cnn[0].weight[0]
        cnn[0].bias[1] = cnn[0].bias[0]
    path = str(tmp_path / "cnn.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cnn, (torch.zeros(1, 2, 8, 8),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    a, b = torch_view(cnn, torch.zeros(1, 2, 8, 8)), read_view(path)
    assert [(ly.name, ly.kind, ly.units, ly.output) for ly in a.layers] == \
        [(ly.name, ly.kind, ly.units, ly.output) for ly in b.layers]
    assert a.graph.n == b.graph.n
    la, lb = a.colour("fibration"), b.colour("fibration")
    for k in range(4):
        np.testing.assert_array_equal(a.layer_labels(la, k), b.layer_labels(lb, k))
    np.testing.assert_array_equal(a.layer_labels(la, 0), [0, 0, 1, 2])


def test_tracker_reads_an_lstm_and_a_transformer():
    """Models beyond chains (planted fibers, tests/planted_nets.py): layers named by the torch
    parameters the exported weights come from; the planted fibers are the fibers at eps = 0.
    With eps > 0 the covering runs the opfibration clustering on the LSTM's cyclic level
    (it raised a broadcasting error in the engine before)."""
    from fibgraph.partition import canonical
    from planted_nets import example_input, planted_lstm, planted_transformer

    def labels_of(fibers, n):
        lab = np.empty(n, dtype=np.int64)
        for k, f in enumerate(fibers):
            lab[f] = k
        return canonical(lab)

    lstm, info = planted_lstm(seed=0)
    tr = FiberTracker(eps=(0, 0.1), symmetries=("fibration", "covering"), example=example_input(info))
    rows = tr(lstm, 0)
    assert {r["layer_name"] for r in rows} == {"rnn.weight_ih_l0 + rnn.weight_hh_l0"}
    assert len(rows) == 4 and all(r["units"] == 6 for r in rows)
    np.testing.assert_array_equal(tr.labels[(0, 1, "fibration", 0.0)], labels_of(info["fibers"]["rnn.hidden"], 6))

    tf, info = planted_transformer(seed=0)
    tr = FiberTracker(eps=0, symmetries="fibration", example=example_input(info))
    rows = {r["layer_name"]: r for r in tr(tf, 0)}
    assert list(rows) == ["inp.weight", "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight",
                          "enc.linear1.weight", "enc.linear2.weight"]
    assert rows["enc.linear1.weight"]["units"] == info["dim_feedforward"]
    np.testing.assert_array_equal(tr.labels[(0, 4, "fibration", 0.0)],
                                  labels_of(info["fibers"]["ff.linear1"], info["dim_feedforward"]))
