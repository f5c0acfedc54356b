"""Greedy per-layer tolerances (the compression paper's Algorithm 3).

Format-free: the caller supplies ``loss(eps_by_layer) -> float``, the loss of
the model compressed with the given per-layer tolerances (layers not in the
dict are compressed with eps = 0, i.e. exact fibers only).  For each layer in
order the largest eps in ``[0, hi]`` whose loss stays within
``(1 + tau) * base_loss`` is found by bisection and kept; later layers are
searched with the earlier choices in place.

Guarantee: every eps returned was *evaluated* with all earlier choices in
place and passed (or is 0, exact fibers).  The final dict therefore equals a
dict that passed the test, so ``loss(result.eps) <= (1 + tau) * base_loss``
as long as ``loss`` is deterministic.  Bisection assumes the loss grows with
eps; where it does not, the search still only returns a passing eps, but not
necessarily the largest one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

__all__ = ["TuneResult", "greedy_eps", "EPS_MAX"]

#: the largest tolerance tried (cosine distances lie in [0, 2]; eps must be < 2)
EPS_MAX = 1.999


@dataclass
class TuneResult:
    """``eps``: {layer: eps}; ``base_loss``: loss with eps = 0 everywhere (or
    as given); ``limit``: (1 + tau) * base_loss; ``loss``: the loss with the
    returned eps; ``trace``: every evaluation ``{layer, eps, loss, ok}``."""

    eps: dict
    base_loss: float
    limit: float
    loss: float
    tau: float
    steps: int
    evaluations: int
    trace: list = field(default_factory=list)


def greedy_eps(layers: Iterable[str], loss: Callable[[dict], float], tau: float = 0.01,
               steps: int = 10, hi: float = EPS_MAX, base_loss: float | None = None,
               on_step: Callable[[str, int, float, float, bool], None] | None = None,
               start: dict | None = None,
               settle: Callable[[str, float, dict, list], float] | None = None) -> TuneResult:
    """Algorithm 3: per layer, bisect the largest eps in ``[0, hi]`` with
    ``loss <= (1 + tau) * base_loss``.

    ``layers``: names in the order to tune (the output layer excluded by the
    caller).  ``loss``: callable on ``{name: eps}``.  ``steps``: bisection
    steps per layer after the first probe at ``hi`` (resolution
    ``hi / 2**steps``).  ``base_loss``: the reference loss (default
    ``loss({})``: the model with exact fibers only, which computes the original
    function).  ``on_step(layer, k, eps, loss, ok)`` is called after each
    evaluation (progress bars).  ``start``: eps of layers fixed beforehand.
    ``settle(layer, eps, earlier, passed)`` may replace the layer's chosen eps
    by another from ``passed`` (the eps that passed for this layer, and 0),
    e.g. the smallest that gives the same compressed model.
    """
    layers = list(layers)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (0 < hi < 2):
        raise ValueError(f"hi must be in (0, 2), got {hi}")
    trace = []
    evals = 0
    cur = dict(start or {})
    if base_loss is None:
        base_loss = float(loss(dict(cur)))
        evals += 1
    limit = (1.0 + tau) * base_loss if base_loss >= 0 else base_loss * (1.0 - tau)
    last_ok_loss = base_loss
    for name in layers:
        def test(e, k):
            nonlocal evals
            trial = {**cur, name: e}
            v = float(loss(trial))
            evals += 1
            ok = v <= limit
            trace.append({"layer": name, "eps": e, "loss": v, "ok": ok})
            if on_step is not None:
                on_step(name, k, e, v, ok)
            return ok, v

        ok, v = test(hi, 0)
        if ok:
            best, best_loss = hi, v
        else:
            lo, up = 0.0, hi
            best, best_loss = 0.0, None
            for k in range(1, steps + 1):
                mid = 0.5 * (lo + up)
                ok, v = test(mid, k)
                if ok:
                    lo, best, best_loss = mid, mid, v
                else:
                    up = mid
        if settle is not None and best > 0:
            passed = [0.0] + [t["eps"] for t in trace if t["layer"] == name and t["ok"]]
            pick = float(settle(name, best, dict(cur), passed))
            if pick != best:
                if pick not in passed:
                    raise ValueError(f"settle returned eps {pick} that was not evaluated")
                best = pick
                best_loss = next((t["loss"] for t in trace if t["layer"] == name and t["eps"] == pick),
                                 last_ok_loss)
        cur[name] = best
        if best_loss is not None:
            last_ok_loss = best_loss
    return TuneResult(eps=cur, base_loss=base_loss, limit=limit, loss=last_ok_loss, tau=tau,
                      steps=steps, evaluations=evals, trace=trace)
