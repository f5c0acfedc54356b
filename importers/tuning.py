"""Greedy per-layer eps (Algorithm 3) on an ONNX classifier, in memory.

:class:`ModelCompressor` imports a model once and compresses it for any
``{layer weight name: eps}`` (layers not named: eps = 0, exact fibers) to a
``ModelProto`` without writing files.  :func:`tune_model` runs
:func:`fibgraph.tune.greedy_eps` with the loss = mean cross-entropy of the
compressed model on calibration data (onnxruntime), and returns a report
whose ``eps`` table is exactly what ``color``/``compress --eps-file`` read
(with the same ``--linkage``/``--metric``/``--no-rescale``).

Evaluations are cached by the partition they produce: two eps that give the
same fibers (and scales) give the same model and are run once.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from fibgraph.errors import InputError
from fibgraph.network import colour_network, compress_network
from fibgraph.refine import DEFAULT_RTOL
from fibgraph.tune import EPS_MAX, greedy_eps

from .api import count_params, criteria_from_table, evaluate, load_data
from .onnx_in import import_onnx
from .onnx_out import write_base_onnx

__all__ = ["ModelCompressor", "tune_model", "criteria_for"]


def criteria_for(eps_by_layer, linkage="average", metric="cosine", rescale=True, rtol=DEFAULT_RTOL):
    """``{None: Exact, name: Tolerance(eps)}`` exactly as ``make_criteria`` builds
    them from an eps file (eps 0 -> exact)."""
    return criteria_from_table(eps_by_layer, 0.0, linkage, metric, rescale, rtol)


class ModelCompressor:
    """An imported ONNX model compressed in memory for any per-layer eps."""

    def __init__(self, model, linkage="average", metric="cosine", rescale=True,
                 symmetry="fibration", rtol=DEFAULT_RTOL, imported=None):
        if linkage not in ("complete", "average"):
            raise InputError(f"--linkage must be complete or average, got {linkage!r}")
        if metric not in ("cosine", "euclidean"):
            raise InputError(f"--metric must be cosine or euclidean, got {metric!r}")
        self.res = imported or import_onnx(model)
        self.model = self.res.model
        self.network = self.res.network
        self.linkage, self.metric, self.rescale = linkage, metric, rescale
        self.symmetry, self.rtol = symmetry, rtol
        self.params_before = count_params(self.model)

    @property
    def tunable(self):
        """Names of the compressible (non-output) layers, in order."""
        return [ly.name for ly in self.network.layers if not ly.is_output]

    def colouring(self, eps_by_layer):
        crit = criteria_for(eps_by_layer, self.linkage, self.metric, self.rescale, self.rtol)
        return colour_network(self.network, self.symmetry, crit)

    def base(self, eps_by_layer):
        """(base Network, colouring) for ``eps_by_layer``."""
        col = self.colouring(eps_by_layer)
        return compress_network(col)[0], col

    def compressed(self, eps_by_layer, check=False):
        """(ModelProto, base Network, colouring)."""
        base, col = self.base(eps_by_layer)
        return write_base_onnx(self.model, base, check=check), base, col


def _partition_key(col):
    h = hashlib.sha1(np.ascontiguousarray(col.labels, dtype=np.int64).tobytes())
    h.update(np.round(np.ascontiguousarray(col.scales, dtype=np.float64), 12).tobytes())
    return h.hexdigest()


def tune_model(model, data, tau=0.01, steps=10, linkage="average", metric="cosine", rescale=True,
               rtol=DEFAULT_RTOL, on_step=None, compressor=None, max_eps=EPS_MAX):
    """Algorithm 3 on an ONNX classifier: returns the report dict.

    ``data``: npz path or ``(x, y)``; the loss is the mean cross-entropy of the
    compressed model's output there.  The reference loss is the ORIGINAL
    model's loss.  ``on_step(layer, k, eps, loss, ok)`` reports progress.
    """
    if not np.isfinite(tau) or tau < 0:
        raise InputError(f"--tau must be >= 0, got {tau}")
    if steps < 0 or steps > 40:
        raise InputError(f"--steps must be in 0..40, got {steps}")
    t0 = time.perf_counter()
    xy = load_data(data, need_y=True) if not isinstance(data, tuple) else data
    mc = compressor or ModelCompressor(model, linkage, metric, rescale, rtol=rtol)
    if not mc.tunable:
        raise InputError("the model has no compressible (non-output) layer to tune")
    base_eval = evaluate(mc.model, xy)
    cache = {}

    def loss(eps_by_layer):
        col = mc.colouring(eps_by_layer)
        key = _partition_key(col)
        if key not in cache:
            base = compress_network(col)[0]
            m2 = write_base_onnx(mc.model, base, check=False)
            r = evaluate(m2, xy)
            cache[key] = (r["loss"], r["accuracy"], count_params(m2), [ly.n_out for ly in base.layers])
        return cache[key][0]

    res = greedy_eps(mc.tunable, loss, tau=tau, steps=steps, base_loss=base_eval["loss"],
                     on_step=on_step, hi=max_eps)
    m2, base, col = mc.compressed(res.eps, check=True)
    final = evaluate(m2, xy)
    layers = []
    for ly, bl in zip(mc.network.layers, base.layers):
        layers.append({"weight": ly.name, "eps": res.eps.get(ly.name, 0.0), "nodes_before": ly.n_out,
                       "nodes_after": bl.n_out, "output_layer": bool(ly.is_output)})
    return {
        "model": os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>",
        "data": os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<arrays>",
        "n": int(xy[0].shape[0]), "tau": tau, "steps": steps, "linkage": linkage, "metric": metric,
        "rescale": bool(rescale), "symmetry": "fibration",
        "eps": {k: float(v) for k, v in res.eps.items()},
        "loss_before": base_eval["loss"], "accuracy_before": base_eval["accuracy"],
        "limit": res.limit, "loss_after": final["loss"], "accuracy_after": final["accuracy"],
        "params_before": mc.params_before, "params_after": count_params(m2),
        "layers": layers, "evaluations": res.evaluations,
        "distinct_models_run": len(cache), "trace": res.trace,
        "seconds": round(time.perf_counter() - t0, 3),
    }
