"""Parameter-symmetry metrics of the position paper (docs/design.md section 9, appendix A.1).

Permutation symmetry of a hidden layer
--------------------------------------
Each unit ``i`` of a weight layer is described by its concatenated weights
``u_i = (incoming weights (flattened over kernel/positions), bias, outgoing
weights (the columns of every dense layer that reads the unit))``; the
importers build these parts from the model's hypergraph
(``fibgraph.importers.dag_units.dag_layers``) and :func:`symmetry_metrics_units`
takes them as arrays.  Swapping two units is a symmetry of the loss
when ``u_i = u_j``; the distance of the parameters from the symmetric
subspace (the projection averages the two units) is ``|u_i - u_j| / sqrt 2``.
We normalise it by the layer's RMS unit norm ``s = sqrt(mean_k |u_k|^2)``::

    Delta_ij = |u_i - u_j| / (sqrt(2) * s)

(``normalise='layer'``, the default: ~1 for unrelated units, 0 for
duplicates; units that shrink towards zero, the paper's "useless" neurons,
become near-duplicates of each other).  ``'pair'`` divides by
``sqrt((|u_i|^2 + |u_j|^2) / 2)`` instead (scale-free per pair), ``'none'``
keeps the raw distance.  As in the paper, units are sorted by ``|u|`` and only
neighbours in that order are compared (n - 1 pairs, a generating set of the
symmetric group; near-duplicates whose norms are separated by a third
unit's norm are missed, the price of the O(n log n) shortcut).  The degree of symmetry ``N_dos(thr)`` is the number of
neighbour pairs with ``Delta < thr`` (thresholds 0.05-0.2), and
``N_dosb = n - N_dos`` the degree of symmetry breaking.  (The paper's
appendix text says "number of Delta above the threshold" while its formula
counts below; we follow the formula and docs/design.md: below.)

Double rotation (attention)
---------------------------
``softmax(x W_Q W_K^T x^T)`` is unchanged by ``W_Q -> W_Q M``,
``W_K -> W_K M^{-T}``.  With ``W_Q, W_K`` of shape ``(d_model, k)``: ``U`` =
eigenvectors of ``W_Q^T W_Q`` (eigenvalues ``Lambda_Q``), ``A = U^T W_K^T W_K U``,
``Delta_i = |Lambda_Q,ii - A_ii|``, ``N_dos = #{i: Delta_i < thr}``
(:func:`double_rotation_dos`).  The symmetric states are the directions ``n``
with ``W_Q n = W_K n = 0`` (both Gram values 0).  The count is invariant
under a common orthogonal rotation of both matrices.  (Q/K weight pairs are
found in the graph by ``fibgraph.importers.onnx.attention_blocks`` or by name by
``fibgraph.importers.dag_units.find_qk_pairs``.)
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

__all__ = ["permutation_deltas", "permutation_dos", "double_rotation_deltas",
           "double_rotation_dos", "spectral_stats", "symmetry_metrics_units", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = (0.05, 0.1, 0.15, 0.2)


def permutation_deltas(U, normalise="layer"):
    """(order, deltas): units sorted by norm and the n - 1 neighbour distances."""
    U = np.asarray(U, dtype=np.float64)
    n = U.shape[0]
    norms = np.linalg.norm(U, axis=1)
    order = np.argsort(norms, kind="stable")
    if n < 2:
        return order, np.zeros(0)
    d = np.linalg.norm(U[order[1:]] - U[order[:-1]], axis=1) / np.sqrt(2.0)
    if normalise == "layer":
        s = np.sqrt(np.mean(norms ** 2))
        d = d / s if s > 0 else np.zeros_like(d)
    elif normalise == "pair":
        s = np.sqrt(0.5 * (norms[order[1:]] ** 2 + norms[order[:-1]] ** 2))
        d = np.where(s > 0, d / np.where(s > 0, s, 1.0), 0.0)
    elif normalise != "none":
        raise InputError(f"normalise must be layer, pair or none, got {normalise!r}")
    return order, d


def permutation_dos(U, thresholds=DEFAULT_THRESHOLDS, normalise="layer") -> dict:
    """Degree of symmetry of the units (rows of ``U``) at each threshold.

    Returns ``{"units", "pairs", "n_dos": {thr: n}, "n_dosb": {thr: n},
    "near_duplicate_units": {thr: n}, "near_duplicate_fraction": {thr: f},
    "min_delta", "median_delta"}``; a near-duplicate unit is in at least one
    neighbour pair below the threshold.
    """
    order, d = permutation_deltas(U, normalise)
    n = int(np.asarray(U).shape[0])
    out = {"units": n, "pairs": int(d.size), "n_dos": {}, "n_dosb": {}, "near_duplicate_units": {},
           "near_duplicate_fraction": {},
           "min_delta": float(d.min()) if d.size else None,
           "median_delta": float(np.median(d)) if d.size else None}
    for t in thresholds:
        below = d < t
        dup = np.zeros(n, dtype=bool)
        dup[order[:-1][below]] = True
        dup[order[1:][below]] = True
        k = _key(t)
        out["n_dos"][k] = int(below.sum())
        out["n_dosb"][k] = n - int(below.sum())
        out["near_duplicate_units"][k] = int(dup.sum())
        out["near_duplicate_fraction"][k] = float(dup.sum() / n) if n else 0.0
    return out


def _key(t):
    return f"{float(t):g}"


def double_rotation_deltas(WQ, WK, relative=False):
    """``Delta_i = |Lambda_Q,ii - (U^T W_K^T W_K U)_ii|`` for the ``k`` directions
    (ascending ``Lambda_Q``); ``relative``: divided by the largest of the two
    Gram matrices' eigenvalues."""
    WQ = np.asarray(WQ, dtype=np.float64)
    WK = np.asarray(WK, dtype=np.float64)
    if WQ.ndim != 2 or WK.ndim != 2 or WQ.shape[1] != WK.shape[1]:
        raise InputError(f"W_Q and W_K must be 2-D with the same number k of columns ((d_model, k); "
                         f"cross-attention may have another d_model for K); got {WQ.shape} and {WK.shape}")
    GQ = WQ.T @ WQ
    GK = WK.T @ WK
    lam, U = np.linalg.eigh(0.5 * (GQ + GQ.T))
    A = U.T @ GK @ U
    delta = np.abs(lam - np.diag(A))
    if relative:
        s = max(float(lam.max(initial=0)), float(np.linalg.eigvalsh(0.5 * (GK + GK.T)).max(initial=0)))
        delta = delta / s if s > 0 else delta
    return delta


def double_rotation_dos(WQ, WK, thr=0.1, relative=False, heads=1) -> int:
    """Degree of symmetry of the double rotation: ``#{i: Delta_i < thr}``, summed
    over ``heads`` equal column blocks (each head has its own rotation)."""
    WQ = np.asarray(WQ, dtype=np.float64)
    WK = np.asarray(WK, dtype=np.float64)
    if heads < 1 or WQ.ndim != 2 or WQ.shape[1] % heads:
        raise InputError(f"cannot split {WQ.shape[-1]} columns into {heads} heads")
    k = WQ.shape[1] // heads
    return int(sum((double_rotation_deltas(WQ[:, h * k:(h + 1) * k], WK[:, h * k:(h + 1) * k],
                                           relative) < thr).sum() for h in range(heads)))


def spectral_stats(W) -> dict:
    """Spectral norm, Frobenius norm and stable rank ``|W|_F^2 / |W|_2^2`` of the
    weight unfolded to ``(n_out, n_in * D)`` (for a conv: the kernel matrix,
    not the conv operator)."""
    M = np.asarray(W, dtype=np.float64).reshape(W.shape[0], -1)
    if M.size == 0:
        return {"spectral_norm": 0.0, "frobenius_norm": 0.0, "stable_rank": 0.0}
    s = np.linalg.svd(M, compute_uv=False)
    fro2 = float((s ** 2).sum())
    return {"spectral_norm": float(s[0]), "frobenius_norm": float(np.sqrt(fro2)),
            "stable_rank": fro2 / float(s[0] ** 2) if s[0] > 0 else 0.0}


def symmetry_metrics_units(layers, thresholds=DEFAULT_THRESHOLDS, normalise="layer", warn_threshold=0.1,
                           warn_fraction=0.25) -> dict:
    """Per-layer table: units, N_dos per threshold, near-duplicate fraction,
    spectral stats, dead units; a summary and warnings.  ``layers`` = dicts with ``name``, ``kind``, ``output_layer``
    and the per-unit blocks ``incoming`` (n, a), ``bias`` (n, b), ``outgoing``
    (n, c) (any of them may have 0 columns), optional ``has_reader`` (n,) bool
    (units with an outgoing column at all; others are not counted as dead) and
    ``extra`` (a dict merged into the row).  A unit's vector is the hstack of
    the three blocks; spectral stats are of ``incoming`` (the unit's incoming
    rows, for a recurrent unit W and R gate rows side by side)."""
    def items():
        for ly in layers:
            inc = np.asarray(ly["incoming"], dtype=np.float64)
            bias = np.asarray(ly["bias"], dtype=np.float64)
            out = np.asarray(ly["outgoing"], dtype=np.float64)
            n = inc.shape[0]
            reader = np.asarray(ly.get("has_reader", np.ones(n, dtype=bool)), dtype=bool)

            def dead(inc=inc, bias=bias, out=out, reader=reader):
                zin = ~np.any(np.hstack([inc, bias]) != 0, axis=1)
                zout = reader & ~np.any(out != 0, axis=1) if out.shape[1] else np.zeros(len(zin), dtype=bool)
                return int(zin.sum()), int(zout.sum())

            yield {"name": ly["name"], "kind": ly["kind"], "units": int(n), "output_layer": bool(ly["output_layer"]),
                   "weight": inc, "vectors": (lambda inc=inc, bias=bias, out=out: np.hstack([inc, bias, out])),
                   "dead": dead, "extra": ly.get("extra", {})}

    return _report(items(), thresholds, normalise, warn_threshold, warn_fraction)


def _report(items, thresholds, normalise, warn_threshold, warn_fraction) -> dict:
    thresholds = tuple(float(t) for t in thresholds)
    for t in thresholds:
        if not np.isfinite(t) or t <= 0:
            raise InputError(f"thresholds must be positive numbers, got {t}")
    wk = _key(warn_threshold)
    rows, warnings = [], []
    for l, ly in enumerate(items):
        name = ly["name"]
        W = ly["weight"]
        rec = {"layer": l + 1, "name": name, "kind": ly["kind"], "units": ly["units"],
               "output_layer": ly["output_layer"], **spectral_stats(W), **ly.get("extra", {})}
        if ly["output_layer"]:
            rec["note"] = "output units are tied to the outputs: no permutation symmetry"
        else:
            dos = permutation_dos(ly["vectors"](), tuple(sorted(set(thresholds + (warn_threshold,)))),
                                  normalise)
            for key in ("n_dos", "n_dosb"):
                dos[key] = {k: v for k, v in dos[key].items() if float(k) in thresholds}
            for key in ("near_duplicate_units", "near_duplicate_fraction"):
                dos[key] = {k: v for k, v in dos[key].items() if float(k) in thresholds or k == wk}
            rec.update(dos)
            zin, zout = ly["dead"]()
            rec["zero_in_units"], rec["zero_out_units"] = zin, zout
            frac = dos["near_duplicate_fraction"][wk]
            if frac >= warn_fraction:
                warnings.append(f"layer {l + 1} ({name}): {frac:.0%} of units are near-duplicates "
                                f"(Delta < {warn_threshold:g})")
            if zout:
                warnings.append(f"layer {l + 1} ({name}): {zout} units have all-zero outgoing weights (dead)")
            if zin:
                warnings.append(f"layer {l + 1} ({name}): {zin} units have all-zero incoming weights and bias")
        if rec["stable_rank"] and rec["stable_rank"] < 1.5 and min(W.shape[:2]) > 2:
            warnings.append(f"layer {l + 1} ({name}): stable rank {rec['stable_rank']:.2f}: "
                            "the weight is nearly rank one")
        rows.append(rec)
    hidden = [r for r in rows if not r["output_layer"]]
    summary = {"hidden_units": int(sum(r["units"] for r in hidden)), "thresholds": list(thresholds),
               "normalise": normalise,
               "n_dos": {_key(t): int(sum(r["n_dos"][_key(t)] for r in hidden)) for t in thresholds},
               "near_duplicate_fraction": {
                   _key(t): (float(sum(r["near_duplicate_units"][_key(t)] for r in hidden))
                             / max(1, sum(r["units"] for r in hidden))) for t in thresholds}}
    return {"layers": rows, "summary": summary, "warnings": warnings}
