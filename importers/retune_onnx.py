"""Compress-retune (the compression paper's Algorithm 2) for any model fibgraph
compresses (MLPs, CNNs, residual streams, LSTM/GRU, attention, LayerNorm),
given as ONNX or as a torch module.

Each round: the greedy per-layer eps of the current model (Algorithm 3,
:func:`fibgraph.importers.tuning.tune_model` with the hypergraph path's
:class:`fibgraph.importers.tuning.DagCompressor`, loss-preserving within ``tau`` on the
calibration data), over-compressed with ``eps * q``; the base ONNX model is
turned into a torch module of the base's shapes
(:class:`fibgraph.importers.onnx.to_torch.OnnxModule`: every float weight a parameter, no
masks), retuned with early stopping on ``val``
(:func:`fibgraph.importers.torch_train.retune`) and written back to ONNX (the base's
graph with the retuned values).  The round is accepted when the loss on
``check`` stays within ``(1 + rho)`` of the ORIGINAL model's; the run stops at
the first rejected round, when over-compression no longer shrinks the model,
or after ``max_iters``.  The result is the last accepted model compressed
once more, loss-preservingly (greedy eps at ``tau``).  The result is a
:class:`fibgraph.retune.RetuneResult` (also what
:func:`fibgraph.importers.torch_base.compress_retune` returns).

Losses and accuracies are measured with onnxruntime on the ONNX models
(:func:`fibgraph.importers.api.evaluate`), so every number is the one a user of the
written file gets.
"""
from __future__ import annotations

import numpy as np
import onnx

from fibgraph.errors import InputError
from fibgraph.retune import RetuneResult, compress_retune_loop

from .api import count_params, evaluate, probe_feeds
from .onnx.importer import import_dag
from .onnx.load import load_onnx
from .tuning import DagCompressor, tune_model

__all__ = ["RetuneResult", "compress_retune_onnx"]


def _as_xy(data):
    x, y = data
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    return x.astype(np.float32), y.astype(np.int64)


def _to_model(model, example):
    if isinstance(model, onnx.ModelProto):
        return model
    if hasattr(model, "state_dict"):                  # a torch module: export it (legacy exporter)
        from .torch_export import export_model

        if example is None:
            raise InputError("a torch module needs an example input to be exported")
        return export_model(model, example)
    return load_onnx(model)


def compress_retune_onnx(model, train, val, check=None, cal=None, example=None, q=1.05, rho=0.05, tau=0.01,
                         steps=8, max_iters=10, linkage="complete", metric="cosine", rescale=True,
                         retune_kw=None, eps_floor=0.0, eps0=None, log=None) -> RetuneResult:
    """Algorithm 2 on an ONNX model (path or ModelProto) or a torch module
    (exported with ``example``).

    ``train``/``val``: (x, y) arrays or tensors; ``val`` is the held-out data
    for early stopping.  ``check``: the data of the loss test (default
    ``val``).  ``cal``: calibration data of the greedy eps (default
    ``check``).  ``eps_floor``: the over-compression eps of a layer is at
    least this (0 = the paper).  ``eps0``: eps dict (or one float for every
    tunable layer) used instead of the greedy eps in the first round.  ``retune_kw``: keyword arguments of
    :func:`fibgraph.importers.torch_train.retune` (lr, batch, max_epochs, patience,
    seed).  ``log(dict)`` receives each history entry.
    """
    import torch

    from .onnx.to_torch import OnnxModule
    from .torch_train import retune

    if q < 1 or not np.isfinite(q):
        raise InputError(f"q must be >= 1, got {q}")
    if rho < 0 or not np.isfinite(rho):
        raise InputError(f"rho must be >= 0, got {rho}")
    train, val = _as_xy(train), _as_xy(val)
    check = val if check is None else _as_xy(check)
    cal = check if cal is None else _as_xy(cal)
    tt = (torch.from_numpy(train[0]), torch.from_numpy(train[1]))
    tv = (torch.from_numpy(val[0]), torch.from_numpy(val[1]))
    retune_kw = dict(retune_kw or {})
    m = _to_model(model, example)
    r0 = evaluate(m, check)
    L0, P0 = r0["loss"], count_params(m)

    last = []                                  # (model, its compressor): imported once per round

    def compressor(mp):
        if not last or last[0][0] is not mp:
            imp = import_dag(mp, feeds=probe_feeds(cal, mp))
            last[:] = [(mp, DagCompressor(mp, linkage, metric, rescale, imported=imp))]
        return last[0][1]

    def greedy(mp):
        mc = compressor(mp)
        if not mc.tunable:
            return mc, {}
        return mc, tune_model(mp, cal, tau=tau, steps=steps, linkage=linkage, metric=metric, rescale=rescale,
                              compressor=mc)["eps"]

    def compress(mp, eps):
        return compressor(mp).compressed(eps, check=True)[0]

    def retune_base(small):
        mod = OnnxModule(small)
        info = retune(mod, tt, tv, **retune_kw)
        return mod.to_onnx(), info

    def loss(mp):
        r = evaluate(mp, check)
        return r["loss"], r["accuracy"]

    if isinstance(eps0, (int, float)):
        eps0 = {n: float(eps0) for n in compressor(m).tunable}
    accepted, history, stopped, _ = compress_retune_loop(
        m, greedy=lambda mp: greedy(mp)[1], compress=compress, retune=retune_base, loss=loss, params=count_params,
        rho=rho, q=q, max_iters=max_iters, eps_floor=eps_floor, eps0=eps0, log=log)
    mc, eps = greedy(accepted)
    final = mc.compressed(eps, check=True)[0] if eps else accepted
    rf = evaluate(final, check)
    return RetuneResult(model=final, module=OnnxModule(final), onnx=final, eps=eps, loss0=L0,
                        accuracy0=r0["accuracy"], params0=P0, loss=rf["loss"], accuracy=rf["accuracy"],
                        params=count_params(final), history=history, stopped=stopped)
