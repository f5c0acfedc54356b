"""eps > 0 on LSTM/GRU ops: the node sets of one recurrent unit (its gates,
cell and hidden node, tied position by position) are clustered JOINTLY, one
clustering of the units on the concatenation of the sets' rows (each set's
rows prepared for the metric, then over sqrt(sets): the distance is the root
mean square of the per-set distances), so the quasi-fibration partition is one
and the same in every tied set and the base keeps exactly that partition.

* Planted LSTM and GRU (tests/planted_nets.py, hidden fibers 3,2,1) with
  multiplicative noise 1e-3 on every gate row of W and R and 1e-2 on one
  gate's rows: at eps 0.012 (complete and average linkage) the planted hidden
  fibers are recovered exactly, in W and R and in every tied node set; the
  base verifies within 5e-2 of the original's outputs and is smaller.  Without
  the ties (each set clustered alone, the base keeping the meet, what the
  engine did before) the same eps does not recover them.
* The engine: ties are ignored by the exact criterion (eps = 0 labels are
  identical with and without them); one-set "ties" equal plain clustering;
  ``joint_rows`` + ``prepared=True`` on one block equals ``threshold_clusters``;
  a tie with two nodes of one node set in a level is refused.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import planted_nets as pn  # noqa: E402
from fibgraph.engine.cluster import joint_rows, threshold_clusters  # noqa: E402
from fibgraph.graph import Block, WeightedDigraph  # noqa: E402
from fibgraph.partition import canonical, classes  # noqa: E402
from fibgraph.engine import Exact, Tolerance, refine  # noqa: E402
from helpers import run_onnx  # noqa: E402
from fibgraph.importers.api import compress_model  # noqa: E402
from fibgraph.importers.dag_api import colour_dag  # noqa: E402
from fibgraph.importers.onnx.importer import import_dag  # noqa: E402
from fibgraph.importers.onnx.records import Kind  # noqa: E402
from fibgraph.importers.onnx.write import write_dag_base  # noqa: E402

EPS = 0.012
VERIFY_TOL = 5e-2


def _as_set(fibers):
    return {frozenset(int(u) for u in cl) for cl in fibers}


def _noisy(kind, d):
    """Planted model; gate rows of W and R times (1 + r * N(0, 1)), r = 1e-3,
    and r = 1e-2 on torch gate block 1 (LSTM f, GRU z)."""
    model, info = (pn.planted_lstm if kind == "LSTM" else pn.planted_gru)(0)
    H, G = info["hidden_size"], (4 if kind == "LSTM" else 3)
    g = torch.Generator().manual_seed(1)
    r = torch.full((G * H, 1), 1e-3)
    r[H:2 * H] = 1e-2
    with torch.no_grad():
        for n in ("weight_ih_l0", "weight_hh_l0"):
            w = getattr(model.rnn, n)
            w.mul_(1 + r * torch.randn(w.shape, generator=g))
    path = pn.export_one(model, pn.example_input(info, batch=3), d / f"{kind.lower()}_noisy.onnx", dynamo=False)
    return model, info, path


@pytest.fixture(scope="module", params=["LSTM", "GRU"])
def noisy(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("joint_" + request.param.lower())
    model, info, path = _noisy(request.param, d)
    return request.param, model, info, path, d, import_dag(path)


def _rec(imp):
    (rec,) = [r for r in imp.records if r.kind is Kind.RECURRENT]
    return rec


@pytest.mark.parametrize("linkage", ["complete", "average"])
def test_joint_eps_recovers_planted_fibers(noisy, linkage):
    kind, model, info, path, d, _ = noisy
    hidden = _as_set(info["fibers"]["rnn.hidden"])
    out = d / f"eps_{linkage}.onnx"
    r = compress_model(path, out, eps=EPS, linkage=linkage, verify=True)
    rnn = [ly for ly in r["layers"] if ly["op"] == kind]
    assert len(rnn) == 2
    for ly in rnn:                                    # W and R
        assert _as_set(ly["fibers"]) == hidden, (ly["weight"], ly["fibers"])
        assert ly["nodes_after"] == len(hidden)
        assert ly["criterion"]["eps"] == EPS
        assert len(ly["criterion"]["joint"]) >= 5          # gates + hidden (+ cell or reset product)
    assert r["params_after"] < r["params_before"]
    assert r["verify"]["max_abs_diff"] <= VERIFY_TOL, r["verify"]
    x = pn.example_input(info, batch=5, seed=23)
    with torch.no_grad():
        y = model(x).numpy()
    y2 = run_onnx(str(out), x.numpy())[0]
    assert y2.shape == y.shape
    assert np.max(np.abs(y2 - y)) <= VERIFY_TOL


def test_every_tied_set_has_the_same_partition(noisy):
    kind, _, info, _, _, imp = noisy
    sets = [s for s in _rec(imp).spaces if imp.spaces[s].kind != "const"]   # gates, cell, hidden, factors
    col = colour_dag(imp, "fibration", eps=EPS, linkage="complete")
    hidden = _as_set(info["fibers"]["rnn.hidden"])
    for s in sets:
        assert _as_set(classes(canonical(col.labels[imp.spaces[s].ids]))) == hidden, imp.spaces[s].name
    tied = imp.graph.tie[np.concatenate([imp.spaces[s].ids for s in sets])]
    assert (tied >= 0).all()
    (entry,) = [v for v in col.info.values() if isinstance(v, dict) and "joint" in v]
    assert entry["joint"]["items"] > 0 and len(entry["joint"]["node_sets"]) == len(sets)


def test_without_ties_the_same_eps_does_not_recover(noisy):
    """What the engine did before: each node set clustered alone, the base keeps the meet."""
    kind, _, info, _, _, imp = noisy
    hid = imp.spaces[_rec(imp).hidden[0]].ids
    hidden = _as_set(info["fibers"]["rnn.hidden"])
    tie = imp.graph.tie
    try:
        imp.graph.tie = None
        col = colour_dag(imp, "fibration", eps=EPS, linkage="complete")
        gid = write_dag_base(imp, col.labels)[1]
    finally:
        imp.graph.tie = tie
    assert len(_as_set(classes(canonical(gid[hid])))) > len(hidden)


def test_exact_ignores_ties(noisy):
    _, _, _, _, _, imp = noisy
    with_tie = colour_dag(imp, "fibration", eps=0.0).labels
    tie = imp.graph.tie
    try:
        imp.graph.tie = None
        without = colour_dag(imp, "fibration", eps=0.0).labels
    finally:
        imp.graph.tie = tie
    assert np.array_equal(with_tie, without)


def test_an_lstm_level_splits_alike_in_parts_and_as_one_matrix(noisy, monkeypatch):
    """The gate rows held as parts (fibgraph/engine/rowparts.py; float32 rows)
    and as one zero-filled matrix (float64): the same labels at EPS."""
    from fibgraph.engine import cluster, rowparts, signatures

    kind, _, _, _, _, imp = noisy
    made = []
    real = signatures.signature_matrix

    def spy(*a):
        X, exact = real(*a)
        made.append(type(X).__name__)
        return X, exact

    monkeypatch.setattr("fibgraph.engine.tolerance.signature_matrix", spy)
    monkeypatch.setattr(signatures, "F32_ROWS_MIN", 1 << 40)
    whole = colour_dag(imp, "fibration", eps=EPS, linkage="complete").labels
    assert "RowParts" not in made
    for mod in (signatures, rowparts, cluster):
        monkeypatch.setattr(mod, "F32_ROWS_MIN", 1)
    made.clear()
    parts = colour_dag(imp, "fibration", eps=EPS, linkage="complete").labels
    assert "RowParts" in made
    np.testing.assert_array_equal(parts, whole)


# ------------------------------------------------------------- the engine
def _two_set_graph(rng, noise):
    """Inputs 0..3; set A (nodes 4..9) and set B (10..15) in one level, A_j and
    B_j tied; planted classes {0,1,2}, {3,4}, {5} of the 6 columns."""
    plant = np.array([0, 0, 0, 1, 1, 2])
    WA = rng.normal(size=(3, 4))[plant] * (1 + noise * rng.normal(size=(6, 4)))
    WB = 0.05 * rng.normal(size=(3, 4))[plant] * (1 + 10 * noise * rng.normal(size=(6, 4)))
    inp = np.arange(4)
    A, B = np.arange(4, 10), np.arange(10, 16)
    blocks = [Block(src=inp, dst=A, weight=WA), Block(src=inp, dst=B, weight=WB)]
    layer = np.r_[np.zeros(4), np.ones(6), 2 * np.ones(6)].astype(np.int64)
    initial = np.r_[np.arange(4), 4 * np.ones(6), 5 * np.ones(6)].astype(np.int64)
    g = WeightedDigraph(n=16, blocks=blocks, levels=[inp, np.r_[A, B]], initial=initial, layer=layer,
                        layer_names=["in", "A", "B"])
    tie = np.r_[-np.ones(4), np.arange(6), np.arange(6)].astype(np.int64)
    return g, tie, plant, A, B


def test_engine_joint_level():
    g, tie, plant, A, B = _two_set_graph(np.random.default_rng(0), 1e-3)
    want = _as_set(classes(plant))
    crit = Tolerance(0.01, "complete", "euclidean")
    r = refine(g, "in", crit, tie=tie)
    assert _as_set(classes(canonical(r.labels[A]))) == want
    assert _as_set(classes(canonical(r.labels[B]))) == want
    assert not set(r.labels[A]) & set(r.labels[B])            # node sets never share a colour
    plain = refine(g, "in", crit)                               # B alone is noisier: the meet splits
    assert len(classes(canonical(plain.labels[B]))) > len(want)
    e1, e2 = refine(g, "in", Exact(), tie=tie), refine(g, "in", Exact())
    assert np.array_equal(e1.labels, e2.labels)


def test_engine_one_set_tie_is_plain():
    g, _, _, A, B = _two_set_graph(np.random.default_rng(1), 1e-2)
    crit = Tolerance(0.05, "average", "euclidean")
    own = np.r_[-np.ones(4), np.arange(12)].astype(np.int64)     # every node its own column
    assert np.array_equal(refine(g, "in", crit, tie=own).labels, refine(g, "in", crit).labels)


def test_joint_rows_one_block_is_plain():
    X = np.random.default_rng(2).normal(size=(30, 5))
    X[10:20] = X[0] * (1 + 1e-3 * np.random.default_rng(3).normal(size=(10, 5)))
    for metric in ("euclidean", "cosine"):
        for link in ("complete", "average"):
            a = threshold_clusters(X, 0.05, link, metric)
            b = threshold_clusters(joint_rows([X], metric), 0.05, link, metric, prepared=True)
            assert np.array_equal(a, b), (metric, link)


def test_tie_with_two_nodes_of_one_set_is_refused():
    g, tie, _, _, _ = _two_set_graph(np.random.default_rng(4), 1e-3)
    bad = tie.copy()
    bad[5] = bad[4]                                             # A_0 and A_1 in one column
    with pytest.raises(ValueError, match="two nodes of one node set"):
        refine(g, "in", Tolerance(0.01, "complete", "euclidean"), tie=bad)
