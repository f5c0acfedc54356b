"""Unrolled recurrences (torch's LSTMCell/GRUCell in a Python loop: Gemm + Split
+ Sigmoid/Tanh + Mul/Add per step, as both exporters write them) and the ONNX
``Attention`` op (torch's dynamo exporter at opset 23): planted fibers found
and compressed exactly."""
import collections
import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

import planted_nets as P  # noqa: E402
from fibgraph.importers.api import compress_model  # noqa: E402

TOL = 1e-5


class CellLoop(torch.nn.Module):
    """The planted nn.LSTM/nn.GRU of planted_nets run step by step by its cell."""

    def __init__(self, rnn, fc, kind):
        super().__init__()
        self.kind = kind
        cls = torch.nn.LSTMCell if kind == "LSTM" else torch.nn.GRUCell
        self.cell = cls(rnn.input_size, rnn.hidden_size)
        for a, b in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"),
                     ("bias_ih", "bias_ih_l0"), ("bias_hh", "bias_hh_l0")):
            getattr(self.cell, a).data = getattr(rnn, b).data.clone()
        self.fc = fc

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            if self.kind == "LSTM":
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.fc(h)


def _fibers(report, name):
    return {frozenset(f) for f in next(ly for ly in report["layers"] if ly["weight"] == name)["fibers"]}


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_unrolled_cell_compresses_exactly(tmp_path, kind, exporter):
    model, info = (P.planted_lstm if kind == "LSTM" else P.planted_gru)(0)
    loop = CellLoop(model.rnn, model.fc, kind).eval()
    x = P.example_input(info)
    path = P.export_one(loop, x, tmp_path / "loop.onnx", dynamo=exporter == "dynamo")
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert ops["LSTM"] == ops["GRU"] == 0 and ops["Split"] >= info["seq"] and ops["Gemm"] > info["seq"]
    rep = compress_model(path, str(tmp_path / "base.onnx"), eps=0.0, verify=True)
    assert rep["verify"]["max_abs_diff"] <= TOL * max(1.0, rep["verify"]["max_abs_output"])
    H = info["hidden_size"]
    G = 4 if kind == "LSTM" else 3
    hidden = {frozenset(f) for f in info["fibers"]["rnn.hidden"]}
    # the gate rows of both weights: every gate block carries the hidden partition
    want = {frozenset(i + g * H for i in f) for g in range(G) for f in hidden}
    for w in ("cell.weight_ih", "cell.weight_hh"):
        assert _fibers(rep, w) == want
        ly = next(ly for ly in rep["layers"] if ly["weight"] == w)
        assert ly["nodes_after"] == G * len(hidden) and ly["uses"] == info["seq"] - (w == "cell.weight_hh")
    # the shared weights are written once, shrunk: parameters drop accordingly
    n_in = info["n_in"]
    k = len(hidden)
    expect = G * k * n_in + G * k * k + 2 * G * k + info["n_out"] * k + info["n_out"]
    # plus the first step's constants the exporters compute from the zero state
    # (W_hh h0 + b_hh, and the zero state itself), written shrunk: G*k + k
    assert rep["params_after"] == expect + G * k + k
    xb = P.example_input(info, batch=5, seed=3).numpy()
    a, b = _run(path, xb), _run(tmp_path / "base.onnx", xb)
    assert np.max(np.abs(a - b)) <= TOL * max(1.0, np.max(np.abs(a)))


@pytest.mark.parametrize("qk_shared", [True, False])
def test_attention_op_opset23(tmp_path, qk_shared):
    model, info = P.planted_transformer(0, qk_shared=qk_shared)
    x = P.example_input(info)
    path = tmp_path / "tf23.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, external_data=False, opset_version=23)
    assert any(n.op_type == "Attention" for n in onnx.load(str(path)).graph.node)
    out = tmp_path / "base.onnx"
    rep = compress_model(str(path), str(out), eps=0.0, verify=True)
    assert not rep["barriers"]
    assert rep["verify"]["max_abs_diff"] <= TOL * max(1.0, rep["verify"]["max_abs_output"])
    H = info["nhead"]
    pairs = max(len(p) for p in info["qk_pairs"])
    v_fibers = max(len({info["maps"]["v"][h * info["head_dim"] + j] for j in range(info["head_dim"])})
                   for h in range(H))
    in_proj = max(rep["layers"], key=lambda ly: ly["nodes_before"])
    assert in_proj["nodes_before"] == 3 * info["d_model"]
    # q and k keep one dim per (q colour, k colour) pair, v its fibers; heads equal by exact splitting
    assert in_proj["nodes_after"] == H * (2 * pairs + v_fibers)
    # the original 1/sqrt(head dim) is written into the op, not recomputed from the new size
    att = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "Attention")
    scale = [onnx.helper.get_attribute_value(a) for a in att.attribute if a.name == "scale"]
    assert scale and abs(scale[0] - 1 / np.sqrt(info["head_dim"])) < 1e-7


def test_eps_recovers_a_noisy_transformer(tmp_path):
    """1e-3 noise on every parameter of the planted Transformer: eps = 0 keeps
    every unit, eps = 0.02 finds the planted residual stream, q/k/v and
    feed-forward fibers again (LayerNorm and the residual Adds cluster too),
    and the base stays close to the original."""
    model, info = P.planted_transformer(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    path = P.export_one(model, P.example_input(info), tmp_path / "noisy.onnx", dynamo=True)
    exact = compress_model(path, str(tmp_path / "b0.onnx"), eps=0.0, verify=True)
    assert all(ly["nodes_after"] == ly["nodes_before"] for ly in exact["layers"])
    rep = compress_model(path, str(tmp_path / "b1.onnx"), eps=0.02, linkage="complete", verify=True)
    after = [ly["nodes_after"] for ly in rep["layers"]]
    H = info["nhead"]
    hd = info["head_dim"]
    per_head = max(max(len(p) for p in info["qk_pairs"]),
                   max(len({info["maps"]["v"][h * hd + j] for j in range(hd)}) for h in range(H)))
    assert after == [len(info["sizes"]["residual"]), 3 * H * per_head, len(info["sizes"]["residual"]),
                     len(info["sizes"]["ff"]), len(info["sizes"]["residual"]), info["n_out"]]
    assert rep["layers"][0]["criterion"]["eps"] == 0.02
    assert rep["verify"]["max_abs_diff"] <= 1e-3 * max(1.0, rep["verify"]["max_abs_output"])


def _and_violations(imp, labels):
    """Pairs of one colour among sums, products, norms and bias adds whose stream
    operands (non-constant in-neighbours, by edge type) have different colours."""
    g = imp.graph
    kind = g.kind.astype(str)
    sig = {}
    for b in g.blocks:
        src, dst, _, et = b.coo()
        et = np.zeros(src.size, np.int64) if et is None else np.asarray(et)
        for s_, d_, e_ in zip(src, dst, et):
            if kind[d_] in ("factor", "norm", "per-unit") and kind[s_] != "const":
                sig.setdefault(int(d_), []).append((int(e_), int(labels[s_])))
    by_colour = {}
    for d_, ops in sig.items():
        by_colour.setdefault(int(labels[d_]), set()).add(tuple(sorted(ops)))
    return sum(len(v) - 1 for v in by_colour.values())


@pytest.mark.parametrize("eps", [0.3, 1.0, 1.9])
def test_and_rule_holds_under_any_tolerance(tmp_path, eps):
    """Under a tolerance, a sum, product, norm or bias add only merges with nodes
    whose stream operands have the same colours: eps applies to its constants.
    (Without the rule, LayerNorm rows reading different stream colours fall
    within eps and the next layer is aggregated over a class the base never
    forms.)"""
    from fibgraph.importers.dag_api import colour_dag
    from fibgraph.importers.onnx.importer import import_dag

    model, info = P.planted_transformer(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    path = P.export_one(model, P.example_input(info), tmp_path / "noisy.onnx", dynamo=False)
    imp = import_dag(path)
    col = colour_dag(imp, eps=eps, linkage="average")
    assert _and_violations(imp, col.labels) == 0
    out = tmp_path / "b.onnx"
    compress_model(path, str(out), eps=eps, linkage="average")      # writes, loads in onnxruntime
