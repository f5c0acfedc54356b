"""Peak memory and wall time of ``fibgraph compress M -o B --eps 0 --verify``
(or ``--keep F --verify`` with ``--keep F``; without ``--verify`` with
``--no-verify``: the written base is then only checked and loaded)
against the model's size: one fresh process per model, measured with
``/usr/bin/time -v`` (its "Maximum resident set size"), so the numbers are
what a user sees.

    python benchmarks/memory_scaling.py MODEL.onnx ... --json out.json --md out.md \\
        [--plot out.png] [--label NAME=MODEL ...] [--extra ARG ...]

Models come from benchmarks/memory_models.py.  File size counts the .onnx
and its external data files; parameters are the float tensors' elements.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def model_size(path):
    """(bytes on disk incl. external data, float parameters)."""
    m = onnx.load(path, load_external_data=False)
    files = {os.path.join(os.path.dirname(path), kv.value) for t in m.graph.initializer for kv in t.external_data
             if kv.key == "location"}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type in floats)
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in floats:
                    params += int(np.prod(a.t.dims))
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in files), params


def measure(path, extra=(), timeout=1800, pythonpath=ROOT, keep=None, verify=True):
    """Run the CLI under /usr/bin/time -v; (seconds, peak RSS bytes, exit code, report)."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as d:
        out, rep = os.path.join(d, "base.onnx"), os.path.join(d, "report.json")
        env = dict(os.environ, PYTHONPATH=pythonpath)
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "fibgraph", "compress", path, "-o", out,
               *(["--eps", "0"] if keep is None else ["--keep", str(keep)]), *(["--verify"] if verify else []),
               "--report", rep, *extra]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=pythonpath)  # -m: cwd first
        wall = time.perf_counter() - t
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        rss = int(m.group(1)) * 1024 if m else None
        report = json.load(open(rep)) if os.path.exists(rep) else None
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-2000:])
        return wall, rss, p.returncode, report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="NAME=PATH or PATH")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md", default=None)
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--keep", type=float, default=None, help="compress --keep F instead of --eps 0")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="compress without --verify")
    ap.add_argument("--pythonpath", default=ROOT, help="the fibgraph checkout to measure")
    ap.add_argument("--plot", default=None, help="time and RSS vs parameters (.png, and .svg beside it)")
    a = ap.parse_args()
    rows = json.load(open(a.json)) if os.path.exists(a.json) else []
    code = "this branch" if os.path.abspath(a.pythonpath) == ROOT else a.pythonpath
    for spec in a.models if a.models != ["-"] else []:        # "-": only redraw the table and plot
        name, _, path = spec.rpartition("=")
        path = os.path.abspath(path)
        name = name or os.path.basename(path)
        size, params = model_size(path)
        wall, rss, rc, rep = measure(path, a.extra, pythonpath=a.pythonpath, keep=a.keep, verify=a.verify)
        setting = ("eps 0" if a.keep is None else f"keep {a.keep:g}") + ("" if a.verify else ", no verify")
        row = {"model": name, "setting": setting, "path": path, "file_mb": size / 2**20, "params": params,
               "seconds": wall,
               "peak_rss_mb": (rss or 0) / 2**20, "ratio": (rss or 0) / size, "exit": rc,
               "max_abs_diff": (rep or {}).get("verify", {}).get("max_abs_diff"),
               "params_after": (rep or {}).get("params_after"), "code": code}
        print(f"{name}: {size / 2**20:.0f} MB, {params:,} params: {wall:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB "
              f"({row['ratio']:.2f}x), exit {rc}, verify {row['max_abs_diff']}", flush=True)
        rows = json.load(open(a.json)) + [row] if os.path.exists(a.json) else rows + [row]   # another run may have added
        rows = list({(r["model"], r.get("code"), r.get("setting", "eps 0")): r for r in rows}.values())
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.md:
        write_md(rows, a.md)
    if a.plot:
        plot([r for r in rows if r.get("code") == code], a.plot,
             [("mlp", "o-"), ("gpt2", "s-"), ("bert", "^"), ("minilm", "v"), ("resnet", "D")])


def write_md(rows, path):
    lines = ["| model | setting | file MB | params | kept | wall s | peak RSS MB | RSS / file | verify max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kept = f"{r['params_after'] / r['params']:.1%}" if r.get("params_after") else ""
        lines.append(f"| {r['model']} | {r.get('setting', 'eps 0')} | {r['file_mb']:.0f} | {r['params'] / 1e6:.1f}M | "
                     f"{kept} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['ratio']:.2f} | {r['max_abs_diff']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows, out, family):
    """Wall time and peak RSS against parameters for the models whose name starts with ``family``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for fam, mark in family:
        rs = sorted((r for r in rows if r["model"].startswith(fam) and r["exit"] == 0
                     and r.get("setting", "eps 0") == "eps 0"), key=lambda r: r["params"])
        if not rs:
            continue
        p = [r["params"] / 1e6 for r in rs]
        ax[0].plot(p, [r["seconds"] for r in rs], mark, label=fam)
        ax[1].plot(p, [r["peak_rss_mb"] / 1024 for r in rs], mark, label=f"{fam}: peak RSS")
        ax[1].plot(p, [2.5 * r["file_mb"] / 1024 for r in rs], ":", color="grey")
    ax[0].set(xlabel="parameters (M)", ylabel="wall time (s)", xscale="log", yscale="log")
    ax[1].set(xlabel="parameters (M)", ylabel="peak RSS (GB)", xscale="log", yscale="log")
    ax[1].plot([], [], ":", color="grey", label="2.5 x file size")
    for x in ax:
        x.grid(alpha=0.3)
        x.legend(fontsize=8)
    fig.suptitle("fibgraph compress --eps 0 --verify (2 cores)", fontsize=10)
    fig.tight_layout()
    for ext in (".png", ".svg"):
        fig.savefig(os.path.splitext(out)[0] + ext, dpi=200)


if __name__ == "__main__":
    main()
