"""``compare-methods --keep``: at each fraction, fibration's base found by
``--keep`` fixes the units per group and every baseline (random, L2, L1,
folding), with and without the repair, has exactly the same parameter count."""
import numpy as np
import onnx

from helpers import cli, mlp_onnx, read_json, run_onnx


def test_compare_methods_keep_equal_parameter_counts(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Ws = [rng.standard_normal((32, 12)), rng.standard_normal((24, 32)), rng.standard_normal((4, 24))]
    m = mlp_onnx(Ws, [np.zeros(32), np.zeros(24), np.zeros(4)])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    for name, seed in (("test", 1), ("cal", 2)):
        x = np.random.default_rng(seed).standard_normal((150, 12)).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", x=x, y=run_onnx(m, x)[0].argmax(1))
    rc, out, err = cli(capsys, "compare-methods", p, "--data", tmp_path / "test.npz", "--keep", "0.5,0.3",
                       "--calib", tmp_path / "cal.npz", "--json", tmp_path / "r.json")
    assert rc == 0, err
    res = read_json(tmp_path / "r.json")
    points = {}
    for r in res["rows"]:
        if r["method"] != "original":
            points.setdefault(r["point"], []).append(r)
    assert set(points) == {"keep=0.5", "keep=0.3"}              # no eps points unless asked
    for point, rows in points.items():
        methods = {r["method"] for r in rows}
        assert methods == {m + rep for m in ("fibration", "random", "l2", "l1", "fold") for rep in ("", "+repair")}
        assert len({r["params"] for r in rows}) == 1, (point, [(r["method"], r["params"]) for r in rows])
        assert len({tuple(r["nodes"]) for r in rows}) == 1
        F = float(point.split("=")[1])
        assert abs(rows[0]["params_kept"] - F) <= 0.02
        assert res["keep"][point]["mode"] == "data-aware"


def test_compare_methods_keep_data_free_and_bad_values(tmp_path, capsys):
    rng = np.random.default_rng(0)
    m = mlp_onnx([rng.standard_normal((20, 6)), rng.standard_normal((3, 20))], [np.zeros(20), np.zeros(3)])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    x = rng.standard_normal((60, 6)).astype(np.float32)
    np.savez(tmp_path / "t.npz", x=x, y=run_onnx(m, x)[0].argmax(1))
    rc, out, err = cli(capsys, "compare-methods", p, "--data", tmp_path / "t.npz", "--keep", "0.5",
                       "--json", tmp_path / "r.json")
    assert rc == 0, err
    res = read_json(tmp_path / "r.json")
    assert res["keep"]["keep=0.5"]["mode"] == "data-free"
    assert not any(r["method"].endswith("+repair") for r in res["rows"])
    rows = [r for r in res["rows"] if r["point"] == "keep=0.5"]
    assert len({r["params"] for r in rows}) == 1 and len(rows) == 5
    rc, out, err = cli(capsys, "compare-methods", p, "--data", tmp_path / "t.npz", "--keep", "0.5,1.5")
    assert rc == 2 and "--keep" in err and len(err.strip().splitlines()) == 1


def test_compare_methods_finetune_rows_keep_the_size(tmp_path, capsys):
    import pytest

    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    m = mlp_onnx([rng.standard_normal((20, 6)), rng.standard_normal((3, 20))], [np.zeros(20), np.zeros(3)])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    for name, seed in (("t", 1), ("c", 2)):
        x = np.random.default_rng(seed).standard_normal((100, 6)).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", x=x, y=run_onnx(m, x)[0].argmax(1))
    rc, out, err = cli(capsys, "compare-methods", p, "--data", tmp_path / "t.npz", "--keep", "0.5", "--methods", "l2",
                       "--calib", tmp_path / "c.npz", "--finetune-epochs", "1", "--json", tmp_path / "r.json")
    assert rc == 0, err
    rows = [r for r in read_json(tmp_path / "r.json")["rows"] if r["point"] == "keep=0.5"]
    assert {r["method"] for r in rows} == {"fibration", "l2", "fibration+repair", "l2+repair", "fibration+ft",
                                           "l2+ft", "fibration+repair+ft", "l2+repair+ft"}
    assert len({r["params"] for r in rows}) == 1
    rc, out, err = cli(capsys, "compare-methods", p, "--data", tmp_path / "t.npz", "--keep", "0.5",
                       "--finetune-epochs", "1")
    assert rc == 2 and "--calib" in err
