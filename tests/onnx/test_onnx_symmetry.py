"""Fibration, opfibration, coverings on a hand-built MLP whose fibers and
opfibers are planted and known by hand.

x(3) -> h1(6) Relu -> h2(4) Relu -> y(3)
- fibers:   h1 {0,1} {3,4} (duplicated W1 rows); h2 {2,3} (balanced W2 rows)
- opfibers: h2 {0,1} (equal W3 columns); h1 {2,5} {3,4} (W2 columns balanced
  over the h2 opfibers)
- covering (intersection): h1 {3,4}; strict covering: nothing (out-balance of
  {3,4} over the h2 singletons fails since W2[0,3] != W2[0,4]).
"""
import numpy as np
import pytest

from helpers import cli, max_rel_diff, meet, mlp_onnx, read_json, refines, run_onnx, save

S = lambda n: [[i] for i in range(n)]  # noqa: E731

EXPECTED = {
    "fibration": [[[0, 1], [2], [3, 4], [5]], [[0], [1], [2, 3]], S(3)],
    "opfibration": [[[0], [1], [2, 5], [3, 4]], [[0, 1], [2], [3]], S(3)],
    "covering": [[[0], [1], [2], [3, 4], [5]], S(4), S(3)],
    "covering-strict": [S(6), S(4), S(3)],
    "opfibration-flavoured": [S(6), S(4), S(3)],   # out-balance inside the fibers
}


def _weights(rng):
    W1, b1 = rng.normal(0, 1, (6, 3)), rng.normal(0, 0.5, 6)
    W1[1], b1[1] = W1[0], b1[0]
    W1[4], b1[4] = W1[3], b1[3]
    W2, b2 = rng.normal(0, 1, (4, 6)), rng.normal(0, 0.5, 4)
    v = W2[2, 2]
    W2[2, 5] = W2[3, 2] = W2[3, 5] = v
    u = W2[2, 3]
    W2[2, 4] = W2[3, 3] = W2[3, 4] = u
    W2[3, 0] = W2[2, 0] + W2[2, 1] - W2[3, 1]
    W2[1, 5] = W2[0, 2] + W2[1, 2] - W2[0, 5]
    W2[1, 4] = W2[0, 3] + W2[1, 3] - W2[0, 4]
    b2[3] = b2[2]
    W3, b3 = rng.normal(0, 1, (3, 4)), rng.normal(0, 0.5, 3)
    W3[:, 1] = W3[:, 0]
    # sanity: the constraints are not trivial
    assert not np.isclose(W2[2, 0], W2[3, 0]) and not np.isclose(W2[0, 3], W2[0, 4])
    assert not np.allclose(W3[:, 2], W3[:, 3])
    return [W1, W2, W3], [b1, b2, b3]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    Ws, bs = _weights(np.random.default_rng(21))
    return save(mlp_onnx(Ws, bs, act="Relu"), tmp_path_factory.mktemp("sym") / "sym.onnx")


def _layers(capsys, tmp_path, path, symmetry):
    out = tmp_path / f"{symmetry}.json"
    rc, _, err = cli(capsys, "color", path, "--symmetry", symmetry, "--json", out)
    assert rc == 0, err
    rep = read_json(out)
    assert [ly["weight"] for ly in rep["layers"]] == ["W1", "W2", "W3"]
    return [ly["fibers"] for ly in rep["layers"]]


@pytest.mark.parametrize("symmetry", list(EXPECTED))
def test_known_partitions(capsys, tmp_path, model, symmetry):
    assert _layers(capsys, tmp_path, model, symmetry) == EXPECTED[symmetry]


def test_hierarchy(capsys, tmp_path, model):
    got = {s: _layers(capsys, tmp_path, model, s) for s in EXPECTED}
    for l in range(3):
        fib, op = got["fibration"][l], got["opfibration"][l]
        cov, strict = got["covering"][l], got["covering-strict"][l]
        assert cov == meet(fib, op)                   # the intersection definition
        assert refines(strict, cov)
        assert refines(cov, fib) and refines(cov, op)
        assert refines(got["opfibration-flavoured"][l], fib)
        assert refines(got["opfibration-flavoured"][l], op)
    # strict is strictly finer somewhere here (h1 {3,4})
    assert got["covering-strict"][0] != got["covering"][0]


def test_compress_opfibration_is_refused(capsys, tmp_path, model):
    out = tmp_path / "op.onnx"
    for sym in ("opfibration", "opfibration-flavoured"):
        rc, _, err = cli(capsys, "compress", model, "-o", out, "--symmetry", sym)
        assert rc == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()


def test_compress_opfibration_refused_in_api(tmp_path, model):
    from fibgraph.errors import InputError
    from fibgraph.importers.api import compress_model

    with pytest.raises(InputError):
        compress_model(model, str(tmp_path / "op.onnx"), symmetry="opfibration")
    assert not (tmp_path / "op.onnx").exists()


@pytest.mark.parametrize("symmetry,nodes", [("covering", [5, 4, 3]), ("covering-strict", [6, 4, 3]),
                                            ("fibration", [4, 3, 3])])
def test_compress_with_coverings_is_exact(capsys, tmp_path, model, symmetry, nodes):
    out, rep_path = tmp_path / "small.onnx", tmp_path / "rep.json"
    rc, _, err = cli(capsys, "compress", model, "-o", out, "--symmetry", symmetry, "--verify", "--report", rep_path)
    assert rc == 0, err
    rep = read_json(rep_path)
    assert [ly["nodes_after"] for ly in rep["layers"]] == nodes
    assert [ly["fibers"] for ly in rep["layers"]] == EXPECTED[symmetry]
    x = np.random.default_rng(0).normal(0, 2, (7, 3))
    assert max_rel_diff(run_onnx(model, x)[0], run_onnx(str(out), x)[0]) <= 1e-5
    assert rep["verify"]["max_abs_diff"] <= 1e-4
