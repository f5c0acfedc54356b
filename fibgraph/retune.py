"""Compress-retune (the compression paper's Algorithm 2), format-free.

Round ``t``: ``eps_t`` = the greedy per-layer eps of the current model
(Algorithm 3, loss-preserving); the model is over-compressed with
``eps_t * q`` (a layer's eps at least ``eps_floor``, at most ``EPS_MAX``),
then retuned.  The round is accepted when the retuned model's loss on the
check data is ``<= (1 + rho) * L0``, ``L0`` the ORIGINAL model's loss there;
the loop stops at the first rejected round, when over-compression no longer
shrinks the model (that round's model is kept), or after ``max_iters``.

The caller supplies the model operations (ONNX models in
:mod:`fibgraph.importers.retune_onnx`; torch modules are exported to ONNX and rebuilt
by :mod:`fibgraph.importers.torch_base`).  Both return one :class:`RetuneResult`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .tune import EPS_MAX

__all__ = ["over_eps", "compress_retune_loop", "RetuneResult"]


@dataclass
class RetuneResult:
    """The outcome of Algorithm 2, whatever the model format.

    ``model``: the returned model in the caller's format (an ONNX
    ``ModelProto`` for an ONNX model, a torch module of the base's shapes for a
    torch module): the last accepted model compressed once more with its
    loss-preserving greedy eps; ``module``: a torch module computing it (the
    rebuilt module itself, or the ONNX graph run by torch); ``onnx``: it as an
    ONNX model; ``eps``: that last greedy eps (an eps file);
    ``loss0``/``accuracy0``/``params0``: the original's, on the check data;
    ``loss``/``accuracy``/``params``: the returned model's; ``history``: one
    dict per round (see :func:`compress_retune_loop`); ``stopped``: why the
    loop ended."""

    model: object
    module: object
    onnx: object
    eps: dict
    loss0: float
    accuracy0: float
    params0: int
    loss: float
    accuracy: float
    params: int
    history: list = field(default_factory=list)
    stopped: str = ""


def over_eps(eps: dict, q: float, floor: float = 0.0) -> dict:
    """``eps * q`` per layer, at least ``floor``, at most ``EPS_MAX``."""
    return {k: min(EPS_MAX, max(v * q, floor)) for k, v in eps.items()}


def compress_retune_loop(model, greedy: Callable, compress: Callable, retune: Callable, loss: Callable,
                         params: Callable, rho: float = 0.05, q: float = 1.05, max_iters: int = 10,
                         eps_floor: float = 0.0, eps0: dict | None = None, record: Callable | None = None,
                         log: Callable | None = None):
    """Algorithm 2's loop.  ``greedy(m) -> eps``; ``compress(m, eps) -> small``;
    ``retune(small) -> (retuned, info with "epochs")``; ``loss(m) -> (loss,
    accuracy)`` on the check data; ``params(m) -> int``; ``record(m, eps,
    over, small) -> dict`` adds fields to a round's history entry; ``eps0``
    replaces the greedy eps of the first round.

    Returns ``(accepted model, history, stopped, L0)``."""
    L0 = loss(model)[0]
    limit = (1 + rho) * L0
    history = []
    m = model
    stopped = f"max_iters={max_iters}"
    for it in range(max_iters):
        t0 = time.perf_counter()
        eps = dict(eps0) if (it == 0 and eps0 is not None) else greedy(m)
        if not eps:
            stopped = "no compressible layer"
            break
        over = over_eps(eps, q, eps_floor)
        small = compress(m, over)
        loss_over = loss(small)[0]
        extra = record(m, eps, over, small) if record is not None else {}
        retuned, info = retune(small)
        Lc, acc = loss(retuned)
        rec = {"iter": it, "params_start": params(m), "eps": eps, "eps_over": over, **extra,
               "params_over": params(retuned), "loss_over": loss_over, "loss_retuned": Lc,
               "accuracy_retuned": acc, "epochs": info["epochs"], "accepted": Lc <= limit,
               "seconds": round(time.perf_counter() - t0, 2)}
        history.append(rec)
        if log is not None:
            log(rec)
        if not rec["accepted"]:
            stopped = f"loss {Lc:.4g} > (1 + rho) * {L0:.4g}"
            break
        shrank = params(retuned) < params(m)
        m = retuned
        if not shrank:
            stopped = "over-compression no longer shrinks the model"
            break
    return m, history, stopped, L0
