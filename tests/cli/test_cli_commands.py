"""The commands' success paths and the JSON contract that outside checks rely on."""
import os

import numpy as np
import onnx
import pytest

from helpers import cli, cli_sub, folder_snapshot, initializer, mlp_onnx, planted_mlp, read_json, run_onnx, save


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = planted_mlp(np.random.default_rng(51), 4, [[0, 0, 1, 2, 1]], 3)
    d = tmp_path_factory.mktemp("cmd")
    return {"path": save(mlp_onnx(p.Ws, p.bs), d / "m.onnx"), "planted": p}


def test_inspect_json(capsys, tmp_path, model):
    out = tmp_path / "i.json"
    rc, so, err = cli(capsys, "inspect", model["path"], "--json", out)
    assert rc == 0, err
    r = read_json(out)
    assert r["graph"] == "hypergraph"                 # one importer: the hypergraph's census
    assert [ly["weight"] for ly in r["layers"]] == ["W1", "W2"]
    assert [ly["units_out"] for ly in r["layers"]] == [5, 3]
    assert r["params"] == model["planted"].params_before()
    assert "W1" in so


def test_compress_report_contract(tmp_path, model):
    out, rep = tmp_path / "s.onnx", tmp_path / "r.json"
    rc, so, err = cli_sub("compress", model["path"], "-o", out, "--report", rep)
    assert rc == 0, err
    assert err.strip() == "" or "Traceback" not in err
    r = read_json(rep)
    assert type(r["params_before"]) is int and type(r["params_after"]) is int
    assert "verify" not in r                              # only with --verify
    for ly in r["layers"]:
        assert {"weight", "nodes_before", "nodes_after", "fibers"} <= set(ly)
        assert type(ly["nodes_before"]) is int and type(ly["nodes_after"]) is int
        assert sorted(i for f in ly["fibers"] for i in f) == list(range(ly["nodes_before"]))
    assert r["layers"][0]["fibers"] == [[0, 1], [2, 4], [3]]
    assert r["params_after"] == model["planted"].params_after()
    # the written file: what the report says
    m = onnx.load(out)
    assert list(initializer(m, "W1").shape) == [3, 4]
    # no temporary files left behind
    assert sorted(os.listdir(tmp_path)) == ["r.json", "s.onnx"]


def test_compress_verify_report(capsys, tmp_path, model):
    rep = tmp_path / "r.json"
    rc, _, err = cli(capsys, "compress", model["path"], "-o", tmp_path / "s.onnx", "--verify", "--report", rep)
    assert rc == 0, err
    v = read_json(rep)["verify"]
    assert isinstance(v["max_abs_diff"], float) and 0 <= v["max_abs_diff"] < 1e-5


def test_compress_verify_with_data(capsys, tmp_path, model):
    x = np.random.default_rng(0).normal(0, 3, (11, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(11, np.int64))
    rep = tmp_path / "r.json"
    rc, _, err = cli(capsys, "compress", model["path"], "-o", tmp_path / "s.onnx", "--data", tmp_path / "d.npz",
                     "--verify", "--report", rep)
    assert rc == 0, err
    v = read_json(rep)["verify"]
    diff = np.max(np.abs(run_onnx(model["path"], x)[0] - run_onnx(str(tmp_path / "s.onnx"), x)[0]))
    assert v["max_abs_diff"] == pytest.approx(float(diff), abs=1e-7)


def test_compress_replaces_an_existing_output(capsys, tmp_path, model):
    out = tmp_path / "s.onnx"
    out.write_bytes(b"old")
    rc, _, err = cli(capsys, "compress", model["path"], "-o", out)
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(out), full_check=True)


@pytest.mark.parametrize("ext", [".dot", ".svg", ".png"])
def test_draw(capsys, tmp_path, model, ext):
    out = tmp_path / f"pic{ext}"
    rc, _, err = cli(capsys, "draw", model["path"], "-o", out)
    assert rc == 0, err
    data = out.read_bytes()
    assert len(data) > 100
    if ext == ".dot":
        assert b"digraph" in data[:200]
    elif ext == ".svg":
        assert b"<svg" in data
    else:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(folder_snapshot(tmp_path)) == {f"pic{ext}"}
