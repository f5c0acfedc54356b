"""Attention found in exported ONNX graphs (importers/onnx/attention_blocks.py) and the
double-rotation rows of `fibgraph symmetry-metrics` on real torch Transformers."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import cli, finish, mlp_onnx, read_json, save, torch_export, wrap_module

from fibgraph.importers.onnx.attention_blocks import attention_metrics, find_attention

D, H, FF = 16, 2, 32
DK = D // H


def _encoder_layer(seed=0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True).eval()


def _export(layer, path, dynamo):
    import torch

    return torch_export(wrap_module(layer), torch.randn(3, 5, D), path, dynamo)


def _in_proj(layer):
    """torch's packed (3d, d) weight as (q, k, v) lists of per-head (d_model, d_k) slices."""
    W = layer.self_attn.in_proj_weight.detach().numpy().astype(np.float64)
    return [[W[p * D + h * DK:p * D + (h + 1) * DK].T for h in range(H)] for p in range(3)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("att")
    layer = _encoder_layer()
    return layer, {dyn: _export(layer, d / f"enc_{'dynamo' if dyn else 'ts'}.onnx", dyn) for dyn in (False, True)}


# ------------------------------------------------------- (a) recovered weights
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_recovered_projections_equal_the_torch_weights(exported, dynamo):
    layer, paths = exported
    blocks, problems = find_attention(paths[dynamo])
    assert problems == [] and len(blocks) == 1
    blk = blocks[0]
    assert [h.head for h in blk.heads] == [0, 1]
    assert blk.scale == pytest.approx(DK ** -0.5, rel=1e-6)          # q and k scaled separately (sqrt each)
    q, k, v = _in_proj(layer)
    Wo = layer.self_attn.out_proj.weight.detach().numpy().astype(np.float64)
    bias = layer.self_attn.in_proj_bias.detach().numpy().astype(np.float64)
    for hd in blk.heads:
        h = hd.head
        assert hd.q_weight == hd.k_weight == hd.v_weight                 # one packed in_proj weight
        assert hd.q_columns == list(range(h * DK, (h + 1) * DK))
        assert hd.k_columns == list(range(D + h * DK, D + (h + 1) * DK))
        assert hd.WQ.shape == hd.WK.shape == (D, DK)
        np.testing.assert_allclose(hd.WQ, q[h], atol=1e-6, rtol=0)
        np.testing.assert_allclose(hd.WK, k[h], atol=1e-6, rtol=0)
        np.testing.assert_allclose(hd.WV, v[h], atol=1e-6, rtol=0)
        np.testing.assert_allclose(hd.WO, Wo[:, h * DK:(h + 1) * DK].T, atol=1e-6, rtol=0)
        np.testing.assert_allclose(hd.bq, bias[h * DK:(h + 1) * DK], atol=1e-6, rtol=0)


def test_separate_projections_gqa_and_score_scale(tmp_path):
    """q/k/v as separate Linear layers, 1/sqrt(d_k) on the scores, a causal mask,
    and grouped-query attention (3 query heads share one K/V head)."""
    torch = pytest.importorskip("torch")
    import math

    class Att(torch.nn.Module):
        def __init__(self, d=12, heads=3, kv=1):
            super().__init__()
            self.h, self.kv, self.dk = heads, kv, d // heads
            self.q = torch.nn.Linear(d, d)
            self.k = torch.nn.Linear(d, self.dk * kv, bias=False)
            self.v = torch.nn.Linear(d, self.dk * kv)
            self.o = torch.nn.Linear(d, d)

        def forward(self, x):
            B, S, d = x.shape
            q = self.q(x).view(B, S, self.h, self.dk).transpose(1, 2)
            k = self.k(x).view(B, S, self.kv, self.dk).transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
            v = self.v(x).view(B, S, self.kv, self.dk).transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
            mask = torch.triu(torch.full((S, S), -1e9), 1)
            p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dk) + mask, -1)
            return self.o((p @ v).transpose(1, 2).reshape(B, S, d))

    torch.manual_seed(1)
    m = Att().eval()
    path = torch_export(m, torch.randn(2, 5, 12), tmp_path / "gqa.onnx", dynamo=False)
    blocks, problems = find_attention(path)
    assert problems == [] and len(blocks) == 1
    blk = blocks[0]
    assert blk.masked and blk.score_scale == pytest.approx(0.5) and len(blk.heads) == 3
    Wq = m.q.weight.detach().numpy().T
    Wk = m.k.weight.detach().numpy().T
    for hd in blk.heads:
        assert hd.q_weight != hd.k_weight and hd.k_columns == [0, 1, 2, 3]
        np.testing.assert_allclose(hd.WQ, Wq[:, 4 * hd.head:4 * hd.head + 4], atol=1e-6)
        np.testing.assert_allclose(hd.WK, Wk, atol=1e-6)
        assert hd.o_rows == list(range(4 * hd.head, 4 * hd.head + 4))


def _handmade_attention(rng, S=4, heads=2, dk=3, interleaved=True):
    """Packed QKV MatMul -> Split -> Reshape/Transpose, scores Div by sqrt(d_k).
    ``interleaved``: head h owns columns h, h + heads, ... (Reshape to (S, dk, heads))."""
    d = heads * dk
    W = rng.normal(size=(d, 3 * d)).astype(np.float32)
    Wo = rng.normal(size=(d, d)).astype(np.float32)
    shape = [S, dk, heads] if interleaved else [S, heads, dk]
    inits = [numpy_helper.from_array(W, "Wqkv"), numpy_helper.from_array(Wo, "Wo"),
             numpy_helper.from_array(np.array(shape, np.int64), "hs"),
             numpy_helper.from_array(np.array([d, d, d], np.int64), "split"),
             numpy_helper.from_array(np.array(np.sqrt(dk), np.float32), "sq"),
             numpy_helper.from_array(np.array([S, d], np.int64), "flat")]
    if interleaved:                           # (S, dk, H) -> (H, S, dk)
        tq, tk = [2, 0, 1], [2, 1, 0]
    else:                                     # (S, H, dk) -> (H, S, dk)
        tq, tk = [1, 0, 2], [1, 2, 0]
    nodes = [helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"]),
             helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=1),
             helper.make_node("Reshape", ["q", "hs"], ["q3"]), helper.make_node("Transpose", ["q3"], ["qh"], perm=tq),
             helper.make_node("Reshape", ["k", "hs"], ["k3"]), helper.make_node("Transpose", ["k3"], ["kt"], perm=tk),
             helper.make_node("Reshape", ["v", "hs"], ["v3"]), helper.make_node("Transpose", ["v3"], ["vh"], perm=tq),
             helper.make_node("MatMul", ["qh", "kt"], ["s"]), helper.make_node("Div", ["s", "sq"], ["s2"]),
             helper.make_node("Softmax", ["s2"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vh"], ["z"]),
             helper.make_node("Transpose", ["z"], ["zt"], perm=[1, 0, 2]),
             helper.make_node("Reshape", ["zt", "flat"], ["zf"]), helper.make_node("MatMul", ["zf", "Wo"], ["y"])]
    g = helper.make_graph(nodes, "att", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [S, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [S, d])], inits)
    return finish(g), W, Wo


@pytest.mark.parametrize("interleaved", [False, True])
def test_handmade_split_attention_columns_found_numerically(interleaved):
    model, W, Wo = _handmade_attention(np.random.default_rng(0), interleaved=interleaved)
    blocks, problems = find_attention(model)
    assert problems == [] and len(blocks) == 1
    blk = blocks[0]
    assert blk.score_scale == pytest.approx(3 ** -0.5) and not blk.masked
    for hd in blk.heads:
        h = hd.head
        cols = [h + 2 * f for f in range(3)] if interleaved else [3 * h + f for f in range(3)]
        assert hd.q_columns == cols and hd.k_columns == [6 + c for c in cols]
        assert hd.v_columns == [12 + c for c in cols]
        np.testing.assert_array_equal(hd.WQ, W[:, cols])
        np.testing.assert_array_equal(hd.WO, Wo[[3 * h + f for f in range(3)], :])


def test_feed_forward_model_has_no_attention():
    rng = np.random.default_rng(0)
    m = mlp_onnx([rng.normal(size=(5, 4)), rng.normal(size=(3, 5))], [np.zeros(5), np.zeros(3)],
                 out_op="Softmax")
    assert find_attention(m) == ([], [])


# ----------------------------------------------------- (b) planted symmetry
def _plant(layer, head, n_dirs, seed):
    """Project the q and k rows of ``head`` off ``n_dirs`` common directions n of
    its d_k space: W_Q n = W_K n = 0 (the symmetric states of the double rotation)."""
    import torch

    rng = np.random.default_rng(seed)
    N = np.linalg.qr(rng.normal(size=(DK, n_dirs)))[0]
    P = torch.tensor(np.eye(DK) - N @ N.T, dtype=torch.float32)
    with torch.no_grad():
        W = layer.self_attn.in_proj_weight
        for off in (0, D):                    # q rows, k rows
            rows = slice(off + head * DK, off + (head + 1) * DK)
            W[rows] = P @ W[rows]
    return layer


def test_planted_double_rotation_symmetry_is_counted(exported, tmp_path):
    _, paths = exported
    th = (1e-4, 0.05)
    base = attention_metrics(paths[False], th)["attention"]
    planted_path = _export(_plant(_encoder_layer(), head=0, n_dirs=3, seed=7), tmp_path / "planted.onnx", False)
    planted = attention_metrics(planted_path, th)["attention"]
    assert [r["layer"].split()[-1] for r in planted] == ["0", "1"]
    assert [r["n_dos"]["0.0001"] for r in base] == [0, 0]
    assert [r["n_dos"]["0.0001"] for r in planted] == [3, 0]          # exactly the planted directions
    assert planted[0]["n_dos"]["0.05"] >= 3
    assert planted[1]["n_dos"] == base[1]["n_dos"]                   # head 1 untouched
    assert planted[0]["min_delta"] < 1e-5 < base[0]["min_delta"]


# ------------------------------------------------------------------- (c) CLI
def test_cli_symmetry_metrics_on_exported_transformer(capsys, exported, tmp_path):
    _, paths = exported
    for dynamo, path in paths.items():
        out = tmp_path / f"s{int(dynamo)}.json"
        rc, so, err = cli(capsys, "symmetry-metrics", path, "--json", out)
        assert rc == 0, err
        r = read_json(out)
        assert len(r["attention"]) == H
        for h, a in enumerate(r["attention"]):
            assert a["metric"] == "double rotation" and a["n"] == DK and a["head"] == h
            assert a["layer"] == f"{a['q']} head {h}" and a["source"] == "graph"
            assert set(a["n_dos"]) == {"0.05", "0.1", "0.15", "0.2"}
            assert a["shape"] == [D, DK]
        assert r["attention_summary"]["heads"] == H and r["attention_summary"]["directions"] == D
        # permutation rows come from the hypergraph, one per
        # weight (in_proj, out_proj, linear1, linear2); out_proj and linear2 write the residual
        # stream, which is the output here (tied through the Adds and LayerNorms): no rows for them
        assert not any("skipped" in w for w in r["warnings"])
        assert [(ly["units"], ly["output_layer"], ly["source"]) for ly in r["layers"]] == [
            (3 * D, False, "hypergraph"), (D, True, "hypergraph"), (FF, False, "hypergraph"), (D, True, "hypergraph")]
        assert r["layers"][0]["name"] == r["attention"][0]["q"]           # the packed in_proj weight
        assert r["layers"][2]["vector"] == {"incoming": D, "bias": 1, "outgoing": D}
        assert r["summary"]["hidden_units"] == 3 * D + FF
        assert r["summary"]["n_dos"]["0.05"] == 0                         # random init: no duplicates
        assert "double rotation" in so and "N_dos<0.05" in so and "head 1" in so
        assert "attention summary: 1 block" in so


def test_cli_feed_forward_unchanged(capsys, tmp_path):
    rng = np.random.default_rng(4)
    path = save(mlp_onnx([rng.normal(size=(6, 4)), rng.normal(size=(2, 6))], [np.zeros(6), np.zeros(2)]),
                tmp_path / "m.onnx")
    rc, so, err = cli(capsys, "symmetry-metrics", path, "--json", tmp_path / "m.json")
    assert rc == 0, err
    r = read_json(tmp_path / "m.json")
    assert [ly["name"] for ly in r["layers"]] == ["W1", "W2"] and r["attention"] == []
    assert "double rotation" not in so and "W1" in so
