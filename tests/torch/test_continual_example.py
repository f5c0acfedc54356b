"""Smoke test of examples/continual_learning.py: every protocol, model and
method runs a few tiny tasks on scikit-learn's digits, writes the per-run
CSVs, the summary and the figure; FSB's reported output change is finite."""
import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _example():
    spec = importlib.util.spec_from_file_location("continual_learning",
                                                  os.path.join(ROOT, "examples", "continual_learning.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.usefixtures("one_torch_thread")
def test_continual_quick_smoke(tmp_path):
    cl = _example()
    # tiny 8x8 images in the data cache the script reads (no sklearn import: seconds under load)
    rng = np.random.default_rng(0)
    X = rng.random((300, 8, 8)).astype(np.float32)
    y = np.arange(300) % 10
    X[np.arange(300), y % 8, y // 8 * 4] += 2.0                # a learnable mark per class
    np.savez(tmp_path / "digits.npz", Xtr=X[:240], ytr=y[:240], Xte=X[240:], yte=y[240:])
    summ = cl.main(["--dataset", "digits", "--tasks", "3", "--seeds", "1", "--jobs", "1", "--n-train", "24",
                    "--epochs", "1", "--dpi", "40", "--out", str(tmp_path)])
    assert set(summ["method"]) == set(cl.METHODS)
    assert set(summ["config"]) == set(cl.CONFIGS)
    assert len(os.listdir(tmp_path / "runs")) == len(cl.METHODS) * len(cl.CONFIGS)
    for f in ("continual_tasks.csv", "continual_summary.csv", "continual_learning.png", "continual_learning.svg"):
        assert (tmp_path / f).stat().st_size > 0
    fsb = summ[summ["method"].str.startswith("fsb")]
    assert fsb["max_change_mean"].notna().all() and (fsb["max_change_mean"] >= 0).all()
    assert (summ["late_acc_mean"].between(0, 1)).all()


@pytest.mark.usefixtures("one_torch_thread")
def test_cbp_replaces_lowest_utility_mature_unit():
    import torch

    cl = _example()
    torch.manual_seed(0)
    model = cl.make_model("mlp", 2, side=8)
    cbp = cl.ContinualBackprop(model, np.random.default_rng(0))
    x = torch.rand(16, 64)
    model(x)                                   # the hooks record |h|
    for l in range(2):
        cbp.age[l][:] = 200                    # every unit mature
        cbp.u[l][:] = 1.0
        cbp.u[l][5] = -1.0                     # unit 5: the lowest running utility by far
    cbp.acc[0] = 1.0 - cl.CBP["rate"] * 64 + 1e-9   # this step accrues one replacement in layer 0 only
    w_in = model[1].weight[5].detach().clone()
    cbp.step()
    assert cbp.replaced == 1
    assert torch.all(model[3].weight[:, 5] == 0)          # zero outgoing weights
    assert not torch.allclose(model[1].weight[5], w_in)   # fresh input weights
    assert cbp.age[0][5] == 0 and cbp.u[0][5] == 0
    assert np.all(np.delete(cbp.age[0], 5) == 201)
