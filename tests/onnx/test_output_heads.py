"""Output layers are found through the writer's columns, and a wide grouped
conv is written without its dense form.

A classifier's head is often ``MatMul -> Add -> Softmax`` (PaddleOCR's
18,710-class recogniser): its MatMul units are not graph outputs themselves
but are tied, unit by unit, to the Softmax that is, so the writer keeps them
all.  Such a layer is an output layer (not tunable, coloured exactly at any
eps): before, its rows were clustered at every eps the ``--keep`` search
tried (a complete linkage over 18,710 rows: 2.9 GB for a 21 MB model) and
nothing of it merged in the end.
"""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from helpers import _init, cli, finish, max_rel_diff, mlp_onnx, read_json, run_onnx, save

from fibgraph.importers.onnx.importer import import_dag

CLASSES = 300


def _head_model(out_op):
    """x(12) -> 8 hidden (ReLU; rows 0~1~2 and 3~4 planted equal) -> MatMul(300) -> Add -> out_op."""
    rng = np.random.default_rng(5)
    W1, b1 = rng.normal(0, 0.5, (8, 12)), rng.normal(0, 0.2, 8)
    W1[1:3], b1[1:3] = W1[0], b1[0]
    W1[4], b1[4] = W1[3], b1[3]
    W2, b2 = rng.normal(0, 0.5, (CLASSES, 8)), rng.normal(0, 0.2, CLASSES)
    W2[1] = W2[0] * 1.01          # two classes within any eps of each other
    return mlp_onnx([W1, W2], [b1, b2], form="matmul", out_op=out_op)


@pytest.mark.parametrize("out_op", ["Softmax", "LogSoftmax", None])
def test_a_head_tied_to_the_output_is_an_output_layer(out_op):
    from fibgraph.importers.onnx.groups import groups_of
    from fibgraph.importers.tuning import DagCompressor

    imp = import_dag(_head_model(out_op))
    by = {g.name: g for g in groups_of(imp)}
    assert by["W2"].is_output and not by["W2"].tunable
    assert not by["W1"].is_output and by["W1"].tunable
    assert DagCompressor(_head_model(out_op)).tunable == ["W1"]


def test_an_output_head_is_never_clustered(monkeypatch):
    """At eps > 0 the hidden layer is clustered, the head is not (exact), and
    the base keeps every class."""
    from fibgraph.engine import tolerance
    from fibgraph.importers.dag_api import colour_dag
    from fibgraph.importers.onnx.write import write_dag_base

    seen = []
    orig = tolerance.threshold_clusters
    monkeypatch.setattr(tolerance, "threshold_clusters",
                        lambda X, *a, **k: (seen.append(X.shape[0]), orig(X, *a, **k))[1])
    m = _head_model("Softmax")
    imp = import_dag(m)
    col = colour_dag(imp, "fibration", eps=0.5)
    assert seen and max(seen) < CLASSES            # the hidden rows were clustered, the head's never
    crit = col.info["criteria"]
    head_sets = [s for s in crit if s is not None and str(s).startswith(("matmul2", "add2", "out_op"))]
    assert head_sets and all(type(crit[s]).__name__ == "Exact" for s in head_sets)
    base, *_ = write_dag_base(imp, col.labels, scales=col.scales)
    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    assert run_onnx(base, x)[0].shape == (4, CLASSES)


def test_compress_keep_reports_the_head_as_output(tmp_path, capsys):
    src = save(_head_model("Softmax"), tmp_path / "head.onnx")
    rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "k.onnx", "--keep", "0.5",
                     "--report", tmp_path / "r.json", "-q")
    assert rc == 0, err
    rep = read_json(tmp_path / "r.json")
    head = next(ly for ly in rep["layers"] if ly["weight"] == "W2")
    assert head["output_layer"] and head["nodes_after"] == CLASSES
    assert head["criterion"].get("exact") is True


def _depthwise(channels, k=5):
    rng = np.random.default_rng(2)
    Wd, bd = rng.normal(0, 0.5, (channels, 1, k, k)), rng.normal(0, 0.3, channels)
    W3, b3 = rng.normal(0, 0.5, (2, channels)), rng.normal(0, 0.3, 2)
    nodes = [
        helper.make_node("Conv", ["x", "Wd", "bd"], ["c"], name="dw", pads=[k // 2] * 4, group=channels),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["y"], name="fc", transB=1),
    ]
    vi = helper.make_tensor_value_info
    return finish(helper.make_graph(
        nodes, "dw", [vi("x", 1, ["N", channels, 6, 6])], [vi("y", 1, ["N", 2])],
        [_init(n, v) for n, v in dict(Wd=Wd, bd=bd, W3=W3, b3=b3).items()]))


def test_a_wide_depthwise_conv_is_written_without_its_dense_form():
    """384 channels, 5 x 5: the dense block-diagonal form is 384 x 384 x 25
    float64 (29 MB); the writer's peak stays far below it, and the base
    computes what the model does."""
    from fibgraph.importers.dag_api import colour_dag
    from fibgraph.importers.onnx.write import write_dag_base

    m = _depthwise(384)
    imp = import_dag(m)
    col = colour_dag(imp, "fibration", eps=0.3)
    tracemalloc.start()
    try:
        base, *_ = write_dag_base(imp, col.labels, scales=col.scales)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 << 20, peak
    exact = write_dag_base(imp, colour_dag(imp, "fibration", eps=0.0).labels)[0]
    x = np.random.default_rng(1).normal(size=(3, 384, 6, 6)).astype(np.float32)
    assert max_rel_diff(run_onnx(exact, x), run_onnx(m, x)) < 1e-5
    assert run_onnx(base, x)[0].shape == (3, 2)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_grouped_taps_are_the_dense_formula(seed):
    """``_grouped_taps`` (one sparse matrix per tap) equals ``Rm @ W_full @ C^T``
    of the dense block-diagonal form, for random groups, multipliers,
    kernels, weighted groupings and rows no group reads."""
    import scipy.sparse as sp

    from fibgraph.importers.onnx.write.linear import _grouped_taps

    rng = np.random.default_rng(seed)
    group, gi, mult = (int(v) for v in rng.integers(1, 5, 3))
    c_out, c_in = group * mult, group * gi
    W = rng.normal(size=(c_out, gi) + tuple(int(v) for v in rng.integers(1, 4, rng.integers(0, 3))))
    full = np.zeros((c_out, c_in) + W.shape[2:])
    for g in range(group):
        full[g * mult:(g + 1) * mult, g * gi:(g + 1) * gi] = W[g * mult:(g + 1) * mult]
    m, c = int(rng.integers(1, c_out + 1)), int(rng.integers(1, c_in + 1))
    r, h = rng.integers(-1, m, c_out), rng.integers(0, c, c_in)
    Rm = sp.csr_matrix((rng.random((r >= 0).sum()), (r[r >= 0], np.flatnonzero(r >= 0))), shape=(m, c_out))
    C = sp.csr_matrix((rng.random(c_in), (h, np.arange(c_in))), shape=(c, c_in))
    taps = _grouped_taps(Rm, W.astype(np.float32), C, group)
    got = np.stack([t.toarray() for t in taps], axis=-1).reshape((m, c) + W.shape[2:])
    want = np.einsum("ro,oi...,ci->rc...", Rm.toarray(), full.astype(np.float32).astype(np.float64), C.toarray())
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
