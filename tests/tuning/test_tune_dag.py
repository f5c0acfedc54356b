"""``fibgraph tune`` (greedy per-layer eps, Algorithm 3) on models of the
hypergraph path: a residual MLP and an LSTM trained on scikit-learn digits,
exported with the legacy torch exporter."""
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from helpers import assert_one_line_error, cli, read_json  # noqa: E402
from planted_nets import export_one  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from seq_models import LSTMNet, digits_seq_split  # noqa: E402

TAU = 0.05


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.res = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(h + torch.relu(self.res(h)))


def _train(m, x, y, steps=300, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    X, Y = torch.tensor(x), torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=g)
        loss = nn.functional.cross_entropy(m(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune_dag")
    (xtr, ytr), (xte, yte) = digits_seq_split()
    torch.manual_seed(0)
    res = _train(_Residual(), xtr.reshape(len(xtr), 64), ytr)
    torch.manual_seed(0)
    lstm = _train(LSTMNet(hidden=24), xtr, ytr)
    out = {"res": export_one(res, torch.zeros(2, 64), d / "res.onnx", dynamo=False),
           "lstm": export_one(lstm, torch.zeros(2, 8, 8), d / "lstm.onnx", dynamo=False),
           "cal_flat": str(d / "cal_flat.npz"), "cal_seq": str(d / "cal_seq.npz"), "dir": d}
    np.savez(out["cal_flat"], x=xte[:300].reshape(-1, 64), y=yte[:300])
    np.savez(out["cal_seq"], x=xte[:300], y=yte[:300])
    return out


@pytest.fixture(scope="module")
def tuned_res(models):
    from fibgraph.importers.tuning import tune_model

    return tune_model(models["res"], models["cal_flat"], tau=TAU, steps=6)


def test_residual_writers_are_one_tunable_layer(tuned_res):
    # fc1 and res both write the residual stream: the base keeps the meet of
    # their partitions, so they are tuned together and share one eps
    assert tuned_res["graph"] == "hypergraph"
    rows = {r["weight"]: r for r in tuned_res["layers"]}
    assert rows["fc1.weight"]["tied"] == ["res.weight"]
    assert tuned_res["eps"]["fc1.weight"] == tuned_res["eps"]["res.weight"] > 0
    assert rows["out.weight"]["output_layer"]
    # a layer keeps eps > 0 only where it changes the base (settle: the
    # smallest eps giving the same compressed model)
    for r in tuned_res["layers"]:
        if not r["output_layer"] and r["eps"] > 0:
            assert r["nodes_after"] < r["nodes_before"]


def test_residual_tune_keeps_the_loss_within_tau_and_compresses(tuned_res, models, tmp_path):
    from fibgraph.importers.api import compress_model, evaluate

    assert tuned_res["loss_after"] <= (1 + TAU) * tuned_res["loss_before"]
    assert tuned_res["params_after"] < tuned_res["params_before"]
    for t in tuned_res["trace"]:
        assert t["ok"] == (t["loss"] <= tuned_res["limit"])
    # the eps file reproduces the tuned model through `compress`
    eps_file = tmp_path / "eps.json"
    eps_file.write_text(json.dumps(tuned_res["eps"]))
    out = tmp_path / "small.onnx"
    rep = compress_model(models["res"], str(out), eps_file=str(eps_file), metric=tuned_res["metric"])
    assert rep["params_after"] == tuned_res["params_after"]
    after = evaluate(str(out), models["cal_flat"])
    assert after["loss"] == pytest.approx(tuned_res["loss_after"], rel=1e-6)


def test_larger_tau_compresses_at_least_as_much(tuned_res, models):
    from fibgraph.importers.tuning import tune_model

    loose = tune_model(models["res"], models["cal_flat"], tau=1.0, steps=6)
    assert loose["params_after"] <= tuned_res["params_after"]
    assert loose["loss_after"] <= 2.0 * loose["loss_before"]


def test_lstm_w_and_r_are_one_layer_and_the_eps_file_names_both(models, tmp_path, capsys):
    eps_path = tmp_path / "lstm_eps.json"
    rc, out, err = cli(capsys, "tune", models["lstm"], "--data", models["cal_seq"], "--tau", str(TAU),
                       "--steps", "4", "-o", eps_path, "--no-progress")
    assert rc == 0, err
    assert "hypergraph" in out and "(+ " in out
    table = read_json(eps_path)
    lstm_names = [k for k in table if k != "head.weight"]
    assert len(lstm_names) == 2 and len({table[k] for k in lstm_names}) == 1
    small = tmp_path / "small.onnx"
    rc, out, err = cli(capsys, "compress", models["lstm"], "--eps-file", eps_path, "-o", small)
    assert rc == 0, err
    from fibgraph.importers.api import evaluate

    before = evaluate(models["lstm"], models["cal_seq"])
    assert evaluate(str(small), models["cal_seq"])["loss"] <= (1 + TAU) * before["loss"] + 1e-9


def test_an_eps_entry_for_one_recurrent_weight_sets_the_layer(models):
    # W and R of one LSTM share their node sets: an entry for W alone must not
    # be overwritten by R's default (exact)
    from fibgraph.engine import Tolerance
    from fibgraph.importers.dag_api import colour_dag, weight_entries
    from fibgraph.importers.onnx.importer import import_dag

    imp = import_dag(models["lstm"])
    w, _, _, spaces = next(e for e in weight_entries(imp) if e[1] == "LSTM")
    crit = colour_dag(imp, eps_table={w: 0.3}).info["criteria"]
    assert all(isinstance(crit[s], Tolerance) and crit[s].eps == 0.3 for s in spaces)


def test_tune_dag_bad_data_is_one_line(models, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((5, 7), np.float32), y=np.zeros(5, np.int64))
    rc, out, err = cli(capsys, "tune", models["res"], "--data", bad, "-o", tmp_path / "e.json", "--no-progress")
    assert_one_line_error(rc, err, "x")
    assert not (tmp_path / "e.json").exists()
