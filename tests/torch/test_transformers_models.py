"""transformers models through ``compress_module`` (random init from configs:
no hub access): the export of a forward behind keyword-binding decorators,
a BertModel back as a BertModel at a size asked for (attention projections
kept whole where torch's head layout cannot hold merged head dims), and a
GPT2Model (transformers' own Conv1D layers) back as a GPT2Model with smaller
feed-forward layers."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from fibgraph.importers.torch_base import compress_module, n_params  # noqa: E402
from fibgraph.importers.torch_train import first_tensor  # noqa: E402

TOL = 1e-5


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def _ids(vocab=300):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _run_base(mp, x):
    import onnxruntime as ort

    s = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def test_bert_exact_is_a_bert_with_the_same_function():
    m, x = _bert(), _ids()
    res = compress_module(m, x, eps=0)
    assert type(res.module) is transformers.BertModel and res.report["fallback"] is None
    assert res.report["params_after"] == n_params(res.module)
    with torch.no_grad():
        np.testing.assert_allclose(first_tensor(res.module(x)).numpy(), first_tensor(m(x)).numpy(),
                                   rtol=TOL, atol=TOL)


def test_bert_at_half_the_parameters_stays_a_bert():
    m, x = _bert(), _ids()
    res = compress_module(m, x, keep=0.5)
    r = res.report
    assert type(res.module) is transformers.BertModel and r["fallback"] is None
    assert r["keep"]["landed"] and abs(r["params_after"] / r["params_before"] - 0.5) < 0.05
    assert r["params_after"] == n_params(res.module)
    # torch names, and the attention projections kept whole (head dims must stay equal)
    assert r["exact_for_torch"] and all(n.startswith("encoder.layer.") for n in r["exact_for_torch"])
    assert any("attention.self" in n for n in r["exact_for_torch"])
    ff = res.module.encoder.layer[0].intermediate.dense
    assert type(ff) is nn.Linear and ff.out_features < 256
    assert res.module.encoder.layer[0].output.dense.in_features == ff.out_features
    with torch.no_grad():
        got = first_tensor(res.module(x)).numpy()
    np.testing.assert_allclose(got, _run_base(res.onnx, x), rtol=1e-4, atol=1e-4)


def test_gpt2_at_half_the_parameters_stays_a_gpt2():
    # transformers' Conv1D (weight (in, out), output width nf) is rebuilt at the
    # base's width; its reshape reads nf, so the writer's shape rewrite there
    # needs no torch node.  Attention (packed q/k/v split by head size) and the
    # residual stream (LayerNorm) are kept whole; the feed-forward layers shrink.
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    m, x = transformers.GPT2Model(cfg).eval(), _ids()
    exact = compress_module(m, x, eps=0)
    assert type(exact.module) is transformers.GPT2Model and exact.report["fallback"] is None
    res = compress_module(m, x, keep=0.5)
    r = res.report
    assert type(res.module) is transformers.GPT2Model and r["fallback"] is None
    assert r["keep"]["landed"] and abs(r["params_after"] / r["params_before"] - 0.5) < 0.05
    assert r["params_after"] == n_params(res.module)
    assert any("attn.c_attn" in n for n in r["exact_for_torch"])
    for blk in res.module.h:
        fc, proj = blk.mlp.c_fc, blk.mlp.c_proj
        assert type(fc).__name__ == "Conv1D" and fc.nf < 256 and tuple(fc.weight.shape) == (64, fc.nf)
        assert tuple(proj.weight.shape) == (fc.nf, 64) and proj.nf == 64
        assert tuple(blk.attn.c_attn.weight.shape) == (64, 192)
    with torch.no_grad():
        got = first_tensor(res.module(x)).numpy()
    np.testing.assert_allclose(got, _run_base(res.onnx, x), rtol=1e-4, atol=1e-4)
