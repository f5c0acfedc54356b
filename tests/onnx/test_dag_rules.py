"""The hypergraph importer's op table (importers/onnx/rules): one rule per op
type, registered once; an op without a rule is a reported barrier; the
importer hands typed records to the writer."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fibgraph.importers.onnx import records as R
from fibgraph.importers.onnx.importer import DAG_OPS, import_dag
from fibgraph.importers.onnx.rules import RULES, lookup, rule
from fibgraph.importers.onnx.rules import attention, elementwise, linear, movement, norm, recurrent, reduce

#: the op-type sets of the rule modules, each with the rule that handles it
FAMILIES = {
    "UNARY": (elementwise.UNARY, elementwise.unary), "ALIAS": (elementwise.ALIAS, elementwise.unary),
    "SOFTMAX": (elementwise.SOFTMAX, elementwise.softmax), "ELEMWISE": (elementwise.ELEMWISE, elementwise.elementwise),
    "REDUCE": (reduce.REDUCE, reduce.reduce), "MOVE": (movement.MOVE, movement.move),
    "POOL": (movement.POOL, movement.pool), "META": (movement.META, movement.shape_op),
    "CONSTANT": (movement.CONSTANT, movement.shape_op), "MATMUL": (linear.MATMUL, linear.matmul),
    "CONV": (linear.CONV, linear.conv), "CHANNEL_NORM": (norm.CHANNEL_NORM, norm.channel_norm),
    "LAYERNORM": ({"LayerNormalization"}, norm.layernorm), "RECURRENT": (recurrent.RECURRENT, recurrent.map_recurrent),
    "ATTENTION": (attention.ATTENTION, attention.attention),
}


def test_every_op_has_exactly_one_rule():
    assert DAG_OPS == sorted(RULES) and len(DAG_OPS) == len(set(DAG_OPS))
    for (a, (sa, _)), (b, (sb, _)) in itertools.combinations(FAMILIES.items(), 2):
        assert not sa & sb, f"{a} and {b} share {sorted(sa & sb)}"
    assert set().union(*(s for s, _ in FAMILIES.values())) == set(RULES)
    for fam, (ops, fn) in FAMILIES.items():
        for op in ops:
            assert lookup(op) is fn, (fam, op)
    assert lookup("NoSuchOp") is None
    # registering an op a second time is refused (the table stays one rule per op)
    with pytest.raises(ValueError, match="Relu already has the rule"):
        rule("Relu")(lambda *a: "activation")
    assert RULES["Relu"] is elementwise.unary


def _mlp_with(op_node, extra_inits=()):
    """x (1, 4) -> MatMul W1 -> [op_node: h -> z] -> MatMul W2 -> y."""
    rng = np.random.default_rng(0)
    W1, W2 = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), op_node,
             helper.make_node("MatMul", ["z", "W2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"), *extra_inits]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unregistered_op_is_a_barrier_naming_the_op():
    axis = numpy_helper.from_array(np.array(1, dtype=np.int64), "axis")
    model = _mlp_with(helper.make_node("CumSum", ["h", "axis"], ["z"], name="cs"), [axis])
    assert "CumSum" not in RULES
    imp = import_dag(model)
    assert imp.barriers == [{"node": "cs", "op": "CumSum", "why": "op CumSum is not supported", "params": 0}]
    assert ("cs", "CumSum", "barrier") in imp.ops
    # the layers on both sides are still mapped, with typed records in graph order
    lin = [r for r in imp.records if r.kind == R.Kind.LINEAR]
    assert [(r.node, r.weight, r.index) for r in lin] == [("fc1", "W1", 0), ("fc2", "W2", 2)]
    assert all(isinstance(r, R.LinearRecord) for r in lin)


def test_the_table_is_what_the_importer_consults(monkeypatch):
    """Without its entry a registered op becomes a barrier too: the walk looks
    rules up in RULES at run time, there is no second dispatch."""
    model = _mlp_with(helper.make_node("Relu", ["h"], ["z"], name="act"))
    assert import_dag(model).barriers == []
    monkeypatch.delitem(RULES, "Relu")
    imp = import_dag(model)
    assert [(b["node"], b["op"], b["why"]) for b in imp.barriers] == [("act", "Relu", "op Relu is not supported")]


def test_records_are_typed():
    model = _mlp_with(helper.make_node("Relu", ["h"], ["z"], name="act"))
    rec = import_dag(model).records[0]
    assert type(rec) is R.LinearRecord and rec.kind is R.Kind.LINEAR
    assert (rec.weight, rec.D, rec.index) == ("W1", 1, 0)
    with pytest.raises(TypeError):
        rec["weight"]                      # no dict-style access: records are typed
