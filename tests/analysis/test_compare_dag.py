"""``compare-methods`` on the hypergraph path (importers/compare_dag.py) and the
writer's prune mode (``write_dag_base(mode="prune")``).

* The CLI on a small Transformer trained a few steps on digits (8 rows of 8
  pixels): table rows, every baseline's node counts equal the fibration's
  (also read back from the written ONNX weights), the plot.
* Prune mode: keeping every unit is the original function; pruning a planted
  dead unit (zero output weights, small input weights: L2 and L1 drop it) of a
  residual MLP, an LSTM and a Transformer's feed-forward block and head dims
  leaves the function unchanged; pruning a live unit does not.
* Folding with k = the number of exact fibers on models with planted fibers
  (residual MLP, LSTM, Transformer) finds the fibers and equals the
  fibration base.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

import planted_nets as pn  # noqa: E402
from helpers import ROOT, assert_one_line_error, cli, read_json, run_onnx  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "examples"))
from seq_models import TfNet  # noqa: E402

from fibgraph.baselines import METHODS  # noqa: E402
from fibgraph.partition import canonical  # noqa: E402
from fibgraph.importers.compare_dag import DagMethods  # noqa: E402
from fibgraph.importers.dag_api import colour_dag  # noqa: E402
from fibgraph.importers.onnx.importer import import_dag  # noqa: E402
from fibgraph.importers.onnx.records import Kind  # noqa: E402
from fibgraph.importers.onnx.write import write_dag_base  # noqa: E402

TOL = 1e-5


def _export(model, example, path):
    return pn.export_one(model, example, str(path), dynamo=False)


def _run(model, x):
    return run_onnx(model, x)[0]


def _x(info, n=16, seed=1):
    return pn.example_input(info, batch=n, seed=seed).numpy()


@pytest.fixture(scope="module")
def digits_tf(tmp_path_factory):
    """TfNet(d 8, ff 12, 1 layer, 2 heads) trained 80 steps on digits; test npz."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32).reshape(-1, 8, 8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    tr, te = perm[:1400], perm[1400:1600]
    torch.manual_seed(0)
    m = TfNet(d=8, ff=12, layers=1, heads=2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    Xt, Yt = torch.tensor(X[tr]), torch.tensor(y[tr])
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(tr), (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(m(Xt[idx]), Yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    tmp = tmp_path_factory.mktemp("cmpdag")
    path = _export(m, torch.zeros(2, 8, 8), tmp / "tf.onnx")
    data = tmp / "test.npz"
    np.savez(data, x=X[te], y=y[te])
    return path, str(data), tmp


def _base_shapes(model):
    """{original weight name: shape} of the weights the writer rewrote."""
    return {t.name.split("__base")[0]: tuple(t.dims) for t in model.graph.initializer if "__base" in t.name}


# ------------------------------------------------------------------ the CLI
def test_cli_compare_methods_on_a_transformer(digits_tf, capsys):
    path, data, tmp = digits_tf
    png, js = tmp / "cmp.png", tmp / "cmp.json"
    rc, out, err = cli(capsys, "compare-methods", path, "--data", data, "--eps", "0.5,0.8,0.9",
                       "-o", png, "--json", js)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    res = read_json(js)
    assert res["graph"] == "hypergraph" and res["metric"] == "euclidean" and res["rescale"] is False
    rows = res["rows"]
    assert rows[0]["method"] == "original" and rows[0]["params_kept"] == 1.0
    assert rows[0]["nodes"] == [8, 24, 8, 12, 8, 10] and len(res["layers"]) == 6
    points = [r["point"] for r in rows if r["method"] == "fibration"]
    assert points == ["eps=0.5", "eps=0.8", "eps=0.9"]
    shrunk = 0
    for point in points:
        pr = [r for r in rows if r["point"] == point]
        assert [r["method"] for r in pr] == ["fibration", *METHODS]
        assert len({tuple(r["nodes"]) for r in pr}) == 1           # equal node counts per weight
        assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["loss"]) for r in pr)
        # pruned models carry no multiplicity constants: at most the merged ones' parameters
        fib, fold = pr[0], pr[-1]
        assert fold["params"] == fib["params"]
        assert all(r["params"] <= fib["params"] for r in pr)
        shrunk += fib["params_kept"] < 0.9
        assert fib["nodes"][-1] == 10                              # the output layer keeps its units
    assert shrunk >= 1
    assert "L2-norm pruning" in out and "folding" in out and "hypergraph" in out


def test_baselines_write_the_fibration_shapes(digits_tf):
    """Node counts read back from the written ONNX weights, per method."""
    path, _, _ = digits_tf
    imp = import_dag(path)
    dm = DagMethods(imp)
    col = colour_dag(imp, "fibration", 0.9)
    m_fib, _, kept, _ = write_dag_base(imp, col.labels)
    counts = dm.class_counts(kept)
    assert (counts < dm.cls_size).any()
    want = _base_shapes(m_fib)
    assert want
    x = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    for meth in METHODS:
        m2, k2 = dm.write(meth, counts, seed=3)
        assert dm.entry_counts(k2) == dm.entry_counts(kept), meth
        got = _base_shapes(m2)
        # LayerNorm: rewritten with multiplicities when merged, kept as one op when pruned
        common = set(got) & set(want)
        assert {w for w, ids in dm.entries if kept[ids].sum() < ids.size} <= common
        assert {k: got[k] for k in common} == {k: want[k] for k in common}, meth
        onnx.checker.check_model(m2)
        assert np.isfinite(_run(m2, x)).all()


def test_cli_compare_methods_dag_eps_file_and_bad_input(digits_tf, capsys, tmp_path):
    path, data, _ = digits_tf
    eps = tmp_path / "eps.json"
    eps.write_text('{"layers.0.linear1.weight": 0.9}')
    js = tmp_path / "r.json"
    rc, out, err = cli(capsys, "compare-methods", path, "--data", data, "--eps", "0",
                       "--eps-file", eps, "--methods", "l1,fold", "--json", js)
    assert rc == 0, err
    rows = read_json(js)["rows"]
    pr = [r for r in rows if r["point"] == "eps-file eps.json"]
    assert [r["method"] for r in pr] == ["fibration", "l1", "fold"]
    # only linear1 was given an eps: its units shrink, the other weights keep theirs
    assert pr[0]["nodes"][3] < 12 and pr[0]["nodes"][:3] == [8, 24, 8]
    assert len({tuple(r["nodes"]) for r in pr}) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"no.such.weight": 0.1}')
    rc, out, err = cli(capsys, "compare-methods", path, "--data", data, "--eps", "0", "--eps-file", bad)
    assert_one_line_error(rc, err, "no.such.weight")
    nolab = tmp_path / "nolab.npz"
    np.savez(nolab, x=np.zeros((3, 8, 8), np.float32))
    rc, out, err = cli(capsys, "compare-methods", path, "--data", nolab, "--eps", "0")
    assert_one_line_error(rc, err, "'y'")


# ----------------------------------------------------------------- prune mode
def _prune_dead(path, x, dead_space_weight, dead_index, methods=("l2", "l1")):
    """Prune one column (the class of unit ``dead_index`` of the node set of the
    weight ``dead_space_weight``) by one; returns {method: max diff}, the
    columns dropped per method and the original output."""
    imp = import_dag(path)
    dm = DagMethods(imp)
    y0 = _run(imp.model, x)
    # k = everything: the original function
    for meth in METHODS:
        m2, k2 = dm.write(meth, dm.cls_size, seed=0)
        assert k2.all()
        assert np.max(np.abs(_run(m2, x) - y0)) < TOL
    m2, _, k2, _ = write_dag_base(imp, np.arange(imp.graph.n), mode="prune")
    assert k2.all() and np.max(np.abs(_run(m2, x) - y0)) < TOL
    sp = next(s for s in imp.spaces if s.weight == dead_space_weight)
    dead_col = dm.col[sp.start + dead_index]
    u = dm.cls[dead_col]
    counts = dm.cls_size.copy()
    counts[u] -= 1
    out = {}
    for meth in methods:
        m2, k2 = dm.write(meth, counts, seed=0)
        dropped = set(np.flatnonzero(~dm.kept_columns(k2)).tolist())
        assert dropped == {int(dead_col)}, meth
        out[meth] = float(np.max(np.abs(_run(m2, x) - y0)))
    # a live unit instead: the function changes
    group, pref = dm.partition("l2", counts)
    live = dm.members[u][dm.members[u] != dead_col][0]
    pref[:] = 0
    pref[dm.members[u]] = 1.0
    pref[live] = 0.0
    group[dm.members[u]] = dm.members[u]
    group[live] = dm.members[u][dm.members[u] != live][0]
    m2, _, k2, _ = write_dag_base(imp, group[dm.col], mode="prune", keep_pref=pref[dm.col])
    assert not dm.kept_columns(k2)[live] and dm.kept_columns(k2)[dead_col]
    out["live"] = float(np.max(np.abs(_run(m2, x) - y0)))
    return out


def _small(t, rows):
    with torch.no_grad():
        t[rows] *= 0.01


def test_prune_dead_unit_residual_mlp(tmp_path):
    torch.manual_seed(0)
    m = pn.ResidualMLP(6, 8, 3)
    j = 5
    with torch.no_grad():
        m.out.weight[:, j] = 0.0              # the stream unit j is read by nobody
        m.res.weight[:, j] = 0.0
        for lin in (m.fc1, m.res):
            lin.weight[j] *= 0.01
            lin.bias[j] *= 0.01
    info = {"n_in": 6}
    path = _export(m, torch.zeros(2, 6), tmp_path / "res.onnx")
    d = _prune_dead(path, _x(info), "fc1.weight", j)
    assert d["l2"] < TOL and d["l1"] < TOL
    assert d["live"] > 1e-3


def test_prune_dead_unit_lstm(tmp_path):
    torch.manual_seed(0)
    m = pn.RNNNet("LSTM", 5, 6, 4)
    H, j = 6, 2
    rows = [g * H + j for g in range(4)]
    with torch.no_grad():
        m.rnn.weight_hh_l0[:, j] = 0.0        # no gate reads h_j
        m.fc.weight[:, j] = 0.0
        m.rnn.weight_ih_l0[rows] *= 0.01
        m.rnn.weight_hh_l0[rows] *= 0.01
    info = {"n_in": 5, "seq": 5}
    path = _export(m, torch.zeros(2, 5, 5), tmp_path / "lstm.onnx")
    imp = import_dag(path)
    W = next(r.W for r in imp.records if r.kind is Kind.RECURRENT)
    d = _prune_dead(path, _x(info), W, j)
    assert d["l2"] < TOL and d["l1"] < TOL
    assert d["live"] > 1e-3


def test_prune_dead_units_transformer(tmp_path):
    """A dead feed-forward unit, and a dead head dim in every head (q rows and
    q bias zero: its q*k products vanish), pruned with the original scale."""
    torch.manual_seed(0)
    m = TfNet(d=8, ff=12, layers=1, heads=2).eval()
    ly = m.layers[0]
    j = 7
    with torch.no_grad():
        ly.linear2.weight[:, j] = 0.0
        ly.linear1.weight[j] *= 0.01
        ly.linear1.bias[j] *= 0.01
        for q in (1, 4 + 2):                   # head 0 dim 1, head 1 dim 2
            ly.attn.in_proj_weight[q] = 0.0
            ly.attn.in_proj_bias[q] = 0.0
            ly.attn.in_proj_weight[8 + q] *= 0.01   # the k of that dim: small
            ly.attn.in_proj_bias[8 + q] *= 0.01
            # q, k and v share one packed projection (a (3, d) reshape): every
            # row keeps the same count, so v loses a dim per head too: a dead one
            ly.attn.out_proj.weight[:, q] = 0.0
            ly.attn.in_proj_weight[16 + q] *= 0.01
            ly.attn.in_proj_bias[16 + q] *= 0.01
    path = _export(m, torch.zeros(2, 8, 8), tmp_path / "tf.onnx")
    x = np.random.default_rng(2).random((6, 8, 8)).astype(np.float32)
    d = _prune_dead(path, x, "layers.0.linear1.weight", j)
    assert d["l2"] < TOL and d["l1"] < TOL and d["live"] > 1e-4
    imp = import_dag(path)
    dm = DagMethods(imp)
    y0 = _run(imp.model, x)
    qk = next(s for s in imp.spaces if s.kind == "linear" and s.n == 24)     # the packed q, k, v
    dead = [1, 6, 8 + 1, 8 + 6, 16 + 1, 16 + 6]
    heads = {int(dm.cls[dm.col[qk.start + q]]) for q in dead}
    assert len(heads) == 4                      # q/k of two heads, v of two heads
    counts = dm.cls_size.copy()
    counts[list(heads)] -= 1                    # every head keeps 3 of its 4 dims
    for meth in ("l2", "l1"):
        m2, k2 = dm.write(meth, counts)
        assert np.flatnonzero(~k2[qk.ids]).tolist() == dead
        assert np.max(np.abs(_run(m2, x) - y0)) < TOL
    counts[min(heads)] += 1                     # unequal head sizes: not a base the writer can keep
    with pytest.raises(ValueError, match="equal"):
        dm.write("l2", counts)


# ----------------------------------------------------------- fold = fibration
@pytest.mark.parametrize("name", ["residual_mlp", "lstm", "transformer"])
def test_fold_at_exact_fiber_counts_is_the_fibration_base(name, tmp_path):
    model, info = {"residual_mlp": lambda: pn.planted_residual_mlp(7), "lstm": lambda: pn.planted_lstm(0),
                   "transformer": lambda: pn.planted_transformer(5)}[name]()
    path = _export(model, pn.example_input(info, batch=2), tmp_path / f"{name}.onnx")
    imp = import_dag(path)
    dm = DagMethods(imp)
    col = colour_dag(imp, "fibration", 0.0)
    m_fib, gid_f, kept, _ = write_dag_base(imp, col.labels)
    counts = dm.class_counts(kept)
    assert (counts < dm.cls_size).any()
    m_fold, kept_fold = dm.write("fold", counts, seed=0)
    assert dm.entry_counts(kept_fold) == dm.entry_counts(kept)
    # the same groups of columns as the fibration base
    group, _ = dm.partition("fold", counts)
    assert np.array_equal(canonical(group), canonical(_col_groups(dm, gid_f)))
    x = _x(info)
    y_fib, y_fold = _run(m_fib, x), _run(m_fold, x)
    assert np.max(np.abs(y_fold - y_fib)) < TOL
    assert np.max(np.abs(y_fib - _run(imp.model, x))) < TOL


def _col_groups(dm, gid):
    """Column -> group from per-node groups (slot 0 of every column)."""
    order = np.lexsort((np.arange(dm.col.size), dm.col))
    first = np.ones(order.size, bool)
    first[1:] = dm.col[order][1:] != dm.col[order][:-1]
    out = np.empty(dm.n_col, np.int64)
    out[dm.col[order][first]] = gid[order][first]
    return out
