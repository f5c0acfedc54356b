"""The whole job on any ONNX DAG (branches, residual streams, attention,
LSTM/GRU, LayerNorm): import as a hypergraph, colour with the one engine,
write the base, verify.  :mod:`fibgraph.importers.api` reads every model this way.

Criteria: eps = 0 is exact up to float rounding.  With eps > 0 the
quasi-fibration clustering (the paper's Algorithm 1) runs on every node set:
the weights' (linear layers, embeddings, recurrent units; an eps file sets
them per weight, and a bias add or per-channel scale right after a layer takes
its layer's eps) and the sums, products and norms between them (the default
eps), so that a residual stream's LayerNorm gamma/beta cluster like its
writers.  The rescaling merge (``relu(s z) = s relu(z)``) applies to the node
sets the importer marks positively homogeneous (a layer whose values reach
the next layers only through ReLU-family activations, pooling and reshapes,
possibly after a bias add; see ``fibgraph.importers.onnx.importer._homogeneous_spaces``): there
``--metric cosine`` clusters rows by angle and the writer folds each node's
scale into the base (rows divided by it, the next layer's columns multiplied
by it).  Elsewhere cosine is not exact and is replaced by the magnitude-aware
distance; the report says per layer which metric ran and whether it rescaled.

Recurrent units cluster jointly: the gates, cell and hidden node of one
LSTM/GRU unit share a cyclic level and are tied (``imp.graph.tie``, the joins
inside one level), so with eps > 0 the engine clusters the units ONCE on the
concatenation of all their node sets' rows (the distance of two units is the
root mean square of their per-set magnitude-aware distances; see
:mod:`fibgraph.engine`) and every gate set, the cell and the hidden state
carry the same partition: the base keeps exactly that partition, not the meet
of four slightly different ones.  Residual streams, bias adds and other joins
across levels are not tied: a stream's writers read colours that the stream
itself determines (joint clustering would need the whole stream as one
fixpoint level), so each node set is clustered alone and the writer keeps the
meet (BENCHMARKS.md, "Sequence models", measures what that costs).

Output layers (every unit tied to a node of a graph output: a softmax head, an
encoder's residual stream) and layers whose units feed a barrier are kept
whole by the writer, so they are coloured exactly whatever eps asks
(docs/design.md section 5).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from fibgraph.errors import InputError
from fibgraph.partition import canonical, classes
from fibgraph.engine import DEFAULT_RTOL, Tolerance
from fibgraph.symmetry import colour

from .onnx.groups import groups_of, module_name, weight_uses
from .onnx.write import write_dag_base
from .onnx.importer import import_dag
from .dag_verify import heavy, verify_against, verify_dag, verify_reference  # noqa: F401  (verify_dag: API)

__all__ = ["DagColouring", "colour_dag", "dag_criteria", "color_dag_model", "compress_dag_model", "verify_dag",
           "weight_entries"]


@dataclass
class DagColouring:
    graph: object
    labels: np.ndarray
    symmetry: str
    info: dict
    base: tuple = None        # (model, groups, kept, why) once written
    groups: tuple = None      # dag_groups(imp, labels) once computed
    scales: np.ndarray = None  # per node: the rescaling merge's scale (1 where none)


def weight_entries(imp):
    """The compressible weights' uses in record order: (weight name, op, node ids
    of its output units, node set names); a view over :func:`groups_of`."""
    return [(u.weight, u.op, u.units, list(u.node_sets)) for u, _ in weight_uses(imp)]


def _criteria(imp, eps, table, linkage, metric, rtol, rescale=True):
    from .criteria import criteria_from_table, make_criterion

    groups = groups_of(imp)
    names = [u.weight for u, _ in weight_uses(imp)]
    unknown = sorted(k for k in table if k != "*" and k not in set(names))
    if unknown:
        raise InputError(f"eps file: layers not in the model: {', '.join(unknown)} (layers: {', '.join(names)})")
    by_weight = criteria_from_table(table, eps, linkage, metric, rescale, rtol)
    # node sets of sums, products and norms take the default criterion: with eps > 0
    # a residual stream's LayerNorm gamma/beta and Add nodes cluster like its writers
    crit = {None: by_weight[None]}
    # weights sharing node sets (W and R of one LSTM) share a criterion: an
    # explicit entry for either beats the default (the first explicit one wins)
    explicit = set()
    for u, _ in weight_uses(imp):
        w = u.weight
        c = by_weight.get(w, by_weight[None])
        for s in u.node_sets:
            if s not in crit or (w in table and s not in explicit):
                crit[s] = c
                if w in table:
                    explicit.add(s)
    # the other node sets of a group (a bias add or BatchNorm after its layer, a
    # residual stream's Adds and LayerNorm gamma/beta with its writers) take the
    # criterion of the group's first explicitly set weight: with eps > 0 the
    # bias is clustered with the rows, as in the paper's Algorithm 1
    for g in groups:
        first = next((u for u in sorted(g.uses, key=lambda u: u.index) if u.weight in table), None)
        if first is None:
            continue
        c = crit[first.node_sets[0]]
        for s in g.node_set_names:
            crit.setdefault(s, c)
    # a group the writer keeps whole (its units are tied to the model's outputs,
    # or feed a barrier) is coloured exactly whatever eps asks: no eps can shrink
    # it, its readers' rows are then compared on the units the base really keeps,
    # and a wide head (an 18,710-class softmax) is not clustered for nothing
    exact = make_criterion(0.0, linkage, metric, rescale, rtol)
    for g in groups:
        if not g.tunable:
            for s in g.node_set_names:
                crit[s] = exact
    return crit


def dag_criteria(imp, eps=0.0, eps_table=None, linkage="complete", metric="cosine", rtol=DEFAULT_RTOL,
                 rescale=True) -> dict:
    """The criterion per node set that :func:`colour_dag` uses (``{node set: criterion, None: default}``)."""
    return _criteria(imp, eps, eps_table or {}, linkage, metric, rtol, rescale)


def colour_dag(imp, symmetry="fibration", eps=0.0, eps_table=None, linkage="complete", metric="cosine",
               rtol=DEFAULT_RTOL, rescale=True, graph=None) -> DagColouring:
    """Colour the hypergraph of ``imp`` (see the module doc for the criteria);
    ``graph``: colour this graph instead (same nodes; the activation-weighted
    graph of :mod:`fibgraph.importers.activation`)."""
    crit = _criteria(imp, eps, eps_table or {}, linkage, metric, rtol, rescale)
    r = colour(imp.graph if graph is None else graph, symmetry, crit)
    return DagColouring(imp.graph, r.labels, symmetry, {"criteria": crit, **r.info}, scales=r.scales)


def _layers(imp, col, gid=None, kept=None, why=None):
    layers = []
    crit = col.info["criteria"]
    for u, g in weight_uses(imp):
        w, op, ids, spaces = u.weight, u.op, u.units, u.node_sets
        colour_classes = classes(canonical(col.labels[ids]))
        # what the base merges: the writer's groups (the meet over a residual
        # stream's writers and readers, split to equal head sizes)
        fibers = colour_classes if gid is None else classes(canonical(gid[ids]))
        c = crit.get(spaces[0], crit[None])
        is_out = u.is_output
        rec = {"weight": w, "op": op, "group": g.name, "tied": list(g.weights), "nodes_before": int(ids.size),
               "fibers": [list(map(int, f)) for f in fibers], "output_layer": is_out,
               "homogeneous": bool(ids.size) and bool(imp.graph.homogeneous[ids].all())}
        if u.keep and not is_out:
            rec["kept_whole"] = "its units feed a barrier"
        if gid is not None and len(fibers) != len(colour_classes):
            rec["colour_classes"] = [list(map(int, f)) for f in colour_classes]
        if isinstance(c, Tolerance):
            level_info = col.info.get(spaces[0])
            level_info = level_info if isinstance(level_info, dict) else {}
            homog = bool(imp.graph.homogeneous[ids].all()) if ids.size else False
            rec["criterion"] = {"eps": c.eps, "linkage": c.linkage,
                                "metric": level_info.get("metric", c.metric if homog else "euclidean"),
                                "requested_metric": c.metric,
                                "rescale": bool(level_info.get("rescale", False))}
            if level_info.get("blocked_rows"):     # a component too big for the exact linkage
                rows = int(level_info["blocked_rows"])
                rec["criterion"]["blocked_rows"] = rows
                rec["criterion"]["note"] = (
                    f"{module_name(w)}: an eps-component of {rows:,} rows was clustered by blocked complete "
                    f"linkage (bounded memory; classes of diameter <= eps, possibly finer than the exact "
                    f"linkage's, which needs {8 * rows ** 2 / 2 ** 30:.1f} GiB: set FIBGRAPH_EXACT_LINKAGE_ROWS="
                    f"{rows} to ask for it)")
            joint = level_info.get("joint")
            if joint and joint["node_sets"]:     # a recurrent unit's node sets clustered as one
                rec["criterion"]["joint"] = joint["node_sets"]
        else:
            rec["criterion"] = {"eps": 0.0, "exact": True, "rtol": c.rtol}
        if kept is not None:
            rec["nodes_after"] = int(kept[ids].sum())
            reasons = sorted({why[s] for s in np.unique(imp.space_of[ids]) if why[s]})
            if reasons:
                rec["kept_whole"] = "; ".join(reasons + ([rec["kept_whole"]] if "kept_whole" in rec else []))
        else:
            rec["nodes_after"] = len(fibers)
        same = next((r for r in layers if r["weight"] == w and r["fibers"] == rec["fibers"]), None)
        if same is not None:          # one weight read at every step of an unrolled loop
            same["uses"] = same.get("uses", 1) + 1
            continue
        layers.append(rec)
    return layers


def _layer_params(imp, base, layers):
    """Per layer entry: ``node`` (the ONNX node reading the weight: the torch
    module's path in an export), ``weight_params`` and ``weight_params_after``
    (elements of the weight tensor in the original and in the base; the base's
    copy is the writer's ``<weight>__base<k>``, or the weight itself when the
    base keeps it as it is), and ``torch_name`` where the ONNX name is not the
    torch tensor's (:func:`fibgraph.importers.onnx.groups.torch_names`)."""
    import re

    from .onnx.groups import torch_names

    node_of = {}
    for rec in imp.records:
        for w in (getattr(rec, "weight", None), getattr(rec, "W", None), getattr(rec, "R", None)):
            if w:
                node_of.setdefault(w, rec.node)
    before = {t.name: int(np.prod(t.dims)) for t in imp.model.graph.initializer}
    after = {}
    if base is not None:
        for t in base.graph.initializer:
            m = re.fullmatch(r"(.*)__base\d+", t.name)
            after.setdefault(m.group(1) if m else t.name, int(np.prod(t.dims)))
    names = torch_names(imp)
    for ly in layers:
        w = ly["weight"]
        ly["node"] = node_of.get(w) or w
        if w in names:                      # the torch tensor an exported copy stands for
            ly["torch_name"] = names[w]
        n0 = before.get(w)
        if n0 is None and w in imp.consts:          # a Constant node's tensor
            n0 = int(np.asarray(imp.consts[w]).size)
        ly["weight_params"] = n0
        ly["weight_params_after"] = n0 if base is None else after.get(w, n0)


def _barriers(imp, total):
    return [{**b, "share": (b["params"] / total) if total else 0.0} for b in imp.barriers]


def color_dag_model(path, symmetry="fibration", eps=0.0, eps_table=None, linkage="complete", metric="cosine",
                    rtol=DEFAULT_RTOL, imp=None, feeds=None, rescale=True, graph=None, spill=None):
    from .criteria import COMPRESS_SYMMETRIES
    from .onnx.runtime import count_params

    t0 = time.perf_counter()
    imp = imp or import_dag(path, feeds=feeds)
    col = colour_dag(imp, symmetry, eps, eps_table, linkage, metric, rtol, rescale, graph=graph)
    t1 = time.perf_counter()
    total = count_params(imp.model)
    report = {"model": os.fspath(path), "symmetry": symmetry, "graph": "hypergraph", "params_before": total}
    if symmetry in COMPRESS_SYMMETRIES:
        m2, gid, kept, why = col.base = write_dag_base(imp, col.labels, scales=col.scales, spill=spill)
        report["params_after"] = count_params(m2)
        report["layers"] = _layers(imp, col, gid, kept, why)
    else:
        report["params_after"] = total
        report["layers"] = _layers(imp, col)
    _layer_params(imp, col.base[0] if col.base is not None else None, report["layers"])
    report["barriers"] = _barriers(imp, total)
    report["nodes"] = int(imp.graph.n)
    report["colors"] = int(col.labels.max() + 1) if col.labels.size else 0
    report["seconds"] = {"colour": round(t1 - t0, 4)}
    return report, imp, col


def compress_dag_model(path, out, symmetry="fibration", eps=0.0, eps_table=None, linkage="complete",
                       metric="cosine", rtol=DEFAULT_RTOL, verify=False, data=None, seed=0, imp=None,
                       rescale=True, post=None, graph=None, external_data=None, reference=None):
    """Colour, write the base to ``out`` (streamed: with ``external_data``, or
    automatically above :data:`fibgraph.importers.onnx.external.EXTERNAL_DATA_BYTES`,
    its weights in ``<out>.data`` beside it), check the file written (the ONNX
    checker and onnxruntime over its path) and verify it against the original;
    a failure leaves nothing written.  ``post(base, col, imp) -> (base, info)``
    may change the base before it is checked and written (the repair), its
    ``info`` goes to ``report["repair"]``.  ``reference``: the original's
    outputs for verify drawn before (:func:`fibgraph.importers.dag_verify.reference_first`).
    A big (lean) model's new weights go to a spill file in ``out``'s folder
    while the base is written (:mod:`fibgraph.importers.onnx.spill`), removed
    once it is saved or anything fails."""
    import gc

    from fibgraph.fileio import atomic_path, install

    from .onnx import external
    from .onnx.runtime import check_loads

    t0 = time.perf_counter()
    imp = imp or import_dag(path)
    spill = _spill_beside(out) if external.is_lean(imp.model) else None
    try:
        report, imp, col = color_dag_model(path, symmetry, eps, eps_table, linkage, metric, rtol, imp=imp,
                                               rescale=rescale, graph=graph, spill=spill)
        m2 = col.base[0]                         # written once, by color_dag_model
        if post is not None:
            m2, report["repair"] = post(m2, col, imp)
        col.base = (None,) + tuple(col.base[1:])
        data_name = os.path.basename(os.fspath(out)) + ".data"
        data_path = os.path.join(os.path.dirname(os.path.abspath(out)), data_name)
        if os.path.realpath(data_path) in {os.path.realpath(f) for f in external.external_files(imp.model)}:
            raise InputError(f"{out}: its data file {data_name} would overwrite the input's external data")
        report["output"] = os.fspath(out)
        with atomic_path(out, suffix=".onnx") as tmp:
            # the data goes to a temporary name and is installed as an output of its own (an earlier
            # OUT.data is kept until the command succeeds, and put back if anything after fails)
            tmp_data = tmp[:-len(".onnx")] + ".data"
            try:
                written = external.save_model(m2, tmp, external=external_data, data_name=data_name, data_file=tmp_data)
                if written:
                    install(tmp_data, data_path)
                    written = data_path
            finally:
                if os.path.lexists(tmp_data):
                    os.unlink(tmp_data)
                if spill is not None:      # the base's new weights are in its own file now
                    spill.close()
            big = heavy(m2) or heavy(path)
            del m2
            if big:                    # a full collection costs time in a big process: only for big models
                gc.collect()
            external.release()                         # the original's weights: not needed in memory until verify
            try:
                try:
                    external.check(tmp)                # a path: external data and > 2 GB alike
                except Exception as e:                 # a writer bug, never the user's input
                    raise RuntimeError(f"the written base model does not pass the ONNX checker: {e}") from None
                if not (verify or data is not None):
                    check_loads(tmp)
                t1 = time.perf_counter()
                if verify or data is not None:
                    ref = reference if reference is not None else verify_reference(imp.model, imp, data=data, seed=seed)
                    report["verify"] = verify_against(tmp, ref)
            except BaseException:
                if written:
                    os.unlink(written)
                raise
        if written:
            report["external_data"] = data_name
        report["seconds"]["compress_write"] = round(time.perf_counter() - t1 + (t1 - t0)
                                                    - report["seconds"]["colour"], 4)
        return report
    finally:
        if spill is not None:
            spill.close()


def _spill_beside(out):
    """A :class:`fibgraph.importers.onnx.spill.Spill` in ``out``'s folder for
    a big model's base, or None where none can be made there (the base's new
    weights are then held in memory)."""
    from .onnx.spill import Spill

    try:
        return Spill(os.path.dirname(os.path.abspath(out)) or ".")
    except OSError:
        return None
