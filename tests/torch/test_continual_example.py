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
