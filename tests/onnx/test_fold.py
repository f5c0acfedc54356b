"""Constant folding for the probe and verify (importers/onnx/fold.py, seventh
session): every op that folds gives onnxruntime's value; the probe and
verify's sessions never compute a chain on weights alone (a dynamo export's
gate reordering, a transposed token table) but are fed its value, a view or
a temporary file's map of a big model's weights, never a copy in memory."""
from __future__ import annotations

import mmap
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import cli, save, spy_sessions

from fibgraph.importers.onnx import external, fold
from fibgraph.pages import mapped_in

BIG = 2 ** 62
I = np.int64


def _c(name, v):
    return numpy_helper.from_array(np.asarray(v), name)


# op, inputs (arrays; the first is the data), attributes, opset
CASES = [
    ("Identity", [np.arange(6.0).reshape(2, 3)], {}, 17),
    ("Slice", [np.arange(60.0).reshape(6, 10), I([1]), I([-1])], {}, 17),
    ("Slice", [np.arange(60.0).reshape(6, 10), I([BIG, 8]), I([-BIG, 1]), I([0, 1]), I([-2, -3])], {}, 17),
    ("Slice", [np.arange(60.0).reshape(6, 10), I([-100]), I([100]), I([-1]), I([3])], {}, 17),
    ("Slice", [np.arange(60.0).reshape(6, 10), I([4]), I([-7]), I([0]), I([-1])], {}, 17),
    ("Slice", [np.arange(60.0).reshape(6, 10)], {"starts": [2], "ends": [5], "axes": [1]}, 9),
    ("Concat", [np.arange(6.0).reshape(2, 3), np.arange(9.0).reshape(3, 3)], {"axis": 0}, 17),
    ("Concat", [np.arange(6.0).reshape(3, 2), np.arange(9.0).reshape(3, 3)], {"axis": -1}, 17),
    ("Unsqueeze", [np.arange(6.0).reshape(2, 3), I([0, -1])], {}, 17),
    ("Unsqueeze", [np.arange(6.0).reshape(2, 3)], {"axes": [1]}, 11),
    ("Squeeze", [np.arange(6.0).reshape(1, 2, 1, 3), I([-2])], {}, 17),
    ("Squeeze", [np.arange(6.0).reshape(1, 2, 1, 3)], {}, 17),
    ("Reshape", [np.arange(24.0).reshape(2, 3, 4), I([0, -1])], {}, 17),
    ("Reshape", [np.arange(24.0).reshape(2, 3, 4), I([2, 0, 2, 2])], {}, 17),
    ("Flatten", [np.arange(24.0).reshape(2, 3, 4)], {"axis": 2}, 17),
    ("Flatten", [np.arange(24.0).reshape(2, 3, 4)], {"axis": 0}, 17),
    ("Transpose", [np.arange(24.0).reshape(2, 3, 4)], {}, 17),
    ("Transpose", [np.arange(24.0).reshape(2, 3, 4)], {"perm": [1, 2, 0]}, 17),
    ("Cast", [np.linspace(-3.7, 3.7, 12).astype(np.float32)], {"to": TensorProto.INT32}, 17),
    ("Cast", [np.linspace(-3.7, 3.7, 12).astype(np.float32)], {"to": TensorProto.FLOAT16}, 17),
    ("Cast", [np.array([0.0, -0.0, 2.5, np.nan], np.float32)], {"to": TensorProto.BOOL}, 17),
    ("Gather", [np.arange(60.0).reshape(6, 10), I([[0, -1], [3, 2]])], {"axis": 1}, 17),
    ("Gather", [np.arange(60.0).reshape(6, 10), I(-2)], {}, 17),
    ("Split", [np.arange(60.0).reshape(6, 10), I([2, 4])], {"axis": 0}, 17),
    ("Split", [np.arange(60.0).reshape(12, 5)], {"num_outputs": 3}, 18),
    ("Split", [np.arange(60.0).reshape(5, 12)], {"axis": -1}, 11),
]


def _one_node(op, xs, at, opset):
    names = [f"c{k}" for k in range(len(xs))]
    outs = ["y0", "y1", "y2"] if op == "Split" else ["y0"]
    if op == "Split" and "num_outputs" not in at and len(xs) == 2:
        outs = ["y0", "y1"]
    node = helper.make_node(op, names, outs, **at)
    g = helper.make_graph([node], "g", [],
                          [onnx.ValueInfoProto(name=o) for o in outs],
                          [_c(n, np.asarray(x, np.float32) if np.asarray(x).dtype == np.float64 else x)
                           for n, x in zip(names, xs)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), outs


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{k}" for k, c in enumerate(CASES)])
def test_every_op_that_folds_gives_onnxruntimes_value(case):
    op, xs, at, opset = case
    m, outs = _one_node(op, xs, at, opset)
    assert fold.folded_outputs(m) == []                 # a graph output is the run's
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(outs, {})
    m.graph.ClearField("output")
    assert fold.folded_outputs(m) == outs
    got = fold.fold_constants(m)
    for o, w in zip(outs, want):
        assert got[o].shape == w.shape and got[o].dtype == w.dtype, o
        np.testing.assert_array_equal(got[o], w)


def _gates_model(H=64, X=32, reorder=True):
    """A dynamo-export-like LSTM: W and R reordered gate by gate with Slice x 4,
    Concat and Unsqueeze; then a head."""
    rng = np.random.default_rng(0)
    Wt = rng.normal(size=(4 * H, X)).astype(np.float32) * 0.2
    Rt = rng.normal(size=(4 * H, H)).astype(np.float32) * 0.2
    nodes, inits = [], [_c("Wt", Wt), _c("Rt", Rt), _c("zero", I([0]))]
    for k in range(5):
        inits.append(_c(f"b{k}", I([k * H])))
    inits.append(_c("one", I([1])))
    for w in ("Wt", "Rt"):
        for k in range(4):
            nodes.append(helper.make_node("Slice", [w, f"b{k}", f"b{k + 1}", "zero"], [f"{w}{k}"]))
        order = [0, 3, 1, 2] if reorder else [0, 1, 2, 3]
        nodes.append(helper.make_node("Concat", [f"{w}{k}" for k in order], [f"{w}c"], axis=0))
        nodes.append(helper.make_node("Unsqueeze", [f"{w}c", "zero"], [f"{w}u"]))
    nodes.append(helper.make_node("LSTM", ["x", "Wtu", "Rtu"], ["Y"], hidden_size=H))
    nodes.append(helper.make_node("Squeeze", ["Y", "one"], ["Ys"]))
    inits.append(_c("head", rng.normal(size=(H, 3)).astype(np.float32)))
    nodes.append(helper.make_node("Gather", ["Ys", "last"], ["h"]))
    inits.append(_c("last", I(-1)))
    nodes.append(helper.make_node("MatMul", ["h", "head"], ["y"]))
    g = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, X])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_the_probe_is_fed_the_folded_weights_and_returns_them_all(monkeypatch):
    """The probe's run has no Slice/Concat/Unsqueeze on the weights: their
    values come from the fold, and equal onnxruntime's."""
    from fibgraph.importers.onnx.probe import probe_model

    m = _gates_model()
    seen = spy_sessions(monkeypatch)
    feeds, vals = probe_model(m)
    ran = seen[0][0]
    assert {n.op_type for n in ran.graph.node} == {"LSTM", "Squeeze", "Gather", "MatMul"}
    assert {i.name for i in ran.graph.input} == {"x", "Wtu", "Rtu"}
    assert {t.name for t in ran.graph.initializer} == {"one", "head", "last"}    # Wt, Rt: folded only
    full = onnx.ModelProto()
    full.CopyFrom(m)
    for o in ("Wtc", "Wtu", "Rtu", "Wt3"):
        full.graph.output.append(onnx.ValueInfoProto(name=o))
    ref = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    for o, v in zip(["y", "Wtc", "Wtu", "Rtu", "Wt3"], ref.run(["y", "Wtc", "Wtu", "Rtu", "Wt3"], feeds)):
        np.testing.assert_allclose(vals[o], v, rtol=1e-6, atol=1e-7)


def test_a_gate_reordered_lstm_compresses_and_verifies(tmp_path, capsys):
    """The reordered LSTM colours as the one stored in ONNX's order and
    verifies exactly (eps 0), the verify sessions fed the folded weights."""
    src = save(_gates_model(), tmp_path / "dyn.onnx")
    rc, out, err = cli(capsys, "compress", src, "-o", tmp_path / "b.onnx", "--verify")
    assert rc == 0, err
    assert "max |output difference| 0," in out + err
    base = onnx.load(tmp_path / "b.onnx")
    assert any(n.op_type == "LSTM" for n in base.graph.node)


@pytest.fixture
def big_weight(tmp_path, monkeypatch):
    """A 2-gate-block weight of 8 MB in a lean (mapped) model: the dynamo
    reordering folded from it."""
    monkeypatch.setattr(external, "LEAN_BYTES", 1)
    m = _gates_model(H=512, X=1024)
    path = save(m, tmp_path / "big.onnx")
    from fibgraph.importers.onnx.load import load_onnx
    return load_onnx(path)


def test_a_big_folded_weight_is_a_map_of_an_unlinked_file_not_memory(big_weight, tmp_path):
    """Concat of a mapped weight's slices goes to a temporary file, block by
    block, and comes back as a read-only map (no file left behind); a Slice
    stays a view of the model's own file; pages of both go back on release."""
    before = set(os.listdir(tmp_path))
    got = fold.fold_constants(big_weight)
    assert set(os.listdir(tmp_path)) == before
    for o in ("Wtc", "Wtu"):
        mm, _, length = mapped_in(got[o])
        assert isinstance(mm, mmap.mmap) and length == got[o].nbytes
    assert mapped_in(got["Wt0"])[0] is not mapped_in(got["Wtc"])[0]         # a view of the model's file
    Wt = external.tensor_array(next(t for t in big_weight.graph.initializer if t.name == "Wt"))
    H = 512
    np.testing.assert_array_equal(got["Wtu"][0], np.concatenate([Wt[:H], Wt[3 * H:], Wt[H:3 * H]]))
    transposed = fold.feedable(got["Wtc"].T)                 # a transposed table: to a file, C order
    assert transposed.flags.c_contiguous and mapped_in(transposed) is not None
    np.testing.assert_array_equal(transposed, got["Wtc"].T)


def test_verify_of_a_transposed_table_feeds_the_fold_and_folds_nothing_itself(tmp_path, capsys, monkeypatch):
    """A graph that transposes a weight (a dynamo export's tied output layer):
    the verify sessions run as written, with the transposed table fed, so no
    session makes the transpose, once or per run."""
    rng = np.random.default_rng(0)
    E = rng.normal(size=(4096, 64)).astype(np.float32)
    W = rng.normal(size=(64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["r", "Et"], ["y"])]
    g = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4096])],
                          [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")])
    tied = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ran = spy_sessions(monkeypatch)
    src = save(tied, tmp_path / "tied.onnx")
    rc, out, err = cli(capsys, "compress", src, "-o", tmp_path / "b.onnx", "--verify")
    assert rc == 0, err
    assert all(so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL for _, so in ran)
    probe, verify_a, verify_b = ran[0][0], ran[-2][0], ran[-1][0]
    for model in (probe, verify_a, verify_b):
        assert "Transpose" not in {n.op_type for n in model.graph.node}
        assert "Et" in {i.name for i in model.graph.input}


def test_a_fold_that_cannot_be_computed_is_one_line_and_exit_2(tmp_path, capsys):
    """A Gather on a weight with an index outside it: a clear error, exit 2."""
    E = np.ones((4, 8), np.float32)
    nodes = [helper.make_node("Gather", ["E", "i"], ["row"]), helper.make_node("Add", ["x", "row"], ["y"])]
    g = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                          [_c("E", E), _c("i", I([9]))])
    src = save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bad.onnx")
    rc, out, err = cli(capsys, "compress", src, "-o", tmp_path / "b.onnx")
    assert rc == 2
    assert "Gather" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.onnx").exists()
