"""The memory limit (fibgraph.limits, ``--max-memory``): every size an input
implies is checked before anything is allocated or run.  A tiny file that
declares a huge tensor, graph input, ConstantOfShape/Expand/Tile/Range target,
.npz array, eps file or node id is refused with exit 2 and one stderr line
naming it, nothing written, the input unchanged.  A table per family."""
import json
import os
import time
import tracemalloc
import zipfile

import numpy as np
import onnx
import pytest
from numpy.lib import format as npf
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_one_line_error, cli, folder_snapshot, mlp_onnx, save

from fibgraph.errors import InputError
from fibgraph.limits import format_size, max_memory, parse_size, set_max_memory

BIG = 10 ** 12


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _model(nodes, inputs, outputs, inits=()):
    """A model built without the checker (bombs are not all valid ONNX)."""
    m = helper.make_model(helper.make_graph(nodes, "bomb", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _ints(name, v):
    return numpy_helper.from_array(np.asarray(v, np.int64), name)


def _good():
    rng = np.random.default_rng(3)
    W1, b1 = rng.normal(0, 1, (5, 4)), rng.normal(0, 1, 5)
    W1[3], b1[3] = W1[1], b1[1]
    W2, b2 = rng.normal(0, 1, (3, 5)), rng.normal(0, 1, 3)
    return mlp_onnx([W1, W2], [b1, b2])


# ------------------------------------------------------------- models
def _huge_initializer():
    W = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[10 ** 6, 10 ** 6])   # no data at all
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", ["N", 10 ** 6])],
                  [_vi("y", ["N", 10 ** 6])], [W])


def _huge_constant():
    t = TensorProto(name="c", data_type=TensorProto.DOUBLE, dims=[BIG])
    return _model([helper.make_node("Constant", [], ["c"], value=t), helper.make_node("Add", ["x", "c"], ["y"])],
                  [_vi("x", ["N", 4], TensorProto.DOUBLE)], [_vi("y", ["N", 4], TensorProto.DOUBLE)])


def _constant_of_shape(shape_from_concat=False):
    """ConstantOfShape([3, 1e12]) reduced to a scalar and added to x: tiny file,
    terabytes if run.  The shape may be computed: Concat of two constants."""
    if shape_from_concat:
        nodes = [helper.make_node("Constant", [], ["a"], value_ints=[3]),
                 helper.make_node("Concat", ["a", "b"], ["shp"], axis=0)]
        inits = [_ints("b", [BIG])]
    else:
        nodes, inits = [], [_ints("shp", [3, BIG])]
    nodes += [helper.make_node("ConstantOfShape", ["shp"], ["c"],
                               value=numpy_helper.from_array(np.array([1.0], np.float32))),
              helper.make_node("ReduceSum", ["c"], ["s"], keepdims=0),
              helper.make_node("Add", ["x", "s"], ["y"])]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], inits)


def _expand():
    nodes = [helper.make_node("Expand", ["x", "shp"], ["e"]),
             helper.make_node("ReduceSum", ["e"], ["y"], keepdims=1)]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", [1, 1])], [_ints("shp", [BIG, 4])])


def _tile():
    nodes = [helper.make_node("Tile", ["x", "reps"], ["t"]),
             helper.make_node("ReduceSum", ["t"], ["y"], keepdims=1)]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", [1, 1])], [_ints("reps", [BIG, 1])])


def _range(floats=False):
    nodes = [helper.make_node("Range", ["s", "l", "d"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["rf"], ["s2"], keepdims=0),
             helper.make_node("Add", ["x", "s2"], ["y"])]
    if floats:
        inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("s", 0.5), ("l", 1e12), ("d", 2.0))]
    else:
        inits = [_ints("s", 0), _ints("l", BIG), _ints("d", 1)]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], inits)


def _in_if_body():
    """The ConstantOfShape bomb inside an If branch (shape from the outer graph)."""
    cos = helper.make_node("ConstantOfShape", ["shp"], ["c"])
    red = helper.make_node("ReduceSum", ["c"], ["o"], keepdims=0)
    body = helper.make_graph([cos, red], "then", [], [_vi("o", [])])
    other = helper.make_graph([helper.make_node("Constant", [], ["o2"], value_float=0.0)], "else", [],
                              [_vi("o2", [])])
    nodes = [helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["cond"], ["v"], then_branch=body, else_branch=other),
             helper.make_node("Add", ["x", "v"], ["y"])]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], [_ints("shp", [3, BIG])])


def _reduced(op_nodes, inits, out="big"):
    """``op_nodes`` making ``out``, summed and added to x (so the output depends on it)."""
    nodes = op_nodes + [helper.make_node("ReduceSum", [out], ["s"], keepdims=0),
                        helper.make_node("Add", ["x", "s"], ["y"])]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], inits)


def _resize():
    one = numpy_helper.from_array(np.ones((1, 1, 2, 2), np.float32), "img")
    scales = numpy_helper.from_array(np.array([1, 1, 1e6, 1e6], np.float32), "scales")
    return _reduced([helper.make_node("Resize", ["img", "", "scales"], ["big"], mode="nearest")], [one, scales])


def _pad():
    one = numpy_helper.from_array(np.ones((1, 4), np.float32), "v")
    return _reduced([helper.make_node("Pad", ["v", "pads"], ["big"])], [one, _ints("pads", [0, 0, 0, BIG])])


def _one_hot():
    idx = _ints("idx", [1, 2])
    return _reduced([helper.make_node("OneHot", ["idx", "depth", "vals"], ["big"])],
                    [idx, _ints("depth", BIG), numpy_helper.from_array(np.array([0, 1], np.float32), "vals")])


def _random():
    return _reduced([helper.make_node("RandomNormal", [], ["big"], shape=[BIG, 2])], [])


def _sparse():
    m = _model([helper.make_node("Add", ["x", "sp"], ["y"])], [_vi("x", [BIG, 10 ** 6])],
               [_vi("y", [BIG, 10 ** 6])])
    vals = numpy_helper.from_array(np.array([1.0], np.float32), "sp")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(vals, _ints("sp_idx", [5]), [BIG, 10 ** 6]))
    return m


def _huge_input():
    W = numpy_helper.from_array(np.ones((6, 3), np.float32), "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [BIG, 6])], [_vi("y", [BIG, 3])], [W])


MODELS = {
    "initializer": (_huge_initializer, ["initializer 'W'", "TiB", "--max-memory"]),
    "constant": (_huge_constant, ["Constant tensor 'c'"]),
    "constant_of_shape": (_constant_of_shape, ["ConstantOfShape output 'c'", "[3, 1000000000000]"]),
    "constant_of_shape_concat": (lambda: _constant_of_shape(True), ["ConstantOfShape output 'c'"]),
    "expand": (_expand, ["Expand output 'e'"]),
    "tile": (_tile, ["Tile output 't'"]),
    "range": (_range, ["Range output 'r'", "1e12 int64"]),
    "range_float": (lambda: _range(True), ["Range output 'r'", "5e11 float32"]),
    "resize": (_resize, ["Resize output 'big'", "[1, 1, 2000000, 2000000]"]),
    "pad": (_pad, ["Pad output 'big'", "[1, 1000000000004]"]),
    "one_hot": (_one_hot, ["OneHot output 'big'", "[2, 1000000000000]"]),
    "random_normal": (_random, ["RandomNormal output 'big'"]),
    "sparse_initializer": (_sparse, ["sparse initializer 'sp' (dense)"]),
    "if_body": (_in_if_body, ["ConstantOfShape output 'c'"]),
    "graph_input": (_huge_input, ["graph input 'x'"]),
}


def _cmd(command, model, out):
    if command == "inspect":
        return ["inspect", model, "--json", out / "i.json"]
    if command == "compress":
        return ["compress", model, "-o", out / "small.onnx", "--verify", "--report", out / "r.json"]
    return ["color", model, "--json", out / "c.json"]


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.mark.parametrize("command", ["inspect", "compress", "color"])
@pytest.mark.parametrize("case", list(MODELS))
def test_model_bombs_refused_before_running(capsys, tmp_path, out, case, command, monkeypatch):
    """Each would need terabytes if onnxruntime ran it; none is run (the probe
    would fail loudly if it were: onnxruntime.InferenceSession is replaced)."""
    import onnxruntime

    def no_session(*a, **k):
        raise AssertionError("onnxruntime ran a model whose sizes were not checked")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    build, needles = MODELS[case]
    p = save(build(), tmp_path / f"{case}.onnx")
    before = open(p, "rb").read()
    t0 = time.perf_counter()
    rc, _, err = cli(capsys, *_cmd(command, p, out))
    assert_one_line_error(rc, err, *needles)
    assert "over the" in err and "memory limit" in err
    assert time.perf_counter() - t0 < 10
    assert folder_snapshot(out) == {}
    assert open(p, "rb").read() == before


def _wide():
    """W1 (200, 4): 3200 bytes, more than its .onnx file once the weights are external."""
    rng = np.random.default_rng(4)
    W1, b1 = rng.normal(0, 1, (200, 4)), rng.normal(0, 1, 200)
    W1[7], b1[7] = W1[1], b1[1]
    return mlp_onnx([W1, rng.normal(0, 1, (3, 200))], [b1, rng.normal(0, 1, 3)])


def _external(folder, cut=None, drop_length=False, model=None, length=None):
    """The good model with its weights in folder/w.bin; ``cut``: bytes removed
    from the end of w.bin; ``drop_length``: the length key of the first
    (``"first"``) or the last (True) tensor removed; ``length``: the last
    tensor's length set to this."""
    os.makedirs(folder, exist_ok=True)
    m = model or _good()
    path = os.path.join(folder, "m.onnx")
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    if drop_length or length is not None:
        m = onnx.load(path, load_external_data=False)
        t = m.graph.initializer[0 if drop_length == "first" else -1]
        info = {kv.key: kv.value for kv in t.external_data}
        if drop_length:
            del info["length"]
        else:
            info["length"] = str(length)
        del t.external_data[:]
        for k, v in info.items():
            t.external_data.add(key=k, value=v)
        with open(path, "wb") as f:
            f.write(m.SerializeToString())
    if cut:
        wb = os.path.join(folder, "w.bin")
        size = os.path.getsize(wb)
        with open(wb, "r+b") as f:
            f.truncate(size - cut)
    return path


EXTERNAL = {   # the last tensor is b2: 3 floats at offset 160 of the 172-byte w.bin
    "cut": (dict(cut=4), ["tensor 'b2'", "claims 12 bytes at offset 160", "holds only 168 bytes"]),
    "cut_no_length": (dict(cut=4, drop_length=True), ["claims 12 bytes at offset 160 (from its dims)"]),
    "huge_length": (dict(length=10 ** 12), ["claims 1000000000000 bytes"]),
    "length_not_dims": (dict(length=8), ["length 8 bytes does not match its dims [3] (12 bytes)"]),
    "no_length_rest": (dict(drop_length="first"), ["tensor 'W1'", "no length", "(172 bytes)", "(80 bytes)"]),
}


@pytest.mark.parametrize("command", ["inspect", "compress"])
@pytest.mark.parametrize("case", list(EXTERNAL))
def test_external_data_claims_checked(capsys, tmp_path, out, command, case):
    """External data claiming more bytes than its file holds (or a length its
    dims do not have) is refused before anything is read."""
    kw, needles = EXTERNAL[case]
    p = _external(str(tmp_path / "ext"), **kw)
    snap = folder_snapshot(tmp_path / "ext")
    rc, _, err = cli(capsys, *_cmd(command, p, out))
    assert_one_line_error(rc, err, "external data", *needles)
    assert folder_snapshot(out) == {} and folder_snapshot(tmp_path / "ext") == snap


def test_external_data_without_length_to_the_end(capsys, tmp_path, out):
    """No length on the last tensor: the rest of the file is its data (onnx's rule): accepted."""
    p = _external(str(tmp_path / "ext"), drop_length=True)
    rc, _, err = cli(capsys, *_cmd("compress", p, out))
    assert rc == 0, err


def test_max_memory_raises_the_limit(capsys, tmp_path, out, monkeypatch):
    """The same model (a 3200-byte W1 in external data, a small .onnx file):
    refused at 1K, accepted at 8K and at the default, through the group
    option, the command option and the environment."""
    p = _external(str(tmp_path / "ext"), model=_wide())
    assert os.path.getsize(p) < 1024
    for args in (["--max-memory", "1K"], ["inspect", "--max-memory", "1K"]):
        cmd = args + [p] if args[0] == "inspect" else args + ["inspect", p]
        rc, _, err = cli(capsys, *cmd)
        assert_one_line_error(rc, err, "initializer 'W1'", "3.1 KiB", "800 float32 elements",
                              "over the 1.0 KiB memory limit")
    rc, _, err = cli(capsys, "--max-memory", "8K", "inspect", p)
    assert rc == 0, err
    rc, _, err = cli(capsys, "--max-memory", "1K", "inspect", p)
    assert max_memory() > 8 << 10                                       # the limit lasts one run
    rc, _, err = cli(capsys, "inspect", p)                              # the default: back after each run
    assert rc == 0, err
    monkeypatch.setenv("FIBGRAPH_MAX_MEMORY", "1K")
    rc, _, err = cli(capsys, "inspect", p)
    assert_one_line_error(rc, err, "initializer 'W1'")
    rc, _, err = cli(capsys, "--max-memory", "8K", "compress", p, "-o", out / "s.onnx", "--verify")
    assert rc == 0, err
    monkeypatch.delenv("FIBGRAPH_MAX_MEMORY")
    rc, _, err = cli(capsys, "--max-memory", "lots", "inspect", p)
    assert_one_line_error(rc, err, "--max-memory", "not a size")


def test_max_memory_accepts_the_huge_model_when_raised(capsys, tmp_path, out, monkeypatch):
    """The ConstantOfShape bomb passes the check at --max-memory 100T (then
    onnxruntime is asked to run it: replaced here by a stub that records it)."""
    import onnxruntime

    ran = []

    def stub(*a, **k):
        ran.append(True)
        raise RuntimeError("stub")

    monkeypatch.setattr(onnxruntime, "InferenceSession", stub)
    p = save(_constant_of_shape(), tmp_path / "c.onnx")
    rc, _, err = cli(capsys, "--max-memory", "100T", "inspect", p)
    assert rc == 2 and "stub" in err and ran


def test_parse_and_format_sizes():
    assert parse_size("8G") == 8 << 30 and parse_size("500M") == 500 << 20 and parse_size("64KiB") == 65536
    assert parse_size("1.5g") == 3 << 29 and parse_size("123") == 123 and parse_size("2TB") == 2 << 40
    for bad in ("", "-1", "0", "8X", "1e9", "nan"):
        with pytest.raises(InputError):
            parse_size(bad)
    assert format_size(3 << 29) == "1.5 GiB" and format_size(12) == "12 bytes"
    set_max_memory("3M")
    try:
        assert max_memory() == 3 << 20
    finally:
        set_max_memory(None)
    assert max_memory() > 0


def test_feeds_check_concrete_sizes():
    """Symbolic dims pass the load check (counted as 1); the feeds check the
    sizes they would draw: batch 64 for --verify, 1 for the probe."""
    from fibgraph.importers.onnx.feeds import make_feeds

    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["N", 1000])], [_vi("y", ["N", 1000])])
    set_max_memory("100K")
    try:
        assert make_feeds(m, n=1)["x"].shape == (1, 1000)
        with pytest.raises(InputError, match="graph input 'x'.*64000 float32"):
            make_feeds(m, n=64)
    finally:
        set_max_memory(None)


# ------------------------------------------------------------- .npz data
def _npz_member(z, name, header, payload=b""):
    import io

    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, header)
    z.writestr(f"{name}.npy", buf.getvalue() + payload)


def _npz(path, kind):
    if kind == "huge_header":           # declares 8 TB, holds 16 bytes: nothing is allocated
        with zipfile.ZipFile(path, "w") as z:
            _npz_member(z, "x", {"descr": "<f8", "fortran_order": False, "shape": (BIG, 4)}, b"\0" * 16)
            _npz_member(z, "y", {"descr": "<i8", "fortran_order": False, "shape": (3,)}, b"\0" * 24)
        return
    x = np.zeros((3, 4), np.float32)
    y = np.array([0, 1, 2])
    if kind == "object":
        with zipfile.ZipFile(path, "w") as z:
            _npz_member(z, "x", {"descr": "|O", "fortran_order": False, "shape": (3,)}, b"\0" * 8)
            _npz_member(z, "y", {"descr": "<i8", "fortran_order": False, "shape": (3,)}, b"\0" * 24)
        return
    if kind == "x_0d":
        x = np.float32(1.0)
    elif kind == "x_str":
        x = np.array([["a"] * 4] * 3)
    elif kind == "x_complex":
        x = x + 1j
    elif kind == "y_fraction":
        y = np.array([0.0, 1.5, 2.0])
    elif kind == "y_str":
        y = np.array(["cat", "dog", "cat"])
    elif kind == "y_0d":
        y = np.int64(1)
    np.savez(path, x=x, y=y)


NPZ = {"huge_header": ["'x'", "TiB"], "object": ["objects"], "x_0d": ["0-d"], "x_str": ["strings"],
       "x_complex": ["complex"], "y_fraction": ["whole numbers", "1.5"], "y_str": ["strings"], "y_0d": ["0-d"]}


@pytest.mark.parametrize("kind,command", [(k, "eval") for k in NPZ]
                         + [(k, "verify") for k in NPZ if not k.startswith("y_")])    # --verify reads x only
def test_bad_npz(capsys, tmp_path, out, kind, command):
    model = save(_good(), tmp_path / "m.onnx")
    d = tmp_path / "d.npz"
    _npz(d, kind)
    before = d.read_bytes()
    if command == "eval":
        args = ["eval", model, "--data", d, "--json", out / "e.json"]
    else:
        args = ["compress", model, "-o", out / "s.onnx", "--verify", "--data", d]
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, *(NPZ[kind] if (kind, command) != ("x_0d", "verify") else ["rank"]))
    assert folder_snapshot(out) == {} and d.read_bytes() == before


def test_whole_float_labels_accepted(capsys, tmp_path):
    model = save(_good(), tmp_path / "m.onnx")
    d = tmp_path / "d.npz"
    np.savez(d, x=np.zeros((3, 4), np.float32), y=np.array([0.0, 1.0, 2.0]))
    rc, out, err = cli(capsys, "eval", model, "--data", d)
    assert rc == 0, err and "n 3" in out


# ------------------------------------------------------------- eps files
def _eps(path, kind):
    if kind == "too_big":                 # a sparse 11 MB file: its size is refused before reading
        with open(path, "wb") as f:
            f.truncate(11 << 20)
        return
    text = {"too_deep": '{"W1": ' + "[" * 100000 + "]" * 100000 + "}",
            "giant_int": '{"W1": ' + "1" * 5000 + "}",
            "bool": '{"*": true}',
            "string": '{"W1": "0.1"}',
            "nested": '{"W1": {"eps": 0.1}}'}.get(kind)
    if kind == "not_utf8":
        path.write_bytes(b'{"W1\xff": 0.1}')
    else:
        path.write_text(text)


EPS = {"too_big": ["over the 10.0 MiB"], "too_deep": ["nested too deeply"], "giant_int": ["5000 digits"],
       "bool": ["must be a number", "true"], "string": ["must be a number"], "nested": ["must be a number"],
       "not_utf8": ["not UTF-8"]}


@pytest.mark.parametrize("kind", list(EPS))
def test_bad_eps_file(capsys, tmp_path, out, kind):
    model = save(_good(), tmp_path / "m.onnx")
    e = tmp_path / "eps.json"
    _eps(e, kind)
    st = os.stat(e)
    rc, _, err = cli(capsys, "compress", model, "-o", out / "s.onnx", "--eps-file", e)
    assert_one_line_error(rc, err, *EPS[kind])
    assert folder_snapshot(out) == {} and os.stat(e).st_mtime_ns == st.st_mtime_ns


# ------------------------------------------------------------- edge lists
def test_edgelist_sparse_ids_small_and_fast(capsys, tmp_path, out):
    """A 20-byte edge list naming node 300,000,000: two nodes, milliseconds,
    a few kilobytes; the partition keyed by the ids of the file."""
    p = tmp_path / "g.edgelist"
    p.write_text("0 300000000\n5 300000000\n")
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        rc, _, err = cli(capsys, "color", p, "--json", out / "c.json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 0, err
    assert time.perf_counter() - t0 < 5
    assert peak < 20 << 20, peak
    doc = json.loads((out / "c.json").read_text())
    assert doc["nodes"] == 3 and set(doc["partition"]) == {"0", "5", "300000000"}
    assert doc["partition"]["0"] == doc["partition"]["5"] != doc["partition"]["300000000"]


@pytest.mark.parametrize("text, needle", [("0 1_000\n", "'1_000'"), ("1_0 2 0.5\n", "'1_0'"),
                                          ("0 +3\n", "'+3'"), ("0 ٣\n", "not a non-negative")])
def test_edgelist_ids_are_plain_digits(capsys, tmp_path, out, text, needle):
    p = tmp_path / "g.edgelist"
    p.write_text(text)
    rc, _, err = cli(capsys, "color", p, "--json", out / "c.json")
    assert_one_line_error(rc, err, needle)
    assert folder_snapshot(out) == {}


def test_sweep_task_takes_the_callers_limit(tmp_path):
    """A Dask worker does not inherit --max-memory: the sweep passes it to each task."""
    from fibgraph.importers.sweep import sweep_task

    p = _external(str(tmp_path / "ext"), model=_wide())
    res = sweep_task(p, "fibration", 0.0, max_memory=1024)
    assert "initializer 'W1'" in res["error"] and "1.0 KiB memory limit" in res["error"]
    set_max_memory(None)
    assert sweep_task(p, "fibration", 0.0)["error"] is None
