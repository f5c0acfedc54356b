"""Accuracy, loss, latency and throughput of a model on a device
(``fibgraph eval --device cpu|cuda --batch-size N --dtype ...``).

Engines, in this order:

- ``onnxruntime`` (CPU, or its CUDA provider when the installed build has
  one) for an ONNX model in float32;
- ``torch`` otherwise: a ``.pt`` module (:func:`fibgraph.importers.torch_out.load_torch`)
  or the ONNX model as a torch module (:func:`fibgraph.importers.torch_out.onnx_to_torch`:
  real layers for a chain, else ``OnnxModule``), on ``cuda`` when
  ``torch.cuda.is_available()``; float16 / bfloat16 run under
  ``torch.autocast`` (parameters stay float32, matmuls and convolutions in
  the low precision).

``--device cuda`` on a machine with neither a CUDA provider nor a CUDA
device is bad input (one line, exit 2).

Latency: one batch of ``batch_size`` rows (the data's first rows, repeated
when there are fewer), ``warmup`` calls, then the median of ``repeats``
timed calls (CUDA synchronised); throughput = rows / median.  On CUDA the
torch engine captures the forward in a CUDA graph and times its replay
(``cuda_graph`` in the result says whether the capture worked, and why not);
an ``OnnxModule`` can be captured because its shape arithmetic is computed
once per input signature (no host tensors in the forward).
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

from fibgraph.errors import InputError

__all__ = ["evaluate_on", "time_module", "time_session", "pick_engine", "DTYPES"]

DTYPES = ("float32", "float16", "bfloat16")


def _ort_has_cuda():
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pick_engine(model_path, device="cpu", dtype="float32"):
    """``"onnxruntime"`` or ``"torch"`` for this model, device and dtype; InputError
    when ``device`` is cuda and there is no CUDA at all."""
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    is_pt = os.fspath(model_path).endswith((".pt", ".pth")) if isinstance(model_path, (str, os.PathLike)) \
        else not hasattr(model_path, "graph")
    if device == "cuda":
        if not is_pt and dtype == "float32" and _ort_has_cuda():
            return "onnxruntime"
        if not _torch_cuda():
            raise InputError("--device cuda: no CUDA here (onnxruntime has no CUDA provider and "
                             "torch.cuda.is_available() is False)")
        return "torch"
    return "torch" if is_pt or dtype != "float32" else "onnxruntime"


def _batch(x, n):
    if x.shape[0] >= n:
        return x[:n]
    reps = -(-n // x.shape[0])
    return np.concatenate([x] * reps)[:n]


def _median_ms(call, repeats, warmup, sync=None):
    for _ in range(warmup):
        call()
    if sync:
        sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        if sync:
            sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_session(sess, feeds, repeats=20, warmup=3):
    """Median milliseconds of one onnxruntime call."""
    return _median_ms(lambda: sess.run(None, feeds), repeats, warmup)


def _autocast(torch, device, dtype):
    if dtype == "float32":
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype), cache_enabled=False)


def time_module(module, xb, device="cpu", dtype="float32", repeats=20, warmup=3, cuda_graph=True):
    """``(median ms, cuda_graph)`` of one forward of ``module`` on the torch
    tensor ``xb`` (moved to ``device``).  On CUDA the forward is captured in a
    CUDA graph when ``cuda_graph`` (``cuda_graph`` in the answer: True, or the
    reason the capture failed, then eager timing)."""
    import torch

    dev = torch.device(device)
    module = module.to(dev).eval()
    xb = xb.to(dev)
    graph = False
    with torch.no_grad(), _autocast(torch, dev.type, dtype):
        if dev.type == "cuda":
            sync = torch.cuda.synchronize
            call = lambda: module(xb)  # noqa: E731
            if cuda_graph:
                try:
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for _ in range(max(warmup, 2)):
                            module(xb)
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        module(xb)
                    call, graph = g.replay, True
                except Exception as e:          # capture not possible: time the eager forward
                    torch.cuda.synchronize()
                    graph = f"not captured: {str(e).splitlines()[0][:160]}"
            ms = _median_ms(call, repeats, warmup, sync)
        else:
            ms = _median_ms(lambda: module(xb), repeats, warmup)
    return ms, graph


def _module_kind(module):
    """logits / probs / logprobs by a Sequential's last layer."""
    import torch

    last = module[-1] if isinstance(module, torch.nn.Sequential) and len(module) else None
    return {torch.nn.Softmax: "probs", torch.nn.LogSoftmax: "logprobs", torch.nn.Sigmoid: "sigmoid"}.get(
        type(last), "logits")


def _torch_module(model, model_path):
    from .torch_out import load_torch, onnx_to_torch

    if model is None:
        return load_torch(model_path), "torch module"
    return onnx_to_torch(model)


def evaluate_on(model_path, data, device="cpu", batch_size=256, dtype="float32", repeats=20, warmup=3,
                cuda_graph=True):
    """Scores (accuracy, mean cross-entropy) of the classifier on ``data``
    (npz with x, y, or ``(x, y)``) and its latency / throughput at
    ``batch_size``; see the module doc for engines and timing."""
    from .onnx.load import load_onnx
    from .onnx.runtime import classifier_scores, evaluate, inputs_for, load_data, prob_kind, session

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if repeats < 1 or warmup < 0:
        raise InputError("--repeats must be >= 1 and --warmup >= 0")
    engine = pick_engine(model_path, device, dtype)
    x, y = load_data(data, need_y=True) if not isinstance(data, tuple) else data
    is_pt = isinstance(model_path, (str, os.PathLike)) and os.fspath(model_path).endswith((".pt", ".pth"))
    model = None if is_pt else (load_onnx(model_path) if isinstance(model_path, (str, os.PathLike))
                                else model_path)
    res = {"engine": engine, "device": device, "dtype": dtype, "batch_size": int(batch_size),
           "repeats": int(repeats), "warmup": int(warmup)}
    if engine == "onnxruntime":
        res.update(evaluate(model, (x, y), device=device, batch=batch_size))
        res["device"] = device
        sess = session(model, device)
        feeds = inputs_for(sess, _batch(x, batch_size))
        ms = time_session(sess, feeds, repeats, warmup)
        res["cuda_graph"] = False
    else:
        import torch

        module, how = _torch_module(model, model_path)
        res["module"] = f"{type(module).__name__} ({how})"
        kind = prob_kind(model, model.graph.output[0].name) if model is not None else _module_kind(module)
        xdt = np.float32 if x.dtype.kind == "f" else x.dtype
        dev = torch.device(device)
        module = module.to(dev).eval()
        outs = []
        try:
            with torch.no_grad(), _autocast(torch, dev.type, dtype):
                for s in range(0, x.shape[0], batch_size):
                    xb = torch.as_tensor(np.ascontiguousarray(x[s:s + batch_size], dtype=xdt), device=dev)
                    out = module(xb)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    outs.append(out.float().cpu().numpy())
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"the torch module could not run on these inputs: {str(e).splitlines()[0][:200]}") \
                from None
        res.update(classifier_scores(np.concatenate(outs), y, kind))
        res["output_kind"] = kind
        xb = torch.as_tensor(np.ascontiguousarray(_batch(x, batch_size), dtype=xdt))
        ms, res["cuda_graph"] = time_module(module, xb, device, dtype, repeats, warmup, cuda_graph)
    res["latency_ms"] = float(ms)
    res["throughput"] = float(batch_size / (ms / 1e3)) if ms > 0 else float("inf")
    return res
