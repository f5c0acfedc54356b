"""Greedy per-layer eps (the compression paper's Algorithm 3, ``fibgraph tune``)
on models of the hypergraph path, trained on scikit-learn digits (issue 5,
items 1 and 4).

Data: ``load_digits``, pixels / 16, each 8x8 image a sequence of 8 rows of 8
features (the residual MLP reads the 64 pixels flat); stratified split
(seed 0): 1,147 train / 200 calibration (the tune loss) / 450 test (reported).
Models (Adam lr 3e-3, batch 64, early stopping on the calibration loss with
patience 5, at most 60 epochs, best state restored, seed 0, 2 torch threads),
exported with torch's legacy ONNX exporter (opset 17):

- residual MLP: x(64) -> h = relu(Linear(64, 64)); twice h = h +
  Linear(128, 64)(relu(Linear(64, 128)(h))) (a residual stream with two
  feed-forward blocks); Linear(64, 10);
- LSTM(8 -> 64) + Linear(64, 10) on the last step (``seq_models.LSTMNet``);
- Transformer: Linear(8, 32) + learned positions, 2 post-norm encoder layers
  (4 heads, ReLU feed-forward 32 -> 64 -> 32), mean over steps, Linear(32, 10)
  (``seq_models.TfNet``).

Tune: ``fibgraph.importers.tuning.tune_model(path, calibration, tau, steps=8,
linkage)`` - exactly what ``fibgraph tune`` runs - for each tau; then the eps
file is applied with ``fibgraph.importers.api.compress_model`` (what ``fibgraph
compress --eps-file`` runs) and the written model is evaluated on the test
split with ``fibgraph.importers.api.evaluate`` (onnxruntime).  Parameters are
``count_params`` of the ONNX files.  Seconds: the whole ``tune_model`` call on
this machine.

Writes ``benchmarks/results/study_tune_dag.json`` and ``.md``; the models
(original and tuned, ``examples/out/tune_dag_<model>[_tau<tau>].onnx``) and the
test splits (``examples/out/tune_dag_<model>_test.npz``) stay for
``benchmarks/bench_latency.py``.  Run from the
repository root: ``python examples/study_tune_dag.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from seq_models import LSTMNet, TfNet, digits_seq_split, export, n_params  # noqa: E402

from fibgraph.importers.api import compress_model, count_params, evaluate  # noqa: E402
from fibgraph.importers.torch_base import retune  # noqa: E402
from fibgraph.importers.tuning import tune_model  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
SLUG = {"residual MLP": "resmlp", "LSTM": "lstm", "Transformer": "transformer"}


class ResidualMLP(nn.Module):
    """x(64) -> h = relu(Linear(64, 64)); twice h = h + Linear(128, 64)(relu(Linear(64, 128)(h)));
    Linear(64, 10): a residual stream with two feed-forward blocks."""

    def __init__(self, width=64, ff=128, blocks=2):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.mid = nn.ModuleList([nn.Linear(width, ff) for _ in range(blocks)])
        self.back = nn.ModuleList([nn.Linear(ff, width) for _ in range(blocks)])
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.reshape(x.shape[0], -1)))
        for a, b in zip(self.mid, self.back):
            h = h + b(torch.relu(a(h)))
        return self.out(h)


def _save(path, x, y):
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and one tau (a smoke run)")
    ap.add_argument("--taus", default="0.01,0.05,0.2")
    ap.add_argument("--linkage", default="average", choices=["average", "complete"])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    taus = [0.05] if args.quick else [float(t) for t in args.taus.split(",")]
    epochs = 5 if args.quick else 60
    (xtr, ytr), (xcal, ycal), (xte, yte) = digits_seq_split(seed=0, val=200)
    tmp = os.path.join(ROOT, "examples", "out")
    os.makedirs(tmp, exist_ok=True)
    rows = []
    models = [("residual MLP", ResidualMLP, True), ("LSTM", lambda: LSTMNet(hidden=64), False),
              ("Transformer", lambda: TfNet(d=32, ff=64, layers=2), False)]
    for name, make, flat in models:
        torch.manual_seed(0)
        m = make()
        shape = (lambda a: a.reshape(len(a), -1)) if flat else (lambda a: a)
        tr = (torch.tensor(shape(xtr)), torch.tensor(ytr))
        cal = (torch.tensor(shape(xcal)), torch.tensor(ycal))
        fit = retune(m, tr, cal, lr=3e-3, batch=64, max_epochs=epochs, patience=5, seed=0)
        tag = SLUG[name]
        path = os.path.join(tmp, f"tune_dag_{tag}.onnx")
        if flat:
            from fibgraph.importers.torch_export import export_torch

            export_torch(m.eval(), torch.zeros(2, 64), path, dynamo=False, opset=17)
        else:
            export(m, path)
        cal_npz = _save(os.path.join(tmp, f"tune_dag_{tag}_cal.npz"), shape(xcal), ycal)
        test_npz = _save(os.path.join(tmp, f"tune_dag_{tag}_test.npz"), shape(xte), yte)
        before = evaluate(path, test_npz)
        p0 = count_params(__import__("onnx").load(path))
        print(f"{name}: {n_params(m):,} params, {fit['epochs']} epochs, test acc {before['accuracy']:.4f}",
              flush=True)
        for tau in taus:
            t0 = time.perf_counter()
            rep = tune_model(path, cal_npz, tau=tau, steps=8, linkage=args.linkage)
            secs = time.perf_counter() - t0
            eps_path = os.path.join(tmp, f"tune_dag_{tag}_tau{tau:g}.json")
            with open(eps_path, "w") as f:
                json.dump(rep["eps"], f)
            small = os.path.join(tmp, f"tune_dag_{tag}_tau{tau:g}.onnx")
            crep = compress_model(path, small, eps_file=eps_path, linkage=args.linkage)
            after = evaluate(small, test_npz)
            row = {"model": name, "tau": tau, "params_before": p0, "params_after": crep["params_after"],
                   "params_kept": crep["params_after"] / p0,
                   "cal_loss_before": rep["loss_before"], "cal_loss_after": rep["loss_after"],
                   "limit": rep["limit"], "test_acc_before": before["accuracy"],
                   "test_acc_after": after["accuracy"], "test_loss_before": before["loss"],
                   "test_loss_after": after["loss"], "evaluations": rep["evaluations"],
                   "distinct_models_run": rep["distinct_models_run"], "seconds": round(secs, 2),
                   "layers": [{k: ly[k] for k in ("weight", "eps", "nodes_before", "nodes_after")
                               if k in ly} | ({"tied": ly["tied"]} if ly.get("tied") else {})
                              for ly in rep["layers"] if not ly["output_layer"]]}
            assert row["params_after"] == rep["params_after"]
            assert rep["loss_after"] <= rep["limit"] + 1e-12
            rows.append(row)
            print(f"  tau {tau:g}: params kept {row['params_kept']:.1%}, cal loss {rep['loss_before']:.4f} -> "
                  f"{rep['loss_after']:.4f}, test acc {before['accuracy']:.4f} -> {after['accuracy']:.4f}, "
                  f"{secs:.1f} s", flush=True)
    setting = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                          f"torch {torch.__version__}",
               "split": f"{len(ytr)} train / {len(ycal)} calibration / {len(yte)} test",
               "linkage": args.linkage, "steps": 8, "quick": args.quick, "epochs_max": epochs}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "study_tune_dag.json"), "w") as f:
        json.dump({"setting": setting, "rows": rows}, f, indent=1)
    lines = [f"Setting: {setting['split']} (digits, seed 0); {args.linkage} linkage, 8 bisection steps; "
             f"{setting['machine']}.", "",
             "| model | tau | params | kept | cal loss (limit) | test acc | layers (eps: nodes) | tune s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lys = "; ".join(f"{ly['weight']}{' +' + str(len(ly['tied'])) if ly.get('tied') else ''} "
                        f"{ly['eps']:.3g}: {ly['nodes_before']}->{ly['nodes_after']}" for ly in r["layers"])
        lines.append(f"| {r['model']} | {r['tau']:g} | {r['params_before']:,} -> {r['params_after']:,} | "
                     f"{r['params_kept']:.1%} | {r['cal_loss_before']:.4f} -> {r['cal_loss_after']:.4f} "
                     f"({r['limit']:.4f}) | {r['test_acc_before']:.1%} -> {r['test_acc_after']:.1%} | {lys} | "
                     f"{r['seconds']:.1f} |")
    with open(os.path.join(RESULTS, "study_tune_dag.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
