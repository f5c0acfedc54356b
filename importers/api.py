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
    from .onnx.groups import eps_names, weight_uses

    weights = [u.weight for u, _ in weight_uses(imp)]
    aliases = {}
    for w, name in eps_names(imp, weights).items():
        if name != w:
            aliases.setdefault(name, []).append(w)
    return read_eps_table(eps_file, weights, aliases)


def color_model(path, symmetry="fibration", eps=0.0, eps_file=None, linkage="complete",
                metric="cosine", rescale=True, rtol=DEFAULT_RTOL, imported=None, data=None):
    """Colour an ONNX model; returns ``(report, DagImport, DagColouring)`` (see
    README and :mod:`fibgraph.importers.dag_api`).  ``data`` (.npz) gives the
    hypergraph importer its probe inputs; ``imported``: a DagImport of the
    model made before."""
    from .dag_api import color_dag_model

    dag = imported if imported is not None else import_any(path, data)[1]
    metric, act_graph = _activation(metric, data, dag)
    eps = check_options(eps, linkage, metric)
    return color_dag_model(path, symmetry, eps, _dag_eps_table(dag, eps_file), linkage, metric, rtol,
                           imp=dag, rescale=rescale, graph=act_graph)


def _activation(metric, data, dag):
    """``(engine metric, graph to colour)``: ``metric="activation"`` clusters the
    activation-weighted rows on ``data`` with the euclidean distance
    (:mod:`fibgraph.importers.activation`); other metrics colour ``dag.graph``."""
    if metric != "activation":
        return metric, None
    if data is None:
        raise InputError("--metric activation weighs the rows by the units' activations: give --data CAL.npz")
    from .activation import activation_graph, node_rms

    return "euclidean", activation_graph(dag.graph, node_rms(dag, data_feeds(data, dag.model)))


def compress_model(path, out, symmetry="fibration", eps=0.0, eps_file=None, linkage="complete",
                   metric="cosine", rescale=True, rtol=DEFAULT_RTOL, verify=False, data=None,
                   seed=0, keep=None, repair=None, external_data=None):
    """Compress an ONNX model to its base and write it atomically to ``out``
    (``external_data``: its weights in ``<out>.data``; None: above 2 GB).

    ``keep`` (0 < keep <= 1): find per-group eps that keep this fraction of the
    parameters (:func:`fibgraph.importers.keep.keep_search`; data-aware on
    ``data`` when given, else data-free) instead of ``eps`` / ``eps_file``; the
    report's ``"keep"`` says what it got."""
    if symmetry not in COMPRESS_SYMMETRIES:
        raise InputError(f"--symmetry {symmetry}: only in-balanced colourings ({', '.join(COMPRESS_SYMMETRIES)}) "
                         "preserve the function; opfibers do not")
    _check_out_path(path, out, (eps_file, data))
    from .dag_api import compress_dag_model

    _, dag = import_any(path, data)
    metric, act_graph = _activation(metric, data, dag)
    eps = check_options(eps, linkage, metric)
    table = _dag_eps_table(dag, eps_file)
    reference = None
    if verify:
        from .dag_verify import reference_first, verify_reference

        if reference_first(dag, data):   # the original's session now, before the colouring's modules and caches
            reference = verify_reference(dag.model, dag, seed=seed)
    found = None
    if keep is not None:
        from .keep import check_keep, keep_search
        from .tuning import DagCompressor

        keep = check_keep(keep)
        if eps or eps_file:
            raise InputError("--keep chooses the eps itself: give --keep or --eps/--eps-file, not both")
        mc = DagCompressor(dag.model, linkage, metric, rescale, symmetry, rtol, imported=dag)
        mc.colour_graph = act_graph
        found = keep_search(mc, keep, data=data)
        table = found["eps"]
    if repair is None:
        repair = data is not None
    if repair and data is None:
        raise InputError("--repair re-fits the merged layers on calibration data: give --data CAL.npz")
    post = _repair_hook(data, dag) if repair else None
    report = compress_dag_model(path, out, symmetry, eps, table, linkage, metric, rtol,
                                verify=verify, data=data, seed=seed, imp=dag, rescale=rescale, post=post,
                                graph=act_graph, external_data=external_data, reference=reference)
    if act_graph is not None:
        report["metric"] = "activation (euclidean on activation-weighted rows)"
    if found is not None:
        report["keep"] = found
    if data is not None and "verify" in report:
        sc = scores_on_data(dag.model, load_onnx(out), data)
        if sc is not None:
            report["verify"]["scores"] = sc
    return report


def _repair_hook(data, dag):
    """``post`` for :func:`~fibgraph.importers.dag_api.compress_dag_model`: the repair on ``data``."""
    def post(m2, col, imp):
        from .repair import RIDGE, output_map, repair_base

        feeds = data_feeds(data, imp.model)
        _, gid, kept, _ = col.base
        fixed, rows = repair_base(imp.model, m2, feeds, out_map=output_map(imp, gid, kept, col.scales))
        return fixed, {"ridge": RIDGE,
                       "n": int(next(iter(feeds.values())).shape[0]), "layers": rows}
    return post


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
