"""``--metric activation``: rows weighted by the inputs' RMS activation on
calibration data.  Exact fibers stay exactly what they are; a column that reads
a unit silent on the data no longer keeps two units apart."""
import numpy as np
import onnx

from helpers import assert_one_line_error, cli, mlp_onnx, read_json, run_onnx


def _model(dead=True):
    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((12, 8))
    b1 = rng.standard_normal(12) * .1
    W1[6:], b1[6:] = W1[:6], b1[:6]                      # 6 exact fibers of 2 in layer 1
    if dead:
        W1[11], b1[11] = 0.0, -100.0                      # unit 11 never fires (and 5 loses its twin)
    W2 = rng.standard_normal((10, 12))
    W2[5] = W2[4]
    W2[5, 11] += 3.0                                      # rows 4 and 5 differ only where unit 11 is read
    W3 = rng.standard_normal((3, 10))
    return mlp_onnx([W1, W2, W3], [b1, np.zeros(10), np.zeros(3)])


def _cal(tmp_path, m):
    x = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x, y=run_onnx(m, x)[0].argmax(1))
    return tmp_path / "cal.npz", x


def test_exact_fibers_stay_exact(tmp_path):
    from fibgraph.importers.api import color_model

    m = _model(dead=False)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    cal, _ = _cal(tmp_path, m)
    r0, _, c0 = color_model(str(p), eps=0.0)
    r1, _, c1 = color_model(str(p), eps=0.0, metric="activation", data=str(cal))
    assert np.array_equal(c0.labels, c1.labels)
    assert [ly["fibers"] for ly in r0["layers"]] == [ly["fibers"] for ly in r1["layers"]]
    # and at a tiny eps with data the planted fibers are still found, nothing else merges
    r2, _, _ = color_model(str(p), eps=1e-6, metric="activation", data=str(cal))
    assert r2["layers"][0]["fibers"] == r0["layers"][0]["fibers"]


def test_a_silent_input_no_longer_separates_two_units(tmp_path):
    from fibgraph.importers.api import color_model, compress_model

    m = _model(dead=True)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    cal, x = _cal(tmp_path, m)
    w, _, _ = color_model(str(p), eps=0.02, metric="euclidean")
    a, _, _ = color_model(str(p), eps=0.02, metric="activation", data=str(cal))
    def together(rep):
        return any(4 in f and 5 in f for f in rep["layers"][1]["fibers"])
    assert not together(w)             # by weights alone rows 4 and 5 are far apart
    assert together(a)                 # on the data they compute the same pre-activation
    # eps on W2 only (the other layers exact): the merge of 4 and 5 is exact on the data
    import json

    (tmp_path / "eps.json").write_text(json.dumps({"W2": 0.02}))
    out = tmp_path / "s.onnx"
    rep = compress_model(str(p), str(out), eps_file=str(tmp_path / "eps.json"), metric="activation",
                         data=str(cal), repair=False)
    assert rep["metric"].startswith("activation")
    assert together(rep) and rep["layers"][1]["nodes_after"] < 10
    y0, y1 = run_onnx(m, x)[0], run_onnx(onnx.load(out), x)[0]
    assert np.abs(y1 - y0).max() <= 1e-4 * np.abs(y0).max()   # exact on the data: unit 11 never fires


def test_activation_metric_needs_data(tmp_path, capsys):
    p = tmp_path / "m.onnx"
    onnx.save(_model(), p)
    rc, out, err = cli(capsys, "compress", p, "-o", tmp_path / "s.onnx", "--eps", "0.1", "--metric", "activation")
    assert_one_line_error(rc, err, "--data")
    cal, _ = _cal(tmp_path, _model())
    rc, out, err = cli(capsys, "compress", p, "-o", tmp_path / "s.onnx", "--keep", "0.5", "--metric", "activation",
                       "--data", cal, "--report", tmp_path / "r.json")
    assert rc == 0, err
    r = read_json(tmp_path / "r.json")
    assert abs(r["keep"]["kept"] - 0.5) <= 0.02 or not r["keep"]["landed"]
