"""Planted fibers: a network whose exact symmetry fibgraph must find and remove.

A fibration (docs/design.md section 2) does not need duplicated neurons.  Units
``i`` and ``j`` are in one fiber iff, for every colour ``c`` of the previous
layer, the SUMS of their incoming weights from ``c`` are equal (bias
included).  This script builds a ReLU MLP in torch with such fibers planted:

- hidden layer 1 reads the inputs, which all have distinct colours, so its
  fibers are sets of identical rows (weights and bias);
- hidden layers 2 and 3 have fibers whose rows are NOT duplicates: for a
  fiber ``F`` and a previous fiber ``c`` every member ``i`` of ``F`` gets its
  own random split of one target sum ``S[F, c]`` over the columns of ``c``
  (``sum_{k in c} W[i, k] == sum_{k in c} W[j, k]`` but ``W[i, k] != W[j, k]``);
- all biases are nonzero (equal inside a fiber), which catches the papers'
  ``b_hat = sum b`` error (the base bias is the MEAN over the fiber);
- units are shuffled inside each layer so fibers are not contiguous.

It exports the model with torch's legacy ONNX exporter, runs
``fibgraph.importers.api.compress_model(..., verify=True)`` at eps = 0 and checks that
(1) the fibers found equal the planted ones, (2) the compressed model has one
unit per planted fiber and (3) it computes the same function (largest output
difference on random inputs, about 1e-6 for float32).

Part 2 plants PROPORTIONAL rows (unit ``j`` = ``s`` times unit ``i``, weights
and bias, ``s > 0``).  They are not a fiber (eps = 0 keeps them apart), but
for a positively homogeneous activation (ReLU) cosine distance at a tiny
eps > 0 with the rescaling merge (``relu(s z) = s relu(z)``) removes them
exactly too.

Run from the repository root::

    python examples/planted_fibers.py [--seed 0] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fibgraph.partition import canonical  # noqa: E402
from fibgraph.importers.api import compress_model  # noqa: E402


def planted_layer(rng, prev_labels, sizes, scale=1.0):
    """Weights (n_out, n_in) and bias (n_out,) with planted fibers.

    ``prev_labels``: fiber label of each input unit; ``sizes``: members per
    planted fiber of this layer.  Returns ``(W, b, labels)`` with units shuffled.
    """
    prev_labels = np.asarray(prev_labels)
    n_in = prev_labels.size
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n_out = labels.size
    W = np.zeros((n_out, n_in))
    b = np.zeros(n_out)
    for f in range(len(sizes)):
        members = np.flatnonzero(labels == f)
        b[members] = rng.uniform(0.2, 1.0) * rng.choice([-1.0, 1.0])   # nonzero, equal in the fiber
        for c in np.unique(prev_labels):
            cols = np.flatnonzero(prev_labels == c)
            S = rng.normal(0, scale)                                   # the fiber's sum over c
            for i in members:
                w = rng.normal(0, scale, cols.size)                    # a different split per unit
                W[i, cols] = w - w.mean() + S / cols.size
    perm = rng.permutation(n_out)
    return W[perm], b[perm], labels[perm]


def build(seed=0, n_in=12, fibers=((3, 2, 4), (2, 3, 1, 4), (3, 3, 2, 2, 1)), n_out=5):
    """A torch MLP n_in - 9 - 10 - 11 - n_out with planted fibers; returns
    (model, planted labels per hidden layer)."""
    rng = np.random.default_rng(seed)
    prev = np.arange(n_in)                       # inputs: distinct colours
    linears, planted = [], []
    for sizes in fibers:
        W, b, lab = planted_layer(rng, prev, sizes, scale=1.0 / np.sqrt(prev.size))
        lin = nn.Linear(W.shape[1], W.shape[0])
        lin.weight.data = torch.tensor(W, dtype=torch.float32)
        lin.bias.data = torch.tensor(b, dtype=torch.float32)
        linears.append(lin)
        planted.append(canonical(lab))
        prev = lab
    out = nn.Linear(prev.size, n_out)           # the output layer: anything, keeps all units
    with torch.no_grad():
        out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        out.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    mods = []
    for lin in linears:
        mods += [lin, nn.ReLU()]
    return nn.Sequential(*mods, out), planted


def export(model, path, n_in):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, n_in),), path, dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)


def fibers_as_labels(fibers, n):
    lab = np.empty(n, dtype=np.int64)
    for c, members in enumerate(fibers):
        lab[members] = c
    return canonical(lab)


def part1(out_dir, seed):
    model, planted = build(seed)
    n_in = model[0].in_features
    W2 = model[2].weight.detach().numpy()
    lab1 = planted[0]
    print("Part 1: fibers with balanced, non-duplicated incoming weights")
    print(f"  MLP {n_in}-{'-'.join(str(m.out_features) for m in model if isinstance(m, nn.Linear))}, "
          f"ReLU, nonzero biases; planted fibers per hidden layer: "
          f"{[int(p.max()) + 1 for p in planted]}")
    # show one non-duplicated pair of layer 2
    lab2 = planted[1]
    f = int(np.argmax(np.bincount(lab2)))
    i, j = np.flatnonzero(lab2 == f)[:2]
    c = int(np.argmax(np.bincount(lab1)))
    cols = np.flatnonzero(lab1 == c)
    print(f"  layer 2 units {i} and {j} (one fiber), inputs {cols.tolist()} (one fiber of layer 1):")
    print(f"    W[{i}, cols] = {np.round(W2[i, cols].astype(float), 4).tolist()}  sum {W2[i, cols].sum():.6f}")
    print(f"    W[{j}, cols] = {np.round(W2[j, cols].astype(float), 4).tolist()}  sum {W2[j, cols].sum():.6f}")
    n_distinct = len({tuple(r) for r in np.round(W2, 6)})
    print(f"  distinct rows in layer 2: {n_distinct} of {W2.shape[0]} (no duplicated neurons)")

    src = os.path.join(out_dir, "planted.onnx")
    dst = os.path.join(out_dir, "planted_base.onnx")
    export(model, src, n_in)
    r = compress_model(src, dst, eps=0.0, verify=True)
    ok = True
    for l, (ly, p) in enumerate(zip(r["layers"], planted + [None])):
        found = fibers_as_labels(ly["fibers"], ly["nodes_before"])
        same = "output layer, kept" if p is None else (
            "= planted" if np.array_equal(found, p) else "DIFFERS from planted")
        ok &= p is None or np.array_equal(found, p)
        want = ly["nodes_before"] if p is None else int(p.max()) + 1
        ok &= ly["nodes_after"] == want
        print(f"  layer {ly['weight']}: units {ly['nodes_before']} -> {ly['nodes_after']} "
              f"(planted {want}); fibers {same}")
    d = r["verify"]["max_abs_diff"]
    print(f"  params {r['params_before']} -> {r['params_after']}; max_abs_diff {d:.3g} "
          f"on {r['verify']['inputs']}")
    ok &= d < 1e-4
    return ok


def part2(out_dir, seed):
    rng = np.random.default_rng(seed + 100)
    n_in, h, n_out = 8, 6, 3
    W1 = rng.normal(0, 0.5, (h, n_in))
    b1 = rng.uniform(0.1, 0.5, h)
    s = np.array([2.5, 0.4])
    W1 = np.vstack([W1, s[0] * W1[0], s[1] * W1[3]])   # units 6 = 2.5 x unit 0, 7 = 0.4 x unit 3
    b1 = np.concatenate([b1, [s[0] * b1[0], s[1] * b1[3]]])
    lin1, lin2 = nn.Linear(n_in, h + 2), nn.Linear(h + 2, n_out)
    lin1.weight.data = torch.tensor(W1, dtype=torch.float32)
    lin1.bias.data = torch.tensor(b1, dtype=torch.float32)
    lin2.weight.data = torch.tensor(rng.normal(0, 0.5, (n_out, h + 2)), dtype=torch.float32)
    lin2.bias.data = torch.tensor(rng.normal(0, 0.5, n_out), dtype=torch.float32)
    model = nn.Sequential(lin1, nn.ReLU(), lin2)
    src = os.path.join(out_dir, "proportional.onnx")
    export(model, src, n_in)
    print("Part 2: proportional units (unit 6 = 2.5 x unit 0, unit 7 = 0.4 x unit 3), ReLU")
    ok = True
    for eps in (0.0, 1e-4):
        r = compress_model(src, os.path.join(out_dir, f"proportional_eps{eps:g}.onnx"),
                           eps=eps, metric="cosine", rescale=True, verify=True)
        ly = r["layers"][0]
        d = r["verify"]["max_abs_diff"]
        print(f"  eps={eps:g} (cosine, rescaling merge): hidden units {ly['nodes_before']} -> "
              f"{ly['nodes_after']}, fibers {[f for f in ly['fibers'] if len(f) > 1]}, "
              f"max_abs_diff {d:.3g}")
        ok &= ly["nodes_after"] == (h + 2 if eps == 0 else h) and d < 1e-4
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the ONNX files (default: a temp folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        os.makedirs(out, exist_ok=True)
        ok = part1(out, args.seed)
        ok = part2(out, args.seed) and ok
    print("OK: planted fibers found and removed exactly" if ok else "FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
