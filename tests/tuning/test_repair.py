"""The repair after merging (importers/repair.py): the layer reading merged
units re-fitted by ridge least squares on calibration data; BatchNorm
statistics shifted.  An exact merge stays exact; an inexact one gets a
strictly smaller pre-activation error in the next layer."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import cli, finish, mlp_onnx, read_json, run_onnx

from fibgraph.importers.repair import output_map, repair_base
from fibgraph.importers.tuning import DagCompressor


def _planted_mlp(seed=0):
    rng = np.random.default_rng(seed)
    W1 = rng.standard_normal((40, 16))
    b1 = rng.standard_normal(40) * .1
    W1[20:], b1[20:] = W1[:20], b1[:20]                  # 20 exact fibers of 2
    W1[:20] += 0.05 * rng.standard_normal((20, 16)) * (np.arange(20) % 2)[:, None]   # half of them inexact
    Ws = [W1, rng.standard_normal((30, 40)) / 6, rng.standard_normal((5, 30)) / 5]
    return Ws, [b1, rng.standard_normal(30) * .1, np.zeros(5)]


def _exact_mlp(seed=0):
    rng = np.random.default_rng(seed)
    W1 = rng.standard_normal((40, 16))
    b1 = rng.standard_normal(40) * .1
    W1[20:], b1[20:] = W1[:20], b1[:20]
    return [W1, rng.standard_normal((30, 40)) / 6, rng.standard_normal((5, 30)) / 5], \
        [b1, rng.standard_normal(30) * .1, np.zeros(5)]


def _repair(m, table, x):
    mc = DagCompressor(m)
    m2, base, col = mc.compressed(table)
    fixed, rows = repair_base(m, m2, {"x": x}, out_map=output_map(mc.imp, base[1], base[2], col.scales))
    return m2, fixed, rows


def _tensor(model, name, x):
    from fibgraph.importers.repair import intermediates

    return intermediates(model, [name], {"x": x})[name]


@pytest.mark.parametrize("form", ["gemm", "matmul", "gemm_ab"])
def test_exact_merge_stays_exact(form):
    m = mlp_onnx(*_exact_mlp(), form=form)
    x = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    m2, fixed, rows = _repair(m, {}, x)
    assert [r["inputs_after"] for r in rows if "inputs_after" in r] == [20]     # the consumer was re-fitted
    xt = np.random.default_rng(2).standard_normal((100, 16)).astype(np.float32)
    y0, y2, yf = run_onnx(m, xt)[0], run_onnx(m2, xt)[0], run_onnx(fixed, xt)[0]
    scale = np.abs(y0).max()
    assert np.abs(yf - y2).max() <= 1e-5 * scale
    assert np.abs(yf - y0).max() <= 1e-5 * scale


@pytest.mark.parametrize("form", ["gemm", "matmul"])
def test_inexact_merge_repair_lowers_the_next_pre_activation_error(form):
    m = mlp_onnx(*_planted_mlp(), form=form)
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    m2, fixed, rows = _repair(m, {"W1": 0.3}, x)
    r = next(r for r in rows if "error_after" in r)
    assert r["inputs_after"] < r["inputs_before"] == 40
    assert r["error_after"] < r["error_before"]
    # measured independently: the second layer's pre-activation (before its bias)
    name = "z2" if form == "gemm" else "mm2"
    z0, zb, zf = (_tensor(mm, name, x) for mm in (m, m2, fixed))
    assert np.sum((zf - z0) ** 2) < np.sum((zb - z0) ** 2)
    assert np.sum((zf - z0) ** 2) == pytest.approx(r["error_after"], rel=1e-3)


def test_consumer_whose_own_units_merge_targets_its_fibers_mean():
    m = mlp_onnx(*_planted_mlp(3), form="gemm")
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    m2, fixed, rows = _repair(m, {"W1": 0.3, "W2": 1.0}, x)
    done = {r["node"]: r for r in rows if "error_after" in r}
    assert "gemm2" in done and done["gemm2"]["error_after"] < done["gemm2"]["error_before"]
    xt = np.random.default_rng(5).standard_normal((300, 16)).astype(np.float32)
    e = [np.mean((run_onnx(mm, xt)[0] - run_onnx(m, xt)[0]) ** 2) for mm in (m2, fixed)]
    assert e[1] < e[0]                                  # held-out output error too


def _conv_model(seed=0, bn=True, exact=True):
    """conv1 (4 channels, 1 and 3 equal) -> relu -> conv2 (3) [-> BN] -> relu -> global pool -> gemm."""
    rng = np.random.default_rng(seed)
    W1 = rng.normal(0, .5, (4, 2, 3, 3))
    b1 = rng.normal(0, .3, 4)
    W1[3], b1[3] = W1[1], b1[1]
    if not exact:
        W1[3] += 0.05 * rng.normal(0, .5, (2, 3, 3))
    W2, b2 = rng.normal(0, .5, (3, 4, 3, 3)), rng.normal(0, .3, 3)
    W3, b3 = rng.normal(0, .5, (2, 3)), np.zeros(2)

    def init(n, a):
        return numpy_helper.from_array(np.asarray(a, np.float32), n)
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [init("W1", W1), init("b1", b1), init("W2", W2), init("b2", b2), init("W3", W3), init("b3", b3)]
    cur = "c2"
    if bn:
        nodes.append(helper.make_node("BatchNormalization", ["c2", "g", "be", "mu", "var"], ["n2"], name="bn2"))
        inits += [init("g", rng.random(3) + .5), init("be", rng.normal(0, .2, 3)), init("mu", rng.normal(0, .2, 3)),
                  init("var", rng.random(3) + .5)]
        cur = "n2"
    nodes += [helper.make_node("Relu", [cur], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "W3", "b3"], ["y"], name="fc", transB=1)]
    vi = helper.make_tensor_value_info
    return finish(helper.make_graph(nodes, "conv", [vi("x", onnx.TensorProto.FLOAT, ["N", 2, 6, 6])],
                                    [vi("y", onnx.TensorProto.FLOAT, ["N", 2])], inits))


def test_conv_consumer_exact_stays_exact_and_inexact_improves():
    x = np.random.default_rng(1).standard_normal((64, 2, 6, 6)).astype(np.float32)
    m = _conv_model(bn=False)
    m2, fixed, rows = _repair(m, {}, x)
    r = next(r for r in rows if "error_after" in r)
    assert r["op"] == "Conv" and r["inputs_after"] == 3 * 9
    y0, yf = run_onnx(m, x)[0], run_onnx(fixed, x)[0]
    assert np.abs(yf - y0).max() <= 1e-5 * np.abs(y0).max()
    m = _conv_model(bn=False, exact=False)
    m2, fixed, rows = _repair(m, {"W1": 0.3}, x)
    r = next(r for r in rows if "error_after" in r)
    assert r["error_after"] < r["error_before"]
    z0, zb, zf = (_tensor(mm, "c2", x) for mm in (m, m2, fixed))
    assert np.sum((zf - z0) ** 2) < np.sum((zb - z0) ** 2)


def test_batchnorm_statistics_follow_the_merge():
    x = np.random.default_rng(1).standard_normal((64, 2, 6, 6)).astype(np.float32)
    m = _conv_model(bn=True, exact=False)
    mc = DagCompressor(m)
    m2, base, col = mc.compressed({"W1": 0.3})
    # the conv repair off, so the BatchNorm sees the merged conv's shifted input
    from fibgraph.importers import repair as rp

    fixed = rp.copy.deepcopy(m2)
    rows = rp._repair_batchnorm(m, fixed, {"x": x})
    assert [r["node"] for r in rows] == ["bn2"]
    n0, nb, nf = (_tensor(mm, "n2", x) for mm in (m, m2, fixed))
    ax = (0, 2, 3)
    assert np.abs(nf.mean(ax) - n0.mean(ax)).sum() < np.abs(nb.mean(ax) - n0.mean(ax)).sum()
    # exact merge: the statistics stay as they are
    m = _conv_model(bn=True, exact=True)
    m2, fixed, rows = _repair(m, {}, x)
    assert not any(r.get("batchnorm") for r in rows)
    y0, yf = run_onnx(m, x)[0], run_onnx(fixed, x)[0]
    assert np.abs(yf - y0).max() <= 1e-5 * np.abs(y0).max()


def test_cli_repair_is_on_with_data_and_off_without(tmp_path, capsys):
    m = mlp_onnx(*_planted_mlp(), form="gemm")
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    rng = np.random.default_rng(0)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((200, 16)).astype(np.float32), y=rng.integers(0, 5, 200))
    rc, out, err = cli(capsys, "compress", p, "-o", tmp_path / "a.onnx", "--eps", "0.3", "--data", cal,
                       "--report", tmp_path / "a.json")
    assert rc == 0, err
    assert "repair gemm2" in out
    rep = read_json(tmp_path / "a.json")
    assert rep["repair"]["layers"][0]["error_after"] < rep["repair"]["layers"][0]["error_before"]
    rc, out, err = cli(capsys, "compress", p, "-o", tmp_path / "b.onnx", "--eps", "0.3", "--data", cal,
                       "--no-repair", "--report", tmp_path / "b.json")
    assert rc == 0, err
    assert "repair" not in read_json(tmp_path / "b.json")
    rc, out, err = cli(capsys, "compress", p, "-o", tmp_path / "c.onnx", "--eps", "0.3", "--repair")
    assert rc == 2 and "--data" in err


def test_repair_on_data_that_does_not_fit_is_one_line(tmp_path, capsys):
    from helpers import assert_one_line_error

    m = mlp_onnx(*_planted_mlp(), form="gemm")
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 7), np.float32), y=np.zeros(5, np.int64))
    rc, out, err = cli(capsys, "compress", p, "-o", tmp_path / "s.onnx", "--eps", "0.3", "--data",
                       tmp_path / "bad.npz")
    assert_one_line_error(rc, err)
    assert not (tmp_path / "s.onnx").exists()
