"""The whole job on an ONNX model: import, colour, compress, write, verify, evaluate.

Every model is read by the hypergraph importer (:mod:`fibgraph.importers.onnx.importer`)
and coloured, compressed and written by :mod:`fibgraph.importers.dag_api`.

This is the Python API behind the CLI::

    from fibgraph.importers.api import color_model, compress_model, evaluate
    report, imp, col = color_model("model.onnx", symmetry="fibration", eps=0.1)
    report = compress_model("model.onnx", "small.onnx", eps=0.0, verify=True)
    scores = evaluate("small.onnx", "test.npz")
    df = layer_table(report)        # per-layer results as a pandas DataFrame
"""
from __future__ import annotations

import os

import numpy as np

from fibgraph.engine import DEFAULT_RTOL
from fibgraph.errors import InputError
from fibgraph.fileio import write_atomic, write_json_atomic
from fibgraph.report import layer_table

from .criteria import (COMPRESS_SYMMETRIES, check_eps, check_options, criteria_from_table, make_criteria,
                       read_eps_table)
from .onnx.load import load_onnx
from .onnx.runtime import (check_loads, count_params, data_feeds, evaluate, load_data, probe_feeds, session,
                           verify_models)
__all__ = ["color_model", "compress_model", "import_any", "evaluate", "verify_models", "count_params",
           "load_data", "data_feeds", "probe_feeds", "session", "check_loads", "make_criteria",
           "criteria_from_table", "read_eps_table", "check_eps", "check_options", "atomic_write_bytes",
           "atomic_write_json", "COMPRESS_SYMMETRIES", "layer_table", "scores_on_data"]


def import_any(path, data=None):
    """``(None, DagImport)``: every ONNX model is read by the hypergraph
    importer (branches, residual streams, attention, LSTM/GRU, LayerNorm,
    barriers; a feed-forward chain is the simplest such graph).  ``data`` (an
    .npz with x, or ``(x, y)``) gives it its probe input.  The first element
    is kept for callers that unpack two values."""
    from .onnx.importer import import_dag

    model = load_onnx(path)
    return None, import_dag(model, feeds=probe_feeds(data, model), label=os.fspath(path))


def _dag_eps_table(imp, eps_file):
    if eps_file is None:
        return {}
    from .onnx.groups import weight_uses

    return read_eps_table(eps_file, [u.weight for u, _ in weight_uses(imp)])


def color_model(path, symmetry="fibration", eps=0.0, eps_file=None, linkage="average",
                metric="cosine", rescale=True, rtol=DEFAULT_RTOL, imported=None, data=None):
    """Colour an ONNX model; returns ``(report, DagImport, DagColouring)`` (see
    README and :mod:`fibgraph.importers.dag_api`).  ``data`` (.npz) gives the
    hypergraph importer its probe inputs; ``imported``: a DagImport of the
    model made before."""
    from .dag_api import color_dag_model

    eps = check_options(eps, linkage, metric)
    dag = imported if imported is not None else import_any(path, data)[1]
    return color_dag_model(path, symmetry, eps, _dag_eps_table(dag, eps_file), linkage, metric, rtol,
                           imp=dag, rescale=rescale)


def compress_model(path, out, symmetry="fibration", eps=0.0, eps_file=None, linkage="average",
                   metric="cosine", rescale=True, rtol=DEFAULT_RTOL, verify=False, data=None,
                   seed=0):
    """Compress an ONNX model to its base and write it atomically to ``out``."""
    if symmetry not in COMPRESS_SYMMETRIES:
        raise InputError(f"--symmetry {symmetry}: only in-balanced colourings ({', '.join(COMPRESS_SYMMETRIES)}) "
                         "preserve the function; opfibers do not")
    _check_out_path(path, out, (eps_file, data))
    from .dag_api import compress_dag_model

    eps = check_options(eps, linkage, metric)
    _, dag = import_any(path, data)
    report = compress_dag_model(path, out, symmetry, eps, _dag_eps_table(dag, eps_file), linkage, metric, rtol,
                                verify=verify, data=data, seed=seed, imp=dag, rescale=rescale)
    if data is not None and "verify" in report:
        sc = scores_on_data(dag.model, load_onnx(out), data)
        if sc is not None:
            report["verify"]["scores"] = sc
    return report


def scores_on_data(original, base, data):
    """Accuracy and mean cross-entropy of the original and the base on
    ``data`` (an .npz with labels ``y``): ``{"original": {...}, "base": {...}}``;
    None when the file has no ``y``; ``{"error": why}`` when the model is not
    a classifier these labels fit."""
    from .compare_dag import eval_data, evaluate_any

    try:
        with np.load(data, allow_pickle=False) as z:
            if "y" not in z.files:
                return None
            xy = (z["x"] if "x" in z.files else None, z["y"])
    except Exception:
        return None                  # data_feeds reported the unreadable file already
    try:
        ev = eval_data(original, data, xy)
        if ev[0] is None:
            return {"error": "no array x for the model's input"}
        r0, r1 = evaluate_any(original, ev), evaluate_any(base, ev)
    except InputError as e:
        return {"error": str(e)}
    keep = ("accuracy", "loss", "n")
    return {"original": {k: r0[k] for k in keep}, "base": {k: r1[k] for k in keep}}


def _check_out_path(inp, out, others=()):
    """The output against the model and the other input files (see :func:`fibgraph.fileio.check_paths`)."""
    from fibgraph.fileio import check_output_path

    if out is None:
        raise InputError("an output path is required (-o OUT.onnx)")
    check_output_path(out, [inp] + [p for p in others if isinstance(p, (str, os.PathLike))])


def atomic_write_bytes(path, data: bytes):
    write_atomic(path, data)


def atomic_write_json(path, obj):
    write_json_atomic(path, obj)
