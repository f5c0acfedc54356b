"""The whole job on an ONNX model: import, colour, compress, write, verify, evaluate.

Every model is read by the hypergraph importer (:mod:`fibgraph.importers.onnx.importer`)
and coloured, compressed and written by :mod:`fibgraph.importers.dag_api`.

This is the Python API behind the CLI::

    from fibgraph.importers.api import color_model, compress_model, evaluate
    report, imp, col = color_model("model.onnx", symmetry="fibration", eps=0.1)
    report = compress_model("model.onnx", "small.onnx", eps=0.0, verify=True)
    scores = evaluate("small.onnx", "test.npz")
"""
from __future__ import annotations

import os

from fibgraph.engine import DEFAULT_RTOL
from fibgraph.errors import InputError
from fibgraph.fileio import write_atomic, write_json_atomic

from .criteria import (COMPRESS_SYMMETRIES, check_eps, check_options, criteria_from_table, make_criteria,
                       read_eps_table)
from .onnx.load import load_onnx
from .onnx.runtime import (check_loads, count_params, data_feeds, evaluate, load_data, probe_feeds, session,
                           verify_models)
__all__ = ["color_model", "compress_model", "import_any", "evaluate", "verify_models", "count_params",
           "load_data", "data_feeds", "probe_feeds", "session", "check_loads", "make_criteria",
           "criteria_from_table", "read_eps_table", "check_eps", "check_options", "atomic_write_bytes",
           "atomic_write_json", "COMPRESS_SYMMETRIES"]


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
                   seed=0, external_data=None):
    """Compress an ONNX model to its base and write it atomically to ``out``
    (``external_data``: its weights in ``<out>.data``; None: above 2 GB)."""
    if symmetry not in COMPRESS_SYMMETRIES:
        raise InputError(f"--symmetry {symmetry}: only in-balanced colourings ({', '.join(COMPRESS_SYMMETRIES)}) "
                         "preserve the function; opfibers do not")
    _check_out_path(path, out)
    from .dag_api import compress_dag_model

    eps = check_options(eps, linkage, metric)
    _, dag = import_any(path, data)
    return compress_dag_model(path, out, symmetry, eps, _dag_eps_table(dag, eps_file), linkage, metric, rtol,
                              verify=verify, data=data, seed=seed, imp=dag, rescale=rescale,
                              external_data=external_data)


def _check_out_path(inp, out):
    if out is None:
        raise InputError("an output path is required (-o OUT.onnx)")
    if os.path.exists(out) and os.path.exists(inp) and os.path.samefile(inp, out):
        raise InputError(f"{out}: output path equals the input path; refusing to overwrite the input")
    if os.path.abspath(out) == os.path.abspath(inp):
        raise InputError(f"{out}: output path equals the input path; refusing to overwrite the input")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise InputError(f"{out}: folder {d} does not exist")


def atomic_write_bytes(path, data: bytes):
    write_atomic(path, data)


def atomic_write_json(path, obj):
    write_json_atomic(path, obj)
