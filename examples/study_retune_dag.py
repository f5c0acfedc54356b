"""Compress-retune (Algorithm 2) on models of the hypergraph path, every weight
compressible: the digits residual MLP, LSTM and Transformer of
``examples/study_tune_dag.py`` (run first if its models are missing).

``fibgraph.importers.retune_onnx.compress_retune_onnx``: per round the greedy eps
(Algorithm 3, tau 0.01 on the 200-image validation split, 6 bisection
steps), over-compression with eps * q (a layer's eps at least
``--eps-floor``), retuning of the base as a torch module of the base's shapes
(Adam lr 1e-3, batch 64, early stopping on the validation split, patience 3,
at most 20 epochs), accepted while the validation loss stays within
(1 + rho) of the original's (``--rho``, default 0.05; ``--q`` default 1.1);
at most 6 rounds.  The validation
split also early-stopped the original training (``study_tune_dag.py``), so
the loss test is not on unseen data: the test split (450 images) is the
reported one.  Parameters: ``count_params`` of the ONNX models.

Writes ``benchmarks/results/study_retune_dag<tag>.json`` and ``.md``.  Run from the
repository root: ``python examples/study_retune_dag.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from seq_models import digits_seq_split  # noqa: E402
from study_tune_dag import SLUG  # noqa: E402

from fibgraph.importers.api import count_params, evaluate  # noqa: E402
from fibgraph.importers.retune_onnx import compress_retune_onnx  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
OUT = os.path.join(ROOT, "examples", "out")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round, 2 epochs (a smoke run)")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--eps-floor", type=float, default=0.3)
    ap.add_argument("--q", type=float, default=1.1)
    ap.add_argument("--tag", default="", help="suffix of the results files")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if not all(os.path.exists(os.path.join(OUT, f"tune_dag_{t}.onnx")) for t in SLUG.values()):
        from study_tune_dag import main as study

        study([])
    (xtr, ytr), (xv, yv), (xte, yte) = digits_seq_split(seed=0, val=200)
    rows = []
    for name, tag in SLUG.items():
        flat = name == "residual MLP"
        shape = (lambda a: a.reshape(len(a), -1)) if flat else (lambda a: a)
        path = os.path.join(OUT, f"tune_dag_{tag}.onnx")
        test = (shape(xte), yte)
        t0 = time.perf_counter()
        res = compress_retune_onnx(path, (shape(xtr), ytr), (shape(xv), yv), rho=args.rho, tau=0.01, q=args.q,
                                   steps=6, max_iters=1 if args.quick else 6, eps_floor=args.eps_floor,
                                   retune_kw=dict(lr=1e-3, batch=64, max_epochs=2 if args.quick else 20,
                                                  patience=3, seed=0),
                                   log=lambda h: print(f"  {name} round {h['iter']}: {h['params_start']:,} -> "
                                                       f"{h['params_over']:,} params, val loss "
                                                       f"{h['loss_over']:.4f} -> {h['loss_retuned']:.4f} "
                                                       f"{'accepted' if h['accepted'] else 'rejected'}",
                                                       flush=True))
        secs = time.perf_counter() - t0
        import onnx

        before = evaluate(onnx.load(path), test)
        after = evaluate(res.model, test)
        row = {"model": name, "params_before": res.params0, "params_after": res.params,
               "params_kept": res.params / res.params0, "val_loss_before": res.loss0, "val_loss_after": res.loss,
               "test_acc_before": before["accuracy"], "test_acc_after": after["accuracy"],
               "test_loss_before": before["loss"], "test_loss_after": after["loss"],
               "rounds": len(res.history), "accepted": sum(h["accepted"] for h in res.history),
               "stopped": res.stopped, "seconds": round(secs, 1),
               "history": [{k: h[k] for k in ("iter", "params_start", "params_over", "loss_over", "loss_retuned",
                                              "accuracy_retuned", "epochs", "accepted")} for h in res.history]}
        assert count_params(res.model) == res.params
        rows.append(row)
        print(f"{name}: {res.params0:,} -> {res.params:,} params ({row['params_kept']:.1%}), test acc "
              f"{before['accuracy']:.4f} -> {after['accuracy']:.4f}; {res.stopped}; {secs:.0f} s", flush=True)
    setting = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                          f"torch {torch.__version__}",
               "rho": args.rho, "tau": 0.01, "q": args.q, "eps_floor": args.eps_floor, "quick": args.quick}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"study_retune_dag{args.tag}.json"), "w") as f:
        json.dump({"setting": setting, "rows": rows}, f, indent=1)
    lines = [f"Setting: rho {args.rho:g}, tau 0.01, q {args.q:g}, eps floor {args.eps_floor:g}; digits split 1147 train / "
             f"200 validation / 450 test (seed 0); {setting['machine']}.", "",
             "| model | params | kept | rounds (accepted) | val loss | test acc | test loss | stopped | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_before']:,} -> {r['params_after']:,} | {r['params_kept']:.1%} | "
                     f"{r['rounds']} ({r['accepted']}) | {r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f} | "
                     f"{r['test_acc_before']:.1%} -> {r['test_acc_after']:.1%} | "
                     f"{r['test_loss_before']:.4f} -> {r['test_loss_after']:.4f} | {r['stopped']} | "
                     f"{r['seconds']:.0f} |")
    with open(os.path.join(RESULTS, f"study_retune_dag{args.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
