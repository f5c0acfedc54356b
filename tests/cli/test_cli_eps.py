"""Per-layer eps (``--eps-file``) and eps range checks.

Model: x(5) -> W1 (6) Relu -> W2 (5) Relu -> W3 (3); W1 rows 0 and 3 are
near-duplicates, W2 rows 1 and 4 too (differences far above float rounding,
cosine distance far below 0.01)."""
import json

import numpy as np
import pytest

from helpers import assert_one_line_error, cli, cli_sub, folder_snapshot, mlp_onnx, read_json, save

W1_MERGED = [[0, 3], [1], [2], [4], [5]]
W2_MERGED = [[0], [1, 4], [2], [3]]
W1_SINGLE = [[i] for i in range(6)]
W2_SINGLE = [[i] for i in range(5)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(31)
    W1, b1 = rng.normal(0, 1, (6, 5)), rng.normal(0, 0.5, 6)
    W1[3] = W1[0] + 1e-3 * rng.standard_normal(5)
    b1[3] = b1[0]
    W2, b2 = rng.normal(0, 1, (5, 6)), rng.normal(0, 0.5, 5)
    W2[4] = W2[1] + 1e-3 * rng.standard_normal(6)
    b2[4] = b2[1]
    W3, b3 = rng.normal(0, 1, (3, 5)), rng.normal(0, 0.5, 3)
    return save(mlp_onnx([W1, W2, W3], [b1, b2, b3]), tmp_path_factory.mktemp("eps") / "m.onnx")


def _eps_file(tmp_path, table, name="eps.json"):
    p = tmp_path / name
    p.write_text(json.dumps(table) if not isinstance(table, str) else table)
    return str(p)


def _fibers(capsys, tmp_path, model, *opts):
    out = tmp_path / "c.json"
    rc, _, err = cli(capsys, "color", model, "--json", out, *opts)
    assert rc == 0, err
    return [ly["fibers"] for ly in read_json(out)["layers"]][:2]


@pytest.mark.parametrize("table,extra,expected", [
    ({}, (), [W1_SINGLE, W2_SINGLE]),
    ({"W1": 0.01}, (), [W1_MERGED, W2_SINGLE]),
    ({"W2": 0.01}, (), [W1_SINGLE, W2_MERGED]),
    ({"*": 0.01}, (), [W1_MERGED, W2_MERGED]),
    ({"*": 0.01, "W1": 0}, (), [W1_SINGLE, W2_MERGED]),
    ({"W1": 0.0}, ("--eps", "0.01"), [W1_SINGLE, W2_MERGED]),
    ({"W1": 0.01, "W2": 0.01, "W3": 0.5}, (), [W1_MERGED, W2_MERGED]),
])
def test_eps_file_per_layer(capsys, tmp_path, model, table, extra, expected):
    f = _eps_file(tmp_path, table)
    assert _fibers(capsys, tmp_path, model, "--eps-file", f, *extra) == expected


def test_eps_file_with_compress(capsys, tmp_path, model):
    f = _eps_file(tmp_path, {"W2": 0.01})
    out, rep = tmp_path / "s.onnx", tmp_path / "r.json"
    rc, _, err = cli(capsys, "compress", model, "-o", out, "--eps-file", f, "--verify", "--report", rep)
    assert rc == 0, err
    r = read_json(rep)
    assert [ly["nodes_after"] for ly in r["layers"]] == [6, 4, 3]
    assert r["verify"]["max_abs_diff"] < 0.05


@pytest.mark.parametrize("table,needle", [
    ({"W9": 0.1}, "W9"),
    ({"W1": 0.1, "fc.weight": 0.1}, "fc.weight"),
    ({"W1": 2.0}, "eps"),
    ({"W1": -0.1}, "eps"),
    ({"*": 7}, "eps"),
    ({"W2": "abc"}, "eps"),
    ({"W2": None}, "eps"),
    ("[0.1, 0.2]", "eps"),
    ("{not json", "json"),
])
@pytest.mark.parametrize("command", ["color", "compress"])
def test_bad_eps_file_exit2_nothing_written(capsys, tmp_path, model, table, needle, command):
    d = tmp_path / "out"
    d.mkdir()
    f = _eps_file(tmp_path, table)
    if command == "color":
        args = ("color", model, "--eps-file", f, "--json", d / "c.json")
    else:
        args = ("compress", model, "-o", d / "s.onnx", "--eps-file", f, "--report", d / "r.json")
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, needle)
    assert folder_snapshot(d) == {}


def test_missing_eps_file(capsys, tmp_path, model):
    rc, _, err = cli(capsys, "color", model, "--eps-file", tmp_path / "nope.json")
    assert_one_line_error(rc, err)


@pytest.mark.parametrize("eps", ["2", "2.5", "-0.1", "nan", "inf", "-inf", "abc"])
def test_eps_out_of_range(capsys, tmp_path, model, eps):
    d = tmp_path / "out"
    d.mkdir()
    rc, _, err = cli(capsys, "compress", model, "-o", d / "s.onnx", "--eps", eps, "--report", d / "r.json")
    assert_one_line_error(rc, err)
    rc, _, err = cli(capsys, "color", model, "--eps", eps, "--json", d / "c.json")
    assert_one_line_error(rc, err)
    assert folder_snapshot(d) == {}


def test_eps_out_of_range_real_stderr(tmp_path, model):
    rc, out, err = cli_sub("color", model, "--eps=-1", "--json", tmp_path / "c.json")
    assert_one_line_error(rc, err, "eps")
    assert not (tmp_path / "c.json").exists()
    f = _eps_file(tmp_path, {"nolayer": 0.1})
    rc, out, err = cli_sub("compress", model, "-o", tmp_path / "s.onnx", "--eps-file", f)
    assert_one_line_error(rc, err, "nolayer")
    assert not (tmp_path / "s.onnx").exists()
