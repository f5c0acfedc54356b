#!/usr/bin/env python
"""Speed and memory of the refinement engine on large random digraphs.

(a) speed: a random digraph with cycles is written as an edge-list file;
    ``fibgraph.cli.graphs.color_graph_file`` (read the file, colour, write the
    JSON) is timed against a plain-Python pipeline (line-by-line reader, the
    per-node signature-tuple refinement of ``tests/engine_reference.py``,
    ``json.dump``).  Both partitions are compared.
(b) memory: graphs of ``--mem-edges`` edges are generated in memory (int32
    ids), built as a WeightedDigraph and coloured (fibration, rounds
    schedule); peak resident memory (``ru_maxrss``) of a fresh child process
    per size is reported, with the same child's peak before colouring.

Graph kinds: ``random`` (G(n, m): m uniform random edges on n nodes, so
self-loops, multi-edges and cycles occur) and ``lift`` (a randomised lift of
a random base with integer weights: planted fibers of average size
``--fiber``, cycles everywhere).

Usage::

    python benchmarks/bench_engine.py                       # small defaults
    python benchmarks/bench_engine.py --edges 1600000 --mem-edges 10000000 100000000
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def make_edges(kind, m, n, seed, weights="int", fiber=8):
    """``(src, dst, w or None, n)`` int32/float arrays of about ``m`` edges."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        src = rng.integers(0, n, m, dtype=np.int32)
        dst = rng.integers(0, n, m, dtype=np.int32)
        if weights == "none":
            w = None
        elif weights == "int":
            w = rng.integers(1, 5, m, dtype=np.int32)
        else:
            w = rng.random(m, dtype=np.float32)
        return src, dst, w, n
    # lift: base with nb nodes, sizes ~ fiber, base edges so that the lift has ~m edges
    from fibgraph.graph import WeightedDigraph
    from fibgraph.lift import lift

    nb = max(2, n // fiber)
    sizes = rng.integers(max(1, fiber // 2), fiber + fiber // 2 + 1, nb)
    mean_pair = float(np.mean(sizes)) ** 2
    mb = max(1, int(m / mean_pair))
    bs = rng.integers(0, nb, mb)
    bd = rng.integers(0, nb, mb)
    bw = rng.integers(1, 10, mb)
    base = WeightedDigraph.from_edges(bs, bd, bw, n=nb)
    g, _ = lift(base, sizes, rng=rng)
    b = g.blocks[0]
    w = b.values[:, 0]
    w = w.astype(np.int32) if b.exact else w
    return b.cols.astype(np.int32), b.rows.astype(np.int32), w, g.n


def write_edgelist(path, src, dst, w):
    with open(path, "w") as f:
        chunk = 1_000_000
        for a in range(0, src.size, chunk):
            s, d = src[a:a + chunk].tolist(), dst[a:a + chunk].tolist()
            if w is None:
                f.write("".join(f"{x} {y}\n" for x, y in zip(s, d)))
            else:
                ww = w[a:a + chunk].tolist()
                f.write("".join(f"{x} {y} {z}\n" for x, y, z in zip(s, d, ww)))


def speed(args):
    from engine_reference import plain_refine_fast, read_edgelist_plain, write_json_plain
    # import everything the engine needs first: module import time is not measured
    import fibgraph.graphio  # noqa: F401
    import fibgraph.symmetry  # noqa: F401
    import rich.console  # noqa: F401
    import scipy.sparse  # noqa: F401
    from fibgraph.cli.graphs import color_graph_file

    n = args.nodes or max(2, args.edges // 8)
    src, dst, w, n = make_edges(args.kind, args.edges, n, args.seed, "int", args.fiber)
    out = {"kind": args.kind, "edges": int(src.size), "nodes": int(n)}
    with tempfile.TemporaryDirectory() as d:
        el = os.path.join(d, "g.edgelist")
        write_edgelist(el, src, dst, w)
        out["file_MB"] = round(os.path.getsize(el) / 2 ** 20, 1)
        j1, j2 = os.path.join(d, "engine.json"), os.path.join(d, "plain.json")
        t0 = time.perf_counter()
        color_graph_file(el, "fibration", json_out=j1, quiet=True)
        out["engine_s"] = round(time.perf_counter() - t0, 2)
        if not args.skip_plain:
            t0 = time.perf_counter()
            nn, s, dd, ww = read_edgelist_plain(el)
            t1 = time.perf_counter()
            lab = plain_refine_fast(nn, s, dd, ww)
            t2 = time.perf_counter()
            write_json_plain(j2, lab)
            t3 = time.perf_counter()
            out["plain_s"] = round(t3 - t0, 2)
            out["plain_read_s"] = round(t1 - t0, 2)
            out["plain_refine_s"] = round(t2 - t1, 2)
            out["speedup"] = round(out["plain_s"] / out["engine_s"], 1)
            a, b = json.load(open(j1)), json.load(open(j2))
            out["same_partition"] = a["partition"] == b["partition"]
        out["colours"] = json.load(open(j1))["colors"]
    return out


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mem_child(m, kind, weights, seed, fiber):
    from fibgraph.graph import Block, WeightedDigraph
    from fibgraph.engine import refine

    n = max(2, m // 10)
    t0 = time.perf_counter()
    src, dst, w, n = make_edges(kind, m, n, seed, weights, fiber)
    gen_peak = _peak_mb()
    nodes = np.arange(n, dtype=np.int64)
    vals = np.ones(src.size, np.float64) if w is None else w.astype(np.float64)
    blk = Block(src=nodes, dst=nodes, rows=dst, cols=src, values=vals,
                exact=w is None or np.issubdtype(w.dtype, np.integer), name="edges")
    del src, dst, w, vals
    g = WeightedDigraph(n=n, blocks=[blk])
    t_build = time.perf_counter() - t0
    built = _peak_mb()
    t0 = time.perf_counter()
    r = refine(g, "in")
    t_ref = time.perf_counter() - t0
    print(json.dumps({"edges": int(g.n_edges), "nodes": int(n), "kind": kind, "weights": weights,
                      "peak_after_generate_MB": round(gen_peak), "peak_after_build_MB": round(built),
                      "peak_MB": round(_peak_mb()), "build_s": round(t_build, 1),
                      "refine_s": round(t_ref, 1), "rounds": r.rounds,
                      "colours": int(r.labels.max()) + 1}))


def memory(args):
    res = []
    for m in args.mem_edges:
        cmd = [sys.executable, os.path.abspath(__file__), "--_memchild", str(m), "--kind",
               args.mem_kind, "--weights", args.weights, "--seed", str(args.seed),
               "--fiber", str(args.fiber)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            res.append({"edges": m, "error": (p.stderr.strip().splitlines() or ["?"])[-1],
                        "returncode": p.returncode})
        else:
            res.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(res[-1]), flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edges", type=int, default=200_000, help="edges of the speed graph")
    ap.add_argument("--nodes", type=int, default=0, help="nodes of the speed graph (default edges/8)")
    ap.add_argument("--kind", choices=["random", "lift"], default="random")
    ap.add_argument("--fiber", type=int, default=8, help="mean planted fiber size (kind=lift)")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--mem-edges", type=int, nargs="*", default=[1_000_000])
    ap.add_argument("--mem-kind", choices=["random", "lift"], default="random")
    ap.add_argument("--weights", choices=["int", "float", "none"], default="int")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_memchild", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memchild:
        mem_child(args._memchild, args.kind, args.weights, args.seed, args.fiber)
        return
    if args.edges:
        print(json.dumps(speed(args)), flush=True)
    if args.mem_edges:
        memory(args)


if __name__ == "__main__":
    main()
