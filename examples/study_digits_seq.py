"""Fibration compression against pruning and folding on scikit-learn's digits
for an LSTM and a small Transformer (issue 5, item 4), at equal unit counts,
without retraining.

Data: ``load_digits``, pixels / 16, each 8x8 image a sequence of 8 rows of 8
features; stratified 75/25 split (seed 0): 1,347 train / 450 test.
Models (``examples/seq_models.py``): LSTM(8 -> 64) + Linear(64, 10) on the last
step; Transformer: Linear(8, 32) + learned positions, 2 post-norm encoder
layers (4 heads, ReLU feed-forward 32 -> 64 -> 32), mean over steps,
Linear(32, 10).  Adam (LSTM lr 1e-2, Transformer lr 3e-3), batch 64, 30
epochs, seed 0, 2 torch threads.  Exported with torch's legacy ONNX exporter
(opset 17).

Fibration: ``fibgraph.importers.api.compress_model(path, out, eps, linkage)`` (the
hypergraph path; with eps > 0 its clustering is the magnitude-aware
euclidean distance, recorded per weight in the report), evaluated with
``fibgraph.importers.api.evaluate`` (onnxruntime) on the test split; parameters =
``count_params`` of the written ONNX.  For the Transformer two fibration
variants: "FF only" (eps on the two ``linear1`` weights, every other weight
exact; the baselines compare to this one) and "all weights" (eps on every
weight: d_model, q/k/v, out_proj, linear2 too; no baseline at its shapes).

A third model, the same Transformer built from torch's
``nn.TransformerEncoderLayer`` (``seq_models.StdTfNet``: same maths and, for
the seed, the same initial weights; its FF block exports as MatMul + Add, the
bias in its own node), gets the two fibration variants only (no baselines).
For every Transformer point the report's per-weight colour classes (before the
writer's meet over a residual stream's writers and readers) are recorded
next to the units the base keeps.  The LSTM's gates, cell and hidden state are
clustered jointly (one clustering of the hidden units; see ``importers/dag_api.py``).

Baselines, built in torch as real smaller modules (no masks) with EXACTLY the
fibration base's unit counts (LSTM hidden units; Transformer feed-forward
units per layer; d_model and attention are left whole), exported and
evaluated the same way: random pruning (mean of 3 seeds), L2-norm and
L1-norm pruning of the units' incoming weights (LSTM: the W_ih and W_hh rows
of the 4 gates; FF: the linear1 row), k-means folding (k-means, n_init 1,
seed 0, on the concatenated incoming weights, bias and outgoing weights;
merged unit: mean of incoming rows and bias, sum of outgoing columns - the
base formula on the k-means partition).  As a check of the torch merge code,
the fibration base's fibers are also merged in torch and compared with the
ONNX base (``torch_vs_onnx_max_abs_diff``).

Writes ``benchmarks/results/study_digits_seq.json`` and ``.md`` and
``benchmarks/figures/digits_seq_compare.png``.  Run from the repository root:
``python examples/study_digits_seq.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seq_models import (LSTMNet, StdTfNet, TfNet, digits_seq_split, export, ff_fold_features,  # noqa: E402
                        ff_in_weights, labels_from_fibers, lstm_fold_features, lstm_in_weights, lstm_merge,
                        lstm_subset, tf_ff_merge, tf_ff_subset)
from study_lib import FIG, ROOT, save_json, timer, train  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
LINKAGES = ("complete", "average")
METHODS = ("random", "l2", "l1", "fold")


def grid(lo, hi, step):
    return [round(float(e), 4) for e in np.arange(lo, hi + 1e-9, step)]


def onnx_eval(path, test):
    import onnx

    from fibgraph.importers.api import count_params, evaluate

    r = evaluate(path, test)
    return {"accuracy": r["accuracy"], "loss": r["loss"], "params": count_params(onnx.load(path))}


def torch_eval(m, test, tmp, name):
    p = export(m, os.path.join(tmp, name + ".onnx"))
    return onnx_eval(p, test)


def keep_top(scores, c):
    return np.sort(np.argsort(-scores, kind="stable")[:c])


def baselines_lstm(m, H_new, test, tmp, seeds=3):
    from fibgraph.baselines import kmeans_labels

    H = m.lstm.hidden_size
    out = {}
    accs = []
    for s in range(seeds):
        keep = np.sort(np.random.default_rng(s).choice(H, H_new, replace=False))
        accs.append(torch_eval(lstm_subset(m, keep), test, tmp, "b"))
    out["random"] = {"accuracy": float(np.mean([a["accuracy"] for a in accs])),
                     "loss": float(np.mean([a["loss"] for a in accs])), "params": accs[0]["params"],
                     "accuracy_seeds": [a["accuracy"] for a in accs]}
    Win = lstm_in_weights(m)
    out["l2"] = torch_eval(lstm_subset(m, keep_top(np.linalg.norm(Win, axis=1), H_new)), test, tmp, "b")
    out["l1"] = torch_eval(lstm_subset(m, keep_top(np.abs(Win).sum(1), H_new)), test, tmp, "b")
    lab = kmeans_labels(lstm_fold_features(m).astype(np.float64), H_new, 0)
    out["fold"] = torch_eval(lstm_merge(m, lab), test, tmp, "b")
    return out


def baselines_tf(m, ff_new, test, tmp, seeds=3):
    from fibgraph.baselines import kmeans_labels

    L = len(m.layers)
    ff = [ly.linear1.out_features for ly in m.layers]
    out = {}
    accs = []
    for s in range(seeds):
        rng = np.random.default_rng(s)
        keeps = [np.sort(rng.choice(ff[l], ff_new[l], replace=False)) for l in range(L)]
        accs.append(torch_eval(tf_ff_subset(m, keeps), test, tmp, "b"))
    out["random"] = {"accuracy": float(np.mean([a["accuracy"] for a in accs])),
                     "loss": float(np.mean([a["loss"] for a in accs])), "params": accs[0]["params"],
                     "accuracy_seeds": [a["accuracy"] for a in accs]}
    out["l2"] = torch_eval(tf_ff_subset(m, [keep_top(np.linalg.norm(ff_in_weights(m, l), axis=1), ff_new[l])
                                            for l in range(L)]), test, tmp, "b")
    out["l1"] = torch_eval(tf_ff_subset(m, [keep_top(np.abs(ff_in_weights(m, l)).sum(1), ff_new[l])
                                            for l in range(L)]), test, tmp, "b")
    labs = [kmeans_labels(ff_fold_features(m, l).astype(np.float64), ff_new[l], 0) for l in range(L)]
    out["fold"] = torch_eval(tf_ff_merge(m, labs), test, tmp, "b")
    return out


def logits_diff(torch_model, onnx_path, x):
    import torch

    from fibgraph.importers.api import session

    sess = session(onnx_path)
    name = sess.get_inputs()[0].name
    a = sess.run(None, {name: x.astype(np.float32)})[0]
    with torch.no_grad():
        b = torch_model(torch.from_numpy(x.astype(np.float32))).numpy()
    return float(np.max(np.abs(a - b)))


def study_lstm(path, m, test, eps_grid, tmp, log):
    from fibgraph.importers.api import compress_model

    rows = [{"method": "original", **onnx_eval(path, test), "hidden": m.lstm.hidden_size}]
    p0 = rows[0]["params"]
    rows[0]["params_kept"] = 1.0
    for link in LINKAGES:
        seen = set()
        for eps in eps_grid:
            out = os.path.join(tmp, "fib.onnx")
            rep = compress_model(path, out, eps=eps, linkage=link, verify=True)
            lw = [ly for ly in rep["layers"] if ly["op"] == "LSTM"]
            H_new = lw[0]["nodes_after"]
            if H_new in seen or H_new == m.lstm.hidden_size:
                continue
            seen.add(H_new)
            fib = onnx_eval(out, test)
            lab = labels_from_fibers(lw[0]["fibers"], m.lstm.hidden_size)
            chk = logits_diff(lstm_merge(m, lab), out, test[0])
            base = {"linkage": link, "eps": eps, "hidden": H_new, "criterion": lw[0]["criterion"],
                    "verify_max_abs_diff": rep["verify"]["max_abs_diff"], "torch_vs_onnx_max_abs_diff": chk}
            rows.append({"method": "fibration", **base, **fib, "params_kept": fib["params"] / p0})
            bl = baselines_lstm(m, H_new, test, tmp)
            for meth in METHODS:
                rows.append({"method": meth, **base, **bl[meth], "params_kept": bl[meth]["params"] / p0})
            log(f"  lstm {link:8s} eps {eps:<5g} H {H_new:3d} params {fib['params'] / p0:6.1%} fib "
                f"{fib['accuracy']:.3f} " + " ".join(f"{k} {bl[k]['accuracy']:.3f}" for k in METHODS) +
                f" (torch check {chk:.1e})")
    return {"params_before": p0, "rows": rows}


def norm_classes(imp, eps, link):
    """Colour classes of each LayerNorm output node set (32 units) in the engine's
    colouring at ``eps`` (what the next layers' rows are aggregated by; the writer
    keeps the meet over the residual stream instead)."""
    from fibgraph.importers.dag_api import colour_dag

    lab = colour_dag(imp, "fibration", eps=eps, linkage=link).labels
    return [int(np.unique(lab[s.ids]).size) for s in imp.spaces if s.kind == "norm"]


def colour_classes(rep):
    """Per weight: the classes of its own colouring (before the writer's meet over
    the columns it is tied to, e.g. a residual stream's writers and readers)."""
    return {ly["weight"]: len(ly.get("colour_classes", ly["fibers"])) for ly in rep["layers"]}


def study_tf_std(path, m, test, eps_grid, tmp, log):
    """The same Transformer built from ``nn.TransformerEncoderLayer`` (FF block as
    MatMul + Add): fibration only, 'FF only' (eps on the two linear1 weights,
    found as the weights with ``ff`` units) and 'all weights'."""
    from fibgraph.importers.api import compress_model

    ff0 = list(m.cfg["ff"])
    rows = [{"method": "original", **onnx_eval(path, test), "ff": ff0}]
    p0 = rows[0]["params"]
    rows[0]["params_kept"] = 1.0
    from fibgraph.importers.onnx.importer import import_dag

    imp = import_dag(path)
    rep0 = compress_model(path, os.path.join(tmp, "fib.onnx"), eps=0.0)
    names = [ly["weight"] for ly in rep0["layers"] if ly["nodes_before"] == ff0[0] and ly["op"] != "Gather"]
    assert len(names) == len(ff0), names
    for variant in ("ff", "all"):
        for link in LINKAGES:
            seen = set()
            for eps in eps_grid:
                out = os.path.join(tmp, "fib.onnx")
                if variant == "ff":
                    ef = os.path.join(tmp, "eps.json")
                    with open(ef, "w") as f:
                        json.dump({n: eps for n in names}, f)
                    rep = compress_model(path, out, eps=0.0, eps_file=ef, linkage=link, verify=True)
                else:
                    rep = compress_model(path, out, eps=eps, linkage=link, verify=True)
                by = {ly["weight"]: ly for ly in rep["layers"]}
                units = {ly["weight"]: ly["nodes_after"] for ly in rep["layers"]}
                key = tuple(sorted(units.items()))
                if key in seen or rep["params_after"] == rep["params_before"]:
                    continue
                seen.add(key)
                fib = onnx_eval(out, test)
                ff_new = [by[n]["nodes_after"] for n in names]
                rows.append({"method": "fibration", "variant": variant, "linkage": link, "eps": eps, "ff": ff_new,
                             "units": units, "classes": colour_classes(rep),
                             **({"norm_classes": norm_classes(imp, eps, link)} if variant == "all" else {}),
                             "verify_max_abs_diff": rep["verify"]["max_abs_diff"], **fib,
                             "params_kept": fib["params"] / p0})
                log(f"  tf_std[{variant}] {link:8s} eps {eps:<5g} ff {ff_new} params {fib['params'] / p0:6.1%} "
                    f"fib {fib['accuracy']:.3f}")
    return {"params_before": p0, "ff_weights": names, "rows": rows}


def ff_names(rep):
    return [ly["weight"] for ly in rep["layers"] if ly["weight"].endswith("linear1.weight")]


def study_tf(path, m, test, eps_grid, tmp, log):
    from fibgraph.importers.api import compress_model

    rows = [{"method": "original", **onnx_eval(path, test), "ff": [ly.linear1.out_features for ly in m.layers]}]
    p0 = rows[0]["params"]
    rows[0]["params_kept"] = 1.0
    from fibgraph.importers.onnx.importer import import_dag

    imp = import_dag(path)
    rep0 = compress_model(path, os.path.join(tmp, "fib.onnx"), eps=0.0)
    names = ff_names(rep0)
    ff0 = [ly.linear1.out_features for ly in m.layers]
    for variant in ("ff", "all"):
        for link in LINKAGES:
            seen = set()
            for eps in eps_grid:
                out = os.path.join(tmp, "fib.onnx")
                if variant == "ff":
                    ef = os.path.join(tmp, "eps.json")
                    with open(ef, "w") as f:
                        json.dump({n: eps for n in names}, f)
                    rep = compress_model(path, out, eps=0.0, eps_file=ef, linkage=link, verify=True)
                else:
                    rep = compress_model(path, out, eps=eps, linkage=link, verify=True)
                by = {ly["weight"]: ly for ly in rep["layers"]}
                ff_new = [by[n]["nodes_after"] for n in names]
                units = {ly["weight"]: ly["nodes_after"] for ly in rep["layers"]}
                key = tuple(sorted(units.items()))
                if key in seen or rep["params_after"] == rep["params_before"]:
                    continue
                seen.add(key)
                fib = onnx_eval(out, test)
                base = {"variant": variant, "linkage": link, "eps": eps, "ff": ff_new, "units": units,
                        "classes": colour_classes(rep), "criterion": by[names[0]]["criterion"],
                        "verify_max_abs_diff": rep["verify"]["max_abs_diff"]}
                if variant == "all":
                    base["norm_classes"] = norm_classes(imp, eps, link)
                msg = ""
                if variant == "ff":
                    labs = [labels_from_fibers(by[n]["fibers"], f) for n, f in zip(names, ff0)]
                    base["torch_vs_onnx_max_abs_diff"] = logits_diff(tf_ff_merge(m, labs), out, test[0])
                    msg = f" (torch check {base['torch_vs_onnx_max_abs_diff']:.1e})"
                rows.append({"method": "fibration", **base, **fib, "params_kept": fib["params"] / p0})
                if variant == "ff":
                    bl = baselines_tf(m, ff_new, test, tmp)
                    for meth in METHODS:
                        rows.append({"method": meth, **base, **bl[meth], "params_kept": bl[meth]["params"] / p0})
                    msg = " ".join(f"{k} {bl[k]['accuracy']:.3f}" for k in METHODS) + msg
                log(f"  tf[{variant}] {link:8s} eps {eps:<5g} ff {ff_new} params {fib['params'] / p0:6.1%} "
                    f"fib {fib['accuracy']:.3f} " + msg)
    return {"params_before": p0, "ff_weights": names, "rows": rows}


def curve(rows, method, link, variant=None):
    pts = sorted({(r["params_kept"], r["accuracy"]) for r in rows if r["method"] == method
                  and r.get("linkage") == link and (variant is None or r.get("variant") == variant)})
    return pts


def interp(pts, at):
    if not pts:
        return None
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    if at < xs.min() or at > xs.max():
        return None
    return float(np.interp(at, xs, ys))


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from study_lib import LABEL, STYLE

    from fibgraph.figures import paper_rc, save_figure

    plt.rcParams.update(paper_rc())
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.0), sharey=True)
    panels = [("lstm", l, None) for l in LINKAGES] + [("tf", l, "ff") for l in LINKAGES]
    for ax, (name, link, var) in zip(axes, panels):
        rows = out[name]["rows"]
        for meth in ("fibration",) + METHODS:
            pts = curve(rows, meth, link, var)
            if not pts:
                continue
            c, mk, ls = STYLE[meth]
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], ls, marker=mk, color=c, ms=3.5,
                    lw=1.2, label=LABEL[meth] + (" (FF only)" if meth == "fibration" and var else ""))
        if name == "tf":
            pts = curve(rows, "fibration", link, "all")
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "-", marker="x", color="tab:orange",
                    ms=4, lw=1.0, label="fibration (all weights)")
            if "tf_std" in out:
                pts = curve(out["tf_std"]["rows"], "fibration", link, "ff")
                ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "--", marker="+", color="tab:brown",
                        ms=4, lw=1.0, label="fibration (FF only), nn.TransformerEncoderLayer")
        ax.axhline(100 * rows[0]["accuracy"], color="k", lw=0.8, ls="-.")
        arch = "LSTM(64)" if name == "lstm" else "Transformer d32 ff64 x2"
        ax.set_title(f"{arch}, {link} linkage (test acc {100 * rows[0]['accuracy']:.1f}%)", fontsize=9)
        ax.set_xlabel("parameters kept (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle("scikit-learn digits as 8-step sequences: fibration vs baselines at equal unit counts, "
                 "no retraining", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    save_figure(fig, path)
    plt.close(fig)


def table(out):
    lines = []
    for name, title in (("lstm", "LSTM"), ("tf", "Transformer")):
        rows = out[name]["rows"]
        r0 = rows[0]
        lines += [f"#### digits {title}: {out[name]['params_before']:,} params (ONNX), test acc "
                  f"{100 * r0['accuracy']:.1f}%\n",
                  "Every fibration point and the baselines at its unit counts "
                  + ("(hidden units H)" if name == "lstm" else "(FF units per layer; fibration 'FF only')")
                  + ":\n",
                  "| linkage | eps | units | params kept | fibration | random | L2 | L1 | folding |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for link in LINKAGES:
            fibs = [r for r in rows if r["method"] == "fibration" and r["linkage"] == link
                    and r.get("variant", "ff") == "ff"]
            for f in fibs:
                bl = {r["method"]: r for r in rows if r["method"] in METHODS and r["linkage"] == link
                      and r["eps"] == f["eps"]}
                u = f["hidden"] if name == "lstm" else "-".join(map(str, f["ff"]))
                lines.append(f"| {link} | {f['eps']:g} | {u} | {100 * f['params_kept']:.1f}% | "
                             f"{100 * f['accuracy']:.1f} | " +
                             " | ".join(f"{100 * bl[k]['accuracy']:.1f}" if k in bl else "-" for k in METHODS) + " |")
        if name == "tf":
            lines += all_weights_table(rows)
        lines.append("")
    if "tf_std" in out:
        rows = out["tf_std"]["rows"]
        lines += [f"#### digits Transformer from nn.TransformerEncoderLayer (FF as MatMul + Add): "
                  f"{out['tf_std']['params_before']:,} params (ONNX), test acc {100 * rows[0]['accuracy']:.1f}%\n",
                  "Fibration 'FF only' (no baselines for this model):\n",
                  "| linkage | eps | FF units | params kept | fibration | verify max abs diff |",
                  "|---|---|---|---|---|---|"]
        for link in LINKAGES:
            for f in [r for r in rows if r["method"] == "fibration" and r["linkage"] == link
                      and r["variant"] == "ff"]:
                lines.append(f"| {link} | {f['eps']:g} | {'-'.join(map(str, f['ff']))} | "
                             f"{100 * f['params_kept']:.1f}% | {100 * f['accuracy']:.1f} | "
                             f"{f['verify_max_abs_diff']:.3g} |")
        lines += all_weights_table(rows) + [""]
    return "\n".join(lines)


def all_weights_table(rows):
    lines = ["", "Fibration with eps on every weight ('all weights'; per weight in model order: input "
             "proj / q,k,v (L0) / out_proj (L0) / FF (L0) / linear2 (L0) / q,k,v (L1) / ...; units the base keeps, "
             "the classes of each weight's own colouring before the writer's meet over the residual stream, and the "
             "colour classes of the 4 LayerNorm outputs in the engine's colouring):\n",
             "| linkage | eps | units per weight | own colour classes | LayerNorm classes | params kept | test acc | "
             "verify max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for link in LINKAGES:
        for f in [r for r in rows if r["method"] == "fibration" and r["linkage"] == link
                  and r.get("variant") == "all"]:
            cl = f.get("classes")
            lines.append(f"| {link} | {f['eps']:g} | {'-'.join(str(v) for v in f['units'].values())} | "
                         f"{'-'.join(str(v) for v in cl.values()) if cl else '-'} | "
                         f"{'-'.join(map(str, f['norm_classes'])) if f.get('norm_classes') else '-'} | "
                         f"{100 * f['params_kept']:.1f}% | {100 * f['accuracy']:.1f} | "
                         f"{f['verify_max_abs_diff']:.3g} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args(argv)
    if args.replot:
        with open(os.path.join(RESULTS, "study_digits_seq.json")) as f:
            out = json.load(f)
        plot(out, os.path.join(FIG, "digits_seq_compare.png"))
        with open(os.path.join(RESULTS, "study_digits_seq.md"), "w") as f:
            f.write(table(out))
        return
    import torch

    torch.set_num_threads(2)
    clock = timer()
    (xtr, ytr), (xte, yte) = digits_seq_split(args.seed)
    test = (xte, yte)
    lstm_grid = grid(0.3, 1.2, 0.01) if not args.quick else grid(0.5, 1.0, 0.1)
    tf_grid = grid(0.3, 1.9, 0.05) if not args.quick else grid(0.5, 1.5, 0.25)
    out = {"setting": {"data": f"scikit-learn digits as 8x8 sequences, stratified 75/25 split "
                               f"({len(ytr):,} train / {len(yte):,} test), seed {args.seed}",
                       "epochs": args.epochs, "batch": 64, "lr": {"lstm": 1e-2, "tf": 3e-3},
                       "seed": args.seed, "lstm_grid": lstm_grid, "tf_grid": tf_grid,
                       "machine": {"nproc": os.cpu_count(), "torch_threads": torch.get_num_threads()}}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, builder, lr, grid_, fn in (("lstm", LSTMNet, 1e-2, lstm_grid, study_lstm),
                                             ("tf", TfNet, 3e-3, tf_grid, study_tf),
                                             ("tf_std", StdTfNet, 3e-3, tf_grid, study_tf_std)):
            torch.manual_seed(args.seed)
            m = builder()
            t0 = clock()
            train(m, xtr, ytr, epochs=args.epochs, lr=lr, batch=64, seed=args.seed)
            t_train = round(clock() - t0, 1)
            path = export(m, os.path.join(tmp, f"digits_{name}.onnx"))
            print(f"{name}: trained in {t_train:.0f} s, torch params {sum(p.numel() for p in m.parameters()):,}",
                  flush=True)
            res = fn(path, m, test, grid_, tmp, lambda s: print(s, flush=True))
            res["train_seconds"] = t_train
            res["study_seconds"] = round(clock() - t0 - t_train, 1)
            res["torch_params"] = int(sum(p.numel() for p in m.parameters()))
            out[name] = res
    out["seconds"] = round(clock(), 1)
    save_json(out, os.path.join(RESULTS, "study_digits_seq.json"))
    plot(out, os.path.join(FIG, "digits_seq_compare.png"))
    md = table(out)
    with open(os.path.join(RESULTS, "study_digits_seq.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"done in {clock():.0f} s")


if __name__ == "__main__":
    main()
