"""Train the small digits MLP that ships with fibgraph (``fibgraph/data``).

A 64-48-48-10 ReLU MLP on scikit-learn's ``load_digits`` (8x8 images, pixels
scaled to [0, 1]), stratified 75/25 split, seed 0, full-batch Adam, with a
small L1 penalty on the weights (it drives many weights and some whole units
to zero, so fibers form at moderate eps).  Writes:

- ``fibgraph/data/digits_mlp.onnx``: exported with torch's legacy (TorchScript)
  exporter, input ``x`` (batch, 64) float32, output ``logits`` (batch, 10),
  dynamic batch axis, opset 17;
- ``fibgraph/data/digits_test.npz``: the test split, ``x`` float32 (N, 64),
  ``y`` int64 (N,).

Run from the repository root::

    python examples/train_digits_mlp.py [--steps 600] [--l1 1e-3] [--out fibgraph/data]

Takes a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "fibgraph", "data")


def load_split(seed=0):
    """Digits scaled to [0, 1]; stratified 75/25 train/test split."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)


def build_mlp(widths=(64, 48, 48, 10)):
    mods = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def train(model, xtr, ytr, steps=600, lr=1e-2, l1=1e-3, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    X, Y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    lossf = nn.CrossEntropyLoss()
    for step in range(steps):
        opt.zero_grad()
        loss = lossf(model(X), Y)
        if l1:
            loss = loss + l1 * sum(p.abs().sum() for n, p in model.named_parameters()
                                   if n.endswith("weight"))
        loss.backward()
        opt.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_legacy(model, path, n_in):
    """torch's legacy TorchScript exporter (dynamo=False), dynamic batch."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, n_in),), path, dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--l1", type=float, default=1e-3, help="L1 penalty on weights (0 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for digits_mlp.onnx and digits_test.npz")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    xtr, xte, ytr, yte = load_split(args.seed)
    model = build_mlp()
    loss = train(model, xtr, ytr, args.steps, args.lr, args.l1, args.seed)
    acc_tr, acc_te = accuracy(model, xtr, ytr), accuracy(model, xte, yte)
    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "digits_mlp.onnx")
    npz_path = os.path.join(args.out, "digits_test.npz")
    export_legacy(model, onnx_path, xtr.shape[1])
    np.savez_compressed(npz_path, x=xte.astype(np.float32), y=yte.astype(np.int64))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits MLP 64-48-48-10, {n_params} params, {args.steps} Adam steps, l1={args.l1}, "
          f"seed={args.seed}: final loss {loss:.4f}")
    print(f"train accuracy {acc_tr:.4f} (n={len(ytr)}), test accuracy {acc_te:.4f} (n={len(yte)})")
    print(f"wrote {onnx_path} ({os.path.getsize(onnx_path)} bytes), "
          f"{npz_path} ({os.path.getsize(npz_path)} bytes) in {time.perf_counter() - t0:.1f} s")
    return acc_te


if __name__ == "__main__":
    main()
