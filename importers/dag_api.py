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
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from fibgraph.errors import InputError
from fibgraph.partition import canonical, classes
from fibgraph.engine import DEFAULT_RTOL, Tolerance
from fibgraph.progress import task
from fibgraph.symmetry import colour

from .onnx.groups import groups_of, weight_uses
from .onnx.write import write_dag_base
from .onnx.importer import import_dag

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
    from .criteria import criteria_from_table

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
                    rtol=DEFAULT_RTOL, imp=None, feeds=None, rescale=True, graph=None):
    from .criteria import COMPRESS_SYMMETRIES
    from .onnx.runtime import count_params

    t0 = time.perf_counter()
    imp = imp or import_dag(path, feeds=feeds)
    col = colour_dag(imp, symmetry, eps, eps_table, linkage, metric, rtol, rescale, graph=graph)
    t1 = time.perf_counter()
    total = count_params(imp.model)
    report = {"model": os.fspath(path), "symmetry": symmetry, "graph": "hypergraph", "params_before": total}
    if symmetry in COMPRESS_SYMMETRIES:
        m2, gid, kept, why = col.base = write_dag_base(imp, col.labels, scales=col.scales)
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


def _free_batch(model):
    """Names of the graph inputs that share one free batch axis: every input of
    rank > 0 declares its first axis free, and with several inputs by one
    symbolic name (``batch``); else none (the batch stays the probe's)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits and len(vi.type.tensor_type.shape.dim) > 0]
    firsts = [vi.type.tensor_type.shape.dim[0] for vi in inputs]
    if not inputs or any(d.HasField("dim_value") and d.dim_value > 0 for d in firsts):
        return set()
    if len(inputs) > 1 and (len({d.dim_param for d in firsts}) != 1 or not firsts[0].dim_param):
        return set()
    return {vi.name for vi in inputs}


def _feeds_like(imp, seed, data=None, specs=None, batch=None):
    """Inputs shaped like the probe's, drawn anew (:func:`fibgraph.importers.onnx.feeds.make_feeds`):
    floats standard normal, integers in the range they index, masks ones; the
    integer inputs of a probe the user gave keep their values.  With ``batch``,
    inputs whose first axis is declared free and drawn (not given) get that
    batch size.  A :class:`Drawn` whose ``given`` names the inputs kept."""
    from .onnx.feeds import Drawn, input_specs, make_feeds

    specs = input_specs(imp.model) if specs is None else specs
    shapes = {k: np.shape(v) for k, v in imp.feeds.items()}
    if batch is not None and isinstance(imp.feeds, Drawn):
        free = _free_batch(imp.model)
        shapes = {k: ((batch,) + tuple(v[1:]) if k in free and len(v) else v) for k, v in shapes.items()}
    feeds = make_feeds(imp.model, seed=seed, shapes=shapes, specs=specs)
    feeds.given = set()
    if not isinstance(imp.feeds, Drawn):      # the user's probe: keep its non-float inputs
        for k, v in imp.feeds.items():
            v = np.asarray(v)
            if v.dtype.kind != "f" or k not in feeds:
                feeds[k] = v
                feeds.given.add(k)
    if data is not None:
        from .onnx.runtime import data_feeds

        got = data_feeds(data, imp.model)
        feeds.update(got)
        feeds.given |= set(got)
    return feeds


def _heavy(model) -> bool:
    """Whether ``model`` (a path or a ModelProto) holds weights of
    :data:`~fibgraph.importers.onnx.external.LEAN_BYTES` or more (then freeing
    them at once matters more than the cost of ``gc.collect``)."""
    from .onnx.external import LEAN_BYTES

    try:
        if isinstance(model, (str, os.PathLike)):
            return os.path.getsize(model) >= LEAN_BYTES
        return sum(len(t.raw_data) for t in model.graph.initializer) >= LEAN_BYTES
    except (OSError, AttributeError):
        return False


def verify_batch(imp, most=64, least=2):
    """The made-up batch for verify: ``most``, or fewer where one sample's
    activations (every tensor of the probe run) are big, so that a batch's
    activations stay within a quarter of the model's weights or
    :data:`VERIFY_ACTIVATIONS` (a 25M-parameter CNN at 32 x 32: a few
    samples, not 64); at least ``least``, so a free batch axis is still
    exercised."""
    inits = {t.name for t in imp.model.graph.initializer}
    act = sum(int(np.prod(s)) for k, s in imp.shapes.items() if k not in inits and s is not None) * 4
    probe_batch = max([int(np.shape(v)[0]) for v in imp.feeds.values() if np.ndim(v)] or [1])
    per_sample = act / max(probe_batch, 1)
    if per_sample <= 0:
        return most
    budget = max(imp.n_params, VERIFY_ACTIVATIONS)        # float32 weights: 4 bytes per parameter
    return int(min(most, max(least, budget // per_sample)))


#: activations a verify batch may always take, whatever the model's size
VERIFY_ACTIVATIONS = 16 << 20


def verify_dag(a, b, imp, data=None, seed=0, repeats=3, batch="auto"):
    """Largest absolute output difference of models ``a`` and ``b`` (ModelProtos
    or paths) on ``repeats`` made-up inputs shaped like the probe's, at
    ``batch`` samples where the model's batch axis is free (or on ``data``;
    ``"auto"``: :func:`verify_batch`, 64 unless one sample's activations are big);
    ``inputs`` in the result says what was fed to each input, ``rel_diff`` the
    difference over the original's largest absolute output.  One session at a
    time: ``a``'s outputs are kept, its session closed, then ``b`` runs.  A
    difference that is not finite is an error, not a number."""
    import gc

    import onnxruntime as ort

    from fibgraph.heap import session_heap, trim

    from .onnx.external import relieve, session
    from .onnx.feeds import describe, input_specs, short_error

    def options():
        so = ort.SessionOptions()
        so.log_severity_level = 4            # errors come back as exceptions
        so.enable_cpu_mem_arena = False      # intermediates freed as they die, not pooled at their peak
        so.add_session_config_entry("session.disable_prepacking", "1")   # no packed second copy of the weights
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC   # no re-laid-out (NCHWc) copies
        return so

    runs = 1 if data is not None else repeats
    if batch == "auto":
        batch = verify_batch(imp)
    with task("verifying: both models on the same inputs", total=2 * runs) as advance, session_heap():
        relieve()                              # the colouring's mapped pages and freed heap back first
        sa = session(a, options())
        names = [i.name for i in sa.get_inputs()]
        specs = input_specs(imp.model)

        def draws(batch):
            out = []
            for r in range(runs):
                drawn = _feeds_like(imp, seed + r, data, specs, batch=batch)
                out.append((drawn, {k: v for k, v in drawn.items() if k in names}))
            return out

        def run_all(sess, fed):
            res = []
            for _, f in fed:
                res.append(sess.run(None, f))
                advance(1)
            return res

        fed = draws(batch)
        try:
            ra = run_all(sa, fed)
        except Exception as e:
            if batch is None or data is not None:
                raise InputError(f"verification run failed: {short_error(e)}") from None
            fed = draws(None)                 # the batch axis is not free after all: the probe's shapes
            try:
                ra = run_all(sa, fed)
            except Exception as e2:
                raise InputError(f"verification run failed: {short_error(e2)}") from None
        del sa
        if _heavy(a):                          # a full collection costs time in a big process: only for big models
            gc.collect()
        trim()                                 # the first session's weights back to the system before the second
        try:
            sb = session(b, options())
        except Exception as e:                 # a writer bug, never the user's input
            raise RuntimeError("the written base model does not load in onnxruntime "
                               f"({short_error(e)}); nothing was written") from None
        diff, scale = 0.0, 0.0
        for (_, feeds), outs in zip(fed, ra):
            try:
                rb = sb.run(None, feeds)
            except Exception as e:
                raise InputError(f"verification run failed: {short_error(e)}") from None
            for p, q in zip(outs, rb):
                if np.shape(p) != np.shape(q):         # a writer bug, never the user's input
                    raise RuntimeError(f"the base's output has shape {list(np.shape(q))}, the original's "
                                       f"{list(np.shape(p))}")
                p, q = np.asarray(p).reshape(-1), np.asarray(q).reshape(-1)
                for k in range(0, p.size, 1 << 20):     # in float64, a slice at a time (a LM's logits are big)
                    pk, qk = p[k:k + (1 << 20)].astype(np.float64), q[k:k + (1 << 20)].astype(np.float64)
                    with np.errstate(invalid="ignore", over="ignore"):
                        d = float(np.max(np.abs(pk - qk)))
                    if not np.isfinite(d):
                        raise InputError(f"verify: output difference is not finite ({d}): the outputs overflow "
                                         "or are NaN on these inputs")
                    diff = max(diff, d)
                    scale = max(scale, float(np.max(np.abs(pk))))
            del rb
            advance(1)
        del sb
    drawn, feeds = fed[-1]
    n = int(next((np.shape(v)[0] for v in feeds.values() if np.ndim(v)), 1))
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    if data is not None:
        return {"max_abs_diff": diff, "max_abs_output": scale, "rel_diff": rel, "inputs": "data", "n": n}
    return {"max_abs_diff": diff, "max_abs_output": scale, "rel_diff": rel,
            "inputs": describe(feeds, specs, drawn.given), "draws": runs, "seed": seed, "n": n}


def compress_dag_model(path, out, symmetry="fibration", eps=0.0, eps_table=None, linkage="complete",
                       metric="cosine", rtol=DEFAULT_RTOL, verify=False, data=None, seed=0, imp=None,
                       rescale=True, post=None, graph=None, external_data=None):
    """Colour, write the base to ``out`` (streamed: with ``external_data``, or
    automatically above :data:`fibgraph.importers.onnx.external.EXTERNAL_DATA_BYTES`,
    its weights in ``<out>.data`` beside it), check the file written (the ONNX
    checker and onnxruntime over its path) and verify it against the original;
    a failure leaves nothing written.  ``post(base, col, imp) -> (base, info)``
    may change the base before it is checked and written (the repair), its
    ``info`` goes to ``report["repair"]``."""
    import gc

    from fibgraph.fileio import atomic_path, install

    from .onnx import external
    from .onnx.runtime import check_loads

    t0 = time.perf_counter()
    report, imp, col = color_dag_model(path, symmetry, eps, eps_table, linkage, metric, rtol, imp=imp,
                                       rescale=rescale, graph=graph)
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
        heavy = _heavy(m2) or _heavy(path)
        del m2
        if heavy:                                  # a full collection costs time in a big process: only for big models
            gc.collect()
        external.release()                         # the original's weights: not needed in memory until verify
        try:
            try:
                external.check(tmp)                # a path: external data and > 2 GB alike
            except Exception as e:                 # a writer bug, never the user's input
                raise RuntimeError(f"the written base model does not pass the ONNX checker: {e}") from None
            if not (verify or data is not None):
                check_loads(tmp)                   # verify opens it anyway (verify_dag)
            t1 = time.perf_counter()
            if verify or data is not None:
                report["verify"] = verify_dag(imp.model, tmp, imp, data=data, seed=seed)
        except BaseException:
            if written:
                os.unlink(written)
            raise
    if written:
        report["external_data"] = data_name
    report["seconds"]["compress_write"] = round(time.perf_counter() - t1 + (t1 - t0) - report["seconds"]["colour"], 4)
    return report
