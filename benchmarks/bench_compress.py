"""Benchmark fibgraph's colouring + compression of MLPs against a plain Algorithm 1.

Two parts (``--part a``, ``--part b`` or ``--part all``, the default):

(a) ``widths``: for each hidden width ``n`` a synthetic ONNX MLP
    ``n_in - n - n - 10`` (default ``n_in`` 256, ReLU, Gemm with transB=1,
    float32, seed 0) with planted structure (see :func:`planted_mlp`), at
    eps = 0 and each ``--eps``.  Per case, each implementation runs in a FRESH
    subprocess (so ``ru_maxrss`` is that case's own peak):

    - ``fibgraph``: the hypergraph path: ``import_dag(model)`` (model parsed
      from bytes in memory), ``colour_dag(imp, 'fibration', eps)``, the
      writer's groups (``dag_groups``: "compress"), ``write_dag_base`` +
      ``SerializeToString``;
    - ``alg1``: the weights read from the model's initializers, then the
      paper's Algorithm 1 done plainly, layer by layer: aggregate ``W`` by the
      previous layer's colours, append the bias column,
      ``fibgraph.engine.cluster.algorithm1`` (pdist on the full ``n x n`` distance
      matrix, scipy linkage, cut at eps).  Both run the magnitude-aware
      euclidean distance without the rescaling merge (part (a) ignores
      ``--metric`` and ``--no-rescale``).  Hidden layers only; the
      output layer keeps its units in both.  At eps = 0 Algorithm 1 is cut at
      ``--ref-eps0`` (default 1e-6: "equal up to float32 rounding" for the
      euclidean distance, which is linear in the difference).

    The partitions of every level are compared (canonical labels, so equal
    partitions are equal arrays) and the speedup is alg1 clustering time over
    fibgraph colouring time (both after the same import).

(b) ``e2e``: a synthetic ``784-4096-4096-4096-10`` MLP (same generator)
    written to disk, then ``fibgraph.importers.api.compress_model(path, out, eps=...)``
    (load, import, colour, compress, write with ONNX check) at eps = 0 and
    each ``--eps``, one fresh subprocess per eps.

Timings are wall-clock (``time.perf_counter``).  Peak memory is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the subprocess: ``peak_total``
over the whole process (Python, numpy, onnx, the model) and ``peak_stage``
after resetting the peak (``/proc/self/clear_refs``) once the model is
imported, i.e. the peak during the measured stage.

Run from the repository root (2 cores: a few minutes with the defaults)::

    python benchmarks/bench_compress.py                      # both parts
    python benchmarks/bench_compress.py --part a --widths 256 1024 4096
    python benchmarks/bench_compress.py --part b --eps 0.1
    python benchmarks/bench_compress.py --json results.json --md results.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ------------------------------------------------------------ synthetic models
def _group_sizes(rng, n_units, lo, hi):
    sizes, total = [], 0
    while total < n_units:
        s = int(min(rng.integers(lo, hi + 1), n_units - total))
        if s < 2:
            break
        sizes.append(s)
        total += s
    return sizes


def planted_layer(rng, n_in, n_out, prev_exact, frac_exact=0.25, frac_near=0.25,
                  group=(2, 8), sigma=(0.05, 0.4)):
    """One hidden layer ``(W (n_out, n_in), b (n_out,), exact labels, info)``.

    - ``frac_exact`` of the units form EXACT fibers (groups of ``group`` sizes):
      one prototype row per group, and each member adds a random perturbation
      whose sum over every exact fiber ``prev_exact`` of the previous layer is
      zero (balanced, not duplicated, when the previous fibers are non-trivial;
      identical rows after the input layer).  Equal bias in a group.
    - ``frac_near`` of the units form NEAR-DUPLICATE groups: prototype plus
      independent noise of relative size ``sigma_g ~ U(sigma)`` per group
      (weights and bias), cosine distance about ``sigma_g**2``; merged by eps
      only when ``sigma_g**2`` is below eps (average linkage), so some groups
      straddle eps = 0.1.
    - the rest are independent random units.
    Rows ``~ N(0, 1/n_in)`` (norm about 1), biases ``~ N(0, 0.1)``.
    """
    ex_sizes = _group_sizes(rng, int(frac_exact * n_out), *group)
    nr_sizes = _group_sizes(rng, int(frac_near * n_out), *group)
    n_ex, n_nr = sum(ex_sizes), sum(nr_sizes)
    n_single = n_out - n_ex - n_nr
    std = 1.0 / np.sqrt(n_in)
    g_ex = np.repeat(np.arange(len(ex_sizes)), ex_sizes)
    g_nr = np.repeat(np.arange(len(nr_sizes)), nr_sizes)
    # exact fibers: prototype + zero-sum-per-previous-fiber perturbation
    P = rng.normal(0, std, (len(ex_sizes), n_in))
    N = rng.normal(0, std, (n_ex, n_in))
    prev_exact = np.asarray(prev_exact)
    cnt = np.bincount(prev_exact).astype(np.float64)
    multi = np.flatnonzero(cnt > 1)
    Z = np.zeros_like(N)
    if multi.size:
        import scipy.sparse as sp

        cols = np.flatnonzero(np.isin(prev_exact, multi))
        lab = prev_exact[cols]
        ind = sp.csr_matrix((1.0 / cnt[lab], (np.arange(cols.size), lab)), shape=(cols.size, cnt.size))
        means = np.asarray(ind.T @ N[:, cols].T).T          # (n_ex, classes): mean over each class
        Z[:, cols] = N[:, cols] - means[:, lab]
    W_ex = P[g_ex] + Z
    b_ex = rng.normal(0, 0.1, len(ex_sizes))[g_ex]
    # near-duplicate groups
    Q = rng.normal(0, std, (len(nr_sizes), n_in))
    qb = rng.normal(0, 0.1, len(nr_sizes))
    sg = rng.uniform(*sigma, len(nr_sizes))
    W_nr = Q[g_nr] + sg[g_nr, None] * rng.normal(0, std, (n_nr, n_in))
    b_nr = qb[g_nr] + sg[g_nr] * rng.normal(0, 0.1, n_nr)
    # singletons
    W_s = rng.normal(0, std, (n_single, n_in))
    b_s = rng.normal(0, 0.1, n_single)
    W = np.vstack([W_ex, W_nr, W_s])
    b = np.concatenate([b_ex, b_nr, b_s])
    exact = np.concatenate([g_ex, len(ex_sizes) + np.arange(n_nr + n_single)])
    perm = rng.permutation(n_out)
    info = {"exact_groups": len(ex_sizes), "exact_units": n_ex, "near_groups": len(nr_sizes),
            "near_units": n_nr, "singletons": n_single,
            "near_sigma2_below_0.1": int(np.sum(sg ** 2 / (1 + sg ** 2) < 0.1))}
    return W[perm], b[perm], exact[perm], info


def planted_mlp(widths, seed=0, **kw):
    """ONNX ModelProto of a ReLU MLP with planted structure in every hidden layer;
    the output layer is random.  Input ``x`` (batch, widths[0]), output ``logits``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    prev = np.arange(widths[0])
    nodes, inits, infos = [], [], []
    cur = "x"
    L = len(widths) - 1
    for l in range(L):
        n_in, n_out = widths[l], widths[l + 1]
        if l < L - 1:
            W, b, prev, info = planted_layer(rng, n_in, n_out, prev, **kw)
            infos.append(info)
        else:
            W = rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in))
            b = rng.normal(0, 0.1, n_out)
        inits += [numpy_helper.from_array(W.astype(np.float32), f"W{l}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{l}")]
        out = "logits" if l == L - 1 else f"z{l}"
        nodes.append(helper.make_node("Gemm", [cur, f"W{l}", f"b{l}"], [out], transB=1, name=f"gemm{l}"))
        if l < L - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{l}"], name=f"relu{l}"))
            cur = f"h{l}"
    g = helper.make_graph(nodes, "planted_mlp", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", widths[-1]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, infos


# ------------------------------------------------------------ measurement
def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _top(prof, n):
    """The ``n`` functions with the largest own time: (own s, cumulative s, calls, name)."""
    import pstats

    st = pstats.Stats(prof).stats
    rows = sorted(st.items(), key=lambda kv: -kv[1][2])[:n]
    return [(round(v[2], 3), round(v[3], 3), v[1], f"{os.path.relpath(k[0], ROOT) if k[0].startswith(ROOT) else os.path.basename(k[0])}:{k[1]}({k[2]})")
            for k, v in rows]


def algorithm1_layers(layers, n_in, eps, linkage="average", eps0=1e-6):
    """The paper's Algorithm 1, plainly, with the hypergraph path's distance
    (magnitude-aware euclidean, no rescaling merge): per hidden layer aggregate
    ``W`` by the previous colours, append the bias, cluster the full distance
    matrix.  ``layers``: ``[(W (n_out, n_in), b), ...]``."""
    import scipy.sparse as sp

    from fibgraph.engine.cluster import algorithm1

    labels = [np.arange(n_in)]
    for l, (W, b) in enumerate(layers):
        if l == len(layers) - 1:
            labels.append(np.arange(W.shape[0]))
            break
        prev = labels[-1]
        C = sp.csr_matrix((np.ones(prev.size), (np.arange(prev.size), prev)), shape=(prev.size, prev.max() + 1))
        X = np.hstack([np.asarray(C.T @ np.asarray(W, np.float64).T).T, np.asarray(b, np.float64)[:, None]])
        labels.append(algorithm1(X, eps if eps > 0 else eps0, linkage, "euclidean"))
    return labels


def worker(spec):
    """Run one case in this (fresh) process; returns a dict of measurements."""
    import onnx

    t0 = time.perf_counter()
    res = {"case": spec}
    if spec["kind"] == "e2e":
        from fibgraph.importers.api import compress_model

        base_rss = _rss_kib() / 1024.0
        t = time.perf_counter()
        r = compress_model(spec["model"], spec["out"], eps=spec["eps"], linkage=spec["linkage"],
                           metric=spec["metric"])
        res["seconds_total"] = time.perf_counter() - t
        res["seconds_report"] = r["seconds"]
        res["units"] = [(ly["nodes_before"], ly["nodes_after"]) for ly in r["layers"]]
        res["params"] = (r["params_before"], r["params_after"])
        res["rss_before_mib"] = base_rss
        res["peak_total_mib"] = _maxrss_mib()
        return res

    from onnx import numpy_helper

    from fibgraph.partition import canonical
    from fibgraph.importers.dag_api import colour_dag, weight_entries
    from fibgraph.importers.onnx.importer import import_dag
    from fibgraph.importers.onnx.write import dag_groups, write_dag_base

    with open(spec["model"], "rb") as f:
        data = f.read()
    t = time.perf_counter()
    model = onnx.load_model_from_string(data)
    del data
    if spec["impl"] == "fibgraph":
        imp = import_dag(model)
    else:
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        layers = [(inits[f"W{l}"], inits[f"b{l}"]) for l in range(sum(1 for k in inits if k.startswith("W")))]
        n_in = int(layers[0][0].shape[1])
        del model
    res["t_import"] = time.perf_counter() - t
    res["rss_after_import_mib"] = _rss_kib() / 1024.0
    res["peak_import_mib"] = _maxrss_mib()
    res["peak_reset"] = _reset_peak()
    if spec["impl"] == "fibgraph":
        prof = None
        if spec.get("profile"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t = time.perf_counter()
        # the distance plain Algorithm 1 runs too (no rescaling merge)
        col = colour_dag(imp, "fibration", spec["eps"], linkage=spec["linkage"], metric="euclidean")
        res["t_cluster"] = time.perf_counter() - t
        if prof is not None:
            prof.disable()
            res["profile"] = _top(prof, spec["profile"])
        res["peak_stage_mib"] = _maxrss_mib()
        t = time.perf_counter()
        groups = dag_groups(imp, col.labels)
        res["t_compress"] = time.perf_counter() - t
        t = time.perf_counter()
        m2 = write_dag_base(imp, col.labels, groups=groups)[0]
        nbytes = len(m2.SerializeToString())
        res["t_write"] = time.perf_counter() - t
        res["bytes_out"] = nbytes
        ents = weight_entries(imp)
        labels = [canonical(col.labels[imp.spaces[0].ids])] + [canonical(col.labels[ids]) for _, _, ids, _ in ents]
        res["units_after"] = [int(groups[1][ids].sum()) for _, _, ids, _ in ents]
    else:
        t = time.perf_counter()
        labels = algorithm1_layers(layers, n_in, spec["eps"], spec["linkage"], spec["ref_eps0"])
        res["t_cluster"] = time.perf_counter() - t
        res["peak_stage_mib"] = _maxrss_mib()
    res["n_colours"] = [int(l.max()) + 1 for l in labels]
    np.savez(spec["labels_out"], *labels)
    res["peak_total_mib"] = _maxrss_mib()
    res["t_process"] = time.perf_counter() - t0
    return res


def run_case(spec, timeout):
    """Run :func:`worker` in a fresh interpreter; returns its dict (or an error)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": spec, "error": f"timeout after {timeout} s"}
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"case": spec, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    out = json.loads(lines[-1])
    out["wall_subprocess"] = wall
    return out


# ------------------------------------------------------------------ parts
def machine():
    import scipy

    try:
        import threadpoolctl

        blas = [f"{i['internal_api']} {i.get('version')} threads={i['num_threads']}"
                for i in threadpoolctl.threadpool_info()]
    except Exception:
        blas = []
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__, "blas": blas}


def part_a(args, tmp, log):
    rows = []
    for n in args.widths:
        widths = [args.n_in, n, n, 10]
        t = time.perf_counter()
        m, infos = planted_mlp(widths, seed=args.seed)
        path = os.path.join(tmp, f"mlp_{n}.onnx")
        with open(path, "wb") as f:
            f.write(m.SerializeToString())
        del m
        log(f"[a] width {n}: built {'-'.join(map(str, widths))} in {time.perf_counter() - t:.1f} s; "
            f"planted per hidden layer: {infos}")
        for eps in [0.0] + list(args.eps):
            row = {"width": n, "widths": widths, "eps": eps, "planted": infos}
            for impl in ("fibgraph", "alg1"):
                if impl == "alg1" and n > args.ref_max_width:
                    row[impl] = {"skipped": f"width > --ref-max-width {args.ref_max_width}"}
                    continue
                runs = []
                for rep in range(args.repeat):
                    spec = {"kind": "widths", "impl": impl, "model": path, "eps": eps,
                            "linkage": args.linkage, "metric": args.metric,
                            "rescale": not args.no_rescale, "ref_eps0": args.ref_eps0,
                            "profile": args.profile if rep == 0 else 0,
                            "labels_out": os.path.join(tmp, f"lab_{n}_{eps}_{impl}_{rep}.npz")}
                    runs.append(run_case(spec, args.timeout))
                    if "error" in runs[-1]:
                        break
                r0 = runs[0]
                if "error" not in runs[-1]:
                    for k in ("t_cluster", "t_compress", "t_write", "t_import", "peak_stage_mib",
                              "peak_total_mib"):
                        if k in r0:
                            vals = [r[k] for r in runs]
                            r0[k + "_all"] = vals
                            r0[k] = float(np.median(vals))
                else:
                    r0 = runs[-1]
                row[impl] = r0
            if eps == 0:  # eps = 0 must find exactly the planted exact fibers
                row["planted_colours"] = [n - p["exact_units"] + p["exact_groups"] for p in infos]
                if "error" not in row["fibgraph"]:
                    row["fibgraph_matches_planted"] = row["fibgraph"]["n_colours"][1:-1] == row["planted_colours"]
            f, a = row["fibgraph"], row["alg1"]
            if "error" not in f and "error" not in a and "skipped" not in a:
                lf = np.load(f["case"]["labels_out"])
                la = np.load(a["case"]["labels_out"])
                same = [bool(np.array_equal(lf[k], la[k])) for k in lf.files]
                row["identical"] = all(same)
                row["identical_per_level"] = same
                row["speedup_cluster"] = a["t_cluster"] / f["t_cluster"]
            rows.append(row)
            log(_fmt_a(row))
            for p in row["fibgraph"].get("profile", []):
                log(f"      own {p[0]:7.3f} s  cum {p[1]:7.3f} s  calls {p[2]:6d}  {p[3]}")
    return rows


def _fmt_a(r):
    f, a = r["fibgraph"], r["alg1"]
    s = f"[a] width {r['width']:>5} eps {r['eps']:<5g} "
    if "error" in f:
        return s + f"fibgraph ERROR {f['error']}"
    if "planted_colours" in r:
        s += f"(planted exact fibers give {r['planted_colours']} colours) "
    if len(f.get("t_cluster_all", [])) > 1:
        s += f"[median of {len(f['t_cluster_all'])} runs] "
    s += (f"fibgraph colour {f['t_cluster']:.2f} s + compress {f['t_compress']:.2f} s + write "
          f"{f['t_write']:.2f} s (import {f['t_import']:.2f} s), peak stage {f['peak_stage_mib']:.0f} MiB, "
          f"total {f['peak_total_mib']:.0f} MiB; colours {f['n_colours'][1:-1]}")
    if "skipped" in a:
        return s + f" | alg1 skipped ({a['skipped']})"
    if "error" in a:
        return s + f" | alg1 ERROR {a['error']}"
    rng_ = ""
    if len(a.get("t_cluster_all", [])) > 1:
        rng_ = f" (runs {', '.join(f'{x:.2f}' for x in a['t_cluster_all'])}; fibgraph {', '.join(f'{x:.2f}' for x in f['t_cluster_all'])})"
    return s + (f" | alg1 {a['t_cluster']:.2f} s{rng_}, peak stage {a['peak_stage_mib']:.0f} MiB; colours "
                f"{a['n_colours'][1:-1]} | identical {r['identical']} | speedup {r['speedup_cluster']:.1f}x")


def part_b(args, tmp, log):
    widths = args.arch
    t = time.perf_counter()
    m, infos = planted_mlp(widths, seed=args.seed)
    path = os.path.join(tmp, "e2e.onnx")
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    size = os.path.getsize(path)
    del m
    log(f"[b] built {'-'.join(map(str, widths))} ({size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    rows = []
    for eps in [0.0] + list(args.eps):
        spec = {"kind": "e2e", "model": path, "out": os.path.join(tmp, f"e2e_out_{eps}.onnx"),
                "eps": eps, "linkage": args.linkage, "metric": args.metric}
        r = run_case(spec, args.timeout)
        r["widths"] = widths
        r["eps"] = eps
        r["planted"] = infos
        r["model_mib"] = size / 2**20
        if eps == 0:
            r["planted_units"] = [w - p["exact_units"] + p["exact_groups"] for w, p in zip(widths[1:], infos)]
        rows.append(r)
        if "error" in r:
            log(f"[b] eps {eps:g}: ERROR {r['error']}")
        else:
            log(f"[b] eps {eps:g}: compress_model {r['seconds_total']:.1f} s (report: {r['seconds_report']}), "
                f"subprocess wall {r['wall_subprocess']:.1f} s, peak {r['peak_total_mib']:.0f} MiB; "
                f"units {r['units']}; params {r['params'][0]} -> {r['params'][1]}"
                + (f"; planted exact fibers give {r['planted_units']}" if "planted_units" in r else ""))
    return rows


def markdown(meta, rows_a, rows_b):
    out = [f"### bench_compress.py, {meta['date']}", "",
           f"Machine: {meta['machine']['cpus']} cores ({meta['machine']['cpu']}), Python "
           f"{meta['machine']['python']}, numpy {meta['machine']['numpy']}, scipy {meta['machine']['scipy']}, "
           f"BLAS {'; '.join(meta['machine']['blas'])}.",
           f"Command: `{meta['command']}`. Settings: linkage {meta['args']['linkage']}, metric "
           f"(a) magnitude-aware euclidean, no rescaling merge, (b) {meta['args']['metric']}, "
           f"seed {meta['args']['seed']}; "
           f"Algorithm 1 at eps=0 cut at {meta['args']['ref_eps0']:g}. Every case in a fresh subprocess; "
           f"times are wall-clock seconds (median of {meta['args']['repeat']} run(s)), memory is ru_maxrss (MiB).", ""]
    if rows_a:
        out += ["#### (a) colour + compress vs plain Algorithm 1 (MLP n_in-n-n-10)", "",
                "| n | eps | fibgraph colour s | compress s | write s | import s | RSS after import MiB | peak stage MiB | "
                "peak total MiB | alg1 s | alg1 peak stage MiB | colours (hidden) fibgraph | alg1 | planted (eps=0) | "
                "identical | speedup |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows_a:
            f, a = r["fibgraph"], r["alg1"]
            if "error" in f:
                out.append(f"| {r['width']} | {r['eps']:g} | ERROR: {f['error']} |")
                continue
            if "skipped" in a or "error" in a:
                at, am, ident, sp = (a.get("skipped") and "skipped") or "ERROR " + a["error"], "", "", ""
                ac = ""
            else:
                at, am = f"{a['t_cluster']:.2f}", f"{a['peak_stage_mib']:.0f}"
                ac = str(a["n_colours"][1:-1])
                ident = "yes" if r["identical"] else "NO " + str(r["identical_per_level"])
                sp = f"{r['speedup_cluster']:.1f}x"
            out.append(f"| {r['width']} | {r['eps']:g} | {f['t_cluster']:.2f} | {f['t_compress']:.2f} | "
                       f"{f['t_write']:.2f} | {f['t_import']:.2f} | {f['rss_after_import_mib']:.0f} | {f['peak_stage_mib']:.0f} | "
                       f"{f['peak_total_mib']:.0f} | {at} | {am} | {f['n_colours'][1:-1]} | {ac} | "
                       f"{r.get('planted_colours', '')} | {ident} | {sp} |")
        out.append("")
    if rows_b:
        r0 = rows_b[0]
        out += [f"#### (b) end to end: `compress_model` on a {'-'.join(map(str, r0['widths']))} MLP "
                f"({r0['model_mib']:.0f} MiB ONNX)", "",
                "| eps | compress_model s | of which import+colour s | compress+write s | peak MiB | "
                "hidden units after | planted (eps=0) | params after |", "|---|---|---|---|---|---|---|---|"]
        for r in rows_b:
            if "error" in r:
                out.append(f"| {r['eps']:g} | ERROR: {r['error']} |")
                continue
            out.append(f"| {r['eps']:g} | {r['seconds_total']:.1f} | {r['seconds_report']['colour']:.1f} | "
                       f"{r['seconds_report']['compress_write']:.1f} | {r['peak_total_mib']:.0f} | "
                       f"{[u[1] for u in r['units'][:-1]]} | {r.get('planted_units', '')} | {r['params'][1]} of {r['params'][0]} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--n-in", type=int, default=256, help="inputs of the part (a) MLPs")
    ap.add_argument("--arch", type=lambda s: [int(x) for x in s.split(",")],
                    default=[784, 4096, 4096, 4096, 10], help="part (b) widths, comma-separated")
    ap.add_argument("--eps", type=float, nargs="*", default=[0.1], help="tolerances besides eps=0")
    ap.add_argument("--linkage", default="average", choices=["average", "complete"])
    ap.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"],
                    help="part (b) only; part (a) compares on the magnitude-aware euclidean distance")
    ap.add_argument("--no-rescale", action="store_true", help="ignored (part (a) has no rescaling merge)")
    ap.add_argument("--ref-eps0", type=float, default=1e-6, help="Algorithm 1 cut used for eps=0")
    ap.add_argument("--ref-max-width", type=int, default=4096,
                    help="skip Algorithm 1 above this width (n=8192 takes ~4 min per eps on 2 cores)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="part (a): fresh-subprocess runs per case and implementation; times are medians")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    ap.add_argument("--profile", type=int, default=0,
                    help="part (a): cProfile fibgraph's colouring, print the N functions with most own time")
    ap.add_argument("--json", default=None, help="write all measurements here")
    ap.add_argument("--md", default=None, help="append a markdown section here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    def log(s):
        print(s, flush=True)

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "command": "python benchmarks/bench_compress.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": vars(args)}
    log(f"machine: {meta['machine']}")
    rows_a, rows_b = [], []
    with tempfile.TemporaryDirectory(prefix="fibbench-") as tmp:
        if args.part in ("a", "all"):
            rows_a = part_a(args, tmp, log)
        if args.part in ("b", "all"):
            rows_b = part_b(args, tmp, log)
    md = markdown(meta, rows_a, rows_b)
    print()
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "a": rows_a, "b": rows_b}, f, indent=1, default=str)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
