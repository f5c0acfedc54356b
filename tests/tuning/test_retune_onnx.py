"""Compress-retune (Algorithm 2) on models of the hypergraph path
(importers/retune_onnx.py): the base ONNX model becomes a torch module of the
base's shapes, is retuned, and is written back to ONNX."""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from planted_nets import export_one  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from seq_models import digits_seq_split  # noqa: E402

RHO, TAU = 0.1, 0.02


class _Residual(nn.Module):
    """x -> h = relu(fc1 x); h + back(relu(mid h)) (a feed-forward block on a
    residual stream); out."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.mid = nn.Linear(32, 48)
        self.back = nn.Linear(48, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(h + self.back(torch.relu(self.mid(h))))


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from fibgraph.importers.torch_base import retune

    (xtr, ytr), (xv, yv), (xte, yte) = digits_seq_split(seed=0, val=200)
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    torch.manual_seed(0)
    m = _Residual()
    retune(m, (torch.tensor(flat(xtr)), torch.tensor(ytr)), (torch.tensor(flat(xv)), torch.tensor(yv)),
           lr=3e-3, batch=64, max_epochs=15, patience=3)
    path = export_one(m, torch.zeros(2, 64), tmp_path_factory.mktemp("rt") / "res.onnx", dynamo=False)
    return {"path": path, "module": m, "train": (flat(xtr), ytr), "val": (flat(xv), yv),
            "test": (flat(xte), yte)}


@pytest.fixture(scope="module")
def result(setting):
    from fibgraph.importers.retune_onnx import compress_retune_onnx

    # eps0 = 0.7 is calibrated for the magnitude-aware distance: with cosine the
    # ReLU layer ``mid`` (positively homogeneous) would take the rescaling merge
    return compress_retune_onnx(setting["path"], setting["train"], setting["val"], rho=RHO, tau=TAU, q=1.1, eps0=0.7,
                                steps=5, max_iters=2, metric="euclidean",
                                retune_kw=dict(lr=1e-3, batch=64, max_epochs=4, patience=2))


def test_rounds_keep_the_loss_test_and_the_model_shrinks(result):
    assert result.history, "no round ran"
    for h in result.history:
        assert h["accepted"] == (h["loss_retuned"] <= (1 + RHO) * result.loss0)
    accepted = [h for h in result.history if h["accepted"]]
    assert accepted and accepted[0]["params_over"] < result.params0
    assert result.params < result.params0
    # the last step is loss-preserving greedy eps on an accepted model
    assert result.loss <= (1 + TAU) * (1 + RHO) * result.loss0 + 1e-9


def test_the_result_is_a_smaller_onnx_model_and_a_torch_module_of_its_shapes(result, setting):
    import onnx

    from fibgraph.retune import RetuneResult
    from fibgraph.importers.api import count_params, evaluate
    from fibgraph.importers.torch_base import compress_retune

    # one result type for ONNX models and torch modules (fibgraph.importers.torch_base.compress_retune)
    assert type(result) is RetuneResult and compress_retune.__annotations__["return"] in ("RetuneResult", RetuneResult)
    assert result.onnx is result.model
    onnx.checker.check_model(result.model, full_check=True)
    assert count_params(result.model) == result.params
    r = evaluate(result.model, setting["val"])
    assert r["loss"] == pytest.approx(result.loss, rel=1e-6)
    x = torch.tensor(setting["test"][0][:7])
    import onnxruntime as ort

    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    got = result.module(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert result.module.n_params() < sum(p.numel() for p in setting["module"].parameters())


def test_a_torch_module_is_exported_first(setting):
    from fibgraph.importers.retune_onnx import compress_retune_onnx

    r = compress_retune_onnx(setting["module"], setting["train"], setting["val"], example=torch.zeros(2, 64),
                             rho=RHO, tau=TAU, steps=3, max_iters=1, retune_kw=dict(max_epochs=1))
    assert r.params0 == sum(p.numel() for p in setting["module"].parameters())
    assert len(r.history) == 1


def test_bad_arguments_are_input_errors(setting):
    from fibgraph.errors import InputError
    from fibgraph.importers.retune_onnx import compress_retune_onnx

    with pytest.raises(InputError, match="q must be"):
        compress_retune_onnx(setting["path"], setting["train"], setting["val"], q=0.5)
    with pytest.raises(InputError, match="example input"):
        compress_retune_onnx(setting["module"], setting["train"], setting["val"])


def test_cli_retune_writes_a_smaller_model_and_its_report(setting, tmp_path, capsys):
    from helpers import cli, read_json

    from fibgraph.importers.api import count_params

    tr, va = tmp_path / "train.npz", tmp_path / "val.npz"
    np.savez(tr, x=setting["train"][0], y=setting["train"][1])
    np.savez(va, x=setting["val"][0], y=setting["val"][1])
    out, rep = tmp_path / "small.onnx", tmp_path / "rounds.json"
    rc, text, err = cli(capsys, "retune", setting["path"], "--train", tr, "--val", va, "--rho", str(RHO),
                        "--q", "1.1", "--eps-floor", "0.7", "--max-iters", "2", "--max-epochs", "3",
                        "--steps", "4", "-o", out, "--report", rep)
    assert rc == 0, err
    assert "round 0:" in text and "wrote" in text
    import onnx

    r = read_json(rep)
    small = onnx.load(str(out))
    assert count_params(small) == r["params_after"] < r["params_before"]
    assert all(h["accepted"] == (h["loss_retuned"] <= (1 + RHO) * r["loss_before"]) for h in r["history"])


@pytest.mark.parametrize("args, needle", [
    (["--val", "VAL"], "--train"),
    (["--train", "TRAIN", "--val", "VAL", "--max-iters", "0"], "--max-iters"),
    (["--train", "MISSING", "--val", "VAL"], "MISSING"),
])
def test_cli_retune_bad_input_is_one_line(setting, tmp_path, capsys, args, needle):
    from helpers import assert_one_line_error, cli

    tr, va = tmp_path / "train.npz", tmp_path / "val.npz"
    np.savez(tr, x=setting["train"][0][:50], y=setting["train"][1][:50])
    np.savez(va, x=setting["val"][0][:50], y=setting["val"][1][:50])
    sub = {"TRAIN": str(tr), "VAL": str(va), "MISSING": str(tmp_path / "missing.npz")}
    out = tmp_path / "o.onnx"
    rc, text, err = cli(capsys, "retune", setting["path"], *[sub.get(a, a) for a in args], "-o", out)
    assert rc != 0
    if needle.startswith("--train"):
        assert "--train" in err
    else:
        assert_one_line_error(rc, err, needle.replace("MISSING", "missing.npz"))
    assert not out.exists()
