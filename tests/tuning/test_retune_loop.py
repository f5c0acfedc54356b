"""Algorithm 2's loop (fibgraph/retune.py) on toy models: a "model" is its
parameter count; compressing with eps removes a share of it; the loss grows
as the model shrinks.  The stop conditions and the accepted model are
checked."""
import pytest

from fibgraph.retune import compress_retune_loop, over_eps
from fibgraph.tune import EPS_MAX


def _ops(loss_of, shrink=lambda p, e: int(p * (1 - min(e, 0.9) / 2))):
    calls = {"greedy": 0, "retune": 0}

    def greedy(p):
        calls["greedy"] += 1
        return {"a": 0.2}

    def compress(p, eps):
        return shrink(p, eps["a"])

    def retune(p):
        calls["retune"] += 1
        return p, {"epochs": 1}

    return dict(greedy=greedy, compress=compress, retune=retune, loss=lambda p: (loss_of(p), 0.0),
                params=lambda p: p), calls


def test_over_eps_scales_floors_and_caps():
    assert over_eps({"a": 0.5, "b": 0.0, "c": 1.9}, 1.1, floor=0.05) == {"a": 0.55, "b": 0.05, "c": EPS_MAX}


def test_stops_at_the_first_rejected_round_and_keeps_the_last_accepted():
    # loss 1 at 1000 params, rising as the model shrinks; rho 0.5 admits <= 1.5
    ops, calls = _ops(lambda p: 1000 / p)
    m, hist, stopped, L0 = compress_retune_loop(1000, rho=0.5, q=1.0, max_iters=20, **ops)
    assert L0 == 1.0
    assert [h["accepted"] for h in hist] == [True] * (len(hist) - 1) + [False]
    assert m == hist[-2]["params_over"] and 1000 / m <= 1.5
    assert 1000 / hist[-1]["params_over"] > 1.5
    assert stopped.startswith("loss")
    assert calls["retune"] == len(hist)


def test_stops_when_over_compression_no_longer_shrinks():
    ops, _ = _ops(lambda p: 1.0, shrink=lambda p, e: max(p - 100, 700))
    m, hist, stopped, _ = compress_retune_loop(1000, rho=0.1, **ops)
    assert m == 700 and stopped == "over-compression no longer shrinks the model"
    assert all(h["accepted"] for h in hist)


def test_max_iters_and_eps0():
    ops, calls = _ops(lambda p: 1.0)
    m, hist, stopped, _ = compress_retune_loop(1000, rho=0.1, max_iters=2, eps0={"a": 0.8}, **ops)
    assert stopped == "max_iters=2" and len(hist) == 2
    assert hist[0]["eps"] == {"a": 0.8} and calls["greedy"] == 1        # round 0 used eps0
    assert hist[0]["eps_over"] == pytest.approx({"a": 0.84})


def test_no_compressible_layer_stops_at_once():
    ops, _ = _ops(lambda p: 1.0)
    ops["greedy"] = lambda p: {}
    m, hist, stopped, _ = compress_retune_loop(1000, **ops)
    assert m == 1000 and hist == [] and stopped == "no compressible layer"
