"""onnxruntime CPU latency of original against fibration-compressed models.

Models (built by the studies, trained here if missing):

- ``examples/out/mnist_mlp_main.onnx``: the 784-500-500-500-10 MNIST MLP of
  ``examples/study_mnist_mlp.py``, compressed at eps 0.7 / 0.8 / 0.9
  (complete linkage, cosine);
- ``examples/out/digits_cnn_study.onnx``: the digits CNN of
  ``examples/study_digits.py``, compressed at eps 0.5 / 0.7.

The compressed models are written in memory (``write_base_onnx``), exactly
what ``fibgraph compress`` writes.

Hypergraph models (``--dag``): the digits residual MLP, LSTM and Transformer
of ``examples/study_tune_dag.py`` and their ``fibgraph tune`` compressions
(one per tau), read from ``examples/out/tune_dag_*.onnx`` (the study is run
first if they are missing).  Each model gets its own
``InferenceSession`` (CPU provider, ``--threads`` intra-op threads, graph
optimisations on), ``--warmup`` warm-up runs, then ``--repeats`` timed runs
at each batch size; the median per run (and the 10th/90th percentiles) is
reported next to the parameter ratio.  Run from the repository root::

    python benchmarks/bench_latency.py [--threads 1] [--repeats 300] [--md benchmarks/latency_results.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

CASES = [("mnist_mlp_main.onnx", (784,), [0.7, 0.8, 0.9]),
         ("digits_cnn_study.onnx", (1, 8, 8), [0.5, 0.7])]
DAG_CASES = [("tune_dag_resmlp", (64,)), ("tune_dag_lstm", (8, 8)), ("tune_dag_transformer", (8, 8))]


def dag_variants(out):
    """(case, input shape, test data, [(label, ModelProto)]) of the tuned hypergraph models."""
    import glob

    import onnx

    if not all(os.path.exists(os.path.join(out, c + ".onnx")) for c, _ in DAG_CASES):
        from study_tune_dag import main as study

        study([])
    cases = []
    for case, shape in DAG_CASES:
        z = np.load(os.path.join(out, case + "_test.npz"))
        small = sorted(glob.glob(os.path.join(out, case + "_tau*.onnx")),
                       key=lambda p: float(p.rsplit("_tau", 1)[1][:-5]))
        variants = [("original", onnx.load(os.path.join(out, case + ".onnx")))]
        variants += [("tune tau " + p.rsplit("_tau", 1)[1][:-5], onnx.load(p)) for p in small]
        cases.append((case + ".onnx", shape, (z["x"], z["y"]), variants))
    return cases


def ensure_models():
    out = os.path.join(ROOT, "examples", "out")
    if not os.path.exists(os.path.join(out, "mnist_mlp_main.onnx")):
        import torch
        from study_lib import export, mnist_split, train
        from study_mnist_mlp import build

        xtr, _, ytr, _ = mnist_split(4000, 0)
        torch.manual_seed(0)
        m = build()
        train(m, xtr, ytr, epochs=1000, steps=600, seed=0)
        os.makedirs(out, exist_ok=True)
        export(m, os.path.join(out, "mnist_mlp_main.onnx"), torch.zeros(1, 784))
    if not os.path.exists(os.path.join(out, "digits_cnn_study.onnx")):
        import torch
        from study_digits import build_cnn
        from study_lib import digits_split, export, train

        xtr, _, ytr, _ = digits_split(0)
        torch.manual_seed(0)
        m = build_cnn()
        train(m, xtr.reshape(-1, 1, 8, 8), ytr, epochs=40, batch=64, seed=0)
        export(m, os.path.join(out, "digits_cnn_study.onnx"), torch.zeros(1, 1, 8, 8))
    return out


def test_data(fname):
    """The test split the model was evaluated on in its study."""
    if fname.startswith("mnist"):
        p = os.path.join(ROOT, "examples", "out", "mnist_test.npz")
        if os.path.exists(p):
            z = np.load(p)
            return z["x"], z["y"]
        from study_lib import mnist_split

        _, xte, _, yte = mnist_split(4000, 0)
        return xte, yte
    from study_lib import digits_split

    _, xte, _, yte = digits_split(0)
    return xte.reshape(-1, 1, 8, 8), yte


def timed(sess, x, warmup, repeats):
    name = sess.get_inputs()[0].name
    feed = {name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    ts = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts[i] = time.perf_counter() - t0
    return ts


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--md", default=None, help="write a markdown table here")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dag", action="store_true",
                    help="also the hypergraph models of examples/study_tune_dag.py (residual MLP, LSTM, Transformer)")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from fibgraph.importers.api import count_params, evaluate
    from fibgraph.importers.tuning import DagCompressor

    out = ensure_models()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    rng = np.random.default_rng(0)
    rows = []
    work = []
    for fname, shape, eps_list in CASES:
        path = os.path.join(out, fname)
        mc = DagCompressor(path, "complete", "cosine", False)
        _, base0, _ = mc.compressed({}, check=False)
        variants = [("original", mc.model, [r["nodes_before"] for r in mc.layer_rows({}, base0)])]
        for e in eps_list:
            table = {n: e for n in mc.tunable}
            m2, base, _ = mc.compressed(table, check=True)
            variants.append((f"eps {e:g}", m2, [r["nodes_after"] for r in mc.layer_rows(table, base)]))
        work.append((fname, shape, test_data(fname), variants))
    if args.dag:
        for fname, shape, test, variants in dag_variants(out):
            work.append((fname, shape, test, [(lb, m, None) for lb, m in variants]))
    for fname, shape, test, variants in work:
        p0 = count_params(variants[0][1])
        for label, model, units in variants:
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            p = count_params(model)
            acc = evaluate(model, test)["accuracy"]
            for b in args.batches:
                x = rng.standard_normal((b,) + shape).astype(np.float32)
                ts = timed(sess, x, args.warmup, args.repeats)
                rows.append({"model": fname, "variant": label, "units": units, "params": p, "test_accuracy": acc,
                             "params_ratio": p / p0, "batch": b,
                             "median_ms": 1e3 * float(np.median(ts)), "p10_ms": 1e3 * float(np.percentile(ts, 10)),
                             "p90_ms": 1e3 * float(np.percentile(ts, 90))})
                r = rows[-1]
                print(f"{fname:24s} {label:9s} params {p:>8,} ({r['params_ratio']:6.1%}) batch {b:3d}: "
                      f"median {r['median_ms']:.4f} ms  [p10 {r['p10_ms']:.4f}, p90 {r['p90_ms']:.4f}]", flush=True)
    for r in rows:
        o = next(x for x in rows if x["model"] == r["model"] and x["variant"] == "original"
                 and x["batch"] == r["batch"])
        r["speedup"] = o["median_ms"] / r["median_ms"]
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = []
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": ort.__version__,
               "python": platform.python_version(), "threads": args.threads, "warmup": args.warmup,
               "repeats": args.repeats, "loadavg_at_end": load}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)
    if args.md:
        lines = ["# Inference latency: original vs fibration-compressed (onnxruntime, CPU)\n",
                 f"Machine: {machine['cpu']}, {machine['cores']} cores (a shared VM: other jobs were running, "
                 f"load average at the end {' '.join(load)}); onnxruntime {machine['onnxruntime']}, "
                 f"CPUExecutionProvider, {args.threads} intra-op thread(s); {args.warmup} warm-up runs, "
                 f"median of {args.repeats} timed runs (p10-p90 in brackets). No GPU was available for this task.\n",
                 f"Produced by `python benchmarks/bench_latency.py{' --dag' if args.dag else ''} "
                 "--md benchmarks/latency_results.md`. "
                 "Compression: fibration, complete linkage, cosine, no rescaling, one eps for every layer "
                 "(test accuracy without retraining on the studies' test splits); the hypergraph models "
                 "(tune_dag_*): `fibgraph tune` at each tau, average linkage "
                 "(examples/study_tune_dag.py).\n",
                 "| model | variant | units per layer | params (kept) | test acc | batch | median ms | "
                 "p10-p90 ms | speedup |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            units = "-".join(map(str, r["units"])) if r["units"] else "see study_tune_dag"
            lines.append(f"| {r['model']} | {r['variant']} | {units} | "
                         f"{r['params']:,} ({r['params_ratio']:.1%}) | "
                         f"{100 * r['test_accuracy']:.1f}% | {r['batch']} | "
                         f"{r['median_ms']:.4f} | {r['p10_ms']:.4f}-{r['p90_ms']:.4f} | {r['speedup']:.2f}x |")
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
