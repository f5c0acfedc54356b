"""The base writer's rule table (importers/onnx/write/registry.py) and typed records.

Every record kind has exactly one writer rule; a record whose kind has no rule
(or an untyped dict handed to the writer) fails with a clear error instead of
being left unwritten; and the importer's dict records and their typed form
write byte-identical bases."""
import numpy as np
import pytest
from helpers import finish, run_onnx
from onnx import TensorProto, helper, numpy_helper

from fibgraph.importers.dag_api import colour_dag
from fibgraph.importers.onnx import records as R
from fibgraph.importers.onnx.records import (
    Kind,
    LinearRecord,
    Record,
    record_from_dict,
)
from fibgraph.importers.onnx.write import RULES, Writer, write_dag_base
from fibgraph.importers.onnx.write.registry import rule_for
from fibgraph.importers.onnx.importer import import_dag


def _model(seed=0):
    """x(5) -> MatMul W1 + b1 (6) -> Relu -> LayerNorm -> MatMul W2 + b2 (4) -> Relu
    -> Gemm W3 (3) -> Softmax.  Planted: hidden units 0 = 3 and 1 = 4 (columns of W1,
    b1, gamma, beta), second layer units 0 = 2."""
    rng = np.random.default_rng(seed)
    W1, b1 = rng.normal(0, 1, (5, 6)), rng.normal(0, 0.5, 6)
    W1[:, 3], W1[:, 4], b1[3], b1[4] = W1[:, 0], W1[:, 1], b1[0], b1[1]
    g, be = rng.normal(1, 0.2, 6), rng.normal(0, 0.2, 6)
    g[3], g[4], be[3], be[4] = g[0], g[1], be[0], be[1]
    W2, b2 = rng.normal(0, 1, (6, 4)), rng.normal(0, 0.5, 4)
    W2[:, 2], b2[2] = W2[:, 0], b2[0]
    W3, b3 = rng.normal(0, 1, (3, 4)), rng.normal(0, 0.5, 3)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k)
             for k, v in {"W1": W1, "b1": b1, "g": g, "be": be, "W2": W2, "b2": b2, "W3": W3, "b3": b3}.items()]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["z1"], name="add1"),
             helper.make_node("Relu", ["z1"], ["a1"], name="relu1"),
             helper.make_node("LayerNormalization", ["a1", "g", "be"], ["n1"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n1", "W2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["z2"], name="add2"),
             helper.make_node("Relu", ["z2"], ["a2"], name="relu2"),
             helper.make_node("Gemm", ["a2", "W3", "b3"], ["z3"], name="gemm3", transB=1),
             helper.make_node("Softmax", ["z3"], ["y"], name="sm", axis=1)]
    g_ = helper.make_graph(nodes, "ln_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return finish(g_)


def test_every_record_kind_has_one_writer_rule():
    assert set(RULES) == set(Kind), set(Kind) ^ set(RULES)
    classes = {c for c in vars(R).values() if isinstance(c, type) and issubclass(c, Record) and c is not Record}
    assert classes == set(R.RECORD_TYPES)
    for cls in R.RECORD_TYPES:
        rec = cls(node="n")
        assert rule_for(rec) is RULES[rec.kind]
        assert rule_for(rec).__name__ == rec.kind.value          # the rule is named after its kind
    assert rule_for(LinearRecord(node="n", depthwise=True)) is RULES[Kind.DEPTHWISE]


def test_untyped_or_unknown_records_fail_loudly():
    with pytest.raises(TypeError, match="typed records"):
        rule_for({"kind": "linear", "node": "fc"})
    with pytest.raises(ValueError, match="unknown record kind 'bogus'"):
        record_from_dict({"kind": "bogus", "node": "fc"})


def test_a_kind_without_a_rule_is_an_error_not_a_silent_skip(monkeypatch):
    imp = import_dag(_model())
    labels = colour_dag(imp).labels
    monkeypatch.delitem(RULES, Kind.LAYERNORM)
    with pytest.raises(TypeError, match="no writer rule for LayerNormRecord .* of node 'ln'"):
        write_dag_base(imp, labels)


def test_typed_records_round_trip_and_write_identical_bases():
    """The importer emits typed records; their dict form (``record_from_dict``,
    e.g. records read back from JSON) gives the same records and the same base."""
    from dataclasses import asdict

    model = _model()
    imp = import_dag(model)
    kinds = {r.kind for r in imp.records}
    assert {Kind.LINEAR, Kind.ELEMENTWISE, Kind.LAYERNORM, Kind.SOFTMAX} <= kinds, kinds
    assert all(type(r).__name__ != "Record" for r in imp.records)
    dicts = [{**asdict(r), "kind": r.kind.value} for r in imp.records]
    again = [record_from_dict(d) for d in dicts]
    assert again == list(imp.records)
    col = colour_dag(imp)
    base_d, gid, kept, _ = write_dag_base(imp, col.labels, scales=col.scales)
    imp.records = again
    base_t, gid_t, kept_t, _ = write_dag_base(imp, col.labels, scales=col.scales)
    assert base_d.SerializeToString() == base_t.SerializeToString()
    assert np.array_equal(gid, gid_t) and np.array_equal(kept, kept_t)
    # the base really is smaller (the planted units merged) and computes the same function
    sizes = {t.name.split("__")[0]: tuple(t.dims) for t in base_t.graph.initializer}
    assert sizes["W1"] == (5, 4) and sizes["W2"] == (4, 3), sizes
    x = np.random.default_rng(1).normal(0, 1, (7, 5))
    np.testing.assert_allclose(run_onnx(base_t, x)[0], run_onnx(model, x)[0], rtol=1e-5, atol=1e-6)


def test_writer_write_dispatches_by_kind():
    """``Writer.write`` on a typed record runs its kind's rule (here: the
    LayerNorm rewrite replaces the op by its decomposition)."""
    imp = import_dag(_model())
    col = colour_dag(imp)
    from fibgraph.importers.onnx.write import dag_groups

    gid, kept, _ = dag_groups(imp, col.labels)
    w = Writer(imp, gid, kept, labels=col.labels)
    (ln,) = [r for r in imp.records if r.kind is Kind.LAYERNORM]
    w.write(ln)
    ops = [n.op_type for n in w.g.node]
    assert "LayerNormalization" not in ops and ops.count("ReduceMean") == 2
