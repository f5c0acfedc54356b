"""Emergence of fibers, opfibers and covers while an MLP learns the digits.

Trains a 64-64-64-10 ReLU MLP on scikit-learn's ``load_digits`` (8x8 images,
pixels scaled to [0, 1], stratified 75/25 split, seed 0) from scratch with
mini-batch SGD (batch 32, lr 0.05, momentum 0.9) for 30 epochs, twice: with
weight decay 5e-3 and without (the control).  After every epoch a
``fibgraph.importers.torch_analysis.FiberTracker`` reads the model (its ONNX export,
in memory, as a hypergraph) and records, per hidden layer, the number of
fibers, opfibers and covers at eps = 0 (exact up to float rounding), 0.05,
0.1 and 0.2 (average linkage; the hypergraph marks no node positively
homogeneous, so the magnitude-aware euclidean distance replaces cosine and
there is no rescaling merge).  Writes

- ``<out>/emergence.csv``: the tidy table (one row per run x epoch x layer x
  symmetry x eps, with the test accuracy);
- ``docs/emergence.png`` (``--figure``): classes / units against epochs, one
  panel per symmetry, top row with weight decay, bottom row without;

and prints the final hierarchy per layer (strict covers, covers, fibers,
opfibers; automorphism orbits only when ``fibgraph.orbits`` is available) and
the activity view (do the weight fibers lie inside activity synchrony
clusters?).

What to expect (measured, seed 0, one thread): exact fibers (eps = 0) never
form - nothing in SGD makes two float weights equal; quasi-fibers at
eps >= 0.05 form gradually WITH weight decay (at eps = 0.1 after 30 epochs
about 30%, 22% and 20% of the units of hidden layers 1-3 lie in non-trivial
fibers, test accuracy 0.953) and not at all without it (0%, 0%, 0%; accuracy
0.973).  At eps > 0 the symmetry levels are separate clusterings and need not
be nested; the printout flags it when they are not.

Run from the repository root (about 100 s on 2 shared CPU cores)::

    python examples/emergence_digits.py [--epochs 30] [--out examples/out] [--figure docs/emergence.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

from fibgraph.partition import num_classes  # noqa: E402
from fibgraph.engine import Exact, Tolerance  # noqa: E402
from fibgraph.tracking import SYMMETRY_NOUN  # noqa: E402
from fibgraph.importers.torch_analysis import FiberTracker, activity_report, torch_view  # noqa: E402

EPS = (0.0, 0.05, 0.1, 0.2)
try:
    import fibgraph.orbits  # noqa: F401
    HAVE_ORBITS = True
except ImportError:
    HAVE_ORBITS = False
SYMS = ("fibration", "opfibration", "covering")


def load_split(seed=0):
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)


def build(seed=0, widths=(64, 64, 64, 64, 10)):
    torch.manual_seed(seed)
    mods = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def run(weight_decay, epochs, seed, data, eps=EPS):
    xtr, xte, ytr, yte = data
    model = build(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
    X, Y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    Xte = torch.from_numpy(xte)
    gen = torch.Generator().manual_seed(seed)
    tracker = FiberTracker(eps=eps, symmetries=SYMS)
    for epoch in range(epochs + 1):
        if epoch > 0:
            model.train()
            perm = torch.randperm(len(X), generator=gen)
            for s in range(0, len(X), 32):
                idx = perm[s:s + 32]
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(Xte).argmax(1).numpy() == yte).mean())
        tracker(model, epoch, accuracy=acc, weight_decay=weight_decay)
    return model, tracker, acc


def hierarchy(model, eps):
    """Counts per hidden layer: (orbits), strict covers, covers, fibers, opfibers."""
    view = torch_view(model)
    crit = Exact() if eps == 0 else Tolerance(eps)
    levels = ["covering-strict", "covering", "fibration", "opfibration"]
    if HAVE_ORBITS and eps == 0:
        levels.insert(0, "automorphism")
    cols = {s: view.colour(s, crit) for s in levels}
    rows = []
    for l in view.hidden():
        rows.append((l + 1, view.layers[l].units, {s: num_classes(view.layer_labels(cols[s], l)) for s in levels}))
    return levels, rows


def write_csv(trackers, path):
    import csv

    with open(path, "w", newline="") as f:
        w = None
        for name, tr in trackers:
            tmp = path + f".{name}.tmp"
            tr.to_csv(tmp)
            with open(tmp) as g:
                r = list(csv.reader(g))
            os.unlink(tmp)
            if w is None:
                w = csv.writer(f)
                w.writerow(["run"] + r[0])
            for row in r[1:]:
                w.writerow([name] + row)


def figure(trackers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(trackers), len(SYMS), figsize=(10.5, 2.9 * len(trackers)), sharex=True,
                             sharey=True, squeeze=False)
    for row, (name, tr) in zip(axes, trackers):
        tr.plot(axes=row, title=name)
    for a in axes[:-1].ravel():
        a.set_xlabel("")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle("digits MLP 64-64-64-10 (ReLU, SGD): classes / units per hidden layer "
                 "(1 = all units distinct)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=5e-3)
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for the CSV")
    ap.add_argument("--figure", default=os.path.join(ROOT, "docs", "emergence.png"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_split(args.seed)
    runs = []
    finals = {}
    for wd in (args.weight_decay, 0.0):
        name = f"weight decay {wd:g}"
        model, tr, acc = run(wd, args.epochs, args.seed, data)
        runs.append((name, tr))
        finals[name] = (model, acc, tr)
        print(f"{name}: test accuracy {acc:.3f} after {args.epochs} epochs "
              f"(tracking took {tr.seconds:.1f} s)")
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "emergence.csv")
    write_csv(runs, csv_path)
    os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
    figure(runs, args.figure)

    print()
    for name, (model, acc, tr) in finals.items():
        for eps in (0.0, 0.1):
            levels, rows = hierarchy(model, eps)
            print(f"final hierarchy, {name}, eps={eps:g} (classes per hidden layer):")
            head = "  layer units " + " ".join(f"{SYMMETRY_NOUN[s]:>14}" for s in levels)
            print(head)
            for l, n, c in rows:
                print(f"  {l:>5} {n:>5} " + " ".join(f"{c[s]:>14}" for s in levels))
                # exact colourings are nested (strict covers refine covers refine fibers and
                # opfibers); clusterings at eps > 0 need not be: say so when it shows
                order = [("covering-strict", "covering"), ("covering", "fibration"), ("covering", "opfibration")]
                for fine, coarse in order:
                    if c[fine] < c[coarse]:
                        print(f"        note: {SYMMETRY_NOUN[fine]} ({c[fine]}) coarser than "
                              f"{SYMMETRY_NOUN[coarse]} ({c[coarse]}): at eps > 0 the levels are "
                              "separate clusterings, not nested")
        last = [r for r in tr.rows if r["epoch"] == args.epochs and r["eps"] == 0.1
                and r["symmetry"] == "fibration"]
        print(f"  {name}: units in non-trivial fibers at eps=0.1: "
              + ", ".join(f"layer {r['layer']} {r['nontrivial_fraction']:.0%}" for r in last))
        if not HAVE_ORBITS:
            print("  (automorphism orbits skipped: fibgraph.orbits is not available)")
        print()

    model = finals[runs[0][0]][0]
    xtr, xte, ytr, yte = data
    rep = activity_report(model, xte, yte, "fibration", Tolerance(0.1), threshold=0.9)
    print(f"activity view ({runs[0][0]}, test inputs, fibers at eps=0.1, synchrony = correlation >= 0.9):")
    for r in rep:
        print(f"  layer {r['layer']}: {r['fibers']} fibers, {r['clusters']} synchrony clusters "
              f"({r['silent_units']} silent units), class-conditional clusters {r['class_clusters_mean']:.1f} "
              f"on average; fiber pairs inside a cluster: {r['refinement_score']:.0%} "
              f"(of {r['fiber_pairs']}), inside the class clusters: {r['class_refinement_score_mean']:.0%}; "
              f"ARI(fibers, clusters) {r['ari_fibers_clusters']:.2f}")
    print(f"\nwrote {csv_path} and {args.figure} ({os.path.getsize(args.figure) // 1024} KiB) "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
