"""Fibration compression against pruning and folding on scikit-learn's digits
(8x8 images), for an MLP and a CNN, at equal node (channel) counts, without
retraining.

- MLP 64-128-128-10 ReLU; CNN Conv(1->16, 3x3, pad 1)-ReLU-MaxPool 2 -
  Conv(16->32, 3x3, pad 1)-ReLU-MaxPool 2 - Flatten - Linear(128->64)-ReLU -
  Linear(64->10).  Stratified 75/25 split (seed 0), Adam lr 1e-3, batch 64,
  40 epochs; exported with torch's legacy ONNX exporter.
- Conv layers are compressed by channels (kernels compared as vectors);
  pruning removes whole channels; folding clusters channels on their
  concatenated (kernels, bias, outgoing kernels).
- The LSTM and Transformer parts of the paper's comparison need the
  recurrent/attention importer of another issue and are not done here.

Writes ``benchmarks/figures/digits_mlp_compare.png``,
``benchmarks/figures/digits_cnn_compare.png``,
``benchmarks/results/study_digits.json`` and ``.md``.  Run from the
repository root: ``python examples/study_digits.py [--quick]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_lib import (CONFIGS, FIG, OUT, ROOT, config_name, digits_split, export, interpolate,  # noqa: E402
                       plot_panels, save_json, sweep, timer, train)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4]
QUICK_GRID = [0.1, 0.3, 0.5, 0.7, 0.9]


def build_mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))



def build_cnn():
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def plot_one(name, res, configs):
    acc0 = res["rows"][0]["accuracy"]
    arch = "64-128-128-10 MLP" if name == "mlp" else "CNN 16-32 ch + 64 dense"
    plot_panels(res, os.path.join(FIG, f"digits_{name}_compare.png"),
                f"digits {arch}, test acc {acc0:.1%}: equal nodes/channels per layer, no retraining",
                configs)


def replot():
    """Redraw both figures from the saved JSON."""
    import json

    with open(os.path.join(RESULTS, "study_digits.json")) as f:
        out = json.load(f)
    for name in ("mlp", "cnn"):
        done = {r["config"] for r in out[name]["rows"]}
        plot_one(name, out[name], [c for c in CONFIGS if config_name(*c) in done])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", action="store_true", help="only redraw the figures from the saved JSON")
    args = ap.parse_args(argv)
    if args.replot:
        replot()
        return
    import torch

    torch.set_num_threads(1)
    clock = timer()
    os.makedirs(OUT, exist_ok=True)
    xtr, xte, ytr, yte = digits_split(args.seed)
    configs = CONFIGS if not args.quick else [CONFIGS[0], CONFIGS[3]]
    grid = GRID if not args.quick else QUICK_GRID
    out = {"setting": {"data": "scikit-learn digits, stratified 75/25 split (1,347 / 450)",
                       "optimizer": f"Adam lr 1e-3 batch 64, {args.epochs} epochs", "seed": args.seed,
                       "grid": grid}}
    for name, builder, shape in (("mlp", build_mlp, (64,)), ("cnn", build_cnn, (1, 8, 8))):
        torch.manual_seed(args.seed)
        m = builder()
        xr, xe = xtr.reshape((-1,) + shape), xte.reshape((-1,) + shape)
        train(m, xr, ytr, epochs=args.epochs, batch=64, seed=args.seed)
        path = os.path.join(OUT, f"digits_{name}_study.onnx")
        export(m, path, torch.zeros((1,) + shape))
        print(f"{name}: trained and exported ({clock():.0f} s)", flush=True)
        res = sweep(path, (xe.astype(np.float32), yte), grid, configs)
        out[name] = res
        plot_one(name, res, configs)
    out["seconds"] = round(clock(), 1)
    os.makedirs(RESULTS, exist_ok=True)
    save_json(out, os.path.join(RESULTS, "study_digits.json"))
    lines = []
    for name in ("mlp", "cnn"):
        rows = out[name]["rows"]
        lines += [f"#### digits {name.upper()}: {out[name]['params_before']:,} params, test acc "
                  f"{100 * rows[0]['accuracy']:.1f}%\n",
                  "Accuracy (%) interpolated at a fraction of parameters kept:\n",
                  "| setting | at | fibration | random | L2 | L1 | folding |", "|---|---|---|---|---|---|---|"]
        for cfg in configs:
            cn = config_name(*cfg)
            for at in (0.25, 0.5):
                vals = [interpolate(rows, m, cn, at) for m in ("fibration", "random", "l2", "l1", "fold")]
                lines.append(f"| {cn} | {int(at * 100)}% | " +
                             " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals) + " |")
        lines.append("")
    with open(os.path.join(RESULTS, "study_digits.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"done in {clock():.0f} s")


if __name__ == "__main__":
    main()
