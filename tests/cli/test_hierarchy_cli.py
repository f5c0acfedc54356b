"""``fibgraph hierarchy MODEL.onnx`` and ``fibgraph compare A B --hierarchy`` on
planted models whose classes per layer are known.

A: x(4) -> h1(6) -> h2(4) -> y(3), fibers = opfibers planted (fibgraph.planted):
   h1 {0,1,2} {3} {4} {5}, h2 {0,1} {2} {3}: balanced both ways, so the strict
   covers are those classes too; no exact automorphism (generic weights): orbits
   are singletons.  Per layer: orbits 6/4/3, every other level 4/3/3.  (Classes
   of two on both sides of one weight would not do: a 2x2 block with equal row
   and column sums is symmetric, so swapping both pairs is an automorphism.)
B: same shapes, generic weights, h1 units 0 and 1 exact copies (same row, bias
   and outgoing column): an automorphism swaps them, so every level is 5 on h1,
   and 4 / 3 on h2 / y.
"""
import numpy as np
import pytest

from helpers import cli, mlp_onnx, read_json, save

from fibgraph.hierarchy import CHECKS, TOLERANCE_CHECKS
from fibgraph.planted import planted_mlp

LEVELS = ["orbits", "strict covers", "flavoured opfibers", "intersection covers", "fibers", "opfibers"]
A_COUNTS = [[6, 4, 4, 4, 4, 4], [4, 3, 3, 3, 3, 3], [3] * 6]
B_COUNTS = [[5] * 6, [4] * 6, [3] * 6]


def _model_a(path):
    P1, P2 = [0, 0, 0, 1, 2, 3], [0, 0, 1, 2]
    layers = planted_mlp(np.random.default_rng(3), [4, 6, 4, 3], fibers=[None, P1, P2, None],
                         opfibers=[None, P1, P2, None])
    return save(mlp_onnx([W for W, _ in layers], [b for _, b in layers]), path)


def _model_b(path):
    rng = np.random.default_rng(4)
    W1, b1 = rng.normal(0, 1, (6, 4)), rng.normal(0, 0.5, 6)
    W2, b2 = rng.normal(0, 1, (4, 6)), rng.normal(0, 0.5, 4)
    W3, b3 = rng.normal(0, 1, (3, 4)), rng.normal(0, 0.5, 3)
    W1[1], b1[1], W2[:, 1] = W1[0], b1[0], W2[:, 0]
    return save(mlp_onnx([W1, W2, W3], [b1, b2, b3]), path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hier")
    return _model_a(d / "a.onnx"), _model_b(d / "b.onnx")


def _counts(rep):
    return [[ly["counts"][lev] for lev in LEVELS] for ly in rep["layers"]]


def test_planted_counts_per_layer_and_inclusions(capsys, tmp_path, models):
    for path, want in zip(models, (A_COUNTS, B_COUNTS)):
        out = tmp_path / "h.json"
        rc, text, err = cli(capsys, "hierarchy", path, "--json", out)
        assert rc == 0, err
        rep = read_json(out)
        assert rep["levels"] == LEVELS
        assert [ly["name"] for ly in rep["layers"]] == ["W1", "W2", "W3"]
        assert _counts(rep) == want
        assert [tuple(c) for c in rep["checks"]] == list(CHECKS)
        assert rep["ok"] and all(ly["ok"] for ly in rep["layers"])
        assert all(c["ok"] is True for ly in rep["layers"] for c in ly["checks"])
        assert "VIOLATED" not in text and "hierarchy holds" in text
        # the table shows the layers and the counts side by side
        assert "W1" in text and "orbits" in text and "opfibers" in text


def test_forced_violation_exits_1(capsys, tmp_path, models, monkeypatch):
    import fibgraph.hierarchy as H

    real = H.levels

    def broken(*a, **k):
        labels, gsize, secs, notes = real(*a, **k)
        labels["strict covers"] = np.zeros_like(labels["strict covers"])    # coarser than the covers
        return labels, gsize, secs, notes

    monkeypatch.setattr(H, "levels", broken)
    out = tmp_path / "bad.json"
    rc, text, err = cli(capsys, "hierarchy", models[0], "--json", out)
    assert rc == 1, err
    assert "VIOLATED" in text and "hierarchy violated" in text
    rep = read_json(out)
    assert not rep["ok"] and not rep["layers"][0]["ok"]
    bad = {(c["fine"], c["coarse"]) for c in rep["layers"][0]["checks"] if c["ok"] is False}
    assert ("strict covers", "intersection covers") in bad


def test_tolerance_checks_only_what_holds(capsys, tmp_path, models):
    out = tmp_path / "t.json"
    rc, _, err = cli(capsys, "hierarchy", models[1], "--eps", "0.4", "--json", out)
    assert rc == 0, err
    rep = read_json(out)
    assert [tuple(c) for c in rep["checks"]] == list(TOLERANCE_CHECKS)
    assert rep["ok"]
    for ly in rep["layers"]:
        c = ly["counts"]
        assert c["strict covers"] >= c["intersection covers"] >= max(c["fibers"], c["opfibers"])
        assert c["flavoured opfibers"] >= c["fibers"]
    assert any("not checked" in n for n in rep["notes"])


def test_orbit_limit_is_a_note_not_a_failure(capsys, tmp_path, models):
    out = tmp_path / "o.json"
    rc, _, err = cli(capsys, "hierarchy", models[0], "--max-orbit-edges", "5", "--json", out)
    assert rc == 0, err
    rep = read_json(out)
    assert all(ly["counts"]["orbits"] is None for ly in rep["layers"])
    assert any("--max-orbit-edges" in n for n in rep["notes"])
    # the orbit check is "not checked", the others still hold
    assert all(c["ok"] is None for ly in rep["layers"] for c in ly["checks"] if c["fine"] == "orbits")
    assert _counts(rep)[0][1:] == A_COUNTS[0][1:]


def test_graph_files_still_work(capsys, tmp_path):
    g = tmp_path / "g.edgelist"
    g.write_text("0 1\n0 2\n1 3\n2 3\n")
    out = tmp_path / "g.json"
    rc, text, err = cli(capsys, "hierarchy", g, "--json", out)
    assert rc == 0, err
    assert read_json(out)["ok"] and "orbits" in text


def test_bad_input_exits_2(capsys, tmp_path):
    bad = tmp_path / "m.xyz"
    bad.write_text("x")
    rc, _, err = cli(capsys, "hierarchy", bad)
    assert rc == 2 and "unknown file type" in err


def test_compare_shows_both_hierarchies(capsys, tmp_path, models):
    out = tmp_path / "c.json"
    rc, text, err = cli(capsys, "compare", *models, "--hierarchy", "--json", out)
    assert rc == 0, err
    h = read_json(out)["hierarchy"]
    assert _counts(h["a"]) == A_COUNTS and _counts(h["b"]) == B_COUNTS
    # side by side, A/B per level: h1 orbits 6/5, strict 4/5
    row = next(ln for ln in text.splitlines() if "W1" in ln and "6/5" in ln)
    assert "4/5" in row
    assert "hierarchy holds in both models" in text
