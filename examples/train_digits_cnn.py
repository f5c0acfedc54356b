"""Train a small CNN on the 8x8 digits images and export it with BOTH torch
ONNX exporters, then compress each export with fibgraph (eps = 0, 0.3, 0.5) and check it.

Architecture: Conv(1->16, 3x3, pad 1) - BatchNorm - ReLU - MaxPool(2) -
Conv(16->16, 3x3, pad 1) - ReLU - Flatten - Linear(256 -> 10).
Data: scikit-learn ``load_digits``, pixels scaled to [0, 1], the same
stratified 75/25 split (seed 0) as ``train_digits_mlp.py``.

Writes, under ``examples/out/`` (not shipped):

- ``digits_cnn_dynamo.onnx``: ``torch.onnx.export(..., dynamo=True, external_data=False)``
- ``digits_cnn_legacy.onnx``: ``torch.onnx.export(..., dynamo=False)``, opset 17
- ``digits_cnn_test.npz``: test split, ``x`` float32 (N, 1, 8, 8), ``y`` int64

Both exports have input ``x`` and output ``logits`` with a dynamic batch axis.
Run from the repository root::

    python examples/train_digits_cnn.py [--steps 300] [--out examples/out]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from train_digits_mlp import load_split  # noqa: E402


def build_cnn(ch=16):
    return nn.Sequential(
        nn.Conv2d(1, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(ch * 4 * 4, 10))


def train(model, x, y, steps=300, lr=1e-2, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    lossf = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss = lossf(model(X[idx]), Y[idx])
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_both(model, out):
    model.eval()
    x0 = torch.zeros(2, 1, 8, 8)
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = os.path.join(out, "digits_cnn_legacy.onnx")
        torch.onnx.export(model, (x0,), p, dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
        paths["legacy"] = p
        p = os.path.join(out, "digits_cnn_dynamo.onnx")
        torch.onnx.export(model, (x0,), p, dynamo=True, external_data=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        paths["dynamo"] = p
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    xtr, xte, ytr, yte = load_split(args.seed)
    xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    model = build_cnn()
    loss = train(model, xtr, ytr, args.steps, seed=args.seed)
    print(f"digits CNN, {sum(p.numel() for p in model.parameters())} params, {args.steps} Adam steps "
          f"(batch 256), seed {args.seed}: last batch loss {loss:.4f}, "
          f"test accuracy {accuracy(model, xte, yte):.4f} (n={len(yte)}), {time.perf_counter() - t0:.1f} s")
    os.makedirs(args.out, exist_ok=True)
    npz = os.path.join(args.out, "digits_cnn_test.npz")
    np.savez_compressed(npz, x=xte.astype(np.float32), y=yte.astype(np.int64))
    paths = export_both(model, args.out)

    from fibgraph.importers.api import compress_model, count_params, evaluate
    from fibgraph.importers.dag_api import weight_entries
    from fibgraph.importers.onnx.importer import import_dag

    for kind, p in paths.items():
        imp = import_dag(p)
        ops = sorted({n.op_type for n in imp.model.graph.node})
        print(f"[{kind}] {p}: {count_params(imp.model)} params, ops {', '.join(ops)}; "
              f"fibgraph weights: {', '.join(f'{w}({op}, {ids.size} units)' for w, op, ids, _ in weight_entries(imp))}")
        ev = evaluate(p, npz)
        print(f"[{kind}] onnxruntime test accuracy {ev['accuracy']:.4f}")
        for eps in (0.0, 0.3, 0.5):
            small = os.path.join(args.out, f"digits_cnn_{kind}_eps{eps:g}.onnx")
            r = compress_model(p, small, eps=eps, verify=True)
            ev2 = evaluate(small, npz)
            nodes = ", ".join(f"{ly['nodes_before']}->{ly['nodes_after']}" for ly in r["layers"])
            print(f"[{kind}] eps={eps:g}: units per layer {nodes}; params {r['params_before']} -> "
                  f"{r['params_after']}; verify max_abs_diff {r['verify']['max_abs_diff']:.3g} "
                  f"({r['verify']['inputs']}); test accuracy {ev2['accuracy']:.4f}")


if __name__ == "__main__":
    main()
