"""``fibgraph sweep`` / :func:`fibgraph.importers.sweep.run_sweep` on a real Dask LocalCluster
(2 worker processes): the tidy table has exactly the expected rows, planted fibers
are recovered at eps 0, broken inputs become error rows while the other tasks
finish, the CLI writes the table and the figures, bad input exits 2 with one line,
and an owned cluster leaves no process behind."""
import logging
import os
import struct
import sys
import time
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import psutil
import pytest

from helpers import assert_one_line_error, cli, mlp_onnx, planted_mlp, save

distributed = pytest.importorskip("distributed")

from fibgraph.importers.api import evaluate                                      # noqa: E402
from fibgraph.importers.sweep import COLUMNS, make_settings, natural_key, parse_eps_list, run_sweep  # noqa: E402
from fibgraph.errors import InputError                                  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fibgraph", "data")
DIGITS = os.path.join(DATA_DIR, "digits_mlp.onnx")
DIGITS_DATA = os.path.join(DATA_DIR, "digits_test.npz")
DIGITS_LAYERS = ["0.weight", "2.weight", "4.weight"]
# planted fibers of the two hidden layers: 8 units in 4 fibers, 6 units in 3;
# 64 inputs and 10 outputs, so the digits data evaluates them too
HIDDEN = [[0, 0, 1, 2, 1, 3, 3, 3], [0, 1, 0, 2, 1, 2]]
PLANTED_COUNTS = [4, 3, 10]                  # nodes_after at eps 0: W1, W2, W3 (output kept)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    (d / "run").mkdir()
    out = {}
    for seed, stem in ((3, "step_2"), (4, "step_10")):
        p = planted_mlp(np.random.default_rng(seed), 64, HIDDEN, 10)
        out[stem] = save(mlp_onnx(p.Ws, p.bs), d / "run" / f"{stem}.onnx")
        out[stem + "_planted"] = p
    bad = d / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf of a model")
    out["corrupt"] = str(bad)
    out["missing"] = str(d / "missing.onnx")
    out["dir"] = d
    return out


def _children():
    """Child processes of this one (the multiprocessing resource tracker, which
    lives as long as this process by design, left out)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _assert_no_new_children(before, wait=15):
    deadline = time.time() + wait
    while _children() - before and time.time() < deadline:
        time.sleep(0.2)
    assert _children() - before == set(), "worker processes left behind"


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes (one thread each) shared by the tests below; closed,
    with its processes gone, at the end of the module."""
    from distributed import LocalCluster

    before = _children()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as c:
        assert len(c.workers) == 2
        yield c.scheduler_address
    _assert_no_new_children(before)


def _rows(df, ckpt, sym, eps):
    return df[(df["checkpoint"] == ckpt) & (df["symmetry"] == sym) & (df["eps"] == eps)]


def test_table_planted_fibers_and_error_rows(models, cluster):
    settings = make_settings(["fibration", "covering"], [0.0, 0.1])
    calls = []
    df = run_sweep([models["missing"], models["step_2"], DIGITS, models["corrupt"]], settings,
                   scheduler=cluster, on_done=lambda done, total, m, s, r: calls.append((done, total)))
    assert list(df.columns) == COLUMNS
    assert calls == [(k, 16) for k in range(1, 17)]          # every (model, setting) reported once
    # exactly the expected rows: a layer row per (model, setting, layer); one error row per failed task
    got = sorted(zip(df["checkpoint"], df["symmetry"], df["eps"], df["layer"].fillna("-")))
    want = sorted([(c, s, e, ly) for c, layers in (("step_2", ["W1", "W2", "W3"]), ("digits_mlp", DIGITS_LAYERS))
                   for s, e in settings for ly in layers]
                  + [(c, s, e, "-") for c in ("missing", "corrupt") for s, e in settings])
    assert got == want and len(df) == 32
    # models in natural order of their paths, layers in model order
    assert list(dict.fromkeys(df["model"])) == sorted(
        [models["missing"], models["step_2"], DIGITS, models["corrupt"]], key=natural_key)
    assert list(_rows(df, "digits_mlp", "fibration", 0.0)["layer"]) == DIGITS_LAYERS
    # errors: filled, with the cause; no numbers
    err = df[df["error"].notna()]
    assert set(err["checkpoint"]) == {"missing", "corrupt"}
    assert err[err["checkpoint"] == "missing"]["error"].str.contains("no such file").all()
    assert err[err["checkpoint"] == "corrupt"]["error"].str.contains("not an ONNX model").all()
    assert err["nodes_after"].isna().all() and err["params_after"].isna().all()
    ok = df[df["error"].isna()]
    assert ok["nodes_after"].notna().all() and (ok["nodes_after"] <= ok["nodes_before"]).all()
    # the planted fibers, exactly, at eps 0; and the planted base's parameter count
    p = models["step_2_planted"]
    fib0 = _rows(df, "step_2", "fibration", 0.0)
    assert list(fib0["nodes_before"]) == [8, 6, 10]
    assert list(fib0["nodes_after"]) == PLANTED_COUNTS
    assert (fib0["params_after"] == p.params_after()).all() and (fib0["params_before"] == p.params_before()).all()
    # coverings refine fibrations: never fewer units kept; larger eps never keeps more (fibration)
    for ckpt in ("step_2", "digits_mlp"):
        for e in (0.0, 0.1):
            f, c = _rows(df, ckpt, "fibration", e), _rows(df, ckpt, "covering", e)
            assert (c["nodes_after"].to_numpy() >= f["nodes_after"].to_numpy()).all()
        assert (_rows(df, ckpt, "fibration", 0.1)["nodes_after"].to_numpy()
                <= _rows(df, ckpt, "fibration", 0.0)["nodes_after"].to_numpy()).all()
    # the bundled model does compress at eps 0.1 (complete linkage, the default: 48 -> 17, 48 -> 23;
    # average linkage gave 48 -> 16, 48 -> 21)
    assert list(_rows(df, "digits_mlp", "fibration", 0.1)["nodes_after"]) == [17, 23, 10]
    assert ok["accuracy"].isna().all()                          # no --data


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_cli_writes_table_stdout_and_plots(models, cluster, tmp_path, capsys):
    out, plots = tmp_path / "table.csv", tmp_path / "plots"
    rc, so, err = cli(capsys, "sweep", models["step_10"], models["step_2"], DIGITS, "--eps", "0,0.1",
                      "--symmetry", "fibration", "--data", DIGITS_DATA, "--scheduler", cluster,
                      "-o", out, "--plots", plots)
    assert rc == 0, err
    df = pd.read_csv(out)
    assert list(df.columns) == COLUMNS and len(df) == 3 * 2 * 3
    assert df["error"].isna().all()
    # checkpoints of one run in natural order: step_2 before step_10
    order = list(dict.fromkeys(df["checkpoint"]))
    assert order.index("step_2") < order.index("step_10")
    # --data: accuracy/loss of every compressed model; at eps 0 the base is exact
    assert df["accuracy"].notna().all() and df["loss"].notna().all()
    for ckpt, path in (("step_2", models["step_2"]), ("digits_mlp", DIGITS)):
        ref = evaluate(path, DIGITS_DATA)
        r = _rows(df, ckpt, "fibration", 0.0)
        assert np.allclose(r["accuracy"], ref["accuracy"], atol=1 / 450 + 1e-12)
        assert np.allclose(r["loss"], ref["loss"], rtol=1e-4)
    # ... and what is scored is the compressed model: at eps 0.1 the digits base (47 of 106 units) differs
    d1 = _rows(df, "digits_mlp", "fibration", 0.1)
    assert (d1["params_after"] < d1["params_before"]).all()
    assert not np.isclose(d1["loss"].iloc[0], _rows(df, "digits_mlp", "fibration", 0.0)["loss"].iloc[0], rtol=1e-6)
    assert list(_rows(df, "step_10", "fibration", 0.0)["nodes_after"]) == PLANTED_COUNTS
    # stdout: a header and one tab-separated line per (model, setting)
    lines = so.splitlines()
    assert lines[0].split("\t")[:3] == ["model", "symmetry", "eps"] and len(lines) == 1 + 6
    assert all(len(ln.split("\t")) == len(lines[0].split("\t")) for ln in lines)
    assert "wrote" in err and "Traceback" not in err
    # figures: per model and symmetry (units kept vs eps), and across the two checkpoints per eps
    names = sorted(os.listdir(plots))
    stems = [f"{c}-fibration-eps" for c in ("digits_mlp", "step_2", "step_10")] + \
        [f"checkpoints-fibration-eps{e}" for e in ("0", "0.1")]
    assert names == sorted(f"{s}.{x}" for s in stems for x in ("svg", "png"))
    assert _png_size(plots / "checkpoints-fibration-eps0.png") == (1280, 800)   # 6.4 x 4 in at 200 dpi
    root = ElementTree.parse(plots / "step_2-fibration-eps.svg").getroot()
    assert root.tag.endswith("svg")
    # --quiet: nothing on stderr, the same stdout; the table is replaced
    rc, so, err = cli(capsys, "sweep", models["step_2"], "--eps", "0", "--scheduler", cluster, "-o", out, "--quiet")
    assert rc == 0 and err == "" and len(so.splitlines()) == 2
    assert list(pd.read_csv(out)["nodes_after"]) == PLANTED_COUNTS


@pytest.mark.slow          # a second cluster: spawning a worker and importing onnx there takes a while
def test_owned_local_cluster_closes_its_processes(models):
    """scheduler=None (the CLI's default): run_sweep starts a LocalCluster and closes it."""
    before = _children()
    df = run_sweep([models["step_2"]], [("fibration", 0.0)], workers=1)
    assert list(df["nodes_after"]) == PLANTED_COUNTS
    _assert_no_new_children(before)


def _bad(tmp_path, models):
    out = tmp_path / "t.csv"
    m = models["step_2"]
    return {
        "no models": (["--eps", "0", "-o", out], "no models"),
        "eps not a number": ([m, "--eps", "0,abc", "-o", out], "not a number"),
        "eps empty item": ([m, "--eps", "0,,0.1", "-o", out], "comma-separated"),
        "eps out of range": ([m, "--eps", "0,2.5", "-o", out], "[0, 2)"),
        "output equals a model": ([m, "--eps", "0", "-o", m], "equals the input"),
        "output equals the data": ([m, "--eps", "0", "--data", DIGITS_DATA, "-o", DIGITS_DATA], "equals the input"),
        "bad symmetry": ([m, "--eps", "0", "--symmetry", "fibration,orbit", "-o", out], "--symmetry"),
        "table extension": ([m, "--eps", "0", "-o", tmp_path / "t.txt"], ".csv or .parquet"),
        "no workers": ([m, "--eps", "0", "--workers", "0", "-o", out], "--workers"),
        "no model exists": ([models["missing"], "--eps", "0", "-o", out], "none of the models"),
        "plots is a file": ([m, "--eps", "0", "-o", out, "--plots", m], "--plots"),
        "data without y": ([m, "--eps", "0", "--data", tmp_path / "x_only.npz", "-o", out], "'y'"),
    }


@pytest.mark.parametrize("case", [
    "no models", "eps not a number", "eps empty item", "eps out of range", "output equals a model",
    "output equals the data", "bad symmetry", "table extension", "no workers", "no model exists",
    "plots is a file", "data without y"])
def test_bad_input_exits_2_with_one_line(case, models, tmp_path, capsys):
    np.savez(tmp_path / "x_only.npz", x=np.zeros((3, 64), np.float32))
    args, needle = _bad(tmp_path, models)[case]
    before = sorted(os.listdir(tmp_path))
    rc, so, err = cli(capsys, "sweep", *args)
    assert_one_line_error(rc, err, needle)
    assert sorted(os.listdir(tmp_path)) == before                       # nothing written


def test_parquet_without_pyarrow_is_a_clear_error(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)                    # import pyarrow -> ImportError
    rc, so, err = cli(capsys, "sweep", models["step_2"], "--eps", "0", "-o", tmp_path / "t.parquet")
    assert_one_line_error(rc, err, "pyarrow")
    assert not (tmp_path / "t.parquet").exists()


def test_api_checks():
    assert parse_eps_list("0, 0.05,0.1,0.05") == [0.0, 0.05, 0.1]
    with pytest.raises(InputError):
        run_sweep([], [("fibration", 0.0)])
    with pytest.raises(InputError):
        run_sweep([DIGITS], [("fibration", -0.1)])
    with pytest.raises(InputError):
        run_sweep([DIGITS], [("nonsense", 0.0)])
    with pytest.raises(InputError):
        run_sweep([DIGITS], [("fibration", 0.0)], linkage="single")


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    from fibgraph.importers.sweep import write_table

    df = pd.DataFrame([{"model": "m.onnx", "checkpoint": "m", "symmetry": "fibration", "eps": 0.0, "layer": "W1",
                        "nodes_before": 8, "nodes_after": 4, "params_before": 10, "params_after": 5,
                        "accuracy": None, "loss": None, "seconds": 0.1, "error": None}], columns=COLUMNS)
    write_table(df, tmp_path / "t.parquet")
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert list(back.columns) == COLUMNS and int(back["nodes_after"].iloc[0]) == 4
