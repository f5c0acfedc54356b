"""The hypergraph path (importers/onnx/, dag_api.py) on torch models with
PLANTED fibers (tests/planted_nets.py): LSTM, GRU, bidirectional LSTM, a
Transformer encoder layer (q/k shared and not), a residual MLP, and a
residual Add whose two writers carry different partitions.

* ``compress_model(eps=0, verify=True)``: exact (verify and an independent
  onnxruntime run at batch 5, against the original file and against torch),
  smaller, and the report's fibers EQUAL the planted partitions (as sets of
  frozensets); attention's packed in_proj keeps nhead * (2 * max_h #(q, k)
  pairs + max_h #v classes) rows (q, k and v are cut from it at their own sizes).
* The residual Add breaks fibers by the AND rule: the Add's nodes are coloured
  by the meet, both writers keep len(meet) rows and the written rows are the
  meet's representatives.
* ``color_model`` with 'opfibration' and 'covering'; covering refines fibration.
* eps > 0 on a noisy LSTM recovers the planted hidden partition.
* The CLI ``fibgraph compress --verify --report`` on the dynamo Transformer.

Every model is exported once per module (both exporters, dynamic batch), and
every (model, exporter) pair is compressed once.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402

import planted_nets as pn  # noqa: E402
from helpers import cli, read_json, refines, run_onnx  # noqa: E402
from fibgraph.importers.api import color_model, compress_model  # noqa: E402
from fibgraph.importers.onnx.records import Kind  # noqa: E402

TOL = 1e-5
KINDS = ("legacy", "dynamo")
BUILDERS = {
    "lstm": lambda: pn.planted_lstm(0),
    "gru": lambda: pn.planted_gru(3),
    "lstm_bi": lambda: pn.planted_lstm(1, bidirectional=True),
    "transformer": lambda: pn.planted_transformer(5, qk_shared=True),
    "transformer_qk": lambda: pn.planted_transformer(6, qk_shared=False),
    "residual_mlp": lambda: pn.planted_residual_mlp(7),
    "residual_breaks": lambda: pn.residual_breaks_fibers(8),
}
PLANTED = ("lstm", "gru", "lstm_bi", "transformer", "transformer_qk", "residual_mlp")
CASES = [(n, k) for n in PLANTED for k in KINDS]


def _scale(a):
    return max(1.0, float(np.max(np.abs(a))))


def _as_set(fibers):
    return {frozenset(int(u) for u in cl) for cl in fibers}


class _Store:
    """Lazy, cached: models, their exports and their compressions."""

    def __init__(self, root):
        self.root = root
        self.models, self.paths, self.compressed = {}, {}, {}

    def model(self, name):
        if name not in self.models:
            torch.manual_seed(0)
            self.models[name] = BUILDERS[name]()
        return self.models[name]

    def path(self, name, kind):
        if name not in self.paths:
            model, info = self.model(name)
            self.paths[name] = pn.export_both(model, pn.example_input(info, batch=3), self.root / "in", name=name)
        return self.paths[name][kind]

    def compress(self, name, kind):
        key = (name, kind)
        if key not in self.compressed:
            out = self.root / f"{name}_{kind}_base.onnx"
            report = compress_model(self.path(name, kind), out, eps=0.0, verify=True)
            self.compressed[key] = (report, str(out))
        return self.compressed[key]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _Store(tmp_path_factory.mktemp("dag_planted"))


def _initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _entry(report, inits, weight):
    """The report layer whose initializer IS this torch weight (stored as is or transposed)."""
    w = weight.detach().numpy().astype(np.float32)
    hits = []
    for layer in report["layers"]:
        a = inits.get(layer["weight"])
        if a is None:
            continue
        if (a.shape == w.shape and np.array_equal(a, w)) or (a.shape == w.T.shape and np.array_equal(a, w.T)):
            hits.append(layer)
    assert len(hits) == 1, f"{len(hits)} report layers hold a weight of shape {tuple(w.shape)}"
    return hits[0]


def _rnn_entries(report, inits, info):
    """(W entry, R entry) of the model's one LSTM/GRU op."""
    rnn = [layer for layer in report["layers"] if layer["op"] in ("LSTM", "GRU")]
    assert len(rnn) == 2, [layer["weight"] for layer in report["layers"]]
    by_last = {inits[layer["weight"]].shape[-1]: layer for layer in rnn}
    assert set(by_last) == {info["n_in"], info["hidden_size"]}, {k: v["weight"] for k, v in by_last.items()}
    return by_last[info["n_in"]], by_last[info["hidden_size"]]


def _expected_layers(store, name, kind, report):
    """[(what, report layer, planted fibers)] for the weights the model plants."""
    model, info = store.model(name)
    inits = _initializers(store.path(name, kind))
    fib = info["fibers"]
    if isinstance(model, pn.RNNNet):
        W, R = _rnn_entries(report, inits, info)
        return [("W", W, fib["rnn.hidden"]), ("R", R, fib["rnn.hidden"])]
    if isinstance(model, pn.TransformerNet):
        enc = model.enc
        return [("inp", _entry(report, inits, model.inp.weight), fib["inp"]),
                ("in_proj", _entry(report, inits, enc.self_attn.in_proj_weight), fib["attn.in_proj"]),
                ("out_proj", _entry(report, inits, enc.self_attn.out_proj.weight), fib["attn.out_proj"]),
                ("linear1", _entry(report, inits, enc.linear1.weight), fib["ff.linear1"]),
                ("linear2", _entry(report, inits, enc.linear2.weight), fib["ff.linear2"])]
    return [("fc1", _entry(report, inits, model.fc1.weight), fib["fc1"]),
            ("res", _entry(report, inits, model.res.weight), fib["res"])]


# ------------------------------------------------------------- 1. planted models
@pytest.mark.parametrize("name,kind", CASES)
def test_compress_exact_and_smaller(store, name, kind):
    report, out = store.compress(name, kind)
    assert report["graph"] == "hypergraph"
    v = report["verify"]
    assert v["max_abs_diff"] <= TOL * max(1.0, v["max_abs_output"]), v
    assert v["max_abs_output"] > 0.1, v                      # the check compared real outputs
    assert report["params_after"] < report["params_before"]
    assert report["barriers"] == []
    # the output layer keeps every unit
    outs = [layer for layer in report["layers"] if layer["output_layer"]]
    assert len(outs) == 1
    assert outs[0]["nodes_after"] == outs[0]["nodes_before"]
    assert _as_set(outs[0]["fibers"]) == {frozenset([i]) for i in range(outs[0]["nodes_before"])}


@pytest.mark.parametrize("name,kind", CASES)
def test_report_fibers_equal_planted(store, name, kind):
    report, _ = store.compress(name, kind)
    for what, layer, planted in _expected_layers(store, name, kind, report):
        # "fibers" are the base's units; "colour_classes" (present when they differ:
        # in_proj's groups split to equal head sizes) the colouring's classes
        coloured = layer.get("colour_classes", layer["fibers"])
        assert _as_set(coloured) == _as_set(planted), (what, layer["weight"], coloured, planted)
        # every base unit lies inside one colour class
        assert all(any(set(f) <= set(c) for c in coloured) for f in layer["fibers"])
        assert "kept_whole" not in layer, (what, layer["kept_whole"])
        if what != "in_proj":                                 # in_proj: see test_in_proj_kept_rows
            assert layer["nodes_before"] == sum(len(cl) for cl in planted), what
            assert layer["nodes_after"] == len(planted), (what, layer["nodes_after"], len(planted))


@pytest.mark.parametrize("name,kind", [(n, k) for n in ("transformer", "transformer_qk") for k in KINDS])
def test_in_proj_kept_rows(store, name, kind):
    report, out = store.compress(name, kind)
    model, info = store.model(name)
    layer = _entry(report, _initializers(store.path(name, kind)), model.enc.self_attn.in_proj_weight)
    nh, hd, d = info["nhead"], info["head_dim"], info["d_model"]
    v_classes = [len({info["maps"]["v"][h * hd + j] for j in range(hd)}) for h in range(nh)]
    # heads keep equal sizes; q and k keep the (q, k) pair classes, v its own classes
    qk, v = max(len(p) for p in info["qk_pairs"]), max(v_classes)
    rows = nh * (2 * qk + v)
    assert layer["nodes_before"] == 3 * d
    assert layer["nodes_after"] == rows, (layer["nodes_after"], info["qk_pairs"], v_classes)
    # the written in_proj weight has that many output columns
    written = [a for a in _initializers(out).values() if a.ndim == 2 and a.shape[1] == rows]
    assert written, "no written weight with the kept in_proj width"


@pytest.mark.parametrize("name,kind", CASES)
def test_written_model_runs_at_another_batch(store, name, kind):
    report, out = store.compress(name, kind)
    model, info = store.model(name)
    m2 = onnx.load(out)
    onnx.checker.check_model(m2, full_check=True)
    dim0 = m2.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.HasField("dim_param") and not dim0.HasField("dim_value"), "the batch axis lost its dynamic size"
    x = pn.example_input(info, batch=5, seed=21)
    y_orig = run_onnx(store.path(name, kind), x.numpy())[0]
    y_base = run_onnx(out, x.numpy())[0]
    with torch.no_grad():
        y_torch = model(x).numpy()
    assert y_base.shape == y_orig.shape == y_torch.shape == (5, info["n_out"])
    assert np.max(np.abs(y_base - y_orig)) <= TOL * _scale(y_orig)
    assert np.max(np.abs(y_base - y_torch)) <= TOL * _scale(y_torch)
    if isinstance(model, pn.RNNNet):                          # hidden_size: the hidden classes per direction
        rnn = [n for n in m2.graph.node if n.op_type in ("LSTM", "GRU")]
        assert len(rnn) == 1
        hs = {a.name: onnx.helper.get_attribute_value(a) for a in rnn[0].attribute}["hidden_size"]
        per_dir = [len(set(info["maps"][m])) for m in (("hidden", "hidden_reverse") if info["bidirectional"]
                                                       else ("hidden",))]
        assert hs == max(per_dir), (hs, per_dir)


# ------------------------------------------------------------- 2. residual break
@pytest.mark.parametrize("kind", KINDS)
def test_residual_break_kept_is_meet_and_exact(store, kind):
    report, out = store.compress("residual_breaks", kind)
    model, info = store.model("residual_breaks")
    v = report["verify"]
    assert v["max_abs_diff"] <= TOL * max(1.0, v["max_abs_output"]), v
    assert report["params_after"] < report["params_before"]
    inits = _initializers(store.path("residual_breaks", kind))
    meet = info["meet"]
    for lin in (model.fc_a, model.fc_skip):
        layer = _entry(report, inits, lin.weight)
        assert layer["nodes_before"] == info["width"]
        assert layer["nodes_after"] == len(meet), (layer["weight"], layer["nodes_after"], meet)
    x = pn.example_input(info, batch=5, seed=22)
    with torch.no_grad():
        y = model(x).numpy()
    assert np.max(np.abs(run_onnx(out, x.numpy())[0] - y)) <= TOL * _scale(y)


@pytest.mark.parametrize("kind", KINDS)
def test_residual_break_report_fibers_are_meet(store, kind):
    """The report's fibers of both writers into the stream are the meet (the units
    the written model merges), as nodes_after says."""
    report, _ = store.compress("residual_breaks", kind)
    model, info = store.model("residual_breaks")
    inits = _initializers(store.path("residual_breaks", kind))
    for lin in (model.fc_a, model.fc_skip):
        layer = _entry(report, inits, lin.weight)
        assert _as_set(layer["fibers"]) == _as_set(info["meet"]), (layer["weight"], layer["fibers"], info["meet"])


@pytest.mark.parametrize("kind", KINDS)
def test_residual_break_add_coloured_by_meet(store, kind):
    """AND rule in the hypergraph: the Add's nodes carry the meet; its two writers
    carry their own partitions."""
    model, info = store.model("residual_breaks")
    _, imp, col = color_model(store.path("residual_breaks", kind), symmetry="fibration")
    adds = [r for r in imp.records if r.kind is Kind.ELEMENTWISE and r.op == "Add"]
    assert len(adds) == 1, adds

    def fibers_of_tensor(t):
        ids = np.asarray(imp.layouts[t]).reshape(-1)
        assert ids.size == info["width"], (t, imp.layouts[t].shape)
        return pn.fibers_of(col.labels[ids])

    assert _as_set(fibers_of_tensor(adds[0].output)) == _as_set(info["meet"])
    lin = {r.weight: r for r in imp.records if r.kind is Kind.LINEAR}
    inits = _initializers(store.path("residual_breaks", kind))
    for tm, planted in ((model.fc_a, info["partition_a"]), (model.fc_skip, info["partition_b"])):
        w = tm.weight.detach().numpy()
        name = [n for n in lin if np.array_equal(inits[n], w) or np.array_equal(inits[n], w.T)]
        assert len(name) == 1
        assert _as_set(fibers_of_tensor(lin[name[0]].output)) == _as_set(planted)


@pytest.mark.parametrize("kind", KINDS)
def test_residual_break_written_rows_are_meet_representatives(store, kind):
    """Kept position q of the stream stands for one meet class G: fc_a and fc_skip
    keep row W[G[0]] (mean over G, equal rows), fc_out's column q is the sum of
    its columns over G; every meet class is kept once."""
    report, out = store.compress("residual_breaks", kind)
    model, info = store.model("residual_breaks")
    meet = info["meet"]
    inits = _initializers(store.path("residual_breaks", kind))
    written = _initializers(out)
    W = {}
    for key, lin in (("a", model.fc_a), ("s", model.fc_skip), ("o", model.fc_out)):
        layer = _entry(report, inits, lin.weight)
        transposed = inits[layer["weight"]].shape != tuple(lin.weight.shape)
        cands = [n for n in written if n.startswith(layer["weight"])]
        assert len(cands) == 1, (layer["weight"], sorted(written))
        a = written[cands[0]]
        W[key] = a.T if transposed else a                      # torch layout (out, in)
    Wa, Ws, Wo = (t.weight.detach().numpy().astype(np.float64) for t in (model.fc_a, model.fc_skip, model.fc_out))
    k = len(meet)
    assert W["a"].shape == W["s"].shape == (k, info["n_in"]) and W["o"].shape == (info["n_out"], k)
    seen = []
    for q in range(k):
        match = [c for c, cl in enumerate(meet)
                 if np.allclose(W["a"][q], Wa[cl[0]], atol=1e-6) and np.allclose(W["s"][q], Ws[cl[0]], atol=1e-6)]
        assert len(match) == 1, (q, match)
        seen.append(match[0])
        np.testing.assert_allclose(W["o"][:, q], Wo[:, meet[match[0]]].sum(axis=1), atol=1e-5)
    assert sorted(seen) == list(range(k))


# --------------------------------------------------------- 3. other symmetries
@pytest.mark.parametrize("name,kind", [("lstm", "legacy"), ("lstm", "dynamo"),
                                       ("transformer", "legacy"), ("transformer", "dynamo")])
def test_opfibration_and_covering(store, name, kind):
    path = store.path(name, kind)
    fib_report, fib_imp, fib = color_model(path, symmetry="fibration")
    labels = {"fibration": fib.labels}
    for sym in ("opfibration", "covering"):
        report, imp, col = color_model(path, symmetry=sym)
        assert report["graph"] == "hypergraph" and report["symmetry"] == sym
        assert imp.graph.n == fib_imp.graph.n
        assert col.labels.shape == (imp.graph.n,)
        assert [layer["weight"] for layer in report["layers"]] == [layer["weight"] for layer in fib_report["layers"]]
        for layer in report["layers"]:
            assert sorted(u for cl in layer["fibers"] for u in cl) == list(range(layer["nodes_before"]))
        labels[sym] = col.labels
    assert report["params_after"] < report["params_before"]        # covering compresses these
    # covering = in- and out-balanced: every covering class inside one fibration class (and opfibration class)
    cov = pn.fibers_of(labels["covering"])
    assert refines(cov, pn.fibers_of(labels["fibration"]))
    assert refines(cov, pn.fibers_of(labels["opfibration"]))
    # and on the reported layers
    cov_layers = {layer["weight"]: layer["fibers"] for layer in report["layers"]}
    for layer in fib_report["layers"]:
        assert refines(cov_layers[layer["weight"]], layer["fibers"]), layer["weight"]


# ------------------------------------------------------------------- 4. eps > 0
@pytest.fixture(scope="module")
def noisy_lstm(tmp_path_factory):
    model, info = pn.planted_lstm(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in ("weight_ih_l0", "weight_hh_l0"):
            w = getattr(model.rnn, n)
            w.mul_(1 + 1e-3 * torch.randn(w.shape, generator=g))
    d = tmp_path_factory.mktemp("dag_noisy")
    path = pn.export_one(model, pn.example_input(info, batch=3), d / "lstm_noisy.onnx", dynamo=False)
    return model, info, path, d


def test_eps_recovers_noisy_lstm(noisy_lstm):
    model, info, path, d = noisy_lstm
    inits = _initializers(path)
    hidden = _as_set(info["fibers"]["rnn.hidden"])

    r0 = compress_model(path, d / "eps0.onnx", eps=0.0, verify=True)
    for layer in r0["layers"]:
        assert layer["nodes_after"] == layer["nodes_before"], layer["weight"]
        assert all(len(cl) == 1 for cl in layer["fibers"]), layer["weight"]
    assert r0["params_after"] == r0["params_before"]

    r = compress_model(path, d / "eps05.onnx", eps=0.05, verify=True)
    W, R = _rnn_entries(r, inits, info)
    for layer in (W, R):
        assert _as_set(layer["fibers"]) == hidden, (layer["weight"], layer["fibers"])
        assert layer["nodes_after"] == len(hidden)
        assert layer["criterion"]["eps"] == 0.05
    assert r["params_after"] < r["params_before"]
    assert r["verify"]["max_abs_diff"] <= 1e-2, r["verify"]
    x = pn.example_input(info, batch=5, seed=23)
    with torch.no_grad():
        y = model(x).numpy()
    y2 = run_onnx(str(d / "eps05.onnx"), x.numpy())[0]
    assert y2.shape == y.shape
    assert np.max(np.abs(y2 - y)) <= 1e-2


# ------------------------------------------------------------------- 5. the CLI
def test_cli_compress_dynamo_transformer(store, capsys, tmp_path):
    src = store.path("transformer", "dynamo")
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    rc, _, err = cli(capsys, "compress", src, "-o", out, "--verify", "--report", rep)
    assert rc == 0, err
    r = read_json(rep)
    assert r["graph"] == "hypergraph"
    assert r["params_after"] < r["params_before"]
    v = r["verify"]
    assert v["max_abs_diff"] <= TOL * max(1.0, v["max_abs_output"]), v
    api_report, _ = store.compress("transformer", "dynamo")
    assert [(la["weight"], la["nodes_after"], la["fibers"]) for la in r["layers"]] == \
        [(la["weight"], la["nodes_after"], la["fibers"]) for la in api_report["layers"]]
    model, info = store.model("transformer")
    layer = _entry(r, _initializers(src), model.enc.self_attn.out_proj.weight)
    assert _as_set(layer["fibers"]) == _as_set(info["fibers"]["attn.out_proj"])
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = pn.example_input(info, batch=5, seed=24).numpy()
    y = run_onnx(src, x)[0]
    assert np.max(np.abs(run_onnx(str(out), x)[0] - y)) <= TOL * _scale(y)


@pytest.mark.parametrize("name", ["transformer", "lstm", "residual_mlp"])
def test_a_base_compresses_again(store, name, tmp_path):
    # a base (and a retuned base, compress-retune's next round) already holds the
    # writer's fib_* names: compressing it again must not reuse them (two
    # initializers of one name, two nodes of one name: onnxruntime refuses)
    _, base = store.compress(name, "legacy")
    merged = False
    for eps in (0.0, 0.9, 1.2):
        out = tmp_path / f"again_{eps}.onnx"
        rep = compress_model(base, out, eps=eps, verify=True)     # raises if the base does not load
        m = onnx.load(str(out))
        names = [t.name for t in m.graph.initializer]
        assert len(names) == len(set(names))
        nodes = [n.name for n in m.graph.node if n.name]
        assert len(nodes) == len(set(nodes))
        if eps == 0.0:
            assert rep["verify"]["max_abs_diff"] <= 1e-4 * max(1.0, rep["verify"]["max_abs_output"])
        merged |= rep["params_after"] < rep["params_before"]
    assert merged, "no eps merged anything: the test would not exercise new fib_* names"
