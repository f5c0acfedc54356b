"""Benchmark the hypergraph path (import, colour, write, verify) on LSTM, attention, residual and branching models.

The hypergraph path (importers/onnx/, dag_api.py) handles the models
the feed-forward chain importer refuses: LSTM/GRU, attention, residual
streams, branching CNNs.

Models:

- third-party ONNX files shipped in PyPI packages (``tests/thirdparty.py``;
  installed by ``./setup.sh --dev``): rapidocr PP-OCRv6 rec/det (small),
  PP-OCRv4 rec/det, the direction classifier (cls), silero-vad's 16 kHz
  sequence model (one ONNX LSTM), magika; plus ``light_squeezenet.onnx`` of the
  onnx package's backend test data (its weights are ConstantOfShape outputs:
  constant-filled tensors, a maximally symmetric net).  Probe input:
  ``tests/thirdparty.sample_input`` (squeezenet: the importer's own).
- synthetic torch models with PLANTED exact fibers (lifting, as in
  ``tests/planted_nets.py``), exported with the dynamo exporter
  (``dynamo=True, external_data=False``, dynamic batch, default opset):

  * ``transformer_d<d>``: x (batch, seq 8, 32) -> Linear(32, d) ->
    ``nn.TransformerEncoder`` of 4 post-norm ReLU layers (d_model d, 8 heads,
    feed-forward 4d, dropout 0, batch_first) -> mean over seq -> Linear(d, 10).
    The residual stream (every writer's rows, LayerNorm gamma/beta, every
    reader's columns divided) is lifted from d/2 units along ONE shuffled map
    (random fiber sizes >= 1); per layer q = k and v are lifted per head from
    head_dim/2 (a feature never leaves its head) and the feed-forward units
    from 2d.  Fibers are exact (checked in torch before export).
  * ``transformer_d<d>_L<L>``: the same with ``L`` encoder layers (depth
    scaling at fixed width, ``--tf-layers``, ``--tf-depth-d``; L = 4 is
    ``transformer_d<d>``).
  * ``lstm_h<H>``: x (batch, seq 8, 64) -> nn.LSTM(64, H) -> last step ->
    Linear(H, 10), hidden lifted from H/2 (``planted_nets.lift_blocks`` on
    the 4 gate blocks, recurrent weight rows and columns).

  The planted number of fibers of every planted weight's output units is
  written next to the model (``<name>.planted.json``, keyed by the ONNX
  initializer that equals the torch weight or its transpose) and compared with
  the colouring.

Per model, in a FRESH subprocess (so peaks are that model's own):

- ``import``: ``fibgraph.importers.onnx.importer.import_dag(path, feeds)`` from the path
  (load, the onnxruntime probe run with every tensor exposed, building the
  hypergraph);
- ``colour``: ``fibgraph.importers.dag_api.colour_dag(imp, 'fibration', eps=0)``;
- ``write``: ``fibgraph.importers.onnx.write.write_dag_base(imp, labels)`` +
  ``SerializeToString``; ``check``: ``onnx.checker.check_model`` on it;
- ``verify``: ``fibgraph.importers.dag_api.verify_dag(original, base, imp)`` (two
  onnxruntime sessions, 3 random inputs shaped like the probe's); beside it
  (untimed) "ort noise": the ORIGINAL model's largest output difference
  between onnxruntime with all graph optimisations and with none on the same
  inputs, the float rounding scale that max_abs_diff should be compared with;
- ``e2e`` (unless ``--no-e2e``): ``fibgraph.importers.api.compress_model(path, out,
  eps=0, verify=True)`` again from the file, the whole thing as the CLI runs
  it (the chain importer is tried first; the report says which path ran;
  it writes the base twice, in ``color_dag_model`` and again in
  ``compress_dag_model``, and runs the ONNX checker).

Time: wall clock (``time.perf_counter``).  Memory: ``resource.getrusage(
RUSAGE_SELF).ru_maxrss`` of the subprocess, reset through
``/proc/self/clear_refs`` ("5") before each stage, so ``peak <stage>`` is the
process's resident peak DURING that stage (interpreter, numpy, onnx and the
model included); ``peak`` is the largest of them.  tracemalloc is not used
(it misses onnxruntime's and protobuf's C++ allocations).

Units: output units of the compressible weights (linear / conv / embedding
rows, LSTM/GRU hidden units, ``dag_api.weight_entries``), before and kept
after.  Params: ``fibgraph.importers.api.count_params`` (float initializers and
Constant tensors, the number ``compress_model`` reports) and "live" params:
only tensors some node reads, ConstantOfShape outputs included.

Power-law exponents ``t = a * x^k`` per phase are fitted over each synthetic
family (x = edges for the width families, nodes for the depth family).
``--profile N`` runs every stage under cProfile and prints the N functions
with most own time (the times then include the profiler's overhead).

Run from the repository root (2 cores: about 4 minutes with the defaults once
the synthetic models are exported to ``--cache``, which takes about 3 more)::

    python benchmarks/bench_dag.py                               # everything
    python benchmarks/bench_dag.py --models magika --synthetic none
    python benchmarks/bench_dag.py --synthetic lstm --lstm-hidden 256 512 --profile 15
    python benchmarks/bench_dag.py --json benchmarks/results/dag.json --md /tmp/dag.md
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
sys.path.insert(0, os.path.join(ROOT, "tests"))

THIRD_PARTY = ["rapidocr_v6_rec", "rapidocr_v6_det", "rapidocr_v4_rec", "rapidocr_v4_det", "rapidocr_cls",
               "silero_vad_sequence", "magika", "light_squeezenet"]
N_LAYERS, N_HEADS, SEQ, TF_IN, N_OUT = 4, 8, 8, 32, 10
LSTM_IN = 64


def squeezenet_path():
    import onnx

    p = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_squeezenet.onnx")
    return p if os.path.isfile(p) else None


# ------------------------------------------------------------ synthetic models
def _sizes(rng, n_big, n_small):
    """``n_small`` random fiber sizes >= 1 summing to ``n_big``."""
    return (rng.multinomial(n_big - n_small, np.full(n_small, 1.0 / n_small)) + 1).tolist()


def build_transformer(d, layers=4, seed=0):
    """(model, example input, {torch parameter: planted fibers of its rows}, check) for transformer_d<d>[_L<layers>]."""
    import torch
    from torch import nn

    import planted_nets as pn

    ff, nh = 4 * d, N_HEADS
    hd = d // nh
    ds, hds, ffs = d // 2, hd // 2, ff // 2

    class StackNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(TF_IN, d)
            layer = nn.TransformerEncoderLayer(d, nh, ff, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.fc = nn.Linear(d, N_OUT)
            self.eval()

        def forward(self, x):
            return self.fc(self.enc(self.inp(x)).mean(dim=1))

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = StackNet()
    fr, _ = pn.make_map(rng, _sizes(rng, d, ds))

    def head_map():
        parts = []
        for h in range(nh):
            f, _ = pn.make_map(rng, _sizes(rng, hd, hds))
            parts.append(f + h * hds)
        return np.concatenate(parts)

    def normal(*shape, fan_in):
        return rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)

    def bias(n):
        b = rng.normal(0.0, 0.3, n)
        b[np.abs(b) < 0.05] += 0.1
        return b

    planted = {}
    n_res = len(set(fr.tolist()))
    pn._set(net.inp.weight, pn.lift(normal(ds, TF_IN, fan_in=TF_IN), fr, None))
    pn._set(net.inp.bias, pn.lift(bias(ds), fr))
    planted[net.inp.weight] = n_res
    for lay in net.enc.layers:
        mha = lay.self_attn
        fq, fv = head_map(), head_map()
        fff, _ = pn.make_map(rng, _sizes(rng, ff, ffs))
        Wq, Wk, Wv = (normal(ds, ds, fan_in=ds) for _ in range(3))
        pn._set(mha.in_proj_weight, np.concatenate([pn.lift(Wq, fq, fr), pn.lift(Wk, fq, fr), pn.lift(Wv, fv, fr)]))
        pn._set(mha.in_proj_bias, np.concatenate([pn.lift(bias(ds), fq), pn.lift(bias(ds), fq), pn.lift(bias(ds), fv)]))
        pn._set(mha.out_proj.weight, pn.lift(normal(ds, ds, fan_in=ds), fr, fv))
        pn._set(mha.out_proj.bias, pn.lift(bias(ds), fr))
        for norm in (lay.norm1, lay.norm2):
            pn._set(norm.weight, pn.lift(1.0 + rng.normal(0.0, 0.3, ds), fr))
            pn._set(norm.bias, pn.lift(bias(ds), fr))
        pn._set(lay.linear1.weight, pn.lift(normal(ffs, ds, fan_in=ds), fff, fr))
        pn._set(lay.linear1.bias, pn.lift(bias(ffs), fff))
        pn._set(lay.linear2.weight, pn.lift(normal(ds, ffs, fan_in=ffs), fr, fff))
        pn._set(lay.linear2.bias, pn.lift(bias(ds), fr))
        planted[mha.out_proj.weight] = n_res
        planted[lay.linear1.weight] = len(set(fff.tolist()))
        planted[lay.linear2.weight] = n_res
    pn._set(net.fc.weight, pn.lift(normal(N_OUT, ds, fan_in=ds), None, fr))
    pn._set(net.fc.bias, bias(N_OUT))
    planted[net.fc.weight] = N_OUT
    net.eval()
    x = torch.randn(3, SEQ, TF_IN, generator=torch.Generator().manual_seed(seed))

    def check():
        """Largest spread of the encoder's output over a planted residual fiber."""
        with torch.no_grad():
            h = net.enc(net.inp(x)).numpy().reshape(-1, d)
        return max(float(np.ptp(h[:, fr == c], axis=1).max()) for c in np.unique(fr))

    return net, x, planted, check


def build_lstm(hidden, seed=0):
    import torch

    import planted_nets as pn

    rng = np.random.default_rng(seed)
    hs = hidden // 2
    net = pn.RNNNet("LSTM", LSTM_IN, hidden, N_OUT)
    f, _ = pn.make_map(rng, _sizes(rng, hidden, hs))
    s_in, s_h = 1.0 / np.sqrt(LSTM_IN), 1.0 / np.sqrt(hs)
    pn._set(net.rnn.weight_ih_l0, pn.lift_blocks(rng.normal(0, s_in, (4 * hs, LSTM_IN)), 4, f, None))
    pn._set(net.rnn.weight_hh_l0, pn.lift_blocks(rng.normal(0, s_h, (4 * hs, hs)), 4, f, f))
    pn._set(net.rnn.bias_ih_l0, pn.lift_blocks(rng.normal(0, 0.3, 4 * hs), 4, f))
    pn._set(net.rnn.bias_hh_l0, pn.lift_blocks(rng.normal(0, 0.3, 4 * hs), 4, f))
    pn._set(net.fc.weight, pn.lift(rng.normal(0, s_h, (N_OUT, hs)), None, f))
    pn._set(net.fc.bias, rng.normal(0, 0.3, N_OUT))
    net.eval()
    x = torch.randn(3, SEQ, LSTM_IN, generator=torch.Generator().manual_seed(seed))
    n_fib = len(set(f.tolist()))
    # the exporter reorders the gates (torch i,f,g,o -> ONNX i,o,f,c): the LSTM's W and R are computed
    # tensors, matched by op (``op_fibers``) rather than by initializer
    planted = {net.fc.weight: N_OUT, "LSTM": n_fib}

    def check():
        with torch.no_grad():
            h = net.rnn(x)[0].numpy().reshape(-1, hidden)
        return max(float(np.ptp(h[:, f == c], axis=1).max()) for c in np.unique(f))

    return net, x, planted, check


def build_worker(spec):
    """Build, check and export one synthetic model (in its own process: torch stays out of the timed ones)."""
    import onnx
    from onnx import numpy_helper

    import planted_nets as pn

    t = time.perf_counter()
    if spec["kind"] == "transformer":
        net, x, planted, check = build_transformer(spec["size"], spec.get("layers", N_LAYERS), spec.get("seed", 0))
    else:
        net, x, planted, check = build_lstm(spec["size"], spec.get("seed", 0))
    spread = check()
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    pn.export_one(net, x, spec["path"], dynamo=True)
    t_export = time.perf_counter() - t
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(spec["path"]).graph.initializer}
    by_name = {}
    op_fibers = {k: v for k, v in planted.items() if isinstance(k, str)}
    planted = {k: v for k, v in planted.items() if not isinstance(k, str)}
    for p, n_fib in planted.items():
        w = p.detach().numpy().astype(np.float32)
        hits = [k for k, a in inits.items()
                if (a.shape == w.shape and np.array_equal(a, w)) or (a.shape == w.T.shape and np.array_equal(a, w.T))]
        if len(hits) == 1:
            by_name[hits[0]] = n_fib
    n_params = int(sum(p.numel() for p in net.parameters()))
    meta = {"planted_fibers": by_name, "op_fibers": op_fibers, "planted_weights": len(planted),
            "matched_weights": len(by_name),
            "fiber_spread_torch": spread, "torch_params": n_params, "t_build": t_build, "t_export": t_export,
            "bytes": os.path.getsize(spec["path"])}
    with open(spec["path"][:-5] + ".planted.json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta


# ------------------------------------------------------------ measurement
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
    return [(round(v[2], 3), round(v[3], 3), v[1],
             f"{os.path.relpath(k[0], ROOT) if k[0].startswith(ROOT) else os.path.basename(k[0])}:{k[1]}({k[2]})")
            for k, v in rows]


def live_params(model):
    """Float elements of the tensors some node (or a graph output) reads: initializers,
    Constant nodes and ConstantOfShape outputs whose shape is a constant."""
    import onnx
    from onnx import numpy_helper

    from fibgraph.importers.onnx.load import FLOAT_TYPES

    g = model.graph
    used = {x for n in g.node for x in n.input if x} | {o.name for o in g.output}
    consts = {t.name: t for t in g.initializer}
    total = 0
    for t in g.initializer:
        if t.name in used and t.data_type in FLOAT_TYPES:
            total += int(np.prod(t.dims)) if len(t.dims) else 1
    const_vals = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    const_vals[n.output[0]] = a.t
                    if n.output[0] in used and a.t.data_type in FLOAT_TYPES:
                        total += int(np.prod(a.t.dims)) if len(a.t.dims) else 1
                elif a.name == "value_floats" and n.output[0] in used:
                    total += len(a.floats)
                elif a.name == "value_float" and n.output[0] in used:
                    total += 1
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.output[0] in used:
            src = consts.get(n.input[0]) or const_vals.get(n.input[0])
            if src is None:
                continue
            dt = onnx.TensorProto.FLOAT
            for a in n.attribute:
                if a.name == "value":
                    dt = a.t.data_type
            if dt in FLOAT_TYPES:
                total += int(np.prod(numpy_helper.to_array(src)))
    return total


def ort_noise(imp, repeats=3, seed=0):
    """Rounding noise of the ORIGINAL model: largest |output difference| between onnxruntime with all
    graph optimisations and with none, on the inputs ``verify_dag`` uses (a scale for max_abs_diff)."""
    import onnxruntime as ort

    from fibgraph.importers.dag_verify import _feeds_like

    def sess(level):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = level
        return ort.InferenceSession(imp.model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    a, b = sess(ort.GraphOptimizationLevel.ORT_ENABLE_ALL), sess(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    names = [i.name for i in a.get_inputs()]
    diff = 0.0
    for r in range(repeats):
        feeds = {k: v for k, v in _feeds_like(imp, seed + r).items() if k in names}
        for p, q in zip(a.run(None, feeds), b.run(None, feeds)):
            p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
            if p.size:
                diff = max(diff, float(np.max(np.abs(p - q))))
    return diff


def worker(spec):
    """Run one model in this (fresh) process; returns a dict of measurements."""
    import onnx

    from fibgraph.importers.api import compress_model, count_params
    from fibgraph.importers.dag_api import colour_dag, verify_dag, weight_entries
    from fibgraph.importers.onnx.importer import import_dag
    from fibgraph.importers.onnx.write import write_dag_base

    res = {"case": spec}
    feeds = None
    if spec.get("thirdparty"):
        import thirdparty

        feeds = thirdparty.sample_input(spec["path"])
    prof_n = spec.get("profile") or 0
    profiles = {}

    def stage(name, fn):
        prof = None
        if prof_n:
            import cProfile

            prof = cProfile.Profile()
        res["peak_reset"] = _reset_peak()
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        out = fn()
        if prof is not None:
            prof.disable()
        res[f"t_{name}"] = time.perf_counter() - t
        res[f"peak_{name}_mib"] = _maxrss_mib()
        if prof is not None:
            profiles[name] = _top(prof, prof_n)
        return out

    res["rss_start_mib"] = _maxrss_mib()
    imp = stage("import", lambda: import_dag(spec["path"], feeds=feeds))
    g = imp.graph
    res["nodes"], res["edges"] = int(g.n), int(g.n_edges)
    res["barriers"] = [{k: b[k] for k in b if k in ("node", "op", "why", "params")} for b in imp.barriers]
    col = stage("colour", lambda: colour_dag(imp, "fibration", eps=0.0))
    res["colours"] = int(col.labels.max()) + 1 if col.labels.size else 0

    def write():
        m2, gid, kept, why = write_dag_base(imp, col.labels)
        return m2, kept, len(m2.SerializeToString())

    m2, kept, nbytes = stage("write", write)
    res["bytes_in"], res["bytes_out"] = os.path.getsize(spec["path"]), nbytes
    try:
        stage("check", lambda: onnx.checker.check_model(m2))
        res["checker"] = "ok"
    except Exception as e:                         # reported, not fatal: the timing still counts
        res["checker"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        v = stage("verify", lambda: verify_dag(imp.model, m2, imp))
        res["max_abs_diff"], res["max_abs_output"] = v["max_abs_diff"], v["max_abs_output"]
    except Exception as e:
        res["verify_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        res["ort_noise"] = ort_noise(imp)
    except Exception as e:
        res["ort_noise_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    res["peak_mib"] = max(res.get(f"peak_{s}_mib", 0.0) for s in ("import", "colour", "write", "check", "verify"))
    entries = weight_entries(imp)
    ids = np.unique(np.concatenate([e[2] for e in entries])) if entries else np.zeros(0, np.int64)
    res["weights"] = len(entries)
    res["units_before"], res["units_after"] = int(ids.size), int(kept[ids].sum())
    res["nodes_kept"] = int(kept.sum())
    res["params_before"], res["params_after"] = count_params(imp.model), count_params(m2)
    res["live_params_before"], res["live_params_after"] = live_params(imp.model), live_params(m2)
    if spec.get("planted"):
        with open(spec["planted"]) as f:
            meta = json.load(f)
        found = {w: len(np.unique(col.labels[i])) for w, _, i, _ in entries}
        kept_w = {w: int(kept[i].sum()) for w, _, i, _ in entries}
        want = {w: n for w, n in meta["planted_fibers"].items() if w in found}
        want.update({w: meta["op_fibers"][op] for w, op, _, _ in entries if op in meta.get("op_fibers", {})})
        rows = {w: {"planted": n, "colours": found[w], "kept": kept_w[w]} for w, n in want.items()}
        res["planted"] = {"weights": rows, "all_equal": all(r["colours"] == r["planted"] for r in rows.values()),
                          "kept_equal": all(r["kept"] == r["planted"] for r in rows.values()),
                          "compared": len(rows), "not_weight_entries": sorted(set(meta["planted_fibers"]) - set(found)),
                          "matched_weights": meta["matched_weights"], "planted_weights": meta["planted_weights"],
                          "fiber_spread_torch": meta["fiber_spread_torch"], "torch_params": meta["torch_params"],
                          "t_export": meta["t_export"], "t_build": meta["t_build"]}
    if profiles:
        res["profile"] = profiles
    imp = col = m2 = None           # freed before the next model (the stages' lambdas hold them as closure cells)
    if spec.get("e2e"):
        _reset_peak()
        out = os.path.join(spec["tmp"], os.path.basename(spec["path"])[:-5] + "_base.onnx")
        t = time.perf_counter()
        r = compress_model(spec["path"], out, eps=0.0, verify=True)
        res["t_e2e"] = time.perf_counter() - t
        res["peak_e2e_mib"] = _maxrss_mib()
        res["e2e_graph"] = r.get("graph", "chain")
        res["e2e_params"] = (r["params_before"], r["params_after"])
        res["e2e_max_abs_diff"] = r.get("verify", {}).get("max_abs_diff")
        res["e2e_seconds"] = r.get("seconds")
    return res


def run_case(mode, spec, timeout):
    """Run :func:`worker` / :func:`build_worker` in a fresh interpreter; returns its dict (or an error)."""
    cmd = [sys.executable, os.path.abspath(__file__), mode, json.dumps(spec)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": spec, "error": f"timeout after {timeout} s"}
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tb = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return {"case": spec, "error": (tb or ["?"])[-1][:300], "traceback": tb[-12:]}
    out = json.loads(lines[-1])
    out["wall_subprocess"] = wall
    return out


# ------------------------------------------------------------------ report
def machine():
    import onnx
    import onnxruntime
    import scipy

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        nproc = os.cpu_count()
    try:
        mem = next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
        mem_gib = round(int(mem) / 2 ** 20, 1)
    except (OSError, StopIteration):
        mem_gib = None
    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = None
    return {"nproc": nproc, "cpu": cpu, "mem_gib": mem_gib, "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "torch": tv,
            "loadavg": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None}


def git_state():
    """The commit measured and the files changed on top of it (others may edit the tree meanwhile)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.rstrip()
        except OSError:
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "dirty": [ln[3:] for ln in git("status", "--porcelain").splitlines() if ln[:2] != "??"]}


def fit_power(xs, ys):
    """Exponent k and prefactor of y = a * x^k (least squares in log-log), or None."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ok = (xs > 0) & (ys > 0)
    if ok.sum() < 2:
        return None
    k, loga = np.polyfit(np.log(xs[ok]), np.log(ys[ok]), 1)
    return {"k": round(float(k), 3), "a": float(np.exp(loga))}


def scaling(rows):
    """Per synthetic family: the power-law exponent of every phase's time vs edges and vs nodes."""
    out = {}
    fams = sorted({f for r in rows for f in r["case"].get("families", {})})
    for fam in fams:
        rs = sorted([r for r in rows if fam in r["case"].get("families", {}) and "error" not in r],
                    key=lambda r: r["case"]["families"][fam])
        if len(rs) < 2:
            continue
        e, n = [r["edges"] for r in rs], [r["nodes"] for r in rs]
        phases = ("import", "colour", "write", "verify", "e2e")
        out[fam] = {"sizes": [r["case"]["families"][fam] for r in rs], "edges": e, "nodes": n,
                    "seconds": {ph: [round(r.get(f"t_{ph}", 0), 3) for r in rs] for ph in phases},
                    "exponent_vs_edges": {ph: fit_power(e, [r.get(f"t_{ph}", 0) for r in rs]) for ph in phases},
                    "exponent_vs_nodes": {ph: fit_power(n, [r.get(f"t_{ph}", 0) for r in rs]) for ph in phases}}
    return out


def _f(x, nd=2):
    return "" if x is None else f"{x:.{nd}f}"


def markdown(meta, rows, fits):
    m = meta["machine"]
    L = [f"##### bench_dag.py, {meta['date']}", "",
         f"Machine: {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB RAM, Python {m['python']}, numpy {m['numpy']}, "
         f"scipy {m['scipy']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, torch {m['torch']} (export only); "
         f"load average at the end {' '.join(m['loadavg'] or [])}.",
         f"Code: commit {meta['git']['commit']}" + (f" + uncommitted changes to {', '.join(meta['git']['dirty'])}"
                                                    if meta["git"]["dirty"] else "") + ".",
         f"Command: `{meta['command']}`. eps = 0, fibration. Every model in a fresh subprocess; wall-clock seconds; "
         "memory is ru_maxrss reset per stage (MiB, whole process).", "",
         "| model | nodes | edges | import s | colour s | write s | verify s | compress_model s | peak MiB | "
         "units before -> after | params before -> after | live params after | max abs diff (max abs output) | "
         "ort noise | planted |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|---|"]
    for r in rows:
        name = r["case"]["name"]
        if "error" in r:
            L.append(f"| {name} | failed: {r['error']} |" + " |" * 13)
            continue
        pl = r.get("planted")
        pls = "" if pl is None else ("equal" if pl["all_equal"] else "DIFFERENT") + \
            ("" if pl["kept_equal"] else ", kept more") + f" ({pl['compared']} weights)"
        e2e = _f(r.get("t_e2e")) + ("" if r.get("e2e_graph") in (None, "hypergraph") else f" ({r['e2e_graph']})")
        live = r["live_params_after"]
        diff = (f"{r['max_abs_diff']:.3g} ({r['max_abs_output']:.3g})" if isinstance(r.get("max_abs_diff"), float)
                else r.get("verify_error", ""))
        noise = f"{r['ort_noise']:.3g}" if "ort_noise" in r else r.get("ort_noise_error", "")
        L.append(f"| {name} | {r['nodes']:,} | {r['edges']:,} | {_f(r['t_import'])} | {_f(r['t_colour'])} | "
                 f"{_f(r['t_write'])} | {_f(r.get('t_verify'))} | {e2e} | {r['peak_mib']:.0f} | "
                 f"{r['units_before']:,} -> {r['units_after']:,} | {r['params_before']:,} -> {r['params_after']:,} | "
                 f"{live:,} of {r['live_params_before']:,} | {diff} | {noise} | {pls} |")
    if fits:
        L += ["", "Power-law fits t = a * x^k over the synthetic sizes, x = hypergraph edges (nodes for the depth "
              "family, whose edges and nodes both grow linearly); k per phase:", "",
              "| family | sizes | nodes | edges | x | import k | colour k | write k | verify k | compress_model k |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
        for fam, f in fits.items():
            by = "exponent_vs_nodes" if fam.endswith("depth") else "exponent_vs_edges"
            ks = [f[by].get(ph) for ph in ("import", "colour", "write", "verify", "e2e")]
            L.append(f"| {fam} | {', '.join(map(str, f['sizes']))} | {', '.join(f'{x:,}' for x in f['nodes'])} | "
                     f"{', '.join(f'{x:,}' for x in f['edges'])} | {by.split('_')[-1]} | "
                     + " | ".join("" if k is None else f"{k['k']:.2f}" for k in ks) + " |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=THIRD_PARTY, help="third-party models (tests/thirdparty.py names, "
                    "light_squeezenet); none for no third-party model")
    ap.add_argument("--synthetic", nargs="*", default=["transformer", "lstm"], help="transformer, lstm or none")
    ap.add_argument("--tf-d", type=int, nargs="+", default=[128, 256, 512],
                    help="Transformer d_model sizes (feed-forward 4 d, 4 layers, 8 heads)")
    ap.add_argument("--tf-layers", type=int, nargs="*", default=[4, 12, 36],
                    help="depth scaling: Transformer encoder layers at d_model --tf-depth-d")
    ap.add_argument("--tf-depth-d", type=int, default=128)
    ap.add_argument("--lstm-hidden", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fibgraph_bench_dag"),
                    help="folder for the exported synthetic models (reused when present)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the compress_model run")
    ap.add_argument("--profile", type=int, default=0, help="cProfile every stage; keep the N functions with most own time")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per subprocess")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.build:
        print(json.dumps(build_worker(json.loads(args.build))))
        return

    import thirdparty

    os.makedirs(args.cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench_dag_")
    cases = []
    for name in [m for m in args.models if m != "none"]:
        try:
            p = squeezenet_path() if name == "light_squeezenet" else thirdparty.model_path(name)
        except KeyError as e:
            print(f"{name}: {e.args[0]}", flush=True)
            continue
        if p is None:
            print(f"{name}: not installed, skipped", flush=True)
            continue
        cases.append({"name": name, "path": p, "thirdparty": name != "light_squeezenet"})
    synth = [s for s in args.synthetic if s != "none"]
    builds = {}                                    # name -> (kind, size, layers, {family: x})
    if "transformer" in synth:
        for d in args.tf_d:
            builds.setdefault(f"transformer_d{d}", ["transformer", d, N_LAYERS, {}])[3]["transformer_width"] = d
        for L in args.tf_layers:
            d = args.tf_depth_d
            name = f"transformer_d{d}" + ("" if L == N_LAYERS else f"_L{L}")
            builds.setdefault(name, ["transformer", d, L, {}])[3]["transformer_depth"] = L
    if "lstm" in synth:
        for h in args.lstm_hidden:
            builds[f"lstm_h{h}"] = ["lstm", h, 1, {"lstm_hidden": h}]
    for name, (fam, size, layers, families) in builds.items():
        path = os.path.join(args.cache, name + ".onnx")
        side = path[:-5] + ".planted.json"
        if not (os.path.exists(path) and os.path.exists(side)):
            t = time.perf_counter()
            b = run_case("--build", {"kind": fam, "size": size, "layers": layers, "path": path}, args.timeout)
            if "error" in b:
                print(f"{name}: build failed: {b['error']}", flush=True)
                cases.append({"name": name, "families": families, "build_error": b})
                continue
            print(f"{name}: built and exported in {time.perf_counter() - t:.1f} s "
                  f"({b['bytes'] / 2**20:.1f} MiB, {b['torch_params']:,} params, fiber spread in torch "
                  f"{b['fiber_spread_torch']:.1e}, {b['matched_weights']}/{b['planted_weights']} planted weights found)",
                  flush=True)
        cases.append({"name": name, "path": path, "families": families, "layers": layers, "planted": side})
    rows = []
    for c in cases:
        if "build_error" in c:
            rows.append({"case": c, "error": "build: " + c["build_error"]["error"],
                         "traceback": c["build_error"].get("traceback")})
            continue
        spec = {**c, "e2e": not args.no_e2e, "tmp": tmp, "profile": args.profile}
        r = run_case("--worker", spec, args.timeout)
        rows.append(r)
        if "error" in r:
            print(f"{c['name']}: FAILED: {r['error']}", flush=True)
            for ln in r.get("traceback") or []:
                print("    " + ln, flush=True)
            continue
        print(f"{c['name']}: {r['nodes']:,} nodes, {r['edges']:,} edges; import {r['t_import']:.2f} s, colour "
              f"{r['t_colour']:.2f} s, write {r['t_write']:.2f} s, check {r.get('t_check', 0):.2f} s, verify "
              f"{r.get('t_verify', float('nan')):.2f} s, compress_model {r.get('t_e2e', float('nan')):.2f} s; "
              f"peak {r['peak_mib']:.0f} MiB; units {r['units_before']} -> {r['units_after']}, params "
              f"{r['params_before']:,} -> {r['params_after']:,} (live {r['live_params_before']:,} -> "
              f"{r['live_params_after']:,}); max abs diff {r.get('max_abs_diff', r.get('verify_error'))}"
              + ("" if "planted" not in r else f"; planted {'equal' if r['planted']['all_equal'] else 'DIFFERENT'}"),
              flush=True)
        for ph, top in (r.get("profile") or {}).items():
            print(f"  profile {ph} (own s, cum s, calls, function):", flush=True)
            for row in top:
                print(f"    {row[0]:8.3f} {row[1]:8.3f} {row[2]:>9} {row[3]}", flush=True)
    fits = scaling(rows)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "git": git_state(),
            "command": "python benchmarks/bench_dag.py" + ("" if argv is None and len(sys.argv) < 2 else
                                                           " " + " ".join(argv if argv is not None else sys.argv[1:])),
            "memory": "ru_maxrss of the subprocess, reset via /proc/self/clear_refs before each stage",
            "settings": {"eps": 0.0, "symmetry": "fibration", "transformer": {"layers": N_LAYERS, "heads": N_HEADS,
                         "depth_family": {"d_model": args.tf_depth_d, "layers": args.tf_layers},
                         "seq": SEQ, "n_in": TF_IN, "ff": "4 d", "planted": "residual d/2 -> d, q=k and v per head "
                         "hd/2 -> hd, ff 2d -> 4d"}, "lstm": {"n_in": LSTM_IN, "seq": SEQ, "planted": "hidden H/2 -> H"}}}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "scaling": fits}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    md = markdown(meta, rows, fits)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
