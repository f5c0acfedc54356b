"""A target size: per-group tolerances that keep a fraction ``F`` of the parameters.

:func:`keep_search` works on a :class:`fibgraph.importers.tuning.DagCompressor`
(one import, any model the hypergraph path reads: MLPs, CNNs, residual nets,
LSTM/GRU, attention) and returns the eps table (one eps per tunable group,
:class:`fibgraph.groups.Group`, given to every weight of the group) whose base
keeps ``kept / total`` within ``tol`` (default 0.02, absolute) of ``F``, or the
closest reachable size with the reason when the model's granularity does not
allow it (output layers, units feeding a barrier and every non-weight tensor
cannot shrink: their parameters are a floor).

Data-free (no ``data``): one global eps for every tunable group, found by
bisection on the parameter count (the distances are dimensionless, in
``[0, 2)``, so one eps cuts every group's dendrogram at a comparable height);
then, when the count jumps over the target between two neighbouring eps
(``lo`` keeps too much, ``hi`` too little), each group in turn is bisected
between ``lo`` and ``hi`` with the others fixed, which walks the sizes between
the two.

Data-aware (``data``: calibration ``(x, y)`` or ``x`` alone): greedy by cost per
parameter.  From eps = 0 everywhere, each step tries, for every tunable group,
its next eps on a grid (:data:`EPS_GRID`, skipping eps that give the same base)
and takes the move of least ``(loss increase) / (parameters removed)`` on the
calibration data; when a move passes the target, that group's eps is bisected
between its last two values to land on it.  The data-free answer is a candidate
as well: of the two within the tolerance, the lower calibration loss wins (so
data-aware never does worse than data-free on the calibration data).  The loss
is the mean cross-entropy
with labels ``y``; without labels, the mean squared difference of the outputs to
the original's over their variance (distillation loss).  Every evaluation is
cached by the base's partition.
"""
from __future__ import annotations

import numpy as np

from fibgraph.errors import InputError
from fibgraph.tune import EPS_MAX
from fibgraph.heap import trim

__all__ = ["keep_search", "check_keep", "EPS_GRID", "KEEP_TOL"]

#: the eps values the greedy search steps through, per group
EPS_GRID = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, EPS_MAX)
#: the absolute distance to the target fraction that counts as landed
KEEP_TOL = 0.02


def check_keep(keep, where="--keep"):
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        raise InputError(f"{where}: must be a number in (0, 1], got {keep!r}") from None
    if not np.isfinite(keep) or not (0 < keep <= 1):
        raise InputError(f"{where}: the fraction of parameters to keep must be in (0, 1], got {keep}")
    return keep


class _Probe:
    """Parameter counts (and losses) of bases, cached by the base's partition."""

    def __init__(self, mc, loss_fn=None):
        from .onnx.runtime import count_params

        self.mc, self.loss_fn, self.count = mc, loss_fn, count_params
        self.by_key, self.by_table = {}, {}
        self.evaluations = 0

    def __call__(self, table):
        t = tuple(sorted((k, float(v)) for k, v in table.items() if v > 0))
        if t in self.by_table:
            return self.by_table[t]
        col = self.mc.colouring(dict(t))
        key = self.mc.key(col)
        if key not in self.by_key:
            # data-free: only the parameter count is needed, so the new weights
            # are written as shapes (no copy of the base's data per probe)
            m2 = self.mc.write(col, dry=self.loss_fn is None)
            self.evaluations += 1
            loss = float(self.loss_fn(m2)) if self.loss_fn is not None else 0.0
            self.by_key[key] = (self.count(m2), loss, key)
            del m2, col
            trim()                  # each probe's transients back to the system
        self.by_table[t] = self.by_key[key]
        return self.by_key[key]


def make_loss(model, data):
    """``loss(ModelProto) -> float`` on calibration ``data`` (an .npz path, ``(x, y)``
    or ``(x, None)``): mean cross-entropy with labels, else the outputs' mean
    squared difference to ``model``'s over their variance."""
    from .onnx.runtime import data_feeds, load_data, npz_headers, run, session
    from .scoring import evaluate_any, feeds_eval

    if isinstance(data, tuple):
        xy = data
    else:       # an .npz with one array per model input (no 'x') is unlabelled calibration data
        xy = load_data(data) if "x" in npz_headers(data) else (None, None)
    if xy[1] is not None:
        d = feeds_eval(model, data, xy)
        return lambda m: evaluate_any(m, d)["loss"]
    if isinstance(data, tuple):
        feeds = {session(model).get_inputs()[0].name: np.asarray(xy[0], dtype=np.float32)}
    else:
        feeds = data_feeds(data, model)

    def outputs(m):
        s = session(m)
        names = [o.name for o in s.get_outputs() if o.type in ("tensor(float)", "tensor(double)")]
        return [np.asarray(a, dtype=np.float64) for a in run(s, names, {k: v for k, v in feeds.items()
                                                                         if k in {i.name for i in s.get_inputs()}})]

    ref = outputs(model)
    var = [max(float(r.var()), 1e-12) for r in ref]
    return lambda m: float(np.mean([np.mean((a - r) ** 2) / v for a, r, v in zip(outputs(m), ref, var)]))


def keep_search(mc, keep, data=None, tol=KEEP_TOL, steps=14, on_step=None, fixed=()):
    """Per-group eps keeping ``keep`` of ``mc``'s parameters (module doc).
    ``fixed``: groups left out of the search (their eps stays 0: exact
    fibers only).

    Returns ``{"eps": {weight: eps}, "target", "params_before", "params_after",
    "kept", "landed", "floor", "mode", "evaluations", "note"?}``; ``eps`` holds
    every weight of every group with eps > 0 (what ``--eps-file`` reads)."""
    keep = check_keep(keep)
    fixed = set(fixed)
    tun = [g for g in mc.tunable if g not in fixed]
    loss_fn = make_loss(mc.model, data) if data is not None else None
    probe = _Probe(mc, loss_fn)
    p0 = mc.params_before

    def frac(table):
        return probe(table)[0] / p0

    floor_table = {g: EPS_MAX for g in tun}
    floor = frac(floor_table) if tun else frac({})
    if not tun or floor > keep + tol:
        best = floor_table if tun else {}
        mode = "data-aware" if data is not None else "data-free"
        return _result(mc, probe, best, keep, tol, mode, floor,
                       note=f"the smallest base keeps {floor:.1%} (output layers, units feeding a barrier and "
                            "tensors that are not weights cannot shrink): landed as close as possible")
    top = frac({})
    if top < keep - tol:          # the exact fibers alone already go below the target: lossless
        return _result(mc, probe, {}, keep, tol, "data-aware" if data is not None else "data-free", floor,
                       note=f"the exact base (eps 0, the same function) already keeps {top:.1%}")
    if data is None:
        best = _data_free(probe, tun, keep, tol, frac, steps, on_step)
        mode = "data-free"
    else:
        best = _greedy(probe, tun, keep, tol, frac, steps, on_step, p0)
        # the data-free answer is a candidate too: of those within tol the lower
        # calibration loss wins (so data-aware never loses to data-free), else the closer
        alt = _data_free(probe, tun, keep, tol, frac, steps, None)
        near = [t for t in (best, alt) if abs(frac(t) - keep) <= tol]
        best = min(near, key=lambda t: probe(t)[1]) if near else _closest([best, alt], frac, keep, probe)
        mode = "data-aware"
    note = None
    if abs(frac(best) - keep) > tol:
        note = (f"no eps table lands within {tol:g} of {keep:g}: merging one more cluster jumps from above to "
                f"below the target (the nearest base keeps {frac(best):.1%})")
    return _result(mc, probe, best, keep, tol, mode, floor, note)


def _closest(tables, frac, keep, probe=None):
    # the closest to the target; among equally close, the lower loss
    return min(tables, key=lambda t: (round(abs(frac(t) - keep), 9), probe(t)[1] if probe else 0.0))


def _data_free(probe, tun, keep, tol, frac, steps, on_step):
    lo, hi = 0.0, EPS_MAX                      # frac(lo) >= keep > frac(hi)
    seen = [{}]
    for k in range(steps):
        mid = 0.5 * (lo + hi)
        t = {g: mid for g in tun}
        seen.append(t)
        f = frac(t)
        if on_step:
            on_step("*", k, mid, f)
        if abs(f - keep) <= tol / 4:
            return t
        if f >= keep:
            lo = mid
        else:
            hi = mid
    seen.append({g: hi for g in tun})
    best = _closest(seen, frac, keep)
    if abs(frac(best) - keep) <= tol:
        return best
    # the count is not monotone in eps (a cyclic level's fixpoint can keep more
    # at a larger eps): scan, then scan every bracket of the target finer
    grid = np.linspace(0.0, EPS_MAX, 33)[1:]
    fs = [frac({g: e for g in tun}) for e in grid]
    seen += [{g: e for g in tun} for e in grid]
    brackets = [(a, b) for a, b, fa, fb in zip(grid[:-1], grid[1:], fs[:-1], fs[1:]) if fa >= keep > fb]
    for _ in range(3):
        nxt = []
        for a, b in brackets:
            sub = np.linspace(a, b, 9)
            fsub = [frac({g: e for g in tun}) for e in sub]
            seen += [{g: e for g in tun} for e in sub]
            if any(abs(f - keep) <= tol / 4 for f in fsub):
                return _closest(seen, frac, keep)
            nxt += [(x, y) for x, y, fx, fy in zip(sub[:-1], sub[1:], fsub[:-1], fsub[1:]) if fx >= keep > fy]
        brackets = nxt
    best = _closest(seen, frac, keep)
    if abs(frac(best) - keep) <= tol:
        return best
    lo, hi = max((e for e, f in zip(grid, fs) if f >= keep), default=0.0), \
        min((e for e, f in zip(grid, fs) if f < keep), default=EPS_MAX)
    lo, hi = min(lo, hi), max(lo, hi)
    # the global count jumps over the target between lo and hi: walk the sizes
    # in between by one group at a time
    cur = {g: lo for g in tun}
    for g in tun:
        hit, a = _bisect(cur, g, lo, hi, keep, tol, frac, steps, seen)
        if hit is not None:
            return hit
        cur = {**cur, g: a}
        seen.append(dict(cur))
        if abs(frac(cur) - keep) <= tol:
            break
    return _closest(seen, frac, keep)


def _greedy(probe, tun, keep, tol, frac, steps, on_step, p0):
    cur = {g: 0.0 for g in tun}
    idx = {g: -1 for g in tun}
    seen = [dict(cur)]
    k = 0
    while frac(cur) > keep + tol / 4:
        p_cur, l_cur, key_cur = probe(cur)
        best = None
        for g in tun:
            j = idx[g] + 1
            # the next grid eps that changes the base
            while j < len(EPS_GRID) and probe({**cur, g: EPS_GRID[j]})[2] == key_cur:
                j += 1
            if j >= len(EPS_GRID):
                continue
            t = {**cur, g: EPS_GRID[j]}
            p, l, _ = probe(t)
            removed = p_cur - p
            if removed <= 0:
                continue
            score = (l - l_cur) / removed
            if best is None or score < best[0]:
                best = (score, g, j, t)
        if best is None:
            break
        _, g, j, t = best
        seen.append(t)
        if on_step:
            on_step(g, k, EPS_GRID[j], frac(t))
        k += 1
        if frac(t) < keep - tol / 4:
            # passed the target: bisect this group's eps between its last two
            # values; if that jumps too, every other group's eps from where it is
            found = _bisect_group(cur, g, cur[g], EPS_GRID[j], keep, tol, frac, steps, seen)
            for h in ([] if found else [h for h in tun if h != g]):
                if _bisect_group(cur, h, cur[h], EPS_MAX, keep, tol, frac, steps, seen):
                    break
            break
        cur, idx[g] = t, j
    near = [t for t in seen if abs(frac(t) - keep) <= tol]
    if near:     # within tolerance: the lowest loss
        return min(near, key=lambda t: probe(t)[1])
    return _closest(seen, frac, keep, probe)


def _bisect(cur, g, a, b, keep, tol, frac, steps, seen):
    """Bisect group ``g``'s eps in ``[a, b]`` (others as in ``cur``) towards the
    target; every table tried goes to ``seen``.  Returns ``(table, a)``: the
    table within ``tol / 4`` of the target (None when none was), and the last
    eps that kept at least the target."""
    for _ in range(steps):
        mid = 0.5 * (a + b)
        t = {**cur, g: mid}
        seen.append(t)
        f = frac(t)
        if abs(f - keep) <= tol / 4:
            return t, a
        if f >= keep:
            a = mid
        else:
            b = mid
    return None, a


def _bisect_group(cur, g, a, b, keep, tol, frac, steps, seen):
    """:func:`_bisect`; True once any table tried is within ``tol``."""
    hit, _ = _bisect(cur, g, a, b, keep, tol, frac, steps, seen)
    return hit is not None or any(abs(frac(t) - keep) <= tol for t in seen)


def _result(mc, probe, best, keep, tol, mode, floor, note=None):
    best = {g: float(e) for g, e in best.items() if e > 0}
    p, loss, _ = probe(best)
    out = {"target": keep, "tolerance": tol, "mode": mode, "params_before": mc.params_before,
           "params_after": int(p), "kept": p / mc.params_before,
           "landed": bool(abs(p / mc.params_before - keep) <= tol), "floor": floor,
           "eps": mc.table(best), "group_eps": best, "evaluations": probe.evaluations,
           "names": {g: mc.name(g) for g in best}}
    if probe.loss_fn is not None:
        out["calibration_loss"] = loss
        out["calibration_loss_before"] = float(probe.loss_fn(mc.model))
    if note:
        out["note"] = note
    return out
