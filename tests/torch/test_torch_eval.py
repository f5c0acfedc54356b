"""Torch out from ONNX (``compress --torch OUT.pt``), evaluation on a device
(``eval --device/--batch-size/--dtype``), and a forward without host tensors
(issue 13).  All on CPU: the CUDA paths are checked for their refusal and
their engine choice (CUDA availability monkeypatched)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import planted_nets as pn  # noqa: E402
from helpers import assert_one_line_error, cli, mlp_onnx, read_json, run_onnx, save  # noqa: E402
from fibgraph.importers import device_eval  # noqa: E402
from fibgraph.importers.onnx.to_torch import OnnxModule  # noqa: E402
from fibgraph.errors import InputError  # noqa: E402
from fibgraph.importers.torch_out import load_torch, onnx_to_torch  # noqa: E402
from fibgraph.importers.torch_rebuild import export_named  # noqa: E402


@pytest.fixture()
def mlp(tmp_path):
    """A 6-10-4 MLP with a planted duplicate hidden unit, and labelled data."""
    rng = np.random.default_rng(0)
    W1, b1 = rng.normal(0, 1, (10, 6)), rng.normal(0, 0.5, 10)
    W1[7:], b1[7:] = W1[:3], b1[:3]
    W2, b2 = rng.normal(0, 1, (4, 10)), rng.normal(0, 0.5, 4)
    p = save(mlp_onnx([W1, W2], [b1, b2]), tmp_path / "m.onnx")
    x = rng.normal(0, 1, (50, 6)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return p, tmp_path / "d.npz", x


def test_eval_cuda_without_cuda_is_one_line_exit_2(capsys, monkeypatch, mlp):
    monkeypatch.setattr(device_eval, "_ort_has_cuda", lambda: False)
    monkeypatch.setattr(device_eval, "_torch_cuda", lambda: False)
    rc, _, err = cli(capsys, "eval", mlp[0], "--data", mlp[1], "--device", "cuda")
    assert_one_line_error(rc, err, "--device cuda")


def test_engine_choice(monkeypatch):
    pick = device_eval.pick_engine
    monkeypatch.setattr(device_eval, "_ort_has_cuda", lambda: True)
    monkeypatch.setattr(device_eval, "_torch_cuda", lambda: True)
    assert pick("m.onnx", "cuda") == "onnxruntime"
    assert pick("m.onnx", "cuda", "float16") == "torch"          # low precision: torch autocast
    assert pick("m.pt", "cuda") == "torch"
    monkeypatch.setattr(device_eval, "_ort_has_cuda", lambda: False)
    assert pick("m.onnx", "cuda") == "torch"                     # stock onnxruntime: torch on CUDA
    assert pick("m.onnx", "cpu") == "onnxruntime" and pick("m.onnx", "cpu", "bfloat16") == "torch"


def test_eval_reports_scores_latency_and_throughput(capsys, mlp, tmp_path):
    p, d, _ = mlp
    rc, so, err = cli(capsys, "eval", p, "--data", d, "--batch-size", "16", "--repeats", "3", "--json",
                      tmp_path / "a.json")
    assert rc == 0, err
    a = read_json(tmp_path / "a.json")
    assert a["engine"] == "onnxruntime" and a["batch_size"] == 16 and a["latency_ms"] > 0
    assert a["throughput"] == pytest.approx(16 / (a["latency_ms"] / 1e3))
    assert "latency" in so and "throughput" in so
    rc, so, err = cli(capsys, "eval", p, "--data", d, "--dtype", "bfloat16", "--repeats", "2", "--json",
                      tmp_path / "b.json")
    assert rc == 0, err
    b = read_json(tmp_path / "b.json")
    assert b["engine"] == "torch" and b["dtype"] == "bfloat16" and b["n"] == a["n"] == 50
    assert b["loss"] == pytest.approx(a["loss"], rel=0.05)       # bfloat16: 8 bits of mantissa


def test_compress_torch_out_loads_back_as_real_layers_and_matches(capsys, mlp, tmp_path):
    p, d, x = mlp
    rc, _, err = cli(capsys, "compress", p, "-o", tmp_path / "s.onnx", "--torch", tmp_path / "s.pt")
    assert rc == 0, err
    m = load_torch(tmp_path / "s.pt")
    assert isinstance(m, nn.Sequential) and [type(t) for t in m] == [nn.Linear, nn.ReLU, nn.Linear]
    assert m[0].out_features == 7                                # the planted copies merged
    with torch.no_grad():
        got = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_onnx(str(tmp_path / "s.onnx"), x)[0], rtol=1e-5, atol=1e-5)
    # the .pt evaluates like the ONNX base
    rc, _, err = cli(capsys, "eval", tmp_path / "s.pt", "--data", d, "--repeats", "2", "--json", tmp_path / "t.json")
    assert rc == 0, err
    rc, _, err = cli(capsys, "eval", tmp_path / "s.onnx", "--data", d, "--repeats", "2", "--json",
                     tmp_path / "o.json")
    assert rc == 0, err
    t, o = read_json(tmp_path / "t.json"), read_json(tmp_path / "o.json")
    assert t["engine"] == "torch" and t["accuracy"] == o["accuracy"]
    assert t["loss"] == pytest.approx(o["loss"], rel=1e-5)


def test_pad_to_rounds_the_torch_widths_with_zero_units(capsys, mlp, tmp_path):
    """--pad-to 8: the merged width 7 becomes 8, the function is the same, the
    report counts the zero parameters added; without --torch: exit 2."""
    p, d, x = mlp
    rc, so, err = cli(capsys, "compress", p, "-o", tmp_path / "s.onnx", "--torch", tmp_path / "s.pt",
                      "--pad-to", "8", "--report", tmp_path / "r.json")
    assert rc == 0, err
    m = load_torch(tmp_path / "s.pt")
    assert m[0].out_features == 8 and m[2].in_features == 8 and m[2].out_features == 4
    t = read_json(tmp_path / "r.json")["torch"]
    assert t["pad_to"] == 8 and t["zero_params_added"] == m[0].in_features + 1 + 4 and "padded" in so
    with torch.no_grad():
        got = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_onnx(str(tmp_path / "s.onnx"), x)[0], rtol=1e-5, atol=1e-5)
    rc, _, err = cli(capsys, "compress", p, "-o", tmp_path / "t.onnx", "--pad-to", "8")
    assert rc == 2 and "--torch" in err and not (tmp_path / "t.onnx").exists()


def test_pad_widths_keeps_a_cnn_with_batchnorm_and_flatten_exact():
    from fibgraph.importers.torch_out import pad_widths

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(7, 13, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(13 * 4, 34), nn.Tanh(), nn.Linear(34, 10)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].bias.uniform_(-1, 1)
    p, added = pad_widths(m, 8)
    assert [p[0].out_channels, p[4].in_channels, p[4].out_channels, p[8].in_features, p[8].out_features,
            p[10].in_features, p[10].out_features] == [8, 8, 16, 64, 40, 40, 10]
    assert added == sum(t.numel() for t in p.parameters()) - sum(t.numel() for t in m.parameters())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="nn.Sequential"):
        pad_widths(nn.LSTM(3, 4), 8)


def test_a_softmax_topped_module_is_scored_as_probabilities(capsys, mlp, tmp_path):
    rng = np.random.default_rng(1)
    W1, W2 = rng.normal(0, 1, (5, 6)), rng.normal(0, 1, (4, 5))
    p = save(mlp_onnx([W1, W2], [np.zeros(5), np.zeros(4)], out_op="Softmax"), tmp_path / "s.onnx")
    module, how = onnx_to_torch(p)
    assert how == "sequential" and isinstance(module[-1], nn.Softmax)
    from fibgraph.importers.torch_out import save_torch

    save_torch(module, tmp_path / "s.pt")
    a = device_eval.evaluate_on(str(tmp_path / "s.pt"), str(mlp[1]), repeats=1, warmup=0)
    b = device_eval.evaluate_on(p, str(mlp[1]), repeats=1, warmup=0)
    assert a["engine"] == "torch" and a["output_kind"] == "probs" == b["output_kind"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]


def test_torch_out_falls_back_to_the_interpreter_for_graphs_without_a_torch_class(tmp_path):
    big, info = pn.planted_lstm(0)
    mp, _ = export_named(big, torch.zeros(1, info["seq"], info["n_in"]))
    module, how = onnx_to_torch(mp)
    assert isinstance(module, OnnxModule) and how == "onnx interpreter"
    from fibgraph.importers.torch_out import save_torch

    save_torch(module, tmp_path / "l.pt")
    back = load_torch(tmp_path / "l.pt")
    x = torch.randn(3, info["seq"], info["n_in"])
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), run_onnx(mp, x.numpy())[0], rtol=1e-5, atol=1e-5)


def test_load_torch_refuses_other_files(tmp_path):
    torch.save({"a": 1}, tmp_path / "d.pt")
    with pytest.raises(Exception, match="not an nn.Module"):
        load_torch(tmp_path / "d.pt")


class _HostTraffic(TorchFunctionMode):
    """Calls that create a tensor from host values or read one back to the
    host: a CUDA graph capture fails on them."""

    WATCH = frozenset({"tensor", "as_tensor", "from_numpy", "tolist", "item", "numpy", "cpu"})

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.WATCH:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_transformer_base_forward_makes_no_host_tensors():
    """The Transformer base as OnnxModule (its residual stream merged: no torch
    class computes it): after the first call for an input shape, the forward
    runs only data nodes; before this change every Shape built a tensor from
    a Python list and every Reshape read its target back with .tolist()."""
    from fibgraph.importers.torch_base import compress_module

    big, _ = pn.planted_transformer(0)
    m = compress_module(big, torch.zeros(1, 5, 7), pin=False).module
    assert isinstance(m, OnnxModule)
    x = torch.randn(4, 5, 7)
    with torch.no_grad():
        first = m(x)
        with _HostTraffic() as watch:
            again = m(x)
        assert watch.calls == []
        torch.testing.assert_close(again, first)
        other = m(torch.randn(2, 5, 7))                          # another batch size: its own plan
        assert other.shape == (2, 3)
        # a check on the check: without the plan, the shape arithmetic is host traffic
        m._static_nodes, m._plans = set(), {}
        with _HostTraffic() as watch:
            m(x)
    assert {"tensor", "tolist"} <= set(watch.calls)
