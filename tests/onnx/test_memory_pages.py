"""Memory of the steps between import and write (sixth session): mapped weight
pages handed back while the engine reads them (fibgraph/pages.py), the base's
new weights spilled to a file instead of the protobuf (importers/onnx/spill.py),
parameter counts without merged weights (the --keep search's dry writes), and
onnxruntime sessions that hold neither a second copy of the weights nor
pooled activations (runtime.lean_options)."""
import mmap
import os
import sys

import numpy as np
import onnx
import pytest

from helpers import cli, save, small_planted_mlp, spy_sessions

from fibgraph.importers.onnx import external

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def _rss_file():
    """Resident file-backed memory of this process, bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssFile")


@pytest.fixture
def mapped_rows(tmp_path):
    """A 24 MB float32 matrix (6144 x 1024) in a file, mapped read-only, and
    its values in memory."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6144, 1024)).astype(np.float32)
    path = tmp_path / "w.bin"
    path.write_bytes(A.tobytes())
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return A, np.frombuffer(mm, dtype=np.float32).reshape(A.shape)     # the map closes with its last view


@linux
def test_a_mapped_views_pages_go_back_and_still_read_the_same(mapped_rows):
    from fibgraph.pages import drop_mapped, mapped_in

    A, M = mapped_rows
    before = _rss_file()
    total = float(M.sum(dtype=np.float64))
    assert _rss_file() - before > 20 << 20              # the whole matrix was read in
    drop_mapped(M)
    assert _rss_file() - before < 2 << 20
    assert float(M.sum(dtype=np.float64)) == total       # read again from the file
    drop_mapped(M)
    # a transposed chunk spans exactly its rows of the file; memory of its own: nothing to drop
    mm, start, length = mapped_in(M.T[:, 100:200])
    assert (start, length) == (100 * 1024 * 4, 100 * 1024 * 4)
    assert mapped_in(A) is None and mapped_in(A.T[:, 3:9]) is None


@linux
def test_the_engine_reads_a_mapped_weight_a_chunk_at_a_time(mapped_rows):
    """Row norms, Gram products and the dendrogram digest of a transposed
    mapped weight (a token table's columns: the residual stream's rows) equal
    those of the rows in memory, and leave little of the file resident."""
    from fibgraph.engine import cluster

    A, M = mapped_rows
    Z, Zm = A.T, M.T                                     # 1024 rows of 6144, F-ordered views
    before = _rss_file()
    np.testing.assert_array_equal(cluster.row_norms(Zm), cluster.row_norms(Z))
    assert _rss_file() - before < 10 << 20               # the 24 MB never resident at once
    np.testing.assert_array_equal(cluster._gram(Zm, 0, 64), cluster._gram(Z, 0, 64))
    assert cluster._digest(Zm) == cluster._digest(np.asfortranarray(Z))
    assert _rss_file() - before < 10 << 20


@linux
def test_exact_hashing_reads_a_mapped_weight_a_chunk_at_a_time(mapped_rows):
    """The exact colouring's largest |weight| and row hashes of a transposed
    mapped weight equal those of the rows in memory, and leave little of the
    file resident (a token table's 47 MB were, before any clustering)."""
    from fibgraph.engine import signatures

    A, M = mapped_rows
    Z, Zm = A.T, M.T
    keys = np.arange(Z.shape[1], dtype=np.uint64)
    before = _rss_file()
    assert signatures._abs_max(Zm) == signatures._abs_max(Z) == float(np.abs(A).max())
    assert _rss_file() - before < 10 << 20
    h = signatures._hash_dense_all(Zm, keys, 1e-6)
    assert _rss_file() - before < 10 << 20
    for a, b in zip(h, signatures._hash_dense_all(Z, keys, 1e-6)):
        np.testing.assert_array_equal(a, b)


def test_a_big_models_new_weights_are_spilled_and_the_spill_removed(tmp_path, capsys, monkeypatch):
    """A lean model's base gets its new weights from a spill file in the
    output's folder; the base written is the in-memory path's, and the spill
    is gone after success and after a failure alike."""
    from fibgraph.errors import InputError
    from fibgraph.importers import dag_api
    from fibgraph.importers.onnx.spill import Spill

    monkeypatch.setattr(external, "LEAN_BYTES", 1)
    monkeypatch.setattr(external, "EXTERNAL_MIN_BYTES", 64)
    spilled = []
    real = Spill.tensor
    monkeypatch.setattr(Spill, "tensor", lambda self, arr, name: (spilled.append((self.path, name)),
                                                                  real(self, arr, name))[1])
    _, m = small_planted_mlp(2)
    src = save(m, tmp_path / "m.onnx")
    rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "lean.onnx", "--verify")
    assert rc == 0, err
    assert spilled and all(os.path.dirname(p) == str(tmp_path) for p, _ in spilled)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fibgraph")]
    monkeypatch.setattr(external, "LEAN_BYTES", 1 << 40)       # the in-memory path
    n = len(spilled)
    rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "mem.onnx", "--verify")
    assert rc == 0, err and len(spilled) == n
    a, b = onnx.load(str(tmp_path / "lean.onnx")), onnx.load(str(tmp_path / "mem.onnx"))
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for s, t in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(s), onnx.numpy_helper.to_array(t))

    def fail(*a, **k):
        raise InputError("verification run failed: made to fail")

    monkeypatch.setattr(external, "LEAN_BYTES", 1)
    monkeypatch.setattr(dag_api, "verify_against", fail)
    rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "fail.onnx", "--verify")
    assert rc == 2 and "made to fail" in err and len(spilled) > n
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fibgraph")]
    assert not (tmp_path / "fail.onnx").exists()


def _planted_conv():
    """Conv 3 -> 8 (channels in duplicate pairs), ReLU, Conv 8 -> 4, both 3 x 3."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    W1 = np.repeat(rng.normal(size=(4, 3, 3, 3)), 2, axis=0).astype(np.float32)
    b1 = np.repeat(rng.normal(size=4), 2).astype(np.float32)
    W2 = rng.normal(size=(4, 8, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "W1"), (b1, "b1"), (W2, "W2"))]
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["mlp", "conv", "lstm"])
def test_a_dry_write_counts_the_parameters_of_the_real_one_without_merging(kind, monkeypatch, tmp_path):
    """The --keep search's parameter counts: a dry write has the real base's
    initializer shapes, and merges no weight (an LSTM's gate blocks neither)."""
    from fibgraph.importers.dag_api import colour_dag
    from fibgraph.importers.onnx.importer import import_dag
    from fibgraph.importers.onnx.runtime import count_params
    from fibgraph.importers.onnx.write import axis, linear, recurrent, write_dag_base

    if kind == "lstm":
        pytest.importorskip("torch")
        import planted_nets as pn

        net, info = pn.planted_lstm(0, bidirectional=True)
        m = onnx.load(str(pn.export_one(net, pn.example_input(info, batch=3), tmp_path / "l.onnx", dynamo=False)))
    else:
        m = small_planted_mlp(3)[1] if kind == "mlp" else _planted_conv()
    imp = import_dag(m)
    col = colour_dag(imp, "fibration", 0.0, {}, "complete", "cosine", 1e-5, True)
    calls = []
    orig = axis.two_sided
    for mod in (linear, recurrent):
        monkeypatch.setattr(mod, "two_sided", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    real, *_ = write_dag_base(imp, col.labels, scales=col.scales)
    assert calls                                  # the spy sees the real merge
    calls.clear()
    dry, *_ = write_dag_base(imp, col.labels, scales=col.scales, dry=True)
    assert not calls
    assert count_params(dry) == count_params(real) < count_params(m)
    assert {t.name: list(t.dims) for t in dry.graph.initializer} == \
        {t.name: list(t.dims) for t in real.graph.initializer}


def test_sessions_over_the_weights_copy_none_and_pool_nothing(tmp_path, capsys, monkeypatch):
    """Every session fibgraph makes over a model's weights while compressing
    (probe, load check, verify) runs the graph as written, without prepacked
    weights, arena or memory pattern: the options that hold the weights once."""
    import onnxruntime as ort

    made = spy_sessions(monkeypatch)
    _, m = small_planted_mlp(4)
    src = save(m, tmp_path / "m.onnx")
    for extra in ([], ["--verify"]):
        rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "b.onnx", *extra)
        assert rc == 0, err
    assert len(made) >= 5                        # probe + check, probe + verify's two
    for _, so in made:
        assert so is not None
        assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert not so.enable_mem_pattern and not so.enable_cpu_mem_arena
        assert so.get_session_config_entry("session.disable_prepacking") == "1"


def test_the_repair_of_a_big_models_base_is_the_in_memory_ones(tmp_path, capsys, monkeypatch):
    """--data with the repair on a lean model (its weights and its base's new
    weights in files): the calibration runs read them there (an absolute
    external location was refused by onnxruntime: an internal error), and the
    repaired base equals the in-memory path's."""
    p, m = small_planted_mlp(6)
    src = save(m, tmp_path / "m.onnx")
    x = np.random.default_rng(6).normal(size=(64, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    outs = {}
    for name, least in (("lean", 1), ("mem", 1 << 40)):
        monkeypatch.setattr(external, "LEAN_BYTES", least)
        monkeypatch.setattr(external, "EXTERNAL_MIN_BYTES", 64)
        rc, out, err = cli(capsys, "compress", src, "-o", tmp_path / f"{name}.onnx", "--eps", "0.3",
                           "--data", tmp_path / "cal.npz", "--repair")
        assert rc == 0, err
        assert "repair gemm" in out
        outs[name] = onnx.load(str(tmp_path / f"{name}.onnx"))
    a, b = outs["lean"], outs["mem"]
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for s, t in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(s), onnx.numpy_helper.to_array(t), rtol=1e-6, atol=1e-7)
