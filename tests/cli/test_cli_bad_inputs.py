"""Bad inputs: exit 2, ONE line on stderr, no traceback, nothing written, an
existing output untouched, the input never overwritten.  A few run the real
CLI in a subprocess (real stderr); the rest call ``fibgraph.cli.main``."""
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import (_init, assert_one_line_error, cli, cli_sub, finish, folder_snapshot, max_rel_diff,
                     mlp_onnx, read_json, run_onnx, save)


def _mlp(rng, n_in=4, hidden=5, n_out=3):
    Ws = [rng.normal(0, 1, (hidden, n_in)), rng.normal(0, 1, (n_out, hidden))]
    bs = [rng.normal(0, 0.5, hidden), rng.normal(0, 0.5, n_out)]
    Ws[0][3], bs[0][3] = Ws[0][1], bs[0][1]          # one fiber, so compression changes something
    return Ws, bs


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _sin_model(rng):
    Ws, bs = _mlp(rng)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z1"], name="gemm1", transB=1),
             helper.make_node("Sin", ["z1"], ["s1"], name="sin_mid"),
             helper.make_node("Gemm", ["s1", "W2", "b2"], ["y"], name="gemm2", transB=1)]
    inits = [_init("W1", Ws[0]), _init("b1", bs[0]), _init("W2", Ws[1]), _init("b2", bs[1])]
    return finish(helper.make_graph(nodes, "sin", [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], inits))


def _lstm_model(rng):
    """x (T, N, 4) -> Relu -> LSTM (hidden 5) -> Y_h (1, N, 5) -> Squeeze -> Gemm (3)."""
    H = 5
    W = rng.normal(0, 0.5, (1, 4 * H, 4))
    R = rng.normal(0, 0.5, (1, 4 * H, H))
    B = rng.normal(0, 0.1, (1, 8 * H))
    W2, b2 = rng.normal(0, 1, (3, H)), rng.normal(0, 0.5, 3)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu_in"),
             helper.make_node("LSTM", ["r", "W", "R", "B"], ["Y", "Y_h"], name="lstm_mid", hidden_size=H),
             helper.make_node("Squeeze", ["Y_h", "ax0"], ["h"], name="squeeze"),
             helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="gemm_out", transB=1)]
    inits = [_init("W", W), _init("R", R), _init("B", B), _init("W2", W2), _init("b2", b2),
             _init("ax0", [0], np.int64)]
    return finish(helper.make_graph(nodes, "lstm", [_vi("x", ["T", "N", 4])], [_vi("y", ["N", 3])], inits))


def _unknown_dims_model(rng):
    """x (N, 2, H, W) with symbolic H, W -> Conv -> Relu -> Transpose (unit axis
    in the middle: N, H, C, W) -> Flatten -> Gemm: the weight layout cannot be
    mapped to units without knowing H and W."""
    Wc, bc = rng.normal(0, 0.5, (3, 2, 3, 3)), rng.normal(0, 0.3, 3)
    Wg, bg = rng.normal(0, 0.3, (4, 4 * 3 * 4)), rng.normal(0, 0.3, 4)
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[0, 2, 1, 3]),
             helper.make_node("Flatten", ["t"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], name="gemm_after_transpose", transB=1)]
    inits = [_init("Wc", Wc), _init("bc", bc), _init("Wg", Wg), _init("bg", bg)]
    return finish(helper.make_graph(nodes, "unk", [_vi("x", ["N", 2, "H", "W"])], [_vi("y", ["N", 4])], inits))


def _nan_model(rng, where):
    Ws, bs = _mlp(rng)
    if where == "weight":
        Ws[1][1, 2] = np.nan
    else:
        bs[0][2] = np.inf
    return mlp_onnx(Ws, bs)


def _external(model, folder, location):
    """Save ``model`` with every initializer in one external file ``location``
    (relative to ``folder``); returns the model path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    m = onnx.ModelProto()
    m.CopyFrom(model)              # save_model(save_as_external_data) edits the model in place
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0, convert_attribute=False)
    return path


def _external_outside(model, root, location):
    """A model in root/sub whose tensors point at ``location`` (outside sub);
    the referenced file exists, so only the location check can refuse it."""
    tmp = os.path.join(root, "ext_src")
    _external(model, tmp, "weights.bin")
    sub = os.path.join(root, "sub")
    os.makedirs(sub, exist_ok=True)
    secret = os.path.join(root, "secret.bin")
    shutil.copy(os.path.join(tmp, "weights.bin"), secret)
    m = onnx.load(os.path.join(tmp, "model.onnx"), load_external_data=False)
    loc = location if location != "ABS" else os.path.abspath(secret)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = loc
    path = os.path.join(sub, "model.onnx")
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    rng = np.random.default_rng(41)
    Ws, bs = _mlp(rng)
    d = tmp_path_factory.mktemp("good")
    m = mlp_onnx(Ws, bs)
    return {"model": m, "path": save(m, d / "good.onnx"), "dir": d}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, good):
    rng = np.random.default_rng(42)
    root = tmp_path_factory.mktemp("bad")
    out = {}
    p = root / "text.onnx"
    p.write_text("this is a text file, not a protobuf\nsecond line\n")
    out["not_onnx"] = (str(p), [])
    data = open(good["path"], "rb").read()
    p = root / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    out["truncated"] = (str(p), [])
    p = root / "empty.onnx"
    p.write_bytes(b"")
    out["empty"] = (str(p), [])
    p = root / "tensor.onnx"                      # another protobuf message, parses leniently
    p.write_bytes(onnx.numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString())
    out["tensor_proto"] = (str(p), [])
    p = root / "arrays.onnx"                      # an npz (zip) renamed
    with open(p, "wb") as f:
        np.savez(f, x=np.ones(3))
    out["npz_renamed"] = (str(p), [])
    out["sin"] = (save(_sin_model(rng), root / "sin.onnx"), ["Sin", "sin_mid"])
    out["lstm"] = (save(_lstm_model(rng), root / "lstm.onnx"), ["LSTM", "lstm_mid"])
    out["unknown_dims"] = (save(_unknown_dims_model(rng), root / "unk.onnx"), ["gemm_after_transpose", "unknown"])
    out["nan_weight"] = (save(_nan_model(rng, "weight"), root / "nan.onnx"), ["W2", "NaN"])
    out["inf_bias"] = (save(_nan_model(rng, "bias"), root / "inf.onnx"), ["b1", "Inf"])
    out["ext_parent"] = (_external_outside(good["model"], str(root / "e1"), "../secret.bin"), ["outside"])
    out["ext_abs"] = (_external_outside(good["model"], str(root / "e2"), "ABS"), ["outside"])
    out["ext_sneaky"] = (_external_outside(good["model"], str(root / "e3"), "x/../../secret.bin"), ["outside"])
    out["missing"] = (str(root / "does_not_exist.onnx"), [])
    return out


IMPORTING = ["inspect", "color", "compress", "compress_existing", "draw"]
ALL_BAD = ["not_onnx", "truncated", "empty", "tensor_proto", "npz_renamed", "nan_weight", "inf_bias",
           "ext_parent", "ext_abs", "ext_sneaky", "missing"]


def _args(command, model, out_dir, npz):
    if command == "inspect":
        return ("inspect", model, "--json", out_dir / "new.json")
    if command == "color":
        return ("color", model, "--json", out_dir / "new.json")
    if command == "compress":
        return ("compress", model, "-o", out_dir / "new.onnx", "--report", out_dir / "new.json", "--verify")
    if command == "compress_existing":
        return ("compress", model, "-o", out_dir / "existing.onnx", "--report", out_dir / "existing.json")
    if command == "draw":
        return ("draw", model, "-o", out_dir / "new.png")
    if command == "eval":
        return ("eval", model, "--data", npz, "--json", out_dir / "new.json")
    raise AssertionError(command)


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "existing.onnx").write_bytes(b"sentinel model bytes")
    (d / "existing.json").write_text('{"sentinel": true}')
    return d


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    p = tmp_path_factory.mktemp("npz") / "d.npz"
    np.savez(p, x=np.zeros((3, 4), np.float32), y=np.array([0, 1, 2]))
    return str(p)


@pytest.mark.parametrize("command", IMPORTING)
@pytest.mark.parametrize("case", ALL_BAD)
def test_bad_model(capsys, bad, out_dir, npz, case, command):
    model, needles = bad[case]
    before_model = open(model, "rb").read() if os.path.exists(model) else None
    before = folder_snapshot(out_dir)
    rc, _, err = cli(capsys, *_args(command, model, out_dir, npz))
    assert_one_line_error(rc, err, *needles)
    assert folder_snapshot(out_dir) == before
    if before_model is not None:
        assert open(model, "rb").read() == before_model


@pytest.mark.parametrize("case", ["not_onnx", "truncated", "empty", "missing", "ext_parent"])
def test_bad_model_eval(capsys, bad, out_dir, npz, case):
    model, needles = bad[case]
    before = folder_snapshot(out_dir)
    rc, _, err = cli(capsys, *_args("eval", model, out_dir, npz))
    assert_one_line_error(rc, err, *needles)
    assert folder_snapshot(out_dir) == before


@pytest.mark.parametrize("case,command", [("not_onnx", "compress"), ("truncated", "color"),
                                          ("inf_bias", "compress_existing"), ("ext_parent", "compress"),
                                          ("nan_weight", "color")])
def test_bad_model_real_stderr(bad, out_dir, npz, case, command):
    model, needles = bad[case]
    before = folder_snapshot(out_dir)
    rc, out, err = cli_sub(*_args(command, model, out_dir, npz))
    assert_one_line_error(rc, err, *needles)
    assert err.startswith("fibgraph")
    assert folder_snapshot(out_dir) == before


def test_every_truncation_is_refused(capsys, tmp_path, good):
    """Cut a real model at many points (protobuf parses some prefixes): always
    exit 2 with one line, never an internal error, nothing written."""
    data = open(good["path"], "rb").read()
    cuts = sorted(set(list(range(1, len(data), 13)) + list(range(len(data) - 12, len(data)))))
    p, out = tmp_path / "cut.onnx", tmp_path / "out"
    out.mkdir()
    bad_cuts = []
    for cut in cuts:
        p.write_bytes(data[:cut])
        rc, _, err = cli(capsys, "compress", p, "-o", out / "s.onnx")
        if rc != 2 or len(err.strip().splitlines()) != 1 or "Traceback" in err:
            bad_cuts.append((cut, rc, err.strip()[:200]))
    assert not bad_cuts, bad_cuts
    assert folder_snapshot(out) == {}


def test_external_data_refused_in_the_loader(bad):
    """The loader itself (used by every command) refuses the location."""
    model, _ = bad["ext_parent"]
    from fibgraph.errors import InputError
    from fibgraph.importers.onnx.load import load_onnx

    with pytest.raises(InputError, match="outside"):
        load_onnx(model)


# --------------------------------------------------- in-folder external data
@pytest.mark.parametrize("location", ["weights.bin", os.path.join("data", "weights.bin")])
def test_in_folder_external_data_compresses(capsys, tmp_path, good, location):
    folder = tmp_path / "ext"
    os.makedirs(folder / "data", exist_ok=True)
    path = _external(good["model"], str(folder), location)
    m = onnx.load(path, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in m.graph.initializer)
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    rc, _, err = cli(capsys, "compress", path, "-o", out, "--verify", "--report", rep)
    assert rc == 0, err
    r = read_json(rep)
    assert r["params_before"] == 5 * 4 + 5 + 3 * 5 + 3
    assert r["params_after"] == 4 * 4 + 4 + 3 * 4 + 3
    assert r["verify"]["max_abs_diff"] < 1e-5
    x = np.random.default_rng(0).normal(size=(7, 4))
    assert max_rel_diff(run_onnx(good["path"], x)[0], run_onnx(str(out), x)[0]) <= 1e-5
    rc, _, err = cli(capsys, "color", path, "--json", tmp_path / "c.json")
    assert rc == 0, err


# ------------------------------------------------------ output == input
SAME_PATH_CASES = {
    "compress-o": ("compress", "{p}", "-o", "{p}"),
    "compress-o-alias": ("compress", "{p}", "-o", "{alias}"),
    "compress-report": ("compress", "{p}", "-o", "{d}/other.onnx", "--report", "{p}"),
    "compress-report-is-o": ("compress", "{p}", "-o", "{d}/same.onnx", "--report", "{d}/same.onnx"),
    "color-json": ("color", "{p}", "--json", "{p}"),
    "color-json-alias": ("color", "{p}", "--json", "{alias}"),
    "inspect-json": ("inspect", "{p}", "--json", "{p}"),
    "eval-json": ("eval", "{p}", "--data", "{npz}", "--json", "{p}"),
    "draw-o": ("draw", "{p}", "-o", "{p}"),
}


@pytest.mark.parametrize("case", list(SAME_PATH_CASES))
def test_output_equal_to_input_is_refused(capsys, tmp_path, good, npz, case):
    d = tmp_path / "m"
    d.mkdir()
    p = str(d / "model.onnx")
    shutil.copy(good["path"], p)
    alias = os.path.join(str(d), "..", "m", "model.onnx")
    args = [a.format(p=p, d=d, alias=alias, npz=npz) for a in SAME_PATH_CASES[case]]
    before = folder_snapshot(d)
    st = os.stat(p)
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err)
    assert folder_snapshot(d) == before
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns


def test_output_equal_to_input_real_stderr(tmp_path, good):
    d = tmp_path / "m"
    d.mkdir()
    p = str(d / "model.onnx")
    shutil.copy(good["path"], p)
    before = folder_snapshot(d)
    rc, _, err = cli_sub("compress", p, "-o", p, "--verify")
    assert_one_line_error(rc, err, "input")
    assert folder_snapshot(d) == before


def test_symlinked_output_to_input_is_refused(capsys, tmp_path, good):
    d = tmp_path / "m"
    d.mkdir()
    p = str(d / "model.onnx")
    shutil.copy(good["path"], p)
    os.symlink(p, d / "link.onnx")
    before = open(p, "rb").read()
    rc, _, err = cli(capsys, "compress", p, "-o", d / "link.onnx")
    assert_one_line_error(rc, err)
    assert open(p, "rb").read() == before
    assert os.path.islink(d / "link.onnx")


# ---------------------------------------------- usage errors, other files
@pytest.mark.parametrize("args", [
    ("compress",),                                   # no model
    ("compress", "{good}"),                          # no -o
    ("color", "{good}", "--symmetry", "nonsense"),
    ("color", "{good}", "--linkage", "single"),
    ("color", "{good}", "--metric", "manhattan"),
    ("eval", "{good}"),                              # no --data
    ("nosuchcommand",),
    ("compress", "{good}", "-o", "{tmp}/no_such_dir/x.onnx"),
    ("draw", "{good}", "-o", "{tmp}/picture.bmp"),
])
def test_usage_errors(capsys, tmp_path, good, args):
    args = [a.format(good=good["path"], tmp=tmp_path) for a in args]
    before = folder_snapshot(tmp_path)
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err)
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize("shape", [(5, 7), (5, 4, 2), (0, 4)])
def test_data_that_does_not_fit_the_model(capsys, tmp_path, good, out_dir, shape):
    """x with the wrong feature count / rank, or empty: bad input (exit 2),
    not an internal error, and nothing written (verify runs before the write)."""
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros(shape, np.float32), y=np.zeros(shape[0], np.int64))
    before = folder_snapshot(out_dir)
    rc, _, err = cli(capsys, "compress", good["path"], "-o", out_dir / "new.onnx", "--verify", "--data", p,
                     "--report", out_dir / "new.json")
    assert_one_line_error(rc, err)
    rc, _, err = cli(capsys, "eval", good["path"], "--data", p, "--json", out_dir / "new.json")
    assert_one_line_error(rc, err)
    assert folder_snapshot(out_dir) == before


@pytest.mark.parametrize("content", ["not an npz", "x_only", "y_bad"])
def test_eval_bad_data(capsys, tmp_path, good, content):
    p = tmp_path / "d.npz"
    if content == "not an npz":
        p.write_text("hello")
    elif content == "x_only":
        np.savez(p, x=np.zeros((3, 4), np.float32))
    else:
        np.savez(p, x=np.zeros((3, 4), np.float32), y=np.array([0, 1, 7]))   # label 7 of 3 classes
    rc, _, err = cli(capsys, "eval", good["path"], "--data", p, "--json", tmp_path / "e.json")
    assert_one_line_error(rc, err)
    assert not (tmp_path / "e.json").exists()


# Models the feed-forward chain importer refuses (an op between layers it has
# no rule for, an LSTM op, a layout it cannot map without concrete sizes) are
# read by the hypergraph importer instead: they colour and compress exactly.
@pytest.mark.parametrize("case", ["sin", "lstm", "unknown_dims"])
def test_models_the_chain_importer_refuses_go_through_the_hypergraph(capsys, bad, out_dir, case):
    model, _ = bad[case]
    rc, out, err = cli(capsys, "inspect", model)
    assert rc == 0, err
    assert "hypergraph" in out
    rc, out, err = cli(capsys, "compress", model, "-o", out_dir / "new.onnx", "--report", out_dir / "new.json",
                       "--verify")
    assert rc == 0, err
    rep = read_json(out_dir / "new.json")
    assert rep["graph"] == "hypergraph" and not rep["barriers"]
    assert rep["verify"]["max_abs_diff"] <= 1e-5 * max(1.0, rep["verify"]["max_abs_output"])
    onnx.checker.check_model(onnx.load(str(out_dir / "new.onnx")), full_check=True)
