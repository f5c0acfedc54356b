"""Blocked against exact complete linkage on one weight's rows: classes, wall
time and peak memory of ``threshold_clusters`` at each eps, each run in a fresh
process (peak RSS from ``resource``, the rows' load included, so compare the
two columns, not the absolute numbers).

    python benchmarks/blocked_linkage.py MODEL.onnx WEIGHT [--eps 0.3 0.62 1.0] [--metric euclidean] [--json out.json]

The rows are the weight's output units (a MatMul weight (in, out) is read
transposed).  "exact" raises ``FIBGRAPH_EXACT_LINKAGE_ROWS`` above the rows;
"blocked" uses the default (4,096: larger components run blocked).
Default: the 18,710-class head ``linear_8.w_0`` of rapidocr's PP-OCRv6 rec
small, where the package is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, resource, sys, time
import numpy as np, onnx
from onnx import numpy_helper
from fibgraph.engine.cluster import threshold_clusters
path, weight, eps, metric = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
t = next(t for t in onnx.load(path).graph.initializer if t.name == weight)
W = numpy_helper.to_array(t)
X = np.ascontiguousarray(W.T if W.ndim == 2 else W.reshape(W.shape[0], -1), dtype=np.float64)
stats = {}
t0 = time.perf_counter()
lab = threshold_clusters(X, eps, "complete", metric, stats=stats)
print(json.dumps({"rows": X.shape[0], "classes": int(lab.max()) + 1, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "blocked_rows": stats.get("blocked_rows")}))
"""


def default_model():
    import importlib.util

    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "PP-OCRv6_rec_small.onnx")
    return path if os.path.exists(path) else None


def run(path, weight, eps, metric, exact):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if exact:
        env["FIBGRAPH_EXACT_LINKAGE_ROWS"] = str(10 ** 6)
    else:
        env.pop("FIBGRAPH_EXACT_LINKAGE_ROWS", None)
    p = subprocess.run([sys.executable, "-c", CHILD, path, weight, str(eps), metric], capture_output=True,
                       text=True, env=env)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("weight", nargs="?", default="linear_8.w_0")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.62, 1.0])
    ap.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"])
    ap.add_argument("--json")
    a = ap.parse_args()
    path = a.model or default_model()
    if path is None:
        raise SystemExit("give MODEL.onnx WEIGHT (rapidocr's PP-OCRv6 rec small is not installed)")
    rows = []
    print("| eps | rows | exact: classes | exact: s | exact: peak RSS MB | blocked: classes | blocked: s "
          "| blocked: peak RSS MB | largest blocked component |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for eps in a.eps:
        ex, bl = run(path, a.weight, eps, a.metric, True), run(path, a.weight, eps, a.metric, False)
        rows.append({"eps": eps, "metric": a.metric, "exact": ex, "blocked": bl})

        def cells(r):
            if "error" in r:
                return [r["error"], "", ""]
            return [str(r["classes"]), f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}"]
        n = bl.get("rows", ex.get("rows", ""))
        print(f"| {eps:g} | {n} | " + " | ".join(cells(ex) + cells(bl)) + f" | {bl.get('blocked_rows') or '-'} |",
              flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": path, "weight": a.weight, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
