"""Numerical checks of the main paper's theorems on planted float64 torch MLPs.

(a) fibers synchronise activity; (b) flavoured opfibers synchronise errors,
plain opfibers do not (nonlinear activation), and grouped outputs need equal
targets; (c) a strict covering survives 200 full-batch GD steps exactly,
while fibers alone do not survive one.  See fibgraph/theorems.py for the
exact setting; the torch side (export to the hypergraph, autograd) is
importers/torch_analysis.py.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fibgraph.partition import canonical, refines  # noqa: E402
from fibgraph.planted import balance_violation, planted_mlp  # noqa: E402
from fibgraph.importers.torch_analysis import (check_activity_sync, check_cover_persistence,  # noqa: E402
                                      check_error_sync, torch_mlp, torch_view)

SIZES = [5, 6, 5, 3]
ROUND = 1e-12      # relative: float64 rounding
APART = 1e-3       # relative: clearly not synchronised


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_fibers_have_identical_activations(act):
    rng = np.random.default_rng(0)
    F = [None, [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2], None]
    layers = planted_mlp(rng, SIZES, F, None)
    for l in (1, 2):   # the planted rows are balanced, not copies
        W, b = layers[l - 1]
        assert balance_violation(W, b, F[l], F[l - 1]) < 1e-12
    assert not np.allclose(layers[1][0][0], layers[1][0][1])
    x = rng.normal(size=(200, SIZES[0])) * 2
    res = check_activity_sync(torch_mlp(layers, act), x)
    for r, planted in zip(res, F[1:3]):
        assert r["classes"] == [list(map(int, np.flatnonzero(canonical(planted) == c)))
                                for c in range(max(planted) + 1)]
        assert r["within"] < ROUND, r
        assert r["between"] > APART, r          # units of different fibers differ somewhere


def test_flavoured_opfibers_have_identical_errors_plain_do_not():
    rng = np.random.default_rng(0)
    F = [None, [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2], None]
    # level 2: {0,1} fiber and opfiber (flavoured); {2,4} opfiber across fibers (plain only)
    O = [None, [0, 0, 1, 2, 2, 3], [0, 0, 1, 2, 1], None]
    model = torch_mlp(planted_mlp(rng, SIZES, F, O, flavoured=True), "tanh")
    x = rng.normal(size=(100, SIZES[0]))
    for targets, loss in ((rng.normal(size=(100, 3)), "mse"), (rng.integers(0, 3, 100), "ce")):
        res = check_error_sync(model, x, targets, loss)
        assert res[0]["flavoured"] == [[0, 1], [2], [3, 4], [5]]
        assert res[1]["flavoured"] == [[0, 1], [2], [3], [4]]
        assert [2, 4] in res[1]["plain"]
        for r in res:
            assert r["within"] < ROUND, r
            assert r["between"] > APART, r
        # the plain opfiber {2, 4} joins units of different fibers: slopes differ, errors differ
        assert res[1]["plain_only_pairs"] == [(2, 4)]
        assert res[1]["plain_only_gap"] > APART


def test_grouped_outputs_need_equal_targets():
    rng = np.random.default_rng(1)
    sizes = [4, 5, 4, 3]
    P = [None, [0, 0, 1, 2, 3], [0, 1, 1, 2], [0, 1, 1]]   # outputs 1, 2 in one fiber
    model = torch_mlp(planted_mlp(rng, sizes, P, P, flavoured=True), "tanh")
    x = rng.normal(size=(64, 4))
    t = rng.normal(size=(64, 3))
    t_eq = t.copy()
    t_eq[:, 2] = t_eq[:, 1]
    same = check_error_sync(model, x, t_eq, output_groups=[[1, 2]])
    assert same[1]["flavoured"] == [[0], [1, 2], [3]] and same[0]["flavoured"][0] == [0, 1]
    assert max(r["within"] for r in same) < ROUND
    differ = check_error_sync(model, x, t, output_groups=[[1, 2]])
    assert min(r["within"] for r in differ) > APART
    # without merging the outputs, the hidden pairs are not opfibers at all
    alone = check_error_sync(model, x, t)
    assert alone[1]["flavoured"] == [[0], [1], [2], [3]]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
def test_strict_cover_survives_gradient_descent(optimizer):
    rng = np.random.default_rng(2)
    P = [None, [0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1], None]   # a 3x3 block with equal row AND column sums
    layers = planted_mlp(rng, SIZES, P, P)
    W2 = layers[1][0]
    assert not np.allclose(W2[0, 2:5], W2[1, 2:5])          # not a permutation of rows: no automorphism needed
    model = torch_mlp(layers, "tanh")
    x = rng.normal(size=(64, SIZES[0]))
    t = rng.normal(size=(64, SIZES[-1]))                     # arbitrary targets: outputs are singletons
    planted = [np.array(P[1]), np.array(P[2])]
    steps = 200 if optimizer == "gd" else 60
    res = check_cover_persistence(model, x, t, planted, steps=steps, lr=0.05, optimizer=optimizer)
    assert len(res["records"]) == steps + 1
    assert res["all_refine"] and res["all_equal"], [r for r in res["records"] if not r["equal"]][:1]
    assert res["loss_last"] < 0.9 * res["loss_first"]        # it did learn
    # the weights did move, and the planted classes are still not duplicated rows
    W2_after = model[2].weight.detach().numpy()
    assert np.abs(W2_after - W2).max() > 1e-2
    assert not np.allclose(W2_after[0, 2:5], W2_after[1, 2:5])


def test_fibers_alone_break_under_gradient_descent():
    rng = np.random.default_rng(3)
    F = [None, [0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1], None]
    model = torch_mlp(planted_mlp(rng, SIZES, F, None), "tanh")
    x = rng.normal(size=(64, SIZES[0]))
    t = rng.normal(size=(64, SIZES[-1]))
    res = check_cover_persistence(model, x, t, [np.array(F[1]), np.array(F[2])], steps=3, lr=0.05,
                                  symmetry="fibration")
    assert res["records"][0]["equal"]                        # planted fibers found at step 0
    assert not res["records"][-1]["refines"]                 # and broken after a step


def test_cover_can_only_coarsen():
    """Theorem 2.1 along a run: the covering at step t refines the one at t+1."""
    rng = np.random.default_rng(4)
    P = [None, [0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1], None]
    model = torch_mlp(planted_mlp(rng, SIZES, P, P), "relu")
    x = rng.normal(size=(32, SIZES[0]))
    t = rng.normal(size=(32, SIZES[-1]))
    X, T = torch.as_tensor(x), torch.as_tensor(t)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prev = None
    for _ in range(20):
        view = torch_view(model, X)
        lab = view.colour("covering-strict")
        cur = np.concatenate([view.layer_labels(lab, 0), 100 + view.layer_labels(lab, 1)])
        if prev is not None:
            assert refines(prev, cur)
        prev = cur
        opt.zero_grad()
        (0.5 * ((model(X) - T) ** 2).sum() / 32).backward()
        opt.step()
