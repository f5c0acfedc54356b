"""The one group abstraction (fibgraph/groups.py, importers/onnx/groups.py).

* the pure functions: ``tie_columns`` / ``set_components`` on hand-made joins,
  ``group_partition`` equal to the meet computed by hand (with slots: two
  nodes of one node set in one column), ``kept_counts``;
* the groups of planted models are exactly the expected ones: an MLP (one
  LAYER group per layer with its bias add), a residual MLP (the stream's two
  writers and the Add in ONE STREAM group), an LSTM (W and R in one
  RECURRENT group, one column per hidden unit holding its gates, cell and
  hidden node), a Transformer (q and k of each head dim in one column of the
  ATTENTION group, v apart; the residual stream's three writers one STREAM
  group);
* the consumers read them: the writer's columns are ``tie_columns``, the
  group partition equals the writer's column groups and the report's
  ``nodes_after``, DagCompressor's layers and ties are the groups, the report
  rows name their group, an eps set for one weight reaches its group's sums.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import classes, meet, mlp_onnx, planted_mlp

from fibgraph.groups import (
    Group,
    GroupKind,
    group_partition,
    kept_counts,
    set_components,
    tie_columns,
)

torch = pytest.importorskip("torch")

import planted_nets as pn

from fibgraph.importers.dag_api import color_dag_model, colour_dag
from fibgraph.importers.onnx.groups import columns_of, groups_of, weight_uses
from fibgraph.importers.onnx.records import Kind
from fibgraph.importers.onnx.write import group_columns
from fibgraph.importers.onnx.importer import import_dag
from fibgraph.importers.tuning import DagCompressor


# ------------------------------------------------------------ pure functions
def test_tie_columns_hand_made():
    joins = [(np.array([0, 3]), np.array([1, 4])),       # 0-1, 3-4
             (np.array([1]), np.array([2])),             # 1-2: column {0, 1, 2}
             (np.array([], dtype=np.int64), np.array([], dtype=np.int64)),
             (np.array([5, 6]), np.array([6]))]          # lengths differ: not a join
    assert tie_columns(8, joins).tolist() == [0, 0, 0, 1, 1, 2, 3, 4]
    assert tie_columns(3, []).tolist() == [0, 1, 2]
    assert tie_columns(0, []).size == 0


def test_set_components_hand_made():
    space_of = np.array([0, 0, 1, 1, 2, 2, 3])
    joins = [(np.array([0, 1]), np.array([2, 3])), (np.array([6]), np.array([5]))]
    assert set_components(space_of, joins, 4).tolist() == [0, 0, 1, 1]
    assert set_components(space_of, joins, 5).tolist() == [0, 0, 1, 1, 2]     # a set without nodes


def _group(nodes, columns, sets):
    nodes = np.asarray(nodes)
    return Group(name="w", kind=GroupKind.LAYER, weights=("w",), uses=(), node_sets=tuple(np.unique(sets)),
                 node_set_names=(), units=nodes, nodes=nodes, columns=np.asarray(columns),
                 sets=np.asarray(sets), is_output=False)


def test_group_partition_is_the_meet():
    # 4 columns, two node sets (nodes 0-3: set 0, nodes 4-7: set 1), column j = {j, 4 + j}
    g = _group(np.arange(8), [0, 1, 2, 3, 0, 1, 2, 3], [0] * 4 + [1] * 4)
    a, b = [0, 0, 1, 1], [5, 6, 6, 6]           # colours of set 0 and set 1 per column
    cols, cls = group_partition(g, np.array(a + b))
    assert cols.tolist() == [0, 1, 2, 3]
    by_hand = meet(classes(a), classes(b))      # {0}, {1}, {2, 3}
    assert classes(cls) == by_hand == [[0], [1], [2, 3]]
    # labels on nodes outside the group are ignored; equal colourings give their own partition
    g2 = _group([2, 3, 4, 5], [7, 9, 7, 9], [1, 1, 2, 2])
    lab = np.array([9, 9, 4, 4, 1, 1])
    assert classes(group_partition(g2, lab)[1]) == [[0, 1]]
    lab[5] = 2
    assert classes(group_partition(g2, lab)[1]) == [[0], [1]]


def test_group_partition_slots():
    # one set with two nodes per column (q and k of one packed projection):
    # columns merge only if both slots agree
    g = _group(np.arange(6), [0, 0, 1, 1, 2, 2], [0] * 6)
    lab = np.array([1, 2, 1, 2, 2, 1])          # column 2 has the colours swapped
    assert classes(group_partition(g, lab)[1]) == [[0, 1], [2]]


def test_kept_counts():
    imp = import_dag(_mlp_model())
    g = groups_of(imp)[0]
    kept = np.zeros(imp.graph.n, dtype=bool)
    kept[g.units[[0, 2]]] = True
    assert kept_counts(g, kept) == [2]


# ------------------------------------------------------------ planted models
def _mlp_model():
    rng = np.random.default_rng(0)
    pm = planted_mlp(rng, 5, [np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 0])], 3)
    return mlp_onnx(pm.Ws, pm.bs, form="matmul")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("groups")
    out = {}
    for name, build in (("lstm", lambda: pn.planted_lstm(0)), ("res", lambda: pn.planted_residual_mlp(7)),
                        ("tr", lambda: pn.planted_transformer(5))):
        model, info = build()
        out[name] = pn.export_one(model, pn.example_input(info, batch=3), d / f"{name}.onnx", dynamo=False)
    return out


def _columns_hold_one_node_per_set(g):
    cols, ci = np.unique(g.columns, return_inverse=True)
    per = np.zeros((cols.size, len(g.node_sets)), dtype=np.int64)
    np.add.at(per, (ci, np.searchsorted(g.node_sets, g.sets)), 1)
    return bool(np.all(per == 1))


def test_mlp_one_layer_group_per_layer_with_its_bias_add():
    imp = import_dag(_mlp_model())
    gs = groups_of(imp)
    assert [g.name for g in gs] == ["W1", "W2", "W3"]
    assert [g.kind for g in gs] == [GroupKind.LAYER] * 3
    assert [g.weights for g in gs] == [("W1",), ("W2",), ("W3",)]
    for g, width, mm, add in zip(gs, (5, 4, 3), ("matmul1", "matmul2", "matmul3"), ("add1", "add2", "add3")):
        assert len(g.node_sets) == 2                                 # the MatMul's units and its bias add
        assert any(n.startswith(mm) for n in g.node_set_names) and any(n.startswith(add) for n in g.node_set_names)
        assert g.units.size == width and np.unique(g.columns).size == width
        assert _columns_hold_one_node_per_set(g)
    assert groups_of(imp) is gs                                      # built once
    # the writer's columns are the same function's
    assert np.array_equal(group_columns(imp, np.zeros(imp.graph.n, np.int64))["col"],
                          columns_of(imp))


def test_residual_mlp_writers_are_one_stream_group(exported):
    imp = import_dag(exported["res"])
    gs = groups_of(imp)
    assert [(g.name, g.kind, g.weights) for g in gs] == [
        ("fc1.weight", GroupKind.STREAM, ("fc1.weight", "res.weight")),
        ("out.weight", GroupKind.LAYER, ("out.weight",))]
    stream = gs[0]
    assert any(n.startswith("/Add") for n in stream.node_set_names)
    assert np.unique(stream.columns).size == 8 and _columns_hold_one_node_per_set(stream)
    assert not stream.is_output and stream.kept_whole is None and stream.tunable
    assert gs[1].is_output and not gs[1].tunable


def test_lstm_w_and_r_are_one_recurrent_group(exported):
    imp = import_dag(exported["lstm"])
    rec = next(r for r in imp.records if r.kind is Kind.RECURRENT)
    gs = groups_of(imp)
    g = gs[0]
    assert g.kind is GroupKind.RECURRENT and g.weights == (rec.W, rec.R) and g.name == rec.W
    assert {s for s in rec.spaces if imp.spaces[s].kind != "const"} == set(g.node_sets)
    H = rec.H
    assert g.units.size == H
    # one column per hidden unit, holding one node of every gate, the cell and the hidden set
    unit_cols = np.unique(columns_of(imp)[g.units])
    assert unit_cols.size == H
    assert _columns_hold_one_node_per_set(g)
    for s in g.node_sets:
        ids = imp.spaces[s].ids
        assert np.array_equal(np.sort(columns_of(imp)[ids]), np.sort(unit_cols))
    assert [(x.name, x.kind) for x in gs[1:]] == [("fc.weight", GroupKind.LAYER)]


def test_transformer_q_and_k_of_a_head_dim_share_a_column(exported):
    imp = import_dag(exported["tr"])
    gs = groups_of(imp)
    kinds = {g.kind for g in gs}
    assert GroupKind.ATTENTION in kinds and GroupKind.STREAM in kinds
    att = next(g for g in gs if g.kind is GroupKind.ATTENTION)
    stream = next(g for g in gs if g.kind is GroupKind.STREAM)
    assert att.weights == (att.name,) and att.units.size == 3 * 8           # packed in_proj: q; k; v
    assert len(stream.weights) == 3 and stream.units.size == 3 * 8          # inp, out_proj, linear2
    assert np.unique(stream.columns).size == 8
    col = columns_of(imp)
    contract = [r for r in imp.records if r.kind is Kind.CONTRACT]
    qk = next(r for r in contract if all(np.isin(imp.layouts[t], att.nodes).all() for t in r.inputs))
    q, k = (np.asarray(imp.layouts[t]).reshape(-1) for t in qk.inputs)
    assert set(col[q]) == set(col[k]) and len(set(col[q])) == 8           # one column per head dim
    # the projection's units: 8 q/k columns with two units each, 8 v columns with one
    per = np.bincount(np.unique(col[att.units], return_inverse=True)[1])
    assert sorted(per.tolist()) == [1] * 8 + [2] * 8


# ------------------------------------------------------------ consumers
@pytest.mark.parametrize("name", ["res", "lstm"])
def test_group_partition_is_the_writers_and_the_reports(exported, name):
    imp = import_dag(exported[name])
    rep, imp, col = color_dag_model(exported[name], imp=imp)
    z = group_columns(imp, col.labels, split=False)
    for g in groups_of(imp):
        if not g.tunable:
            continue
        cols, cls = group_partition(g, col.labels)
        assert classes(cls) == classes(z["gid_col"][cols])
        kept = col.base[2]
        for u, n in zip(g.uses, kept_counts(g, kept)):
            row = next(r for r in rep["layers"] if r["weight"] == u.weight)
            assert row["nodes_after"] == n == int(cls.max()) + 1
            assert row["group"] == g.name and row["tied"] == list(g.weights)


def test_planted_partition_found_per_group(exported):
    imp = import_dag(exported["res"])
    col = colour_dag(imp)
    g = groups_of(imp)[0]
    _, cls = group_partition(g, col.labels)
    # the planted map of the hidden width 8 -> 4 (sizes 3, 1, 2, 2)
    assert sorted(np.bincount(cls).tolist()) == [1, 2, 2, 3]


def test_tuning_layers_are_the_groups(exported):
    imp = import_dag(exported["tr"])
    dc = DagCompressor(exported["tr"], imported=imp)
    gs = groups_of(imp)
    assert dc.ties == {g.name: list(g.weights) for g in gs}
    assert dc.tunable == [g.name for g in gs if g.tunable]
    # one eps per group: the eps file names every weight of the group
    stream = next(g for g in gs if g.kind is GroupKind.STREAM)
    assert set(dc.table({stream.name: 0.2})) == set(stream.weights)


def test_eps_of_a_weight_reaches_its_groups_sums(exported):
    imp = import_dag(exported["res"])
    stream = groups_of(imp)[0]
    col = colour_dag(imp, eps=0.0, eps_table={"res.weight": 0.25})
    crit = col.info["criteria"]
    res_use = next(u for u, _ in weight_uses(imp) if u.weight == "res.weight")
    add = next(n for n in stream.node_set_names if n.startswith("/Add"))
    assert crit[add] is crit[res_use.node_sets[0]] and crit[add].eps == 0.25


def test_no_groups_without_weights():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    assert groups_of(import_dag(m)) == []


@pytest.mark.parametrize("name", ["tr", "res", "lstm"])
def test_baseline_column_classes_lie_inside_groups(exported, name):
    from fibgraph.importers.compare_dag import DagMethods

    imp = import_dag(exported[name])
    dm = DagMethods(imp)
    assert np.array_equal(dm.col, columns_of(imp))
    gs = groups_of(imp)
    for members in dm.members:
        assert np.unique(dm.group_of_col[members]).size == 1
    # every group's columns are classes of the baselines (nothing outside a group is chosen with it)
    for k, g in enumerate(gs):
        assert set(np.nonzero(dm.group_of_col == k)[0]) == set(np.unique(g.columns).tolist())


def test_onnx_attention_op_q_and_k_are_one_attention_group(tmp_path):
    """The ONNX Attention op (opset 23): the packed projection's group is ATTENTION,
    with one column per head dim holding its q and k units, v's units apart."""
    import contextlib
    import io
    import warnings

    model, info = pn.planted_transformer(0)
    path = tmp_path / "tf23.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (pn.example_input(info),), str(path), dynamo=True, external_data=False,
                          opset_version=23)
    imp = import_dag(str(path))
    assert any(r.kind is Kind.ATTENTION for r in imp.records)
    gs = groups_of(imp)
    att = [g for g in gs if g.kind is GroupKind.ATTENTION]
    assert len(att) == 1 and att[0].units.size == 3 * info["d_model"]
    per = np.bincount(np.unique(columns_of(imp)[att[0].units], return_inverse=True)[1])
    assert sorted(per.tolist()) == [1] * info["d_model"] + [2] * info["d_model"]
    assert [g.kind for g in gs].count(GroupKind.STREAM) == 1
