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
exactly that many; no fine-tuning.  Writes ``benchmarks/results/keep_<model>.md``
and ``.json``.  Run from the repository root: ``python benchmarks/bench_keep.py [--cnn]``.
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
    ap.add_argument("--cnn", action="store_true")
    a = ap.parse_args(argv)
    keeps = [float(v) for v in a.keep.split(",")]
    xtr, xte, ytr, yte = digits_split()
    tmp = tempfile.mkdtemp()
    shape = (-1, 1, 8, 8) if a.cnn else (-1, 64)
    cal, test = os.path.join(tmp, "cal.npz"), os.path.join(tmp, "test.npz")
    np.savez(cal, x=xtr[:500].reshape(shape), y=ytr[:500])
    np.savez(test, x=xte.reshape(shape), y=yte)
    name = "digits_cnn" if a.cnn else "digits_mlp"
    model = _cnn(os.path.join(tmp, "cnn.onnx"), xtr, ytr) if a.cnn else \
        os.path.join(ROOT, "fibgraph", "data", "digits_mlp.onnx")
    t0 = time.perf_counter()
    res = compare_methods(model, test, eps_list=[], keeps=keeps, calib=cal)
    secs = time.perf_counter() - t0
    rows = res["rows"]
    orig = rows[0]
    methods = ["fibration", "random", "l2", "l1", "fold"]
    lines = [f"##### bench_keep.py {name}, {time.strftime('%Y-%m-%d %H:%M')}, {secs:.0f} s", "",
             f"original: {orig['params']:,} params, test accuracy {orig['accuracy']:.2%} (n = {res['n']}); "
             "calibration: 500 training images; complete linkage, euclidean; no fine-tuning", "",
             "| keep | params kept | " + " | ".join(f"{METHOD_LABELS[m].split(' (')[0]} / + repair" for m in methods)
             + " |", "|---" * (len(methods) + 2) + "|"]
    for F in keeps:
        pt = [r for r in rows if r["point"] == f"keep={F:g}"]
        acc = {r["method"]: r["accuracy"] for r in pt}
        cells = [f"{acc[m]:.1%} / {acc[m + '+repair']:.1%}" for m in methods]
        lines.append(f"| {F:g} | {pt[0]['params_kept']:.1%} | " + " | ".join(cells) + " |")
    tp_rows = None if a.cnn else torch_pruning_rows(
        model, {f"keep={F:g}": next(r["nodes"] for r in rows if r["point"] == f"keep={F:g}") for F in keeps}, test)
    if tp_rows is not None:
        lines += ["", "Torch-Pruning 1.6 `MagnitudePruner` (L2 group importance, no repair) on the same MLP rebuilt "
                  "in torch, pruned to the same units per layer:", "",
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
    out = os.path.join(ROOT, "benchmarks", "results", f"keep_{name}")
    with open(out + ".md", "w") as f:
        f.write(md)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1, default=float)


if __name__ == "__main__":
    main()
