"""Big models in bounded memory (importers/onnx/external.py): weights read as
views of the memory-mapped file, not copies; the base streamed to disk with
in-folder external data (on request, or automatically above a threshold);
onnxruntime sessions built over the file, never over the serialised weights;
and the lean path giving the same base as the in-memory one.  The thresholds
are module constants, made small here so that small models take the big-model
path."""
import mmap
import os
import weakref

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import cli, max_rel_diff, mlp_onnx, run_onnx, save, small_planted_mlp

from fibgraph.importers.onnx import external
from fibgraph.importers.onnx.importer import import_dag
from fibgraph.importers.onnx.load import load_onnx, tensor_value


@pytest.fixture
def lean(monkeypatch):
    """Every model counts as big: opened lean, weights read in place."""
    monkeypatch.setattr(external, "LEAN_BYTES", 1)
    monkeypatch.setattr(external, "EXTERNAL_MIN_BYTES", 64)


def _mapped(arr):
    """Whether ``arr`` is a view whose base chain ends in a memory map (no copy)."""
    b = arr
    while isinstance(b, np.ndarray):
        if b.flags.owndata:
            return False
        b = b.base
    if isinstance(b, memoryview):
        b = b.obj
    return isinstance(b, mmap.mmap)


def test_embedded_model_is_imported_without_copying_its_weights(tmp_path, lean):
    p, m = small_planted_mlp()
    path = save(m, tmp_path / "m.onnx")
    model = load_onnx(path)
    assert external.is_lean(model)
    # the protobuf in memory holds no weight bytes: only references into the file
    assert model.ByteSize() < sum(w.size * 4 for w in p.Ws) // 4
    W1 = tensor_value(next(t for t in model.graph.initializer if t.name == "W1"))
    assert _mapped(W1) and not W1.flags.writeable
    np.testing.assert_array_equal(W1, np.asarray(p.Ws[0], np.float32))
    imp = import_dag(model)
    assert _mapped(imp.consts["W1"]) and np.shares_memory(imp.consts["W1"], W1)
    blk = next(b for b in imp.graph.blocks if b.name == "W1")
    assert np.shares_memory(blk.weight, W1)           # the hypergraph's block: the same bytes


@pytest.mark.parametrize("flag", ["--external-data", None])
def test_external_data_input_is_memory_mapped(tmp_path, capsys, lean, flag):
    """Every tensor external, small ones (biases below EXTERNAL_MIN_BYTES) too:
    read in place, and written back embedded or external, never as a
    reference to the input's file."""
    _, m = small_planted_mlp(1)
    path = str(tmp_path / "m.onnx")
    onnx.save_model(m, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    model = load_onnx(path)
    t = next(t for t in model.graph.initializer if t.name == "W2")
    W2 = tensor_value(t)
    assert _mapped(W2)
    assert os.path.realpath(dict((kv.key, kv.value) for kv in t.external_data)["location"]) == \
        os.path.realpath(tmp_path / "weights.bin")
    out = tmp_path / "b.onnx"
    rc, _, err = cli(capsys, "compress", path, "-o", out, "--verify", *([flag] if flag else []))
    assert rc == 0, err
    skel = onnx.load(str(out), load_external_data=False)
    locs = {kv.value for t in skel.graph.initializer for kv in t.external_data if kv.key == "location"}
    assert locs == ({"b.onnx.data"} if flag else set())
    x = np.random.default_rng(0).normal(size=(8, 32))
    assert max_rel_diff(run_onnx(str(out), x)[0], run_onnx(path, x)[0]) < 1e-5


@pytest.mark.parametrize("flag", ["--external-data", None])
def test_external_data_output_is_in_folder_relative_and_verifies(tmp_path, capsys, lean, monkeypatch, flag):
    p, m = small_planted_mlp(2)
    src = save(m, tmp_path / "m.onnx")
    out = tmp_path / "b.onnx"
    if flag is None:               # automatic: the base's tensors exceed the threshold
        monkeypatch.setattr(external, "EXTERNAL_DATA_BYTES", 100)
    rc, _, err = cli(capsys, "compress", src, "-o", out, "--verify", *([flag] if flag else []))
    assert rc == 0, err
    assert (tmp_path / "b.onnx.data").is_file()
    locs = {dict((kv.key, kv.value) for kv in t.external_data).get("location")
            for t in onnx.load(str(out), load_external_data=False).graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}
    assert locs == {"b.onnx.data"}                   # relative, in the output's folder
    base = onnx.load(str(out))                        # loads with its data
    onnx.checker.check_model(str(out))
    n = sum(int(np.prod(t.dims)) for t in base.graph.initializer)
    assert n == p.params_after()                      # the planted base
    x = np.random.default_rng(0).normal(size=(16, 32))
    assert max_rel_diff(run_onnx(str(out), x)[0], run_onnx(m, x)[0]) < 1e-5
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fibgraph")]    # no temporaries left


def test_embedded_output_by_default_streamed_equal(tmp_path, capsys, lean):
    """Without the flag (below the threshold) one protobuf, written tensor by
    tensor, equal to the base the in-memory path writes."""
    _, m = small_planted_mlp(3)
    src = save(m, tmp_path / "m.onnx")
    rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "lean.onnx", "--verify")
    assert rc == 0, err
    assert not (tmp_path / "lean.onnx.data").exists()
    external.LEAN_BYTES = 1 << 40                     # the in-memory path (monkeypatch restores it)
    rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "mem.onnx", "--verify")
    assert rc == 0, err
    a, b = onnx.load(str(tmp_path / "lean.onnx")), onnx.load(str(tmp_path / "mem.onnx"))
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for s, t in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(s), onnx.numpy_helper.to_array(t))
    assert a.graph.node == b.graph.node


def test_save_model_round_trip(tmp_path):
    """Embedded: the same ModelProto back; external: the same tensors, page-aligned offsets."""
    _, m = small_planted_mlp(4)
    external.save_model(m, tmp_path / "e.onnx", external=False)
    assert onnx.load(str(tmp_path / "e.onnx")) == m
    external.save_model(m, tmp_path / "x.onnx", external=True)
    back = onnx.load(str(tmp_path / "x.onnx"))
    for s, t in zip(m.graph.initializer, back.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(s), onnx.numpy_helper.to_array(t))
    skel = onnx.load(str(tmp_path / "x.onnx"), load_external_data=False)
    offs = [int(dict((kv.key, kv.value) for kv in t.external_data)["offset"]) for t in skel.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL]
    assert offs and all(o % external.ALIGN == 0 for o in offs)


def test_sessions_are_built_from_the_file_not_the_weights(tmp_path, capsys, lean, monkeypatch):
    """The probe and verify hand onnxruntime a protobuf without the weights (or
    the written file's path), and verify opens one session at a time."""
    _, m = small_planted_mlp(5)
    src = save(m, tmp_path / "m.onnx")
    weights = sum(t.ByteSize() for t in m.graph.initializer if t.name.startswith("W"))
    seen, live = [], weakref.WeakSet()
    real = external.session

    class Tracked:
        def __init__(self, s):
            self.s = s
            live.add(self)

        def __getattr__(self, k):
            return getattr(self.s, k)

    def spy(model, options=None, providers=("CPUExecutionProvider",)):
        seen.append((model.ByteSize(), external.is_lean(model)) if isinstance(model, onnx.ModelProto)
                    else os.fspath(model))
        assert len(live) == 0, "a second session while one is open"
        return Tracked(real(model, options, providers))

    monkeypatch.setattr(external, "session", spy)
    rc, _, err = cli(capsys, "compress", src, "-o", tmp_path / "b.onnx", "--verify")
    assert rc == 0, err
    protos = [s for s in seen if isinstance(s, tuple)]
    paths = [s for s in seen if isinstance(s, str)]
    assert protos and all(lean_ and size < weights for size, lean_ in protos)   # probe, verify's original
    assert len(paths) == 1 and os.path.dirname(paths[0]) == str(tmp_path)       # the base: its file


def test_truncated_external_data_is_one_line(tmp_path, capsys, lean):
    _, m = small_planted_mlp(6)
    path = str(tmp_path / "m.onnx")
    onnx.save_model(m, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    with open(tmp_path / "w.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "w.bin") // 2)
    rc, _, err = cli(capsys, "compress", path, "-o", tmp_path / "b.onnx")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "b.onnx").exists()


def test_a_file_replaced_at_the_same_path_is_read_anew(tmp_path, lean):
    """The maps are shared per file, not per path: a model rewritten in place
    (an output compressed again) is not read through a stale map."""
    path = str(tmp_path / "m.onnx")
    vals = []
    for seed in (7, 8):
        _, m = small_planted_mlp(seed)
        tmp = str(tmp_path / f"t{seed}.onnx")
        save(m, tmp)
        os.replace(tmp, path)
        vals.append(np.array(tensor_value(next(t for t in load_onnx(path).graph.initializer if t.name == "W1"))))
        np.testing.assert_array_equal(vals[-1], onnx.numpy_helper.to_array(m.graph.initializer[0]))
    assert not np.array_equal(vals[0], vals[1])


def test_lean_tensors_of_every_type_read_as_onnx_reads_them(tmp_path, lean):
    """float16 is a view; bfloat16 (numpy has no such type) is decoded by onnx, equal to its reading."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(9)
    h = onnx.numpy_helper.from_array(rng.normal(size=(64, 8)).astype(np.float16), "h")
    bf = helper.make_tensor("bf", TensorProto.BFLOAT16, [64, 8], rng.normal(size=512).astype(np.float32).tolist())
    i8 = onnx.numpy_helper.from_array(rng.integers(-100, 100, (64, 8)).astype(np.int8), "i8")
    g = helper.make_graph([helper.make_node("Identity", ["h"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [64, 8])], [h, bf, i8])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    want = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    path = str(tmp_path / "m.onnx")
    onnx.save_model(m, path, save_as_external_data=True, location="d.bin", size_threshold=0)
    got = {t.name: tensor_value(t) for t in load_onnx(path).graph.initializer}
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k], np.float64), np.asarray(want[k], np.float64))
    assert _mapped(got["h"]) and _mapped(got["i8"])


def test_lean_attention_model_compresses_like_the_in_memory_one(tmp_path, monkeypatch):
    """A lean attention model compresses to the same base; the attention analysis's own
    onnxruntime session (attention_trace.evaluate) reads the weights in place too."""
    pytest.importorskip("torch")
    import test_dag_packed_attention as pa

    from fibgraph.importers.dag_api import compress_dag_model

    name = next(iter(pa.PLANTS))
    net, _ = pa._planted(name)
    src = pa._export(net, tmp_path / "a.onnx", "legacy")
    reports = {}
    import sys

    callers, real = [], external.session

    def spy(model, *a, **k):
        callers.append(sys._getframe(1).f_code.co_name)
        return real(model, *a, **k)

    monkeypatch.setattr(external, "session", spy)
    for mode, lean_bytes in (("mem", 1 << 40), ("lean", 1)):
        monkeypatch.setattr(external, "LEAN_BYTES", lean_bytes)
        monkeypatch.setattr(external, "EXTERNAL_MIN_BYTES", 64)
        reports[mode] = compress_dag_model(src, tmp_path / f"{mode}.onnx", eps=0.0, verify=True)
    assert external.is_lean(load_onnx(src))
    assert reports["lean"]["params_after"] == reports["mem"]["params_after"] < reports["mem"]["params_before"]
    assert [ly["nodes_after"] for ly in reports["lean"]["layers"]] == \
        [ly["nodes_after"] for ly in reports["mem"]["layers"]]
    assert reports["lean"]["verify"]["max_abs_diff"] < 1e-4
    # the attention analysis (inspect, metrics) runs its own session: over the lean model too
    from fibgraph.importers.onnx.attention_blocks import find_attention

    callers.clear()
    blocks, problems = find_attention(load_onnx(src))
    assert "evaluate" in callers and blocks and not problems
    monkeypatch.setattr(external, "LEAN_BYTES", 1 << 40)
    ref, _ = find_attention(load_onnx(src))
    assert [len(b.heads) for b in blocks] == [len(b.heads) for b in ref]


@pytest.mark.parametrize("ext", [False, True])
def test_writing_a_lean_model_hands_each_tensors_pages_back(tmp_path, lean, monkeypatch, ext):
    """A lean model's tensors are written from the map in chunks whose pages
    are released as they go (not left resident), and the file is the one
    the in-memory model gives."""
    _, m = small_planted_mlp(5)
    src = save(m, tmp_path / "m.onnx")
    lm = load_onnx(str(src))
    assert external.is_lean(lm)
    dropped = []
    real = external.drop_pages
    monkeypatch.setattr(external, "drop_pages", lambda mm, a, n: (dropped.append(n), real(mm, a, n)))
    monkeypatch.setattr(external, "_WRITE_CHUNK", 256)
    external.save_model(lm, tmp_path / "o.onnx", external=ext)
    big = [t for t in lm.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and sum(dropped) == sum(external._nbytes(t) for t in big) and len(dropped) > len(big)
    back = onnx.load(str(tmp_path / "o.onnx"))
    for s, t in zip(m.graph.initializer, back.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(s), onnx.numpy_helper.to_array(t))


def test_verify_batch_bounds_the_activations(monkeypatch):
    """64 made-up samples for a model whose activations are small; fewer (but
    at least 2) where one sample's activations are big against the budget."""
    from fibgraph.importers import dag_verify
    from fibgraph.importers.onnx.importer import import_dag

    _, m = small_planted_mlp(6)
    imp = import_dag(m)
    assert dag_verify.verify_batch(imp) == 64
    inits = {t.name for t in imp.model.graph.initializer}
    per_sample = 4 * sum(int(np.prod(s)) for k, s in imp.shapes.items() if k not in inits and s is not None)
    monkeypatch.setattr(dag_verify, "VERIFY_ACTIVATIONS", 5 * per_sample)
    imp.n_params = 0
    assert dag_verify.verify_batch(imp) == 5
    monkeypatch.setattr(dag_verify, "VERIFY_ACTIVATIONS", 1)
    assert dag_verify.verify_batch(imp) == 2


def test_a_failed_run_leaves_the_earlier_output_and_its_data_as_they_were(tmp_path, capsys, lean, monkeypatch):
    """OUT.data is an output of its own: written under a temporary name,
    installed with a backup of the file it replaces, put back when a later
    step fails (here verify); on success it is replaced and nothing is left."""
    from fibgraph.errors import InputError
    from fibgraph.importers import dag_api

    _, m = small_planted_mlp(7)
    src = save(m, tmp_path / "m.onnx")
    out, data = tmp_path / "b.onnx", tmp_path / "b.onnx.data"
    out.write_bytes(b"earlier model")
    data.write_bytes(b"earlier data")

    def fail(*a, **k):
        raise InputError("verification run failed: made to fail")

    monkeypatch.setattr(dag_api, "verify_against", fail)
    rc, _, err = cli(capsys, "compress", src, "-o", out, "--verify", "--external-data")
    assert rc == 2 and "made to fail" in err
    assert out.read_bytes() == b"earlier model" and data.read_bytes() == b"earlier data"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fibgraph")]
    monkeypatch.undo()
    monkeypatch.setattr(external, "LEAN_BYTES", 1)
    monkeypatch.setattr(external, "EXTERNAL_MIN_BYTES", 64)
    rc, _, err = cli(capsys, "compress", src, "-o", out, "--verify", "--external-data")
    assert rc == 0, err
    assert data.read_bytes() != b"earlier data" and onnx.load(str(out)).graph.initializer
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fibgraph")]


def test_a_model_file_of_a_few_megabytes_reaches_onnxruntime_and_the_checker_lean(tmp_path, monkeypatch):
    """A file with 4 MB or more of weights (LEAN_FILE_BYTES) is handed to an
    onnxruntime session and to the checker without its weights: onnxruntime
    maps them from the file; before, it parsed the whole protobuf and copied
    every weight out of it (a 46 MB base took 90 MB at once)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    Ws = [rng.normal(size=(1100, 1000)), rng.normal(size=(2, 1100))]
    m = mlp_onnx(Ws, [np.zeros(1100), np.zeros(2)])
    path = save(m, tmp_path / "m.onnx")
    assert os.path.getsize(path) >= external.LEAN_FILE_BYTES
    x = rng.normal(size=(3, 1000)).astype(np.float32)
    want = run_onnx(m, x)[0]
    handed, checked = [], []
    real_sess, real_check = ort.InferenceSession, onnx.checker.check_model
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda model, *a, **k: handed.append(model) or real_sess(model, *a, **k))
    monkeypatch.setattr(onnx.checker, "check_model", lambda p, *a, **k: checked.append(p) or real_check(p, *a, **k))
    sess = external.session(path)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    assert len(handed) == 1 and isinstance(handed[0], bytes) and len(handed[0]) < 64 << 10
    external.check(path)
    assert len(checked) == 1 and checked[0] != path and os.path.getsize(path) > 4 << 20
    assert not any(f.startswith(".fibgraph-check-") for f in os.listdir(tmp_path))     # its temporary is gone


def _movement_model():
    """x (1, 8) -> MatMul -> Reshape (1, 2, 4) -> Transpose -> Flatten -> MatMul -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array(np.array([1, 2, 4], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["s"]),
             helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Flatten", ["t"], ["f"]),
             helper.make_node("MatMul", ["f", "W2"], ["y"])]
    g = helper.make_graph(nodes, "move", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_the_probe_and_movement_ops_leave_scipy_and_the_reference_evaluator_unimported(tmp_path):
    """The probe holds the model's weights, so nothing else heavy is imported
    before it: scipy arrives with the colouring (fibgraph.lazy).  Units move
    through Reshape/Transpose/Flatten in onnxruntime; the ONNX reference
    evaluator (12 MB with its schemas) is imported only for an op onnxruntime
    has no integer kernel for."""
    import subprocess
    import sys

    path = save(_movement_model(), tmp_path / "m.onnx")
    code = ("import sys\n"
            "from fibgraph.importers.onnx.load import load_onnx\n"
            "from fibgraph.importers.onnx.probe import probe_model\n"
            "from fibgraph.importers.onnx.importer import import_dag\n"
            f"m = load_onnx({path!r})\n"
            "probe_model(m)\n"
            "print('scipy' if 'scipy.sparse._base' in sys.modules else 'no scipy')\n"
            "imp = import_dag(m)\n"
            "print(len(imp.barriers), 'reference' if 'onnx.reference' in sys.modules else 'no reference')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["no scipy", "0 no reference"]


@pytest.mark.parametrize("op,attrs,shape,extra", [
    ("Reshape", {}, [2, 3, 4], [np.array([4, -1], np.int64)]),
    ("Transpose", {"perm": [2, 0, 1]}, [2, 3, 4], []),
    ("Gather", {"axis": 1}, [2, 3, 4], [np.array([2, -1, 0], np.int64)]),
    ("Slice", {}, [2, 3, 4], [np.array([3], np.int64), np.array([0], np.int64), np.array([2], np.int64),
                              np.array([-1], np.int64)]),
    ("DepthToSpace", {"blocksize": 2}, [1, 8, 2, 3], []),        # no int64 kernel in onnxruntime
])
def test_unit_ids_move_as_the_reference_evaluator_moves_them(op, attrs, shape, extra):
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from fibgraph.importers.onnx.rules.movement import run_small

    names = ["x"] + [f"a{k}" for k in range(len(extra))]
    node = helper.make_node(op, names, ["y"], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in names],
                          [onnx.ValueInfoProto(name="y")])
    gm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape), **dict(zip(names[1:], extra))}
    got = run_small(gm, feeds)[0]
    want = ReferenceEvaluator(gm).run(None, feeds)[0]
    assert got.dtype == np.int64 and np.array_equal(got, want)


@pytest.mark.parametrize("rows_shrink_more", [False, True])
def test_kernel_weights_are_merged_in_chunks_as_the_formula_says(monkeypatch, rows_shrink_more):
    """``W_hat[r, q] = mean_{i in G(r)} sum_{k in G(q)} W[i, k]`` for a 4-D kernel,
    computed a block of output rows and a few weight rows at a time, whether
    the rows or the columns shrink the weight more, and stored as float32
    exactly as the float64 result rounded."""
    import scipy.sparse as sp

    from fibgraph.importers.onnx.write import axis

    monkeypatch.setattr(axis, "CHUNK", 7)             # many blocks
    rng = np.random.default_rng(2)
    W = rng.normal(size=(6, 5, 3, 2)).astype(np.float32)
    if rows_shrink_more:                              # 2 x 5 after the rows < 6 x 4 after the columns
        Rm = sp.csr_matrix(np.array([[.5, .5, 0, 0, 0, 0], [0, 0, .25, .25, .25, .25]]))
        C = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]], float))
    else:                                             # 3 x 5 after the rows > 6 x 2 after the columns
        Rm = sp.csr_matrix(np.array([[.5, .5, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1 / 3, 1 / 3, 1 / 3]]))
        C = sp.csr_matrix(np.array([[1, 0, 1, 0, 0], [0, 1, 0, 1, 1]], float))
    got = axis.two_sided(Rm, W, C)
    want = np.einsum("ro,oikl,ci->rckl", Rm.toarray(), W.astype(np.float64), C.toarray())
    assert got.shape == (Rm.shape[0], C.shape[0], 3, 2) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    low = axis.two_sided(Rm, W, C, np.float32)
    assert low.dtype == np.float32
    np.testing.assert_array_equal(low, got.astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 40))
def test_two_sided_is_the_formula_for_any_grouping_and_block_size(seed, chunk):
    """Random weights (2-D to 4-D), groupings with weights (a scaled merge,
    a pruned side: rows no group reads) and block sizes down to one entry:
    ``two_sided`` equals ``Rm @ W @ C.T`` computed densely."""
    import scipy.sparse as sp

    from fibgraph.importers.onnx.write import axis

    rng = np.random.default_rng(seed)
    n_out, n_in = (int(v) for v in rng.integers(1, 25, 2))
    W = rng.normal(size=(n_out, n_in) + tuple(int(v) for v in rng.integers(1, 4, rng.integers(0, 3))))
    m, c = int(rng.integers(1, n_out + 1)), int(rng.integers(1, n_in + 1))
    g, h = rng.integers(-1, m, n_out), rng.integers(0, c, n_in)          # -1: a row no output reads
    Rm = sp.csr_matrix((rng.random((g >= 0).sum()), (g[g >= 0], np.flatnonzero(g >= 0))), shape=(m, n_out))
    C = sp.csr_matrix((rng.random(n_in), (h, np.arange(n_in))), shape=(c, n_in))
    old, axis.CHUNK = axis.CHUNK, chunk
    try:
        got = axis.two_sided(Rm, W.astype(np.float32), C)
    finally:
        axis.CHUNK = old
    want = np.einsum("ro,oi...,ci->rc...", Rm.toarray(), W.astype(np.float32).astype(np.float64), C.toarray())
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_onnxruntime_runs_map_their_big_blocks():
    """Inside ``session_heap`` a 2 MB block the heap has no free room for is
    mapped on its own (freed back to the system at once), not carved from a
    grown heap; after it the threshold is 32 MB again (numpy's temporaries
    reuse the heap).  glibc only; in a fresh process, whose heap has no big
    free chunk."""
    import subprocess
    import sys

    code = """
import ctypes, sys
import numpy as np
from fibgraph.heap import session_heap
try:
    libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2
except (OSError, AttributeError):
    print("skip"); sys.exit()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
def mapped(nbytes):
    before = libc.mallinfo2().hblkhd
    a = np.ones(nbytes, np.uint8)
    return libc.mallinfo2().hblkhd - before >= nbytes
with session_heap():
    inside = mapped(2 << 20)
print(inside, mapped(2 << 20))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "skip":
        pytest.skip("not glibc >= 2.33")
    assert out.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("first", [True, False])
def test_the_originals_outputs_are_drawn_before_the_colouring_when_small(tmp_path, monkeypatch, first):
    """``compress --verify``: the original's session runs right after the import
    when its outputs for verify are small (then neither scipy's clustering nor
    the ``--keep`` search is resident while it holds the weights), else at the
    end as before; the verification is the same either way."""
    from fibgraph.importers import api, dag_api, dag_verify
    from fibgraph.importers.tuning import DagCompressor

    if not first:
        monkeypatch.setattr(dag_verify, "REFERENCE_FIRST_BYTES", 0)
    _, m = small_planted_mlp(8)
    src = save(m, tmp_path / "m.onnx")
    events = []
    real_reference, real_colouring = dag_verify.verify_reference, DagCompressor.colouring

    def spy_reference(*a, **k):
        events.append("reference")
        return real_reference(*a, **k)

    def spy_colouring(self, *a, **k):
        events.append("colouring")
        return real_colouring(self, *a, **k)

    monkeypatch.setattr(DagCompressor, "colouring", spy_colouring)
    monkeypatch.setattr(dag_verify, "verify_reference", spy_reference)
    monkeypatch.setattr(dag_api, "verify_reference", spy_reference)
    report = api.compress_model(src, tmp_path / "b.onnx", keep=0.5, verify=True)
    assert events.count("reference") == 1 and "colouring" in events
    assert (events.index("reference") < events.index("colouring")) == first
    assert report["verify"]["max_abs_diff"] < 1e-4 and report["verify"]["draws"] == 3
