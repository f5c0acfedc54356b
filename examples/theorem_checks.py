"""Numerical checks of the main paper's theorems on planted float64 MLPs.

(a) Activity synchronisation: units of a fiber have identical activations on
    any input; units of different fibers do not.
(b) Error synchronisation: units of a FLAVOURED opfiber have identical error
    signals dL/dz for any input and target; a plain opfiber that joins units
    of different fibers does not (the slopes sigma'(z) differ).  When output
    units are grouped, their targets must agree as well.
(c) Cover coarse-graining: a strict covering (balanced both ways) planted in
    the hidden layers survives 200 steps of full-batch gradient descent
    exactly - recomputed from the weights after every step - for arbitrary
    targets; a partition that is only a fibration breaks at the first step.

The exact setting is documented in ``fibgraph/theorems.py``; the models are
read through their ONNX export as hypergraphs (``importers/torch_analysis.py``).  The planted
networks come from ``fibgraph.planted`` (random weights projected onto the
balance equations, so the classes are NOT copies of one another).

Run from the repository root (under a minute: the covering is recomputed
from an export of the model after every step)::

    python examples/theorem_checks.py
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fibgraph.planted import planted_mlp  # noqa: E402
from fibgraph.importers.torch_analysis import (check_activity_sync, check_cover_persistence,  # noqa: E402
                                      check_error_sync, torch_mlp)

SIZES = [5, 6, 5, 3]


def ok(flag):
    return "OK  " if flag else "FAIL"


def main():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    failures = 0
    x = rng.normal(size=(200, SIZES[0]))

    print("(a) fibers synchronise activity (tanh and ReLU; relative to the largest activation)")
    F = [None, [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2], None]
    layers = planted_mlp(rng, SIZES, F, None)
    for act in ("tanh", "relu"):
        for r in check_activity_sync(torch_mlp(layers, act), x):
            good = r["within"] < 1e-12 and r["between"] > 1e-3
            failures += not good
            print(f"  {ok(good)} {act:4} layer {r['layer']}: fibers {r['classes']}; "
                  f"max in-fiber difference {r['within']:.1e}, min between fibers {r['between']:.2f}")

    print("\n(b) flavoured opfibers synchronise errors dL/dz (MSE, random targets)")
    O = [None, [0, 0, 1, 2, 2, 3], [0, 0, 1, 2, 1], None]
    model = torch_mlp(planted_mlp(rng, SIZES, F, O, flavoured=True), "tanh")
    t = rng.normal(size=(200, 3))
    for r in check_error_sync(model, x, t):
        good = r["within"] < 1e-12
        failures += not good
        line = (f"  {ok(good)} layer {r['layer']}: flavoured opfibers {r['flavoured']}; max in-class error "
                f"difference {r['within']:.1e}")
        if r["plain_only_pairs"]:
            bad = r["plain_only_gap"] > 1e-3
            failures += not bad
            line += (f"\n  {ok(bad)}   plain opfibers {r['plain']} also join {r['plain_only_pairs']} "
                     f"(different fibers): their errors differ by {r['plain_only_gap']:.2f}")
        print(line)
    print("  grouped outputs: outputs 1 and 2 in one fiber, merged in the initial colouring")
    P = [None, [0, 0, 1, 2, 3], [0, 1, 1, 2], [0, 1, 1]]
    sizes = [5, 5, 4, 3]
    model = torch_mlp(planted_mlp(rng, sizes, P, P, flavoured=True), "tanh")
    t = rng.normal(size=(200, 3))
    t_eq = t.copy()
    t_eq[:, 2] = t_eq[:, 1]
    same = max(r["within"] for r in check_error_sync(model, x, t_eq, output_groups=[[1, 2]]))
    diff = min(r["within"] for r in check_error_sync(model, x, t, output_groups=[[1, 2]]))
    failures += not (same < 1e-12 and diff > 1e-3)
    print(f"  {ok(same < 1e-12)} equal targets for outputs 1, 2: max in-class error difference {same:.1e}")
    print(f"  {ok(diff > 1e-3)} different targets: in-class errors differ by at least {diff:.2f}")

    print("\n(c) a strict covering survives gradient descent (full batch, lr 0.05, float64, random targets)")
    P = [None, [0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1], None]
    planted = [np.array(P[1]), np.array(P[2])]
    x64 = rng.normal(size=(64, SIZES[0]))
    t64 = rng.normal(size=(64, SIZES[-1]))
    for opt, steps in (("gd", 200), ("momentum", 100)):
        model = torch_mlp(planted_mlp(rng, SIZES, P, P), "tanh")
        w0 = model[2].weight.detach().clone()
        res = check_cover_persistence(model, x64, t64, planted, steps=steps, lr=0.05, optimizer=opt)
        moved = float((model[2].weight.detach() - w0).abs().max())
        good = res["all_equal"]
        failures += not good
        print(f"  {ok(good)} {opt:8}: planted strict covers equal to the recomputed covering at all "
              f"{len(res['records'])} checks; loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}; "
              f"weights moved up to {moved:.2f}")
    model = torch_mlp(planted_mlp(rng, SIZES, P, None), "tanh")
    res = check_cover_persistence(model, x64, t64, planted, steps=3, lr=0.05, symmetry="fibration")
    broke = res["records"][0]["equal"] and not res["records"][1]["refines"]
    failures += not broke
    print(f"  {ok(broke)} control: planted fibers that are not covers break after one step "
          f"(fibers per layer {res['records'][0]['classes']} -> {res['records'][1]['classes']})")

    print(f"\n{'all checks passed' if not failures else f'{failures} checks FAILED'}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
