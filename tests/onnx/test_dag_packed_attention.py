"""Attention with torch's PACKED ``in_proj`` (issue 11, item 7) on the hypergraph
path (``fibgraph.importers.dag_api.compress_dag_model``), both torch exporters.

A standard ``nn.TransformerEncoderLayer(d_model 16, nhead 2, dim_ff 6,
batch_first)`` gets planted fibers in its attention: per head, the rows of
W_Q and W_K (weights and bias) repeat so that the head dims fall into a few
(q colour, k colour) PAIR classes, and the rows of W_V into a few v fibers
(out_proj's columns are left free: they are summed).  The residual stream and
the feed-forward block are random (nothing to merge there).

The exact base (docs/design.md section 6): q.k over a head's dims merges by
(q colour, k colour) pairs, so q and k keep, per head, the number of pair
classes (heads keep equal sizes: the largest count, reached by exact
splitting); v keeps its fibers; the multiplicity is folded into W_Q (no extra
constant) and the original 1/sqrt(head dim) stays.  Its parameter count is
computed here by hand from those sizes.  The bug: the exporters reshape the
packed projection to (..., 3, d_model) and Gather q, k, v from it, and the
writer made q, k and v keep EQUAL sizes there (48 -> 30 rows instead of 20).

Checked per exporter: the report's parameter count equals the hand count of
the exact base; the in_proj rows kept and their groups equal the planted
pairs / v fibers; the head dims of the written score and PV MatMuls (run in
onnxruntime) are the pair count and the v fiber count; outputs equal the
original file's and torch's within 1e-5 relative at another batch size (and,
for the dynamo export, whose sequence axis is dynamic, another sequence
length: the TorchScript exporter bakes torch's MHA sequence length in).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import planted_nets as pn  # noqa: E402
from fibgraph.importers.dag_api import compress_dag_model  # noqa: E402

D, NH, HD, FF, SEQ = 16, 2, 8, 6, 5
TOL = 1e-5
# per head: colours of the 8 head dims of q, k and v
PLANTS = {
    # 3 (q, k) pairs and 4 v fibers in each head; q has 2 fibers in head 0 but
    # 3 in head 1, k the other way round: the pairs, not q's fibers, decide
    "equal": {"q": [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2, 2]],
              "k": [[0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1]],
              "v": [[0, 1, 1, 2, 2, 2, 3, 3], [0, 0, 0, 1, 2, 2, 3, 3]]},
    # head 0: 3 pairs, 4 v fibers; head 1: 2 pairs, 3 v fibers -> split to 3 and 4
    "unequal": {"q": [[0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1]],
                "k": [[0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0]],
                "v": [[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 1, 1, 1, 2, 2]]},
}
KINDS = ("legacy", "dynamo")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.TransformerEncoderLayer(D, NH, FF, dropout=0.0, batch_first=True)
        self.eval()

    def forward(self, x):
        return self.enc(x)


def _pairs(plant, h):
    return {(q, k) for q, k in zip(plant["q"][h], plant["k"][h])}


def _sizes(plant):
    """(q/k dims per head, v dims per head) of the exact base: the largest count over heads."""
    qk = max(len(_pairs(plant, h)) for h in range(NH))
    v = max(len(set(plant["v"][h])) for h in range(NH))
    return qk, v


def _planted(name):
    plant = PLANTS[name]
    rng = np.random.default_rng(11)
    net = Net()

    def rows(cols):           # per head, one random row (weights + bias) per colour, repeated
        return np.concatenate([rng.standard_normal((max(c) + 1, D + 1))[c] for c in cols])

    W = np.concatenate([rows(plant["q"]), rows(plant["k"]), rows(plant["v"])])
    enc = net.enc
    with torch.no_grad():
        enc.self_attn.in_proj_weight.copy_(torch.tensor(W[:, :D] * 0.5))
        enc.self_attn.in_proj_bias.copy_(torch.tensor(W[:, D] * 0.2))
        # every other parameter random and distinct (the exporters share equal initializers)
        for p in (enc.self_attn.out_proj.weight, enc.self_attn.out_proj.bias, enc.linear1.weight,
                  enc.linear1.bias, enc.linear2.weight, enc.linear2.bias, enc.norm1.bias, enc.norm2.bias):
            p.copy_(torch.tensor(0.4 * rng.standard_normal(tuple(p.shape))))
        for p in (enc.norm1.weight, enc.norm2.weight):
            p.copy_(torch.tensor(1.0 + 0.3 * rng.standard_normal(tuple(p.shape))))
    return net, plant


def _export(net, path, kind):
    x = torch.randn(3, SEQ, D)
    with pn._quiet():
        if kind == "dynamo":
            dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", min=2, max=1024)}
            torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                              external_data=False, dynamic_shapes=(dims,), verbose=False)
        else:
            torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return str(path)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_attention")
    out = {}
    for name in PLANTS:
        net, plant = _planted(name)
        for kind in KINDS:
            src = _export(net, root / f"{name}_{kind}.onnx", kind)
            dst = root / f"{name}_{kind}_base.onnx"
            report = compress_dag_model(src, dst, eps=0.0, verify=True)
            out[(name, kind)] = (net, plant, src, str(dst), report)
    return out


CASES = [(n, k) for n in PLANTS for k in KINDS]


def _in_proj(report):
    hits = [layer for layer in report["layers"] if layer["nodes_before"] == 3 * D]
    assert len(hits) == 1, [layer["weight"] for layer in report["layers"]]
    return hits[0]


def _n_params(d_qk, d_v):
    """Parameters of the layer with q, k of ``d_qk`` and v of ``d_v`` features in all."""
    in_proj = (2 * d_qk + d_v) * (D + 1)
    out_proj = D * d_v + D
    norms = 4 * D
    ff = FF * (D + 1) + D * (FF + 1)
    return in_proj + out_proj + norms + ff


@pytest.mark.parametrize("name,kind", CASES)
def test_params_equal_exact_base(cases, name, kind):
    _, plant, _, _, report = cases[(name, kind)]
    assert report["barriers"] == []
    qk, v = _sizes(plant)
    # float constants that are not weights (the exporters' attention scale)
    extra = report["params_before"] - _n_params(D, D)
    assert 0 <= extra <= 2, report["params_before"]
    assert report["params_after"] == _n_params(NH * qk, NH * v) + extra, \
        (report["params_after"], _n_params(NH * qk, NH * v) + extra)


@pytest.mark.parametrize("name,kind", CASES)
def test_in_proj_groups_are_planted_pairs(cases, name, kind):
    """q and k rows merge by (q colour, k colour) pair classes, v rows by v fibers;
    heads split to equal sizes only where their counts differ."""
    _, plant, _, _, report = cases[(name, kind)]
    layer = _in_proj(report)
    qk, v = _sizes(plant)
    assert layer["nodes_after"] == NH * (2 * qk + v), layer["nodes_after"]
    assert "kept_whole" not in layer
    fibers = {frozenset(f) for f in layer["fibers"]}
    for h in range(NH):
        pairs = list(zip(plant["q"][h], plant["k"][h]))
        for off in (0, D):                                  # q rows, then k rows
            mine = {f for f in fibers if min(f) >= off + h * HD and max(f) < off + (h + 1) * HD}
            assert len(mine) == qk, (h, off, mine)
            for f in mine:                                  # each group lies in one pair class
                assert len({pairs[i - off - h * HD] for i in f}) == 1, (h, off, f)
            if len(_pairs(plant, h)) == qk:                 # no split needed: the groups ARE the classes
                want = {frozenset(off + h * HD + j for j in range(HD) if pairs[j] == p) for p in set(pairs)}
                assert mine == want
        mine = {f for f in fibers if min(f) >= 2 * D + h * HD and max(f) < 2 * D + (h + 1) * HD}
        assert len(mine) == v
        cols = plant["v"][h]
        for f in mine:
            assert len({cols[i - 2 * D - h * HD] for i in f}) == 1, (h, f)


def _score_and_pv(model):
    """(q operand of the score MatMul, v operand of the PV MatMul) tensor names."""
    prod = {o: n for n in model.graph.node for o in n.output}
    cons = {}
    for n in model.graph.node:
        for x in n.input:
            cons.setdefault(x, []).append(n)
    inits = {t.name for t in model.graph.initializer}
    score = pv = None
    for n in model.graph.node:
        if n.op_type != "Softmax":
            continue
        t = n.input[0]
        while prod[t].op_type != "MatMul":
            t = next(x for x in prod[t].input if x not in inits and x in prod)
        score = prod[t]
        t = n.output[0]
        while cons[t][0].op_type != "MatMul":
            t = cons[t][0].output[0]
        pv = cons[t][0]
    assert score is not None and pv is not None
    return score.input[0], pv.input[1]


def _run(path, x, extra=()):
    m = onnx.load(path)
    for t in extra:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


@pytest.mark.parametrize("name,kind", CASES)
def test_head_dims_shrink(cases, name, kind):
    _, plant, src, dst, _ = cases[(name, kind)]
    qk, v = _sizes(plant)
    x = np.random.default_rng(2).standard_normal((2, SEQ, D)).astype(np.float32)
    for path, want in ((src, (HD, HD)), (dst, (qk, v))):
        q_t, v_t = _score_and_pv(onnx.load(path))
        _, q, vv = _run(path, x, (q_t, v_t))
        assert (q.shape[-1], vv.shape[-1]) == want, (path, q.shape, vv.shape)
        assert q.size // q.shape[-1] == 2 * NH * SEQ        # (batch, heads, seq) in some order


@pytest.mark.parametrize("name,kind", CASES)
def test_outputs_equal_elsewhere(cases, name, kind):
    net, _, src, dst, report = cases[(name, kind)]
    ver = report["verify"]
    assert ver["max_abs_diff"] <= TOL * max(1.0, ver["max_abs_output"]), ver
    onnx.checker.check_model(onnx.load(dst), full_check=True)
    shapes = [(5, SEQ), (1, SEQ)] + ([(4, 9), (2, 3)] if kind == "dynamo" else [])
    for b, t in shapes:
        x = np.random.default_rng(b * 100 + t).standard_normal((b, t, D)).astype(np.float32)
        y_orig = _run(src, x)[0]
        y_base = _run(dst, x)[0]
        with torch.no_grad():
            y_torch = net(torch.from_numpy(x)).numpy()
        scale = max(1.0, float(np.max(np.abs(y_torch))))
        assert y_base.shape == y_torch.shape == (b, t, D)
        assert np.max(np.abs(y_base - y_orig)) <= TOL * scale, (b, t)
        assert np.max(np.abs(y_base - y_torch)) <= TOL * scale, (b, t)


# ------------------------------------------- the multiplicity: folded or a Mul
class _SeparateQKV(torch.nn.Module):
    """One head with separate q, k, v Linears; ``reads_q``: q is also added to
    the attention output, so the score is not q's only reader."""

    def __init__(self, reads_q, d=8):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.reads_q = reads_q
        self.eval()

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
        return self.o(a + q if self.reads_q else a)


@pytest.mark.parametrize("reads_q", [False, True], ids=["score-only", "q-read-elsewhere"])
@pytest.mark.parametrize("kind", KINDS)
def test_multiplicity_folded_into_w_q_or_a_mul(reads_q, kind, tmp_path):
    """q, k, v rows repeat along one map (3 classes of sizes 2, 3, 3): q.k keeps 3
    dims.  When only the score reads q, the multiplicities go into W_Q and its
    bias (no new constant: the hand count); when q has another reader they
    cannot (that reader needs q itself) and a Mul before the score carries
    them (3 more parameters).  Both exact."""
    rng = np.random.default_rng(5)
    net = _SeparateQKV(reads_q)
    cols = [0, 0, 1, 1, 1, 2, 2, 2]
    with torch.no_grad():
        for lin in (net.q, net.k, net.v):
            R = rng.standard_normal((3, 9))[cols]
            lin.weight.copy_(torch.tensor(R[:, :8]))
            lin.bias.copy_(torch.tensor(R[:, 8]))
    src = pn.export_one(net, torch.randn(2, SEQ, 8), tmp_path / f"qkv_{kind}.onnx", dynamo=kind == "dynamo")
    dst = tmp_path / "base.onnx"
    report = compress_dag_model(src, dst, eps=0.0, verify=True)
    v = report["verify"]
    assert v["max_abs_diff"] <= TOL * max(1.0, v["max_abs_output"]), v
    extra = report["params_before"] - 4 * 72                 # the exporter's scale constant
    assert 0 <= extra <= 2
    base = 3 * 3 * 9 + (8 * 3 + 8) + extra                   # q, k, v: 3 rows; o: 3 columns
    muls = [n for n in onnx.load(str(dst)).graph.node if n.name.startswith("fib_mult")]
    assert report["params_after"] == base + (3 if reads_q else 0), report["params_after"]
    assert len(muls) == (1 if reads_q else 0)
    x = np.random.default_rng(7).standard_normal((4, SEQ, 8)).astype(np.float32)
    with torch.no_grad():
        y_torch = net(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(_run(str(dst), x)[0] - y_torch)) <= TOL * max(1.0, float(np.max(np.abs(y_torch))))
