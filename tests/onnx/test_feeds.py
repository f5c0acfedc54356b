"""Made-up inputs (importers/feeds.py) for the probe and ``--verify``: integer
inputs in the range they index (token ids below the embedding's rows, masks
ones), the report says what was fed; onnxruntime messages quoted whole-word on
one line; ``compare-methods`` folding without scikit-learn."""
import os
import sys
import warnings

import numpy as np
import onnx
import pytest
from helpers import ROOT, cli, read_json
from onnx import TensorProto, helper, numpy_helper

from fibgraph.errors import InputError

VOCAB, SEQ = 1000, 8
MODEL_DIGITS = os.path.join(ROOT, "fibgraph", "data", "digits_mlp.onnx")
DATA_DIGITS = os.path.join(ROOT, "fibgraph", "data", "digits_test.npz")


# ------------------------------------------------------------------ models
def _tiny_bert_module(torch):
    """A BERT-shaped encoder in plain torch: word, position and type embeddings,
    LayerNorm, one self-attention layer with the extended mask
    ``(1 - mask) * -10000`` and a GELU feed-forward."""
    nn = torch.nn

    class TinyBert(nn.Module):
        def __init__(self, vocab=VOCAB, d=16, max_pos=64, types=2):
            super().__init__()
            self.word, self.pos, self.tok_type = nn.Embedding(vocab, d), nn.Embedding(max_pos, d), nn.Embedding(types, d)
            self.register_buffer("pos_ids", torch.arange(max_pos)[None])
            self.ln, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, input_ids, attention_mask, token_type_ids):
            n = input_ids.shape[1]
            h = self.ln(self.word(input_ids) + self.pos(self.pos_ids[:, :n]) + self.tok_type(token_type_ids))
            ext = (1.0 - attention_mask[:, None, :].to(h.dtype)) * -10000.0
            a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4.0 + ext, dim=-1) @ self.v(h)
            h = self.ln2(h + self.o(a))
            return h + self.ff2(torch.nn.functional.gelu(self.ff1(h)))

    return TinyBert()


def _export(torch, module, args, names, path):
    dyn = {k: {0: "batch", 1: "seq"} for k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=list(names), output_names=["h"],
                          dynamic_axes=dyn, opset_version=17, dynamo=False)
    return str(path)


def _transformers_bert(torch, path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    bert = transformers.BertModel(cfg).eval()

    class W(torch.nn.Module):             # positional inputs for the exporter
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, input_ids, attention_mask):
            return self.b(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, VOCAB, (1, SEQ))
    return _export(torch, W(bert), (ids, torch.ones(1, SEQ, dtype=torch.long)), ["input_ids", "attention_mask"],
                   path)


@pytest.fixture(scope="module", params=["torch", "transformers"])
def bert(request, tmp_path_factory):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert") / f"bert_{request.param}.onnx"
    if request.param == "transformers":
        return _transformers_bert(torch, path)
    ids = torch.randint(0, VOCAB, (1, SEQ))
    one = torch.ones(1, SEQ, dtype=torch.long)
    return _export(torch, _tiny_bert_module(torch), (ids, one, torch.zeros_like(ids)),
                   ["input_ids", "attention_mask", "token_type_ids"], path)


def _ort(model_or_path, feeds):
    import onnxruntime as ort

    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else model_or_path
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _gather_model(rows=50):
    """tok (int64 [N, 5]) -> Cast int32 -> Unsqueeze -> Reshape -> Gather over a
    (rows, 4) table; keep (int64, not named a mask) -> Cast -> 1 - keep -> * -1e4
    added to the scores; x (float) added; also a OneHot with depth 7 of ``cls``."""
    rng = np.random.default_rng(0)
    T = numpy_helper.from_array(rng.normal(size=(rows, 4)).astype(np.float32), "table")
    nodes = [
        helper.make_node("Cast", ["tok"], ["t32"], to=TensorProto.INT32),
        helper.make_node("Unsqueeze", ["t32", "ax0"], ["tu"]),
        helper.make_node("Reshape", ["tu", "shp"], ["tr"]),
        helper.make_node("Gather", ["table", "tr"], ["emb"], axis=0),          # [N, 5, 4]
        helper.make_node("ReduceSum", ["emb", "ax2"], ["s"], keepdims=0),       # [N, 5]
        helper.make_node("Cast", ["keep"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "kf"], ["nk"]),
        helper.make_node("Mul", ["nk", "big"], ["pen"]),
        helper.make_node("Add", ["s", "pen"], ["s2"]),
        helper.make_node("Add", ["s2", "x"], ["s3"]),
        helper.make_node("OneHot", ["cls", "depth", "onoff"], ["oh"], axis=-1),
        helper.make_node("ReduceSum", ["oh", "ax2"], ["ohs"], keepdims=0),
        helper.make_node("Add", ["s3", "ohs"], ["y"]),
    ]
    inits = [T, numpy_helper.from_array(np.array([-1], np.int64), "ax0"),
             numpy_helper.from_array(np.array([-1, 5], np.int64), "shp"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "big"),
             numpy_helper.from_array(np.array(7, np.int64), "depth"),
             numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "onoff")]
    ins = [helper.make_tensor_value_info("tok", TensorProto.INT64, ["N", 5]),
           helper.make_tensor_value_info("keep", TensorProto.INT64, ["N", 5]),
           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5]),
           helper.make_tensor_value_info("cls", TensorProto.INT64, ["N", 5])]
    g = helper.make_graph(nodes, "gather", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


# ------------------------------------------------------------------ (a) integer inputs
def test_bert_feeds_are_token_ids_in_the_vocabulary_and_ones_masks(bert):
    from fibgraph.importers.onnx.feeds import input_specs, make_feeds
    from fibgraph.importers.onnx.probe import probe_model, sample_feeds

    m = onnx.load(bert)
    specs = input_specs(m)
    assert specs["input_ids"].kind == "uniform" and specs["input_ids"].high == VOCAB
    assert specs["attention_mask"].kind == "ones"
    if "token_type_ids" in specs:                         # type ids: the 2 rows of their table
        assert specs["token_type_ids"].high == 2
    for feeds in (make_feeds(m, n=3, seed=1), sample_feeds(m), probe_model(m)[0]):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert ids.dtype == np.int64 and ids.shape[1] == SEQ          # symbolic seq: 8
        assert ids.min() >= 0 and ids.max() < VOCAB
        assert np.unique(ids).size > ids.size // 2                   # not all zero, not one token
        assert mask.shape == ids.shape and np.all(mask == 1)
        _ort(bert, feeds)                                            # valid for the model
    assert probe_model(m)[0]["input_ids"].shape[0] == 1              # the probe: batch 1
    # a mask not named like one is still read as one (1 - m, comparisons, And)
    for vi in m.graph.input:
        if vi.name == "attention_mask":
            vi.name = "keep"
    for node in m.graph.node:
        for k, x in enumerate(node.input):
            if x == "attention_mask":
                node.input[k] = "keep"
    assert input_specs(m)["keep"].kind == "ones"


def test_bert_compresses_and_verify_names_what_was_fed(bert, tmp_path):
    from fibgraph.importers.api import compress_model

    out = str(tmp_path / "base.onnx")
    rep = compress_model(bert, out, eps=0.0, verify=True)
    assert rep["graph"] == "hypergraph"
    v = rep["verify"]
    fed = v["inputs"]
    assert fed["input_ids"] == (f"int64 uniform in [0, {VOCAB}), shape [64, {SEQ}] "
                                f"(the rows of '{_word_table(bert)}')"), fed
    assert fed["attention_mask"] == f"ones, shape [64, {SEQ}]"
    assert v["draws"] == 3 and v["seed"] == 0
    assert v["max_abs_diff"] <= 1e-5 * max(1.0, v["max_abs_output"])
    # the base computes the same function on real-looking inputs with padding
    rng = np.random.default_rng(7)
    names = [i.name for i in onnx.load(bert).graph.input]
    feeds = {"input_ids": rng.integers(0, VOCAB, (1, SEQ)), "attention_mask": np.array([[1] * 5 + [0] * 3])}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.array([[0] * 4 + [1] * 4])
    a, b = _ort(bert, feeds)[0], _ort(out, feeds)[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def _word_table(path):
    m = onnx.load(path)
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    return next(k for k, d in inits.items() if d[:1] == [VOCAB])


def test_gather_over_50_rows_gets_ids_below_50():
    from fibgraph.importers.onnx.feeds import describe, input_specs, make_feeds

    m = _gather_model(50)
    specs = input_specs(m)
    assert (specs["tok"].kind, specs["tok"].high) == ("uniform", 50)
    assert specs["keep"].kind == "ones"                   # read as 1 - keep: a mask, whatever its name
    assert (specs["cls"].kind, specs["cls"].high) == ("uniform", 7)
    assert specs["x"].kind == "normal"
    f = make_feeds(m, n=40, seed=3)
    assert f["tok"].shape == (40, 5) and f["tok"].min() >= 0 and f["tok"].max() < 50
    assert f["tok"].max() > 40 and np.unique(f["tok"]).size > 30   # the whole range, not zeros
    assert np.all(f["keep"] == 1) and 0 <= f["cls"].min() and f["cls"].max() < 7
    assert f["x"].dtype == np.float32 and abs(float(f["x"].std()) - 1.0) < 0.2
    _ort(m, f)
    d = describe(f)
    assert d["tok"] == "int64 uniform in [0, 50), shape [40, 5] (the rows of 'table')"
    assert d["keep"] == "ones, shape [40, 5]" and d["x"] == "normal(0,1), shape [40, 5]"
    # the same seed draws the same feeds
    g = make_feeds(m, n=40, seed=3)
    assert all(np.array_equal(f[k], g[k]) for k in f)


def test_a_scalar_compared_with_a_constant_is_fed_that_constant():
    """``rate`` (int64 scalar) picks a branch by ``Equal(rate, 16000)``: fed 16000
    (a sample rate); an unbounded ``k`` gets [0, 2)."""
    from fibgraph.importers.onnx.feeds import describe, make_feeds

    nodes = [helper.make_node("Equal", ["rate", "sr16"], ["is16"]),
             helper.make_node("Where", ["is16", "x", "zero"], ["y0"]),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["y0", "kf"], ["y"])]
    g = helper.make_graph(nodes, "sr", [helper.make_tensor_value_info("rate", TensorProto.INT64, []),
                                        helper.make_tensor_value_info("k", TensorProto.INT64, []),
                                        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.array(16000, np.int64), "sr16"),
                           numpy_helper.from_array(np.zeros(3, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    f = make_feeds(m, n=2, seed=0)
    assert f["rate"].shape == () and int(f["rate"]) == 16000
    assert f["k"].shape == () and 0 <= int(f["k"]) < 2
    y = _ort(m, f)[0]
    np.testing.assert_allclose(y, f["x"] + float(f["k"]), rtol=1e-6)      # the branch that uses x
    assert describe(f)["rate"] == "int64 16000, shape [] (compared with 'sr16')"


def test_gather_over_50_rows_bound_is_used_by_the_probe():
    from fibgraph.importers.onnx.probe import probe_model

    feeds, _ = probe_model(_gather_model(50))
    assert feeds["tok"].shape == (1, 5) and 0 <= feeds["tok"].min() and feeds["tok"].max() < 50
    assert np.any(feeds["tok"] != 0)
    assert np.all(feeds["keep"] == 1)


def test_verify_names_its_inputs_at_batch_64(tmp_path):
    from fibgraph.importers.api import compress_model

    rep = compress_model(MODEL_DIGITS, str(tmp_path / "b.onnx"), eps=0.0, verify=True)
    name = onnx.load(MODEL_DIGITS).graph.input[0].name
    assert rep["verify"]["inputs"] == {name: "normal(0,1), shape [64, 64]"}
    assert rep["verify"]["seed"] == 0 and rep["verify"]["n"] == 64


def test_cli_verify_line_names_the_inputs(tmp_path, capsys):
    rc, out, err = cli(capsys, "compress", MODEL_DIGITS, "-o", tmp_path / "b.onnx", "--verify")
    assert rc == 0, err
    assert "verify: max |output difference| 0, relative 0" in out
    assert "on 3 x 64 made-up inputs (x: normal(0,1), shape [64, 64]; seed 0)" in out


def test_user_probe_keeps_its_integer_inputs():
    """A probe the user gave keeps its integer values in verify's draws (a
    sample rate, say), and the report says they were given."""
    from fibgraph.importers.dag_verify import _feeds_like
    from fibgraph.importers.onnx.importer import import_dag

    m = _gather_model(50)
    given = {"tok": np.full((1, 5), 42, np.int64), "keep": np.ones((1, 5), np.int64),
             "x": np.zeros((1, 5), np.float32), "cls": np.full((1, 5), 3, np.int64)}
    try:
        imp = import_dag(m, feeds=given)
    except InputError as e:                   # the importer may not map this toy graph; the feeds logic still holds
        pytest.skip(f"toy graph not importable: {e}")
    f = _feeds_like(imp, 5)
    assert np.all(f["tok"] == 42) and np.all(f["cls"] == 3) and "tok" in f.given
    assert np.any(f["x"] != 0)


# ------------------------------------------------------------------ (c) one-line errors
def test_short_error_cuts_at_a_word_with_an_ellipsis():
    from fibgraph.importers.onnx.feeds import short_error

    words = " ".join(f"word{k}" for k in range(200))
    s = short_error(RuntimeError(words + "\nsecond line"), 100)
    assert s.endswith(" ...") and "\n" not in s and len(s) <= 104
    body = s[:-4]
    assert words.startswith(body) and words[len(body)] == " "      # ends on a whole word
    assert short_error(RuntimeError("short\nmore")) == "short ..."
    assert short_error(RuntimeError("one line " * 40)) == ("one line " * 40).strip()   # one line: whole
    loc = "Status Message: /onnxruntime_src/core/providers/cpu/tensor/reshape_helper.h:91 the shape is bad"
    assert short_error(RuntimeError(loc)) == "Status Message: the shape is bad"
    assert short_error(RuntimeError("x" * 50), 100) == "x" * 50


def _quoted_ok(msg, original):
    """``msg`` is one line and quotes ``original``'s first line (less its source
    file locations) whole, or cut after a whole word and marked with an ellipsis."""
    from fibgraph.importers.onnx.feeds import _SRC

    lines = [_SRC.sub("", ln).strip() for ln in original.strip().splitlines()]
    first = [ln for ln in lines if ln][0]
    assert "\n" not in msg and len(msg) > 40
    if first in msg:
        assert msg.endswith(first) or msg.endswith(first + " ...") or first + ";" in msg or first + ")" in msg
        return
    assert msg.endswith(" ..."), msg
    body = msg[:-4]
    k = next(j for j in range(len(body)) if first.startswith(body[j:]))   # the quoted tail of msg
    quoted = body[k:]
    assert len(quoted) > 20 and first[len(quoted)] == " ", (msg, first)


def test_onnxruntime_run_error_is_one_line_and_whole_words():
    import onnxruntime as ort

    from fibgraph.importers.onnx.runtime import run as _run, session

    m = _gather_model(50)
    bad = {"tok": np.full((1, 5), 999, np.int64), "keep": np.ones((1, 5), np.int64),
           "x": np.zeros((1, 5), np.float32), "cls": np.zeros((1, 5), np.int64)}
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, bad)
        pytest.fail("onnxruntime ran a Gather out of bounds")
    except Exception as e:                                      # noqa: BLE001
        original = str(e)
    with pytest.raises(InputError) as ei:
        _run(session(m), None, bad)
    _quoted_ok(str(ei.value), original)


def test_onnxruntime_load_error_is_one_line_and_whole_words():
    import onnxruntime as ort

    from fibgraph.importers.api import session

    # a type clash onnxruntime refuses at load (its message is long and multi-line)
    n = helper.make_node("Add", ["a", "b"], ["c"])
    g = helper.make_graph([n], "bad", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2]),
                                       helper.make_tensor_value_info("b", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        pytest.fail("onnxruntime loaded a type clash")
    except Exception as e:                                      # noqa: BLE001
        original = str(e)
    with pytest.raises(InputError) as ei:
        session(m)
    _quoted_ok(str(ei.value), original)


def test_probe_failure_is_one_line_and_whole_words():
    """A model no made-up input runs (a Reshape to a fixed size 7 of an input
    with symbolic dims): one line, what was tried, --data asked for."""
    from fibgraph.importers.onnx.probe import probe_model

    n1 = helper.make_node("Reshape", ["x", "shp"], ["r"])
    n2 = helper.make_node("MatMul", ["r", "W"], ["y"])
    g = helper.make_graph([n1, n2], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                          [numpy_helper.from_array(np.array([1, 7], np.int64), "shp"),
                           numpy_helper.from_array(np.ones((7, 3), np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError) as ei:
        probe_model(m)
    msg = str(ei.value)
    assert "\n" not in msg and "--data" in msg and "x: normal(0,1), shape [1, 32]" in msg
    assert "Reshape" in msg                       # onnxruntime's reason, quoted


# ------------------------------------------------------------------ (b) folding without sklearn
def _no_sklearn(monkeypatch):
    for k in [k for k in sys.modules if k == "sklearn" or k.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, k, None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError):
        import sklearn.cluster  # noqa: F401


def test_kmeans_without_sklearn_recovers_planted_clusters(monkeypatch):
    from fibgraph.baselines import kmeans_labels

    _no_sklearn(monkeypatch)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (5, 6))
    truth = rng.permutation(np.repeat(np.arange(5), 8))
    X = centres[truth] + rng.normal(0, 0.01, (truth.size, 6))
    lab = kmeans_labels(X, 5, 0)
    # the same partition as the planted one
    pairs = {(int(a), int(b)) for a, b in zip(lab, truth)}
    assert len(pairs) == 5 and len(set(lab.tolist())) == 5
    assert np.array_equal(lab, kmeans_labels(X, 5, 0))              # deterministic
    # fewer distinct points than clusters: still k labels
    lab = kmeans_labels(np.zeros((6, 2)), 3, 1)
    assert sorted(set(lab.tolist())) == [0, 1, 2]


def test_compare_methods_fold_without_sklearn(monkeypatch, tmp_path, capsys):
    _no_sklearn(monkeypatch)
    data = DATA_DIGITS
    js = tmp_path / "c.json"
    rc, _, err = cli(capsys, "compare-methods", MODEL_DIGITS, "--data", data, "--eps", "0.3",
                     "--methods", "fold", "--json", js)
    assert rc == 0, err
    rows = read_json(js)["rows"]
    fold = [r for r in rows if r["method"] == "fold"]
    fib = [r for r in rows if r["method"] == "fibration"]
    assert len(fold) == 1 and fold[0]["nodes"] == fib[0]["nodes"] and 0 <= fold[0]["accuracy"] <= 1
    # deterministic: the same run gives the same accuracy
    rc, _, err = cli(capsys, "compare-methods", MODEL_DIGITS, "--data", data, "--eps", "0.3",
                     "--methods", "fold", "--json", tmp_path / "d.json")
    assert rc == 0, err
    assert [r for r in read_json(tmp_path / "d.json")["rows"] if r["method"] == "fold"] == fold


def test_verify_models_on_model_protos_draws_its_own_inputs():
    """verify_models(ModelProto, ModelProto) without data draws feeds from the
    model's declared inputs (it used to fail on a wrong relative import)."""
    import onnx

    from fibgraph.importers.api import verify_models

    m = onnx.load(MODEL_DIGITS)
    res = verify_models(m, m)
    assert res["max_abs_diff"] == 0.0
