"""Self-check of tests/planted_nets.py: the planted fibers are real and the
models export.

* torch: on random inputs every planted fiber has identical activations
  (max in-fiber spread <= 1e-6 * max(1, max |a|)), and distinct fibers differ
  (> 1e-3), so the planted partition IS the partition of equal activations;
  the hand-written ``taps`` agree with torch's own modules (forward hooks,
  nn.LSTM / nn.GRU outputs); exact lifts equal their base model.
* ONNX: both exporters (legacy and dynamo) write a file that passes
  onnx.checker, and onnxruntime reproduces torch within 1e-5 * max(1, |y|);
  with a dynamic batch axis, at batch sizes other than the example's.
* The exported RNN weights are the torch weights in ONNX gate order, and the
  attention weights are stored transposed (MatMul), as the docstring of
  planted_nets / the report says.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402

import planted_nets as pn  # noqa: E402

FIBER_TOL = 1e-6
ORT_TOL = 1e-5
APART = 1e-3

BUILDERS = {
    "lstm": lambda: pn.planted_lstm(0, return_base=True),
    "lstm_bi": lambda: pn.planted_lstm(1, bidirectional=True, return_base=True),
    "lstm_seqfirst": lambda: pn.planted_lstm(2, batch_first=False, return_base=True),
    "gru": lambda: pn.planted_gru(3, return_base=True),
    "gru_bi": lambda: pn.planted_gru(4, bidirectional=True, return_base=True),
    "transformer": lambda: pn.planted_transformer(5, return_base=True),
    "transformer_qk": lambda: pn.planted_transformer(6, qk_shared=False, return_base=True),
    "residual_mlp": lambda: pn.planted_residual_mlp(7, return_base=True),
    "residual_breaks": lambda: pn.residual_breaks_fibers(8) + (None,),
}
# name -> dynamic batch axis.  Every model here exports with a dynamic batch
# (PLANTED_NETS_ALL=1 checks that, and exports lstm_bi too); by default only
# the RNNs and the Transformer do, because dynamic shapes make the dynamo
# exporter ~2.5x slower and this file must run in under 20 s on 2 cores
# (dynamic-batch MLP exports are covered by test_onnx_planted).
ALL = os.environ.get("PLANTED_NETS_ALL") == "1"
EXPORTED = {"residual_breaks": ALL, "lstm": True, "gru": True, "transformer": True, "residual_mlp": ALL}
if ALL:
    EXPORTED["lstm_bi"] = True


def _scale(a):
    return max(1.0, float(np.max(np.abs(a))))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("planted_nets")
    out = {}
    for name, dynamic in EXPORTED.items():
        model, info, _ = models[name]
        out[name] = pn.export_both(model, pn.example_input(info, batch=3), d, name=name, dynamic=dynamic)
    return out


# ------------------------------------------------------------------ torch
@pytest.mark.parametrize("name", list(BUILDERS))
def test_planted_fibers_identical_and_distinct(models, name):
    model, info, base = models[name]
    x = pn.example_input(info, batch=16, seed=11)
    with torch.no_grad():
        y = model(x).numpy()
        taps = {k: v.numpy() for k, v in model.taps(x).items()}
        assert np.max(np.abs(taps["out"] - y)) <= FIBER_TOL * _scale(y)
        if info.get("exact_base"):
            yb = base(x).numpy()
            assert np.max(np.abs(yb - y)) <= ORT_TOL * _scale(y)
    assert set(info["fibers"]) <= set(taps)
    for layer, fibers in info["fibers"].items():
        a = taps[layer].reshape(-1, taps[layer].shape[-1])
        assert sorted(u for cl in fibers for u in cl) == list(range(a.shape[1])), layer
        assert fibers == sorted(sorted(cl) for cl in fibers), layer
        s = _scale(a)
        for cl in fibers:
            spread = np.max(np.abs(a[:, cl] - a[:, cl[:1]]))
            assert spread <= FIBER_TOL * s, (layer, cl, spread)
        reps = a[:, [cl[0] for cl in fibers]]
        gap = np.max(np.abs(reps[:, :, None] - reps[:, None, :]), axis=0) + np.eye(len(fibers)) * 1e9
        assert gap.min() > APART, (layer, gap.min())
    # the lifted layers are non-trivial, non-uniform and shuffled
    lifted = [f for k, f in info["fibers"].items() if info["layer_map"][k] is not None]
    assert lifted and all(any(len(cl) > 1 for cl in f) for f in lifted)
    for mname, sizes in info["sizes"].items():
        assert sorted(info["maps"][mname]) == sorted(np.repeat(np.arange(len(sizes)), sizes).tolist())
        assert len(set(sizes)) > 1 or mname in ("a", "b"), mname
    assert any(cl != list(range(cl[0], cl[0] + len(cl))) for f in lifted for cl in f)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_taps_match_torch_modules(models, name):
    """taps() recomputes by hand; check it against torch's modules (slow path, grad on)."""
    model, info, _ = models[name]
    x = pn.example_input(info, batch=4, seed=12)
    taps = model.taps(x)
    if isinstance(model, pn.RNNNet):
        out, state = model.rnn(x)
        if not model.batch_first:
            out = out.transpose(0, 1)
        got = {"rnn.hidden": out}
        if model.kind == "LSTM":
            c_n = state[1]                                            # (dirs, batch, H)
            H = model.rnn.hidden_size
            cell = taps["rnn.cell"]
            assert torch.allclose(c_n[0], cell[:, -1, :H], atol=1e-6)
            if model.rnn.bidirectional:
                assert torch.allclose(c_n[1], cell[:, 0, H:], atol=1e-6)
    else:
        hooks = {"inp": "inp", "attn.out_proj": "enc.self_attn", "norm1": "enc.norm1", "ff.linear1": "enc.linear1",
                 "ff.linear2": "enc.linear2", "norm2": "enc.norm2", "fc": "fc",
                 "fc1": "fc1", "res": "res", "fc_out": "fc_out" if hasattr(model, "fc_out") else "out",
                 "fc_a": "fc_a", "fc_skip": "fc_skip"}
        mods = dict(model.named_modules())
        got, handles = {}, []
        for key, mod in hooks.items():
            if key in info["fibers"] and mod in mods:
                def hook(m, inp, out, key=key):
                    got[key] = out[0] if isinstance(out, tuple) else out
                handles.append(mods[mod].register_forward_hook(hook))
        y = model(x)
        for h in handles:
            h.remove()
        assert torch.allclose(y, taps["out"], atol=1e-6)
        if isinstance(model, pn.TransformerNet):
            assert {"attn.out_proj", "norm1", "ff.linear1", "ff.linear2", "norm2"} <= set(got)   # slow path ran
    assert got
    for key, val in got.items():
        assert torch.allclose(val, taps[key], atol=1e-6 * _scale(val.detach().numpy())), key


def test_residual_breaks_meet(models):
    _, info, _ = models["residual_breaks"]
    a, b, m = info["partition_a"], info["partition_b"], info["meet"]
    assert info["fibers"]["add"] == m == pn.meet(a, b)
    assert m != a and m != b and len(m) == 5 and sorted(map(len, m)) == [1, 1, 2, 2, 2]
    where_a = {u: c for c, cl in enumerate(a) for u in cl}
    where_b = {u: c for c, cl in enumerate(b) for u in cl}
    for cl in m:                                   # the meet refines both
        assert len({where_a[u] for u in cl}) == 1 and len({where_b[u] for u in cl}) == 1


def test_transformer_qk_pairs(models):
    _, info, _ = models["transformer"]
    assert [len(p) for p in info["qk_pairs"]] == [2, 2]               # shared q/k map: base head dim
    _, info, _ = models["transformer_qk"]
    hd = info["head_dim"]
    for h, pairs in enumerate(info["qk_pairs"]):
        q = [info["maps"]["q"][h * hd + j] for j in range(hd)]
        k = [info["maps"]["k"][h * hd + j] for j in range(hd)]
        assert pairs == pn.fibers_of([qq * 100 + kk for qq, kk in zip(q, k)])
        assert all(h * info["base_head_dim"] <= c < (h + 1) * info["base_head_dim"] for c in q + k)
    assert max(len(p) for p in info["qk_pairs"]) > 2


# ------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", list(EXPORTED))
def test_onnxruntime_matches_torch(models, exports, name, exporter):
    model, info, _ = models[name]
    sess = ort.InferenceSession(exports[name][exporter], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    dims = sess.get_inputs()[0].shape
    batch_axis = 1 if info.get("batch_first") is False else 0
    assert isinstance(dims[batch_axis], str) == EXPORTED[name], dims          # dynamic batch axis as asked
    for batch in ((1, 5) if EXPORTED[name] else (3,)):
        x = pn.example_input(info, batch=batch, seed=20 + batch)
        with torch.no_grad():
            y = model(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert got.shape == y.shape
        assert np.max(np.abs(got - y)) <= ORT_TOL * _scale(y), (name, exporter, batch)


def _onnx(path):
    m = onnx.load(path)
    return m, {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", [n for n in ("lstm", "lstm_bi", "gru") if n in EXPORTED])
def test_rnn_export_layout(models, exports, name, exporter):
    """One LSTM/GRU node; W (dirs, G*H, I), R (dirs, G*H, H), B (dirs, 2*G*H) are
    torch's weights with the gate blocks reordered: LSTM torch [i,f,g,o] -> ONNX
    [i,o,f,c]; GRU torch [r,z,n] -> ONNX [z,r,h] (linear_before_reset=1)."""
    model, info, _ = models[name]
    m, inits = _onnx(exports[name][exporter])
    nodes = [n for n in m.graph.node if n.op_type == info["kind"]]
    assert len(nodes) == 1
    node = nodes[0]
    H = model.rnn.hidden_size
    order = [0, 3, 1, 2] if info["kind"] == "LSTM" else [1, 0, 2]
    sfx = ["", "_reverse"] if info["bidirectional"] else [""]
    sd = {k: v.detach().numpy() for k, v in model.rnn.state_dict().items()}

    def reo(a):
        return np.concatenate([a[g * H:(g + 1) * H] for g in order])

    W = np.stack([reo(sd["weight_ih_l0" + s]) for s in sfx])
    R = np.stack([reo(sd["weight_hh_l0" + s]) for s in sfx])
    B = np.stack([np.concatenate([reo(sd["bias_ih_l0" + s]), reo(sd["bias_hh_l0" + s])]) for s in sfx])
    w, r, b = (inits[i] for i in node.input[1:4])
    assert np.array_equal(w, W) and np.array_equal(r, R) and np.array_equal(b, B)
    if info["kind"] == "GRU":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["linear_before_reset"] == 1


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_transformer_export_layout(models, exports, exporter):
    """in_proj packed [q;k;v] and stored TRANSPOSED (8, 24) for one MatMul;
    out_proj kept (8, 8) for Gemm(transB=1); linear1/linear2/inp transposed."""
    model, info, _ = models["transformer"]
    m, inits = _onnx(exports["transformer"][exporter])
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ops = {n.op_type for n in m.graph.node}
    assert {"LayerNormalization", "Softmax", "MatMul", "Gemm"} <= ops
    found = {}
    for key, v in sd.items():
        for name, a in inits.items():
            if a.shape == v.shape and np.array_equal(a, v):
                found[key] = (name, False)
            elif v.ndim == 2 and a.shape == v.T.shape and np.array_equal(a, v.T):
                found[key] = (name, True)
    assert found["enc.self_attn.in_proj_weight"][1] is True
    assert found["enc.self_attn.out_proj.weight"] == ("enc.self_attn.out_proj.weight", False)
    for key in ("inp.weight", "enc.linear1.weight", "enc.linear2.weight"):
        assert found[key][1] is True, key
    assert set(found) == set(sd), set(sd) - set(found)      # every parameter is an initializer
