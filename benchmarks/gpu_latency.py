"""Latency of original against fibration base, on a GPU when there is one
(issue 13), on CPU otherwise: torch engine, the same timing as
``fibgraph eval`` (:func:`fibgraph.importers.device_eval.time_module`: warm-up,
median of repeats, CUDA graph on CUDA), original and base alternating in
rounds.

Models:

- ``mnist_mlp``: ``examples/out/mnist_mlp_main.onnx`` (784-500-500-500-10),
  base at eps 0.8 on every hidden layer;
- ``digits_cnn``: ``examples/out/digits_cnn_study.onnx``, base at eps 0.7;
- ``digits_transformer``: ``examples/out/tune_dag_transformer.onnx`` against
  its ``fibgraph tune`` base at tau 0.2 (``..._tau0.2.onnx``);
- ``mlp_100m``: a 1024-8192-8192-3072-10 ReLU MLP (100.7M parameters) whose
  hidden units are 4 copies each, compressed by ``compress_module`` (the
  exact base, real ``nn.Linear`` layers, 7.8% of the parameters).

The ONNX models run as torch modules (:func:`fibgraph.importers.torch_out.onnx_to_torch`:
``nn.Sequential`` of real layers for the MLP and CNN, ``OnnxModule`` for the
Transformer).  Batches 1, 64, 8192 (``--batches``); on CPU the 100M MLP runs
at batch ``--big-cpu-batch`` (256) instead of 8192.  Reported per model and
batch: parameters, latency (median ms), speed-up = original / base latency,
and speed-up / parameter ratio (1.0 = the speed-up the parameter count
promises), and the ratio of multiply-adds per sample (Linear / Conv / LSTM /
GRU layers, counted by forward hooks; "-" for the ``OnnxModule``): a
convolution's work scales with its output's spatial size, not its parameters.  Models missing under ``--models`` are built by
``benchmarks/bench_latency.py`` / ``examples/study_tune_dag.py``.

    python benchmarks/gpu_latency.py --device cuda --md gpu.md     # on a GPU machine
    python benchmarks/gpu_latency.py --device cpu --threads 2      # here
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _onnx_case(path, eps=None, base_path=None):
    import onnx

    from fibgraph.importers.onnx.runtime import count_params
    from fibgraph.importers.torch_out import onnx_to_torch
    from fibgraph.importers.tuning import DagCompressor

    m = onnx.load(path)
    if base_path is not None:
        b = onnx.load(base_path)
    else:
        mc = DagCompressor(m)
        b = mc.compressed({w: eps for w in mc.tunable}, check=True)[0]
    (mo, how_o), (mb, how_b) = onnx_to_torch(m), onnx_to_torch(b)
    shape = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim][1:]
    return mo, mb, count_params(m), count_params(b), shape, f"{how_o} / {how_b}"


def _mlp_100m():
    import torch
    from torch import nn

    from fibgraph.importers.torch_base import compress_module, n_params

    torch.manual_seed(0)
    sizes = [1024, 8192, 8192, 3072, 10]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    m = nn.Sequential(*layers[:-1]).eval()
    with torch.no_grad():                     # each hidden unit 4 times: rows repeat, columns read copies alike
        for k, lin in enumerate(m[::2][:-1]):
            q = lin.out_features // 4
            lin.weight.copy_(lin.weight[:q].repeat(4, 1))
            lin.bias.copy_(lin.bias[:q].repeat(4))
    res = compress_module(m, torch.zeros(1, 1024))
    return m, res.module, n_params(m), res.report["params_after"], [1024], "nn.Sequential / rebuilt nn.Sequential"


def macs(module, shape):
    """Multiply-adds per sample of the module's Linear / Conv / LSTM / GRU
    layers (forward hooks on one sample), or None when none ran (an
    ``OnnxModule`` interpreter): the work the parameter count stands for."""
    import torch
    from torch import nn

    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += out.numel() * mod.in_features
        elif isinstance(mod, nn.modules.conv._ConvNd):
            k = int(torch.tensor(mod.kernel_size).prod())
            total[0] += out.numel() * (mod.in_channels // mod.groups) * k
        elif isinstance(mod, (nn.LSTM, nn.GRU)):
            gates = 4 if isinstance(mod, nn.LSTM) else 3
            steps = inp[0].shape[1 if mod.batch_first else 0]
            total[0] += steps * gates * mod.hidden_size * (mod.input_size + mod.hidden_size) * mod.num_layers

    hs = [m.register_forward_hook(hook) for m in module.modules()
          if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.LSTM, nn.GRU))]
    try:
        with torch.no_grad():
            module(torch.zeros([1] + list(shape)))
    finally:
        for h in hs:
            h.remove()
    return total[0] or None


def cases(models):
    out = []
    need = [os.path.join(models, f) for f in ("mnist_mlp_main.onnx", "digits_cnn_study.onnx",
                                                "tune_dag_transformer.onnx", "tune_dag_transformer_tau0.2.onnx")]
    if not all(os.path.exists(p) for p in need[:2]):
        from bench_latency import ensure_models

        ensure_models()
    if not all(os.path.exists(p) for p in need[2:]):
        from study_tune_dag import main as study

        study([])
    out.append(("mnist_mlp", lambda: _onnx_case(need[0], eps=0.8)))
    out.append(("digits_cnn", lambda: _onnx_case(need[1], eps=0.7)))
    out.append(("digits_transformer", lambda: _onnx_case(need[2], base_path=need[3])))
    out.append(("mlp_100m", _mlp_100m))
    return out


def machine(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        name = platform.processor() or "unknown CPU"
    return f"{name}, {torch.get_num_threads()} torch threads"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--batches", default="1,64,8192")
    ap.add_argument("--big-cpu-batch", type=int, default=256, help="the 100M MLP's largest batch on CPU")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="original and base alternate this many times")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default=os.path.join(ROOT, "examples", "out"))
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--pad-to", type=int, default=None,
                    help="time the base with its hidden widths padded to a multiple of N (zero units, "
                         "fibgraph.importers.torch_out.pad_widths); its parameter count includes the zeros")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    from fibgraph.importers.device_eval import time_module

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_latency: --device cuda but torch.cuda.is_available() is False")
    if a.threads:
        torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for name, build in cases(a.models):
        if a.only and name not in a.only.split(","):
            continue
        mo, mb, po, pb, shape, how = build()
        if a.pad_to and isinstance(mb, torch.nn.Sequential):
            from fibgraph.importers.torch_out import pad_widths

            mb, added = pad_widths(mb, a.pad_to)
            pb += added
            how += f", base padded to multiples of {a.pad_to} (+{added:,} zero parameters)"
        mac_o, mac_b = macs(mo, shape), macs(mb, shape)
        mac_ratio = mac_o / mac_b if mac_o and mac_b else None
        for bs in batches:
            note = ""
            if name == "mlp_100m" and a.device == "cpu" and bs > a.big_cpu_batch:
                bs, note = a.big_cpu_batch, f"batch {a.big_cpu_batch} on CPU (not 8192)"
            reps = a.repeats if bs <= 1024 else max(3, a.repeats // 4)
            x = torch.randn([bs] + list(shape))
            # original and base alternate in --rounds rounds (a shared machine's load hits both alike);
            # each round's median, then the median over rounds
            ts = {"o": [], "b": []}
            for _ in range(a.rounds):
                for k, mod in (("o", mo), ("b", mb)):
                    ms, graph = time_module(mod, x, a.device, a.dtype, max(1, reps // a.rounds), a.warmup)
                    ts[k].append(ms)
                    if k == "o":
                        go = graph
                    else:
                        gb = graph
            to, tb = statistics.median(ts["o"]), statistics.median(ts["b"])
            ratio = po / pb
            row = {"model": name, "batch": bs, "params": po, "params_base": pb, "param_ratio": ratio,
                   "ms": to, "ms_base": tb, "speedup": to / tb, "speedup_per_param_ratio": to / tb / ratio,
                   "macs": mac_o, "macs_base": mac_b, "mac_ratio": mac_ratio,
                   "cuda_graph": [go, gb], "modules": how, "note": note}
            rows.append(row)
            print(f"{name:19s} batch {bs:5d}  params {po:>11,d} -> {pb:>10,d} ({ratio:5.2f}x)  "
                  f"{to:9.3f} -> {tb:9.3f} ms  speed-up {to / tb:5.2f}x  /param ratio {to / tb / ratio:4.2f}"
                  f"  {note}", flush=True)
        del mo, mb
    info = {"device": a.device, "machine": machine(a.device), "dtype": a.dtype, "torch": torch.__version__,
            "repeats": a.repeats, "warmup": a.warmup, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)
    if a.md:
        lines = [f"Device {a.device} ({info['machine']}), {a.dtype}, torch {torch.__version__}, "
                 f"{'bases padded to multiples of ' + str(a.pad_to) + ' (zeros counted), ' if a.pad_to else ''}median of "
                 f"{a.repeats} timed calls after {a.warmup} warm-up (a quarter of the repeats at batch > 1024), original and "
                 f"base alternating in {a.rounds} rounds (median of the round medians).", "",
                 "| model | batch | params | base params | param ratio | MAC ratio | original ms | base ms | "
                 "speed-up | speed-up / param ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            mr = f"{r['mac_ratio']:.2f}" if r.get("mac_ratio") else "-"
            lines.append(f"| {r['model']} | {r['batch']}{' *' if r['note'] else ''} | {r['params']:,} | "
                         f"{r['params_base']:,} | {r['param_ratio']:.2f} | {mr} | {r['ms']:.3f} | {r['ms_base']:.3f} | "
                         f"{r['speedup']:.2f} | {r['speedup_per_param_ratio']:.2f} |")
        if any(r["note"] for r in rows):
            lines += ["", f"\\* the 100M MLP at batch {a.big_cpu_batch} on CPU, not 8192."]
        with open(a.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
