"""``fibgraph break``: a planted-cover ONNX MLP is lifted to a valid ONNX model
of the same shapes that onnxruntime runs with the same outputs at eps = 0;
the report gives the covers, the units re-initialised, the output change and
the loss before / after; bad input is one line and exit 2."""
import os

import numpy as np
import onnx
from onnx import numpy_helper

from helpers import assert_one_line_error, canonical, cli, cli_sub, mlp_onnx, planted_layer, read_json, run_onnx, save

L1 = canonical([0, 1, 0, 2, 1, 0])
L2 = canonical([0, 0, 1, 1, 2])


def _cover_model(tmp_path, seed=0, form="gemm"):
    rng = np.random.default_rng(seed)
    W1, b1, _, _ = planted_layer(rng, np.arange(4), L1, split=0.0)
    W2, b2, _, _ = planted_layer(rng, L1, L2, split=0.0)
    W3, b3, _, _ = planted_layer(rng, L2, np.arange(3), split=0.0)
    return save(mlp_onnx([W1, W2, W3], [b1, b2, b3], form=form), tmp_path / f"cover_{form}.onnx")


def _inits(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_break_cli_eps0_same_outputs(tmp_path, capsys):
    for form in ("gemm", "matmul"):
        m = _cover_model(tmp_path, form=form)
        out, rep = tmp_path / f"lifted_{form}.onnx", tmp_path / f"r_{form}.json"
        rc, stdout, err = cli(capsys, "break", m, "-o", out, "--eps", "0", "--report", rep, "--seed", "3")
        assert rc == 0, err
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        x = np.random.default_rng(1).normal(size=(100, 4))
        y0, y1 = run_onnx(m, x)[0], run_onnx(out, x)[0]
        assert np.max(np.abs(y0 - y1)) < 1e-5
        r = read_json(rep)
        assert r["reinit"] == 5 and r["max_output_change"] < 1e-5
        assert [ly["cover_sizes"] for ly in r["layers"]][:2] == [[3, 2], [2, 2]]
        a, b = _inits(m), _inits(out)
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        W1o, W1 = (a["W1"], b["W1"]) if form == "gemm" else (a["W1"].T, b["W1"].T)
        for member in r["layers"][0]["reinit"]:
            assert not np.allclose(W1[member], W1o[member])
        assert "5 units re-initialised" in stdout


def test_break_cli_data_loss_and_fibration(tmp_path, capsys):
    m = _cover_model(tmp_path)
    rng = np.random.default_rng(2)
    data = tmp_path / "cal.npz"
    np.savez(data, x=rng.normal(size=(50, 4)).astype(np.float32), y=rng.integers(0, 3, 50))
    out, rep = tmp_path / "f.onnx", tmp_path / "f.json"
    rc, _, err = cli(capsys, "break", m, "-o", out, "--symmetry", "fibration", "--data", data, "--report", rep)
    assert rc == 0, err
    r = read_json(rep)
    assert r["symmetry"] == "fibration" and r["measured_on"] == "data"
    assert abs(r["loss_before"] - r["loss_after"]) < 1e-5


def test_break_cli_bad_inputs(tmp_path, capsys):
    m = _cover_model(tmp_path)
    rc, _, err = cli(capsys, "break", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err)
    rc, _, err = cli(capsys, "break", m, "-o", m)
    assert_one_line_error(rc, err, "input")
    rc, _, err = cli(capsys, "break", m, "-o", tmp_path / "o.onnx", "--eps", "-1")
    assert_one_line_error(rc, err, "eps")
    rc, _, err = cli(capsys, "break", m)
    assert_one_line_error(rc, err, "output")
    assert not os.path.exists(tmp_path / "o.onnx")
    rc, _, err = cli_sub("break", tmp_path / "model.txt", "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err, ".onnx")


def test_break_cli_near_covers_eps(tmp_path, capsys):
    """Near-covers (weights perturbed by 1e-3 relative): none at eps 0, all
    found at eps 0.05, and the output change is reported, small but nonzero."""
    rng = np.random.default_rng(4)
    W1, b1, _, _ = planted_layer(rng, np.arange(4), L1, split=0.0)
    W2, b2, _, _ = planted_layer(rng, L1, L2, split=0.0)
    W3, b3, _, _ = planted_layer(rng, L2, np.arange(3), split=0.0)
    Ws = [W * (1 + 1e-3 * rng.standard_normal(W.shape)) for W in (W1, W2, W3)]
    m = save(mlp_onnx(Ws, [b1, b2, b3]), tmp_path / "near.onnx")
    reps = {}
    for eps in ("0", "0.05"):
        out, rep = tmp_path / f"o{eps}.onnx", tmp_path / f"r{eps}.json"
        rc, _, err = cli(capsys, "break", m, "-o", out, "--eps", eps, "--report", rep)
        assert rc == 0, err
        reps[eps] = read_json(rep)
    assert reps["0"]["reinit"] == 0 and reps["0"]["max_output_change"] < 1e-5
    assert reps["0.05"]["reinit"] == 5
    assert 0 < reps["0.05"]["max_output_change"] < 0.05
