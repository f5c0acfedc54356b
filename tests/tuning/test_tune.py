"""Greedy per-layer eps (Algorithm 3): the format-free search, the ONNX glue
and the ``fibgraph tune`` command."""
import json
import os

import pytest

from fibgraph.tune import EPS_MAX, greedy_eps
from helpers import assert_one_line_error, cli, read_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "fibgraph", "data", "digits_mlp.onnx")
DATA = os.path.join(ROOT, "fibgraph", "data", "digits_test.npz")


# ------------------------------------------------------------ format-free
def _threshold_loss(thresholds, calls=None):
    """loss = 1 + sum over layers of max(0, eps - t): within tau=0 iff eps <= t."""
    def loss(eps):
        if calls is not None:
            calls.append(dict(eps))
        return 1.0 + sum(max(0.0, eps.get(k, 0.0) - t) for k, t in thresholds.items())
    return loss


def test_greedy_finds_each_threshold_to_the_resolution():
    th = {"a": 0.3, "b": 1.2, "c": 0.0}
    r = greedy_eps(list(th), _threshold_loss(th), tau=0.0, steps=12)
    res = EPS_MAX / 2 ** 12
    for k, t in th.items():
        assert t - res <= r.eps[k] <= t + 1e-12, (k, r.eps[k])
    assert r.loss <= r.limit


def test_greedy_keeps_earlier_layers_while_searching_later_ones():
    calls = []
    th = {"a": 0.5, "b": 0.25}
    r = greedy_eps(["a", "b"], _threshold_loss(th, calls), tau=0.0, steps=6)
    later = [c for c in calls if "b" in c]
    assert later and all(c["a"] == r.eps["a"] for c in later)


def test_greedy_probe_at_top_accepts_everything_when_loss_never_rises():
    r = greedy_eps(["a", "b"], lambda e: 1.0, tau=0.01, steps=5)
    assert r.eps == {"a": EPS_MAX, "b": EPS_MAX}
    assert r.evaluations == 1 + 2          # the base loss and one probe per layer


def test_greedy_never_returns_a_failing_eps_on_a_non_monotone_loss():
    # loss fails on (0.4, 0.6) and above 1.5: bisection may miss the largest
    # passing eps, but what it returns must pass
    def loss(eps):
        e = eps.get("a", 0.0)
        return 2.0 if (0.4 < e < 0.6 or e > 1.5) else 1.0

    r = greedy_eps(["a"], loss, tau=0.01, steps=10)
    assert loss(r.eps) <= r.limit
    assert r.eps["a"] > 0


def test_settle_replaces_the_chosen_eps_by_an_equivalent_smaller_one():
    # the "model" only changes at eps 0.5 steps: settle picks the smallest
    # passing eps that gives the same model as the bisection's choice
    th = {"a": 1.3, "b": 0.7}
    model = lambda e: int(e / 0.5)  # noqa: E731
    seen = []

    def settle(name, best, earlier, passed):
        seen.append((name, best, sorted(passed)))
        return min(e for e in passed if model(e) == model(best))

    r = greedy_eps(["a", "b"], _threshold_loss(th), tau=0.0, steps=8, settle=settle)
    plain = greedy_eps(["a", "b"], _threshold_loss(th), tau=0.0, steps=8)
    for name, best, passed in seen:
        assert best == plain.eps[name]
        assert r.eps[name] == min(e for e in passed if model(e) == model(best))
        assert r.eps[name] <= best and model(r.eps[name]) == model(best)
    assert 1.0 <= r.eps["a"] < plain.eps["a"] and 0.5 <= r.eps["b"] < plain.eps["b"]
    with pytest.raises(ValueError):
        greedy_eps(["a"], _threshold_loss(th), tau=0.0, steps=3, settle=lambda *a: 0.123)


def test_greedy_rejects_bad_arguments():
    with pytest.raises(ValueError):
        greedy_eps(["a"], lambda e: 1.0, tau=-0.1)
    with pytest.raises(ValueError):
        greedy_eps(["a"], lambda e: 1.0, hi=2.0)


# -------------------------------------------------------------- ONNX glue
@pytest.fixture(scope="module")
def tuned():
    from fibgraph.importers.tuning import tune_model

    return tune_model(MODEL, DATA, tau=0.01, steps=7)


def test_tune_model_keeps_calibration_loss_within_tau(tuned, tmp_path):
    """The eps file, read back by the ordinary compress path, gives a model
    whose calibration loss is <= (1 + tau) * the original's."""
    from fibgraph.importers.api import compress_model, evaluate

    assert tuned["loss_after"] <= (1 + tuned["tau"]) * tuned["loss_before"]
    assert tuned["params_after"] < tuned["params_before"]
    assert any(v > 0 for v in tuned["eps"].values())
    eps_file = tmp_path / "eps.json"
    eps_file.write_text(json.dumps(tuned["eps"]))
    out = tmp_path / "small.onnx"
    rep = compress_model(MODEL, str(out), eps_file=str(eps_file), linkage=tuned["linkage"],
                         metric=tuned["metric"], rescale=tuned["rescale"])
    assert rep["params_after"] == tuned["params_after"]
    before, after = evaluate(MODEL, DATA), evaluate(str(out), DATA)
    assert after["loss"] <= (1 + tuned["tau"]) * before["loss"] + 1e-9
    assert after["loss"] == pytest.approx(tuned["loss_after"], rel=1e-6)


def test_every_accepted_evaluation_is_within_the_limit(tuned):
    for t in tuned["trace"]:
        assert t["ok"] == (t["loss"] <= tuned["limit"])
    # the chosen eps of each layer was evaluated and passed (or is 0)
    for name, e in tuned["eps"].items():
        if e > 0:
            assert any(t["layer"] == name and t["eps"] == e and t["ok"] for t in tuned["trace"])


def test_larger_tau_compresses_at_least_as_much(tuned):
    from fibgraph.importers.tuning import tune_model

    loose = tune_model(MODEL, DATA, tau=0.5, steps=7)
    assert loose["params_after"] <= tuned["params_after"]
    assert loose["loss_after"] <= 1.5 * loose["loss_before"]


# -------------------------------------------------------------------- CLI
def test_cli_tune_writes_an_eps_file_that_compress_accepts(tmp_path, capsys):
    eps_path, rep_path, small = tmp_path / "eps.json", tmp_path / "rep.json", tmp_path / "s.onnx"
    rc, out, err = cli(capsys, "tune", MODEL, "--data", DATA, "--steps", "5", "-o", eps_path,
                       "--report", rep_path)
    assert rc == 0, err
    table = read_json(eps_path)
    assert set(table) == {"0.weight", "2.weight"}
    assert "parameters:" in out
    rep = read_json(rep_path)
    assert rep["loss_after"] <= rep["limit"]
    # with the metric tune ran (reported, and in the command it prints when it is not compress's default)
    rc, out, err = cli(capsys, "compress", MODEL, "--eps-file", eps_path, "--metric", rep["metric"], "-o", small)
    assert rc == 0, err
    assert f"{rep['params_after']:,}" in out


@pytest.mark.parametrize("args,needle", [
    (["--tau", "-1"], "--tau"),
    (["--steps", "99"], "--steps"),
    (["--data", "/nonexistent.npz"], "nonexistent"),
])
def test_cli_tune_bad_input_is_one_line(tmp_path, capsys, args, needle):
    base = ["tune", MODEL, "--data", DATA, "-o", tmp_path / "e.json"]
    if args[0] == "--data":
        base = ["tune", MODEL, "-o", tmp_path / "e.json"]
    rc, out, err = cli(capsys, *base, *args)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "e.json").exists()
