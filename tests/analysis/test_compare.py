"""Partition scores, `fibgraph compare`, and the activity view (weight fibers vs synchrony clusters),
all on the hypergraph import (a LayerView of fibgraph.importers.onnx.importer.import_dag)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_one_line_error, cli, mlp_onnx, read_json, save

from fibgraph.activity import (class_conditional_clusters, fiber_activity_report, refinement_score,
                               synchrony_clusters)
from fibgraph.compare import (adjusted_rand_index, align_units, compare_partitions, compare_views,
                              variation_of_information)
from fibgraph.errors import InputError
from fibgraph.partition import canonical
from fibgraph.planted import planted_mlp
from fibgraph.importers.dag_units import layer_view
from fibgraph.importers.onnx.importer import import_dag


# ------------------------------------------------------------ ARI and VI
def test_identical_partitions_score_perfectly_whatever_the_labels():
    a = np.array([0, 0, 1, 2, 2, 2, 3])
    b = np.array([7, 7, 3, 5, 5, 5, 1])          # same partition, other names
    assert adjusted_rand_index(a, b) == 1.0
    assert variation_of_information(a, b) == 0.0
    assert adjusted_rand_index(np.arange(5), np.arange(5)) == 1.0
    assert adjusted_rand_index(np.zeros(5), np.zeros(5)) == 1.0


def test_vi_is_zero_iff_equal_and_a_metric():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, k, 12) for k in (1, 2, 3, 4, 6, 12) for _ in range(3)]
    for p in parts:
        for q in parts:
            vi = variation_of_information(p, q)
            assert (vi == 0.0) == np.array_equal(canonical(p), canonical(q))
            assert vi == pytest.approx(variation_of_information(q, p))
            assert vi <= np.log(12) + 1e-12
            for r in parts[:6]:
                assert vi <= variation_of_information(p, r) + variation_of_information(r, q) + 1e-12


def test_known_values():
    # splitting one class of two into singletons: VI = (2/n) log 2 with n = 4
    assert variation_of_information([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(0.5 * np.log(2))
    # all together vs all apart: ARI 0, VI = log n
    assert adjusted_rand_index(np.zeros(6), np.arange(6)) == 0.0
    assert variation_of_information(np.zeros(6), np.arange(6)) == pytest.approx(np.log(6))
    assert variation_of_information(np.zeros(6), np.arange(6), normalised=True) == pytest.approx(1.0)


def test_ari_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        a = rng.integers(0, rng.integers(1, 8), n)
        b = a.copy() if rng.random() < 0.2 else rng.integers(0, rng.integers(1, 8), n)
        assert adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b), abs=1e-12)


def test_refinement_detection():
    fine, coarse = [0, 1, 2, 2, 3], [0, 0, 1, 1, 1]
    r = compare_partitions(fine, coarse)
    assert r["a_refines_b"] and not r["b_refines_a"] and not r["equal"]
    assert r["vi"] > 0 and r["ari"] < 1
    r = compare_partitions([0, 0, 1, 1], [0, 1, 0, 1])            # crossing: neither refines
    assert not r["a_refines_b"] and not r["b_refines_a"]
    with pytest.raises(ValueError):
        compare_partitions([0, 1], [0, 1, 2])


# ------------------------------------------------------- compare networks
SIZES = [4, 6, 5, 3]
F = [None, [0, 0, 1, 2, 1, 3], [0, 0, 0, 1, 2], None]


def _net(layers, act="Relu", form="gemm"):
    """The LayerView of a float64 ONNX MLP with weights W1, W2, ... (hypergraph import)."""
    model = mlp_onnx([W for W, _ in layers], [b for _, b in layers], act=act, form=form, dtype=np.float64)
    return layer_view(import_dag(model))


def _forward(layers, x, act=np.tanh):
    """Activities of the MLP in numpy: {weight name: (N, units)} (output layer: no activation)."""
    out, h = {}, np.asarray(x, dtype=np.float64)
    for l, (W, b) in enumerate(layers):
        h = h @ W.T + b
        if l < len(layers) - 1:
            h = act(h)
        out[f"W{l + 1}"] = h
    return out


def _split_one(layers):
    """Perturb hidden unit 1 (a member of a 2-unit fiber) so that its fiber splits."""
    out = [(W.copy(), b.copy()) for W, b in layers]
    out[0][1][1] += 0.3
    return out


def test_compare_networks_finds_refinement_and_counts():
    layers = planted_mlp(np.random.default_rng(0), SIZES, F, None)
    A, B = _net(layers), _net(_split_one(layers))
    res = compare_views(A, B, "fibration")
    l1, l2, out = res["layers"]
    assert l1["classes_a"] == 4 and l1["classes_b"] == 5
    assert l1["b_refines_a"] and not l1["a_refines_b"] and l1["vi"] > 0 and l1["ari"] < 1
    assert l1["counts"]["fibration"] == {"a": 4, "b": 5}
    # splitting a unit of layer 1 breaks the in-balance of layer 2's planted fiber {0, 1, 2}
    assert l2["b_refines_a"] and l2["classes_b"] > l2["classes_a"]
    assert out["equal"] and out["ari"] == 1.0 and out["vi"] == 0.0
    same = compare_views(A, _net(layers), "covering-strict")
    assert all(r["equal"] and r["vi"] == 0.0 for r in same["layers"])


@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_align_recovers_a_permuted_copy(form):
    # layer 1 without ties (so its match is unique), planted fibers in layer 2;
    # 'matmul': MatMul + Add, the bias on a node tied to the unit's MatMul node
    layers = planted_mlp(np.random.default_rng(2), SIZES, [None, None, [0, 0, 1, 2, 1], None], None)
    rng = np.random.default_rng(3)
    p, q = rng.permutation(6), rng.permutation(5)
    (W1, b1), (W2, b2), (W3, b3) = layers
    perm = [(W1[p], b1[p]), (W2[q][:, p], b2[q]), (W3[:, q], b3)]
    A, B = _net(layers, form=form), _net(perm, form=form)
    plain = compare_views(A, B)
    assert not plain["layers"][1]["equal"]
    assert plain["layers"][1]["counts"]["fibration"] == {"a": 3, "b": 3}   # counts need no alignment
    perms = align_units(A, B)
    np.testing.assert_array_equal(perms[0], np.argsort(p))
    np.testing.assert_array_equal(perms[1], np.argsort(q))
    np.testing.assert_array_equal(perms[2], np.arange(3))                  # output layer keeps its order
    np.testing.assert_allclose(W2[q][:, p][perms[1]][:, perms[0]], W2, atol=1e-12)
    aligned = compare_views(A, B, align=True)
    assert all(r["equal"] for r in aligned["layers"])


def test_architecture_mismatch_is_an_input_error():
    rng = np.random.default_rng(0)
    A = _net(planted_mlp(rng, SIZES, F, None))
    with pytest.raises(InputError, match="architecture mismatch at layer 1"):
        compare_views(A, _net(planted_mlp(rng, [4, 7, 5, 3], None, None)))
    with pytest.raises(InputError, match="layers"):
        compare_views(A, _net(planted_mlp(rng, [4, 6, 3], None, None)))
    # the same weights exported as MatMul + Add: another graph (bias-add nodes)
    with pytest.raises(InputError, match="at layer 1: A 'W1' is Gemm with 6 units, B 'W1' is MatMul"):
        compare_views(A, _net(planted_mlp(rng, SIZES, F, None), form="matmul"))


def _hand_view(W1, b1, W2, b2, extra_edge=False):
    """A LayerView built by hand (no importer): inputs, hidden, outputs, one bias node per layer."""
    from fibgraph.graph import Block, WeightedDigraph
    from fibgraph.layerview import LayerView, ViewLayer

    n_in, n_h, n_out = W1.shape[1], W1.shape[0], W2.shape[0]
    inp, hid = np.arange(n_in), n_in + np.arange(n_h)
    out = n_in + n_h + np.arange(n_out)
    c1, c2 = n_in + n_h + n_out, n_in + n_h + n_out + 1
    blocks = [Block(inp, hid, W1), Block([c1], hid, b1[:, None]), Block(hid, out, W2), Block([c2], out, b2[:, None])]
    if extra_edge:
        blocks.append(Block([c2], hid, np.ones((n_h, 1))))
    initial = np.concatenate([np.arange(n_in), np.full(n_h, n_in), n_in + 1 + np.arange(n_out),
                              [n_in + 1 + n_out, n_in + 2 + n_out]])
    g = WeightedDigraph(n=c2 + 1, blocks=blocks, initial=initial,
                        levels=[np.concatenate([inp, [c1, c2]]), hid, out])
    return LayerView(g, [ViewLayer("h", "dense", hid), ViewLayer("o", "dense", out, output=True)])


def test_compare_views_built_by_hand():
    rng = np.random.default_rng(9)
    W1, b1, W2, b2 = rng.normal(size=(4, 3)), rng.normal(size=4), rng.normal(size=(2, 4)), rng.normal(size=2)
    W1[1], b1[1] = W1[0], b1[0]
    A = _hand_view(W1, b1, W2, b2)
    p = np.array([2, 0, 3, 1])
    B = _hand_view(W1[p], b1[p], W2[:, p], b2)
    res = compare_views(A, B, levels=("fibration",))
    assert [r["classes_a"] for r in res["layers"]] == [3, 2] and not res["layers"][0]["equal"]
    assert compare_views(A, B, align=True)["layers"][0]["equal"]
    np.testing.assert_array_equal(align_units(A, B)[0][[2, 3]], [0, 2])       # units 2, 3 of A are B's 0, 2
    with pytest.raises(InputError, match="the graphs differ|differ in shape"):
        compare_views(A, _hand_view(W1, b1, W2, b2, extra_edge=True))


# ------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    layers = planted_mlp(np.random.default_rng(0), SIZES, F, None)
    a = save(mlp_onnx([W for W, _ in layers], [b for _, b in layers]), d / "a.onnx")
    s = _split_one(layers)
    b = save(mlp_onnx([W for W, _ in s], [b for _, b in s]), d / "b.onnx")
    other = planted_mlp(np.random.default_rng(1), [4, 7, 3], None, None)
    c = save(mlp_onnx([W for W, _ in other], [b for _, b in other]), d / "c.onnx")
    return {"a": a, "b": b, "c": c, "dir": d}


def test_cli_compare_json(capsys, tmp_path, models):
    out = tmp_path / "c.json"
    rc, so, err = cli(capsys, "compare", models["a"], models["b"], "--json", out)
    assert rc == 0, err
    r = read_json(out)
    assert r["symmetry"] == "fibration" and len(r["layers"]) == 3
    l1 = r["layers"][0]
    assert l1["name_a"] == "W1" and l1["units"] == 6
    assert l1["b_refines_a"] is True and l1["a_refines_b"] is False
    assert 0 < l1["vi"] and l1["ari"] < 1
    assert set(l1["counts"]) == {"fibration", "opfibration", "covering-strict"}
    assert "ARI" in so and "W1" in so
    rc, so, err = cli(capsys, "compare", models["a"], models["a"], "--symmetry", "covering-strict",
                      "--eps", "0.05", "--json", out)
    assert rc == 0, err
    assert all(x["vi"] == 0 and x["ari"] == 1 for x in read_json(out)["layers"])


def test_cli_compare_errors(capsys, tmp_path, models):
    rc, _, err = cli(capsys, "compare", models["a"], models["c"])
    assert_one_line_error(rc, err, "architecture mismatch")
    rc, _, err = cli(capsys, "compare", models["a"], tmp_path / "missing.onnx")
    assert_one_line_error(rc, err, "missing.onnx")
    rc, _, err = cli(capsys, "compare", models["a"], models["b"], "--eps", "3")
    assert_one_line_error(rc, err, "eps")
    rc, _, err = cli(capsys, "compare", models["a"], models["b"], "--json", models["a"])
    assert_one_line_error(rc, err, "input")
    rc, _, err = cli(capsys, "compare", models["a"], models["b"], "--json", tmp_path / "no" / "x.json")
    assert_one_line_error(rc, err, "does not exist")


# ------------------------------------------------------- activity view
def test_synchrony_clusters_on_synthetic_signals():
    rng = np.random.default_rng(0)
    s1, s2 = rng.normal(size=(2, 300))
    noise = lambda: 0.05 * rng.normal(size=300)  # noqa: E731
    acts = np.stack([s1 + noise(), 2 * s1 + 1 + noise(), s2 + noise(), np.zeros(300), s2 + noise(),
                     np.full(300, 3.0), rng.normal(size=300)], 1)
    lab = synchrony_clusters(acts, threshold=0.9)
    np.testing.assert_array_equal(lab, canonical([0, 0, 1, 2, 1, 2, 3]))   # silent units together
    assert synchrony_clusters(acts, threshold=0.99999).max() + 1 == 6        # only the silent ones merge
    y = np.repeat([0, 1], 150)
    cc = class_conditional_clusters(acts, y, 0.9)
    assert set(cc) == {0, 1} and all(len(v) == 7 for v in cc.values())


def test_refinement_score():
    assert refinement_score([0, 0, 1, 2], [0, 0, 0, 1]) == (1.0, 1)
    assert refinement_score([0, 0, 1, 1], [0, 1, 2, 2]) == (0.5, 2)
    assert refinement_score([0, 1, 2], [0, 0, 0]) == (1.0, 0)


def test_weight_fibers_refine_activity_clusters():
    """Format-free: a view, a colouring and activity arrays (computed here in numpy)."""
    rng = np.random.default_rng(5)
    layers = planted_mlp(rng, SIZES, F, None)
    view = _net(layers, act="Tanh")
    x = rng.normal(size=(400, 4))
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)
    acts = _forward(layers, x)
    np.testing.assert_allclose(acts["W1"][:, 0], acts["W1"][:, 1], atol=1e-12)    # a planted fiber
    rep = fiber_activity_report(view, view.colour("fibration"), acts, len(x), y, threshold=0.95)
    assert [r["name"] for r in rep] == ["W1", "W2"] and [r["fibers"] for r in rep] == [4, 3]
    for r in rep:
        assert r["fibers_refine_clusters"] and r["refinement_score"] == 1.0 and r["fiber_pairs"] > 0
        assert r["fibers_refine_every_class"] and r["fibers_refine_class_meet"]
        assert r["clusters"] <= r["fibers"]
    # a fiber broken in the weights (unit 1 of W1 moved) is no longer one fiber
    broken = _net(_split_one(layers), act="Tanh")
    rep2 = fiber_activity_report(broken, broken.colour("fibration"), _forward(_split_one(layers), x),
                                 len(x), None, threshold=0.95)
    assert rep2[0]["fibers"] == 5 and "class_clusters" not in rep2[0]
    with pytest.raises(InputError, match="units"):
        fiber_activity_report(view, view.colour("fibration"), {"W1": acts["W2"]}, len(x))


def test_torch_activity_report_and_activations_match_numpy():
    torch = pytest.importorskip("torch")
    from fibgraph.importers.torch_analysis import activity_report, torch_activations, torch_mlp

    layers = planted_mlp(np.random.default_rng(6), SIZES, F, None)
    x = np.random.default_rng(7).normal(size=(50, 4))
    a = torch_activations(torch_mlp(layers, "relu"), x)
    b = _forward(layers, x, act=lambda z: np.maximum(z, 0))
    assert list(a) == ["0.weight", "2.weight", "4.weight"]
    for p, q in zip(a.values(), b.values()):
        np.testing.assert_allclose(p, q, atol=1e-12)
    rep = activity_report(torch_mlp(layers, "tanh"), x, (x[:, 0] > 0).astype(int), threshold=0.95)
    assert [(r["name"], r["fibers"]) for r in rep] == [("0.weight", 4), ("2.weight", 3)]
    assert all(r["fibers_refine_clusters"] and r["fibers_refine_every_class"] for r in rep)
    # conv channels: positions count as samples; MaxPool and BatchNorm after a conv are its activity
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(3 * 4 * 4, 2), torch.nn.Softmax(dim=1))
    xi = np.random.default_rng(0).normal(size=(5, 1, 6, 6)).astype(np.float32)
    acts = torch_activations(cnn, xi)
    assert acts["0.weight"].shape == (5 * 16, 3) and acts["3.weight"].shape == (5, 2)
    with torch.no_grad():
        relu = cnn[1](cnn[0](torch.as_tensor(xi))).numpy()
        logits = cnn[3](cnn[2](torch.as_tensor(relu))).numpy()
    np.testing.assert_allclose(acts["0.weight"], np.moveaxis(relu, 1, -1).reshape(-1, 3), atol=1e-6)
    np.testing.assert_allclose(acts["3.weight"], logits, atol=1e-6)     # before the final Softmax


def test_compare_a_residual_model_and_align_refuses_shared_units(capsys, tmp_path):
    """Any model the hypergraph reads: a residual block (the stream's writers share nodes)."""
    torch = pytest.importorskip("torch")
    from fibgraph.importers.torch_analysis import export_model, torch_view

    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.a, self.b, self.out = (torch.nn.Linear(3, 4), torch.nn.Linear(4, 6),
                                                  torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))

        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.b(torch.relu(self.a(h))))

    torch.manual_seed(0)
    m = Res().double()
    with torch.no_grad():                  # plant a fiber {0, 1} in `a`: equal rows and biases
        m.a.weight[1] = m.a.weight[0]
        m.a.bias[1] = m.a.bias[0]
    x = torch.zeros(1, 3, dtype=torch.float64)
    A = torch_view(m, x)
    assert [ly.name for ly in A.layers] == ["inp.weight", "a.weight", "b.weight", "out.weight"]
    pa = save(export_model(m, x), tmp_path / "a.onnx")
    with torch.no_grad():
        m.a.weight[1, 0] += 0.5            # the next checkpoint breaks it
    B = torch_view(m, x)
    pb = save(export_model(m, x), tmp_path / "b.onnx")
    res = compare_views(A, B)
    a = res["layers"][1]
    assert (a["classes_a"], a["classes_b"]) == (5, 6) and a["b_refines_a"] and not a["equal"]
    assert res["layers"][3]["output_layer"]
    with pytest.raises(InputError, match="shares its units' nodes"):
        align_units(A, B)
    # the same through the CLI, on the two ONNX checkpoints
    rc, so, err = cli(capsys, "compare", pa, pb, "--json", tmp_path / "r.json")
    assert rc == 0, err
    r = read_json(tmp_path / "r.json")
    assert [ly["name_a"] for ly in r["layers"]] == ["inp.weight", "a.weight", "b.weight", "out.weight"]
    assert (r["layers"][1]["classes_a"], r["layers"][1]["classes_b"]) == (5, 6)
    rc, _, err = cli(capsys, "compare", pa, pb, "--align")
    assert_one_line_error(rc, err, "shares its units' nodes")


def test_align_a_permuted_cnn():
    """Conv channels permuted in both convs and the dense layer after Flatten (its edges carry the
    3 x 3 positions of a channel): the alignment recovers every permutation."""
    import copy

    torch = pytest.importorskip("torch")
    from torch import nn

    from fibgraph.importers.torch_analysis import torch_view

    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1),
                        nn.Tanh(), nn.Flatten(), nn.Linear(27, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    p, q, r = np.array([2, 0, 3, 1]), np.array([1, 2, 0]), np.array([4, 0, 3, 1, 2])
    B = copy.deepcopy(cnn)
    with torch.no_grad():
        B[0].weight.copy_(cnn[0].weight[p])
        B[0].bias.copy_(cnn[0].bias[p])
        B[3].weight.copy_(cnn[3].weight[q][:, p])
        B[3].bias.copy_(cnn[3].bias[q])
        B[6].weight.copy_(cnn[6].weight.reshape(5, 3, 9)[r][:, q].reshape(5, 27))
        B[6].bias.copy_(cnn[6].bias[r])
        B[8].weight.copy_(cnn[8].weight[:, r])
    x = torch.randn(3, 2, 8, 8)
    assert torch.allclose(cnn(x), B(x), atol=1e-5)                     # the same function
    perms = align_units(torch_view(cnn, x), torch_view(B, x))
    for got, want in zip(perms, (np.argsort(p), np.argsort(q), np.argsort(r), np.arange(2))):
        np.testing.assert_array_equal(got, want)
