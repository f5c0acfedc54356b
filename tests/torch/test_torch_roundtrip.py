"""Torch in, torch out (issue 13): ``compress_module`` on each architecture
torch exports to ONNX returns a module of the SAME class and attribute
structure (same ``named_modules`` names) whose layers are the real torch
classes with the base's shapes.

Per architecture, with planted exact fibers: the returned module's outputs
equal the base ONNX model's (onnxruntime) within 1e-5 (and the original's),
its parameter count equals the report's (read from the base's tensors), the
planted sizes are recovered, and names in the report are torch names.
A Transformer whose residual stream merges needs LayerNorm multiplicities no
``nn.LayerNorm`` computes: it falls back to ``OnnxModule``, and the report
names the torch module that blocks.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402

import planted_nets as pn  # noqa: E402
from fibgraph.errors import InputError  # noqa: E402
from fibgraph.importers.torch_base import ModuleCompression, compress_module, n_params  # noqa: E402

TOL = 1e-5


def _run_base(base, x):
    s = ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _check(model, res, x, classes):
    """The contract of the round trip (see the module doc)."""
    small = res.module
    assert isinstance(res, ModuleCompression) and type(small) is type(model) and small is not model
    assert res.report["fallback"] is None
    assert [n for n, _ in small.named_modules()] == [n for n, _ in model.named_modules()]
    for name, cls in classes.items():
        assert type(small.get_submodule(name)) is cls, name
    assert n_params(small) == res.report["params_after"] < res.report["params_before"] == n_params(model)
    small.eval()
    with torch.no_grad():
        got = small(x).numpy()
        orig = model(x).numpy()
    want = _run_base(res.onnx, x)
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= TOL * scale
    assert float(np.abs(got - orig).max()) <= 1e-4 * scale          # exact fibers: the original's function
    return small


def _planted_mlp():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(4, 10, generator=g).repeat(3, 1))
        m[0].bias.copy_(torch.randn(4, generator=g).repeat(3))
    return m.eval()


def test_mlp():
    m = _planted_mlp()
    res = compress_module(m, torch.zeros(1, 10))
    small = _check(m, res, torch.randn(9, 10), {"0": nn.Linear, "2": nn.Linear, "4": nn.Linear})
    assert tuple(small[0].weight.shape) == (4, 10) and tuple(small[2].weight.shape) == (8, 4)
    assert [r["weight"] for r in res.report["layers"]] == ["0.weight", "2.weight", "4.weight"]


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_cnn_with_batchnorm_keeps_batchnorm_layers():
    """Channel fibers of 8 -> 3 planted in conv 0 AND its BatchNorm (weight,
    bias, running statistics); the base keeps a real BatchNorm2d(3)."""
    torch.manual_seed(0)
    m = _ConvBN().eval()
    fib = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    conv, bn = m.features[0], m.features[1]
    with torch.no_grad():
        conv.weight.copy_(conv.weight[fib])
        conv.bias.copy_(conv.bias[fib])
        bn.weight.copy_((torch.rand(8) + 0.5)[fib])
        bn.bias.copy_(torch.randn(8)[fib])
        bn.running_mean.copy_(torch.randn(8)[fib])
        bn.running_var.copy_((torch.rand(8) + 0.5)[fib])
        m.features[4].running_var.uniform_(0.5, 1.5)
        m.features[4].running_mean.normal_()
    res = compress_module(m, torch.zeros(2, 2, 6, 6))
    small = _check(m, res, torch.randn(5, 2, 6, 6),
                   {"features.0": nn.Conv2d, "features.1": nn.BatchNorm2d, "features.3": nn.Conv2d,
                    "features.4": nn.BatchNorm2d, "head": nn.Linear})
    assert small.features[1].num_features == 3 and tuple(small.features[3].weight.shape) == (6, 3, 3, 3)
    assert small.features[1].running_var.shape == (3,)
    assert "features.0.weight" in {r["weight"] for r in res.report["layers"]}


def test_residual_net():
    big, info = pn.planted_residual_mlp(0)
    res = compress_module(big, torch.zeros(1, info["n_in"]))
    small = _check(big, res, torch.randn(7, info["n_in"]), {"fc1": nn.Linear, "res": nn.Linear, "out": nn.Linear})
    assert small.fc1.out_features == info["base_width"] == small.res.out_features == small.out.in_features


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_lstm_gru_hidden_size_shrinks_across_all_gate_blocks(kind):
    big, info = (pn.planted_lstm if kind == "LSTM" else pn.planted_gru)(0)
    x = torch.randn(4, info["seq"], info["n_in"])
    res = compress_module(big, torch.zeros(1, info["seq"], info["n_in"]))
    cls = getattr(nn, kind)
    small = _check(big, res, x, {"rnn": cls, "fc": nn.Linear})
    assert small.rnn.hidden_size == info["base_hidden_size"] and small.fc.in_features == info["base_hidden_size"]
    G = 4 if kind == "LSTM" else 3
    assert tuple(small.rnn.weight_hh_l0.shape) == (G * info["base_hidden_size"], info["base_hidden_size"])
    # the layer is named by the torch tensor, not onnx::LSTM_109
    assert "rnn.weight_ih_l0" in {r["weight"] for r in res.report["layers"]}
    # eps files speak torch names: the same name is accepted back
    again = compress_module(big, torch.zeros(1, info["seq"], info["n_in"]), eps={"rnn.weight_ih_l0": 0.0})
    assert again.report["params_after"] == res.report["params_after"]


class _Encoder(nn.Module):
    def __init__(self, d=8, nhead=2, ff=12, n_out=3):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, nhead, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def test_transformer_encoder_ffn_shrinks_attention_kept():
    """The feed-forward hidden units of layer 0 repeat (12 -> 5): linear1 and
    linear2 shrink; MultiheadAttention (packed in_proj) and LayerNorm keep
    their shapes and are the base's."""
    torch.manual_seed(0)
    m = _Encoder().eval()
    lay = m.encoder.layers[0]
    fib = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0])
    with torch.no_grad():
        lay.linear1.weight.copy_(lay.linear1.weight[fib])
        lay.linear1.bias.copy_(lay.linear1.bias[fib])
    res = compress_module(m, torch.zeros(1, 5, 8))
    small = _check(m, res, torch.randn(3, 5, 8),
                   {"encoder.layers.0.linear1": nn.Linear, "encoder.layers.0.self_attn": nn.MultiheadAttention,
                    "encoder.layers.0.norm1": nn.LayerNorm, "encoder.layers.1.linear2": nn.Linear})
    assert small.encoder.layers[0].linear1.out_features == 5 and small.encoder.layers[0].linear2.in_features == 5
    assert small.encoder.layers[1].linear1.out_features == 12
    names = {r["weight"] for r in res.report["layers"]}
    assert "encoder.layers.0.linear1.weight" in names and not any(n.startswith("onnx::") for n in names)


def test_transformer_with_a_merged_residual_stream_falls_back_and_names_the_module():
    big, _ = pn.planted_transformer(0)
    x = torch.randn(3, 5, 7)
    res = compress_module(big, torch.zeros(1, 5, 7), pin=False)
    from fibgraph.importers.onnx.to_torch import OnnxModule

    assert isinstance(res.module, OnnxModule)
    assert "module 'enc." in res.report["fallback"] and "OnnxModule" in res.report["fallback"]
    assert res.module.n_params() == res.report["params_after"]
    with torch.no_grad():
        got = res.module(x).numpy()
    np.testing.assert_allclose(got, _run_base(res.onnx, x), rtol=TOL, atol=TOL)
    with pytest.raises(InputError, match="module 'enc"):
        compress_module(big, torch.zeros(1, 5, 7), fallback=False, pin=False)


def test_transformer_keeps_the_residual_stream_whole_and_stays_its_class():
    """The default: the residual stream the LayerNorms read is kept whole (a
    torch LayerNorm has no multiplicities), the rest compresses, and the
    result is the module's own class computing the same function."""
    big, _ = pn.planted_transformer(0)
    x = torch.randn(3, 5, 7)
    res = compress_module(big, torch.zeros(1, 5, 7))
    assert type(res.module) is type(big) and res.report["fallback"] is None
    assert res.report["exact_for_torch"] and any("kept whole" in n for n in res.report["notes"])
    assert res.report["params_after"] == n_params(res.module)
    assert res.report["params_after"] < n_params(big)
    assert isinstance(res.module.enc.linear1, nn.Linear) and \
        res.module.enc.linear1.out_features < big.enc.linear1.out_features
    with torch.no_grad():
        np.testing.assert_allclose(res.module(x).numpy(), big(x).numpy(), rtol=TOL, atol=TOL)
        np.testing.assert_allclose(res.module(x).numpy(), _run_base(res.onnx, x), rtol=TOL, atol=TOL)


def test_layernorm_over_planted_copies_keeps_them_and_merges_the_rest():
    """Planted copies read by a LayerNorm stay (no merge), the planted copies
    after it merge 12 -> 6; exact at eps 0."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        for a, b in ((1, 0), (3, 2), (5, 4)):
            for p in (m[0].weight, m[0].bias, m[1].weight, m[1].bias):
                p[a] = p[b]
        m[3].weight[6:] = m[3].weight[:6]
        m[3].bias[6:] = m[3].bias[:6]
    res = compress_module(m, torch.zeros(1, 8))
    assert type(res.module) is nn.Sequential and res.report["exact_for_torch"] == ["0.weight"]
    assert [type(x) for x in res.module] == [type(x) for x in m]
    assert res.module[0].out_features == 6 and res.module[3].out_features == 6 and res.module[5].in_features == 6
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), m(x), rtol=1e-5, atol=1e-5)


def test_one_eps_for_every_layer_and_data_for_the_probe():
    """``eps`` as one float applies to every tunable layer (names in the
    report's eps table are torch names); ``data`` is the probe and the check
    input; the package exposes ``compress_module``."""
    import fibgraph.importers as fi

    m = _planted_mlp()
    x = np.random.default_rng(0).normal(size=(20, 10)).astype(np.float32)
    res = fi.compress_module(m, torch.zeros(1, 10), eps=0.3, data=x)
    assert set(res.report["eps"]) == {"0.weight", "2.weight"} and set(res.report["eps"].values()) == {0.3}
    exact = compress_module(m, torch.zeros(1, 10))
    assert res.report["params_after"] <= exact.report["params_after"] == n_params(exact.module)
    assert n_params(res.module) == res.report["params_after"]


def test_unknown_layer_names_are_refused_in_torch_names():
    with pytest.raises(InputError, match="0.weight"):
        compress_module(_planted_mlp(), torch.zeros(1, 10), eps={"9.weight": 0.1})


@pytest.mark.parametrize("with_data", [False, True])
def test_compress_module_keep_lands_on_the_budget_with_real_layers(one_torch_thread, with_data):
    """compress_module(keep=F): the returned module keeps F of the parameters
    (within the 2% of --keep, or the report says why not), with real
    nn.Linear layers of the original's attribute structure."""
    import torch
    from torch import nn

    from fibgraph.importers import compress_module

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 4)).eval()
    x = torch.randn(64, 12)
    data = (x, m(x).argmax(1)) if with_data else None
    res = compress_module(m, x[:1], keep=0.5, data=data)
    small, rep = res.module, res.report
    k = rep["keep"]
    assert k["mode"] == ("data-aware" if with_data else "data-free")
    n0 = sum(p.numel() for p in m.parameters())
    n1 = sum(p.numel() for p in small.parameters())
    assert n1 == rep["params_after"] < n0
    assert abs(n1 / n0 - 0.5) <= 0.02 or not k["landed"]
    assert [type(a) for a in small] == [type(a) for a in m]
    assert dict(m.named_modules()).keys() == dict(small.named_modules()).keys()


def test_a_submodule_the_forward_never_reaches_is_kept_as_it_is(one_torch_thread):
    """A module with a layer its forward does not use (as a BERT pooler under
    last_hidden_state): not in the export, so it is kept unchanged and
    counted once; the used layers shrink. (It used to be refused as
    'not found in its ONNX export'.)"""
    import torch
    from torch import nn

    from fibgraph.importers import compress_module

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.pooler = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(6, 6)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():                      # plant 3 pairs of equal units in fc1
        m.fc1.weight[3:] = m.fc1.weight[:3]
        m.fc1.bias[3:] = m.fc1.bias[:3]
    res = compress_module(m, torch.randn(1, 4), eps=0.0)
    small = res.module
    assert type(small) is Net and small.fc1.out_features == 3 and small.fc2.in_features == 3
    assert torch.equal(small.pooler.weight, m.pooler.weight)
    assert res.report["params_after"] == sum(p.numel() for p in small.parameters())
    x = torch.randn(8, 4)
    with torch.no_grad():
        assert float((small(x) - m(x)).abs().max()) < 1e-5


def test_size_first_chooses_between_the_size_asked_and_the_modules_class():
    """A TransformerEncoder at keep 0.5: keeping the attention and the residual
    stream whole cannot reach half the parameters, so by default the result
    is the interpreter at the size asked (and why); size_first=False gives
    the module's own class at the size it reaches, said in the report."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.enc(self.inp(x)).mean(1))

    from fibgraph.importers.onnx.to_torch import OnnxModule

    m, x = Net().eval(), torch.randn(3, 5, 6)
    a = compress_module(m, x, keep=0.5)
    assert isinstance(a.module, OnnxModule) and a.report["keep"]["landed"]
    assert "kept whole" in a.report["fallback"] and "asked: 50%" in a.report["fallback"]
    b = compress_module(m, x, keep=0.5, size_first=False)
    assert type(b.module) is Net and b.report["fallback"] is None and not b.report["keep"]["landed"]
    assert b.report["exact_for_torch"] and b.report["params_after"] == n_params(b.module) < n_params(m)
    assert b.module.enc.layers[0].linear1.out_features < 32
    with torch.no_grad():
        np.testing.assert_allclose(b.module(x).numpy(), _run_base(b.onnx, x), rtol=TOL, atol=TOL)
