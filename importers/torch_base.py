"""Fibration compression of torch modules to real smaller modules, and the
compression paper's compress-retune procedure (Algorithm 2), on the one
(hypergraph) path.

A module is exported to ONNX in memory (:func:`fibgraph.importers.torch_export.export_model`:
legacy exporter, input ``x``, dynamic batch; parameters keep their state-dict
names such as ``0.weight``), coloured and compressed by the hypergraph path
(:class:`fibgraph.importers.tuning.DagCompressor`), and the base is rebuilt as a copy
of the module whose ``nn.Linear``/``nn.Conv*d`` layers have the base's shapes
(:func:`module_from_onnx`).

- :func:`compress_module`: ``{layer: eps}`` -> (smaller module, base ONNX
  model, colouring).  Layer names are the weights' parameter names
  (``"0.weight"``), so eps files carry over to ``fibgraph compress``.
- :func:`module_from_onnx`: a base ONNX model of a module's export as a new
  module of the base's shapes (weights copied by parameter name; verified
  against the base with onnxruntime).
- :func:`tune_module`: Algorithm 3 (greedy eps) on a module.
- :func:`retune`: training with early stopping on held-out data (best state
  restored); :func:`module_loss`, :func:`n_params`.
- :func:`compress_retune`: Algorithm 2 (:func:`fibgraph.importers.retune_onnx.compress_retune_onnx`
  on the module's export), returned as a module of the base's shapes in a
  :class:`fibgraph.retune.RetuneResult`.

Only what the export keeps can be rebuilt: modules whose forward is a chain
or any graph of ``Linear``/``Conv`` layers and shape-preserving ops whose base
has the same ONNX nodes as the export (an MLP, a CNN).  A base that needs
nodes of its own (multiplicity constants of a residual stream's LayerNorm,
for instance) is refused with the hint to use the ONNX model as it is
(:class:`fibgraph.importers.onnx_torch.OnnxModule`, ``compress_retune_onnx``).
"""
from __future__ import annotations

import os
import re
from dataclasses import replace

import numpy as np

from fibgraph.errors import InputError
from fibgraph.engine import DEFAULT_RTOL
from fibgraph.retune import RetuneResult
from fibgraph.tune import EPS_MAX, TuneResult

from .torch_blocking import RebuildBlocked, node_scope, same_nodes, sizes_itself
from .torch_train import as_tensors, first_tensor, module_loss, retune  # noqa: F401  (part of this API)

__all__ = ["compress_module", "ModuleCompression", "module_from_onnx", "module_loss", "n_params", "tune_module", "retune",
           "compress_retune", "RetuneResult"]

_BASE_SUFFIX = re.compile(r"(__base\d+)+$")
_REBUILD_HINT = ("use the base ONNX model as it is (fibgraph.importers.onnx.to_torch.OnnxModule, "
                 "fibgraph.importers.retune_onnx.compress_retune_onnx)")


def _torch():
    try:
        import torch
    except ImportError:
        raise InputError("torch is not installed: pip install torch (CPU build)") from None
    return torch


def _example(model, example):
    """The export's example input: ``example``, or for a module whose first
    parametrised layer is an ``nn.Linear`` a batch of one zero vector."""
    torch = _torch()
    nn = torch.nn
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch nn.Module, got {type(model).__name__}")
    if example is not None:
        return example if isinstance(example, torch.Tensor) else torch.as_tensor(np.asarray(example))
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    if first is None:
        raise InputError("the module has no parameters to compress")
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features)
    raise InputError(f"the module's first layer is {type(first).__name__}: give example= (an input batch) "
                     "to export it")


def _export(model, example):
    from .torch_rebuild import export_named

    return export_named(model, example)[0]


def _groups_at(mc, original, paths):
    """Tunable groups of ``mc`` whose merges a torch rebuild cannot hold, from
    the module paths that block it: groups with a weight of the module
    (``enc.0.attention.self`` -> its query/key/value), else the groups whose
    units the module's nodes read or write (a LayerNorm -> the residual
    stream it normalises); and the same groups of every repeated block
    (``encoder.layer.3.`` -> ``encoder.layer.<k>.``)."""
    tun = set(mc.tunable)
    out = set()
    for path in paths:
        pre = f"{path}." if path else ""
        hit = {g.name for g in mc.groups if g.name in tun and any(w.startswith(pre) for w in g.weights)}
        if not hit:
            tensors = {t for n in original.graph.node
                       if node_scope(n.name) == path or node_scope(n.name).startswith(pre)
                       for t in list(n.input) + list(n.output) if t in mc.imp.layouts}
            if tensors:
                ids = np.unique(np.concatenate([np.asarray(mc.imp.layouts[t]).reshape(-1) for t in tensors]))
                hit = {g.name for g in mc.groups if g.name in tun and np.isin(g.nodes, ids).any()}
        out |= hit
    pats = [re.compile(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(g))) for g in out]
    out |= {g for g in tun if any(p.fullmatch(g) for p in pats)}
    return out


def module_from_onnx(base, template, original=None, example=None, check=True, data=None):
    """A copy of ``template`` whose layers have the shapes and weights of
    ``base``, a compressed model of ``template``'s ONNX export ``original``
    (exported here from ``example`` when not given).

    Every tensor of the module (parameters and running statistics) is read
    back from the base's initializers through the export's packing
    (:mod:`fibgraph.importers.torch_rebuild`): ``nn.Linear``, ``nn.Conv*d``
    (groups 1), ``nn.BatchNorm*d``, ``nn.LSTM`` and ``nn.GRU`` layers are
    replaced by new ones of the base's shapes, any other module with
    parameters must keep its shapes.  ``check``: run the new module and the
    base (onnxruntime) on random input (or ``data``) and require equal
    outputs (1e-5 relative)."""
    from .torch_rebuild import base_tensors, rebuild, tensor_sources

    ex = _example(template, example)
    if original is None:
        original = _export(template, ex)
    src, _ = tensor_sources(original, template)
    same_nodes(original, base, lambda path: sizes_itself(template, path))
    small = rebuild(template, base_tensors(base, src))
    if check:
        _check_same(small, base, ex, data)
    return small


def _check_same(small, base, example, data=None, rtol=1e-5):
    """The rebuilt module and the base (onnxruntime) on the same input: equal
    within ``rtol`` of the output scale, else InputError."""
    import onnxruntime as ort

    torch = _torch()
    if data is not None:
        x = torch.as_tensor(np.asarray(_data_x(data)[:16]))
    elif example.is_floating_point():
        g = torch.Generator().manual_seed(0)
        x = torch.randn((3,) + tuple(example.shape[1:]), generator=g, dtype=example.dtype)
    else:
        x = example
    was = small.training
    small.eval()
    try:
        with torch.no_grad():
            got = first_tensor(small(x))
    except Exception as e:
        raise InputError(f"the rebuilt module does not run ({str(e).splitlines()[0][:200]})") from None
    finally:
        small.train(was)
    got = got.detach().cpu().double().numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(base.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})[0], dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    if got.shape != want.shape or float(np.max(np.abs(got - want))) > rtol * scale:
        raise InputError("the rebuilt module does not compute the base")


def _data_x(data):
    """x of ``data``: an .npz path, ``(x, y)`` or an array / tensor."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from .onnx.runtime import load_data

        return load_data(data)[0]
    x = data[0] if isinstance(data, tuple) else data
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class ModuleCompression:
    """What :func:`compress_module` returns: ``module`` (the smaller torch
    module: the original's class with smaller layers, or an
    :class:`~fibgraph.importers.onnx.to_torch.OnnxModule` of the base when
    ``report["fallback"]`` says why it could not be rebuilt), ``onnx`` (the
    base ``ModelProto``, initializers in torch names), ``colouring`` and
    ``report`` (params before/after in torch terms, per-layer rows, the eps
    table, notes).  Unpacks as ``module, onnx, colouring``."""

    def __init__(self, module, onnx, colouring, report):
        self.module, self.onnx, self.colouring, self.report = module, onnx, colouring, report

    def __iter__(self):
        return iter((self.module, self.onnx, self.colouring))

    def __repr__(self):
        r = self.report
        how = f", fallback: {r['fallback']}" if r.get("fallback") else ""
        return (f"ModuleCompression({type(self.module).__name__}, params {r['params_before']} -> "
                f"{r['params_after']}{how})")


def n_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _compressor(mp, linkage, metric, rescale, rtol=DEFAULT_RTOL, symmetry="fibration", feeds=None):
    from .tuning import DagCompressor

    return DagCompressor(mp, linkage, metric, rescale, symmetry=symmetry, rtol=rtol, feeds=feeds)


def compress_module(model, example_inputs=None, eps=None, linkage="complete", metric="cosine", rescale=True,
                    rtol=DEFAULT_RTOL, symmetry="fibration", example=None, data=None, fallback=True,
                    eps_by_layer=None, keep=None, pin=True, size_first=True) -> ModuleCompression:
    """Compress a torch module to its base: a :class:`ModuleCompression`
    (unpacks as ``module, base ONNX, colouring``).

    ``example_inputs``: an input batch for the export (default for a module
    starting with ``nn.Linear``: one zero vector; ``example=`` is the old
    spelling).  ``eps``: one float for every tunable layer or
    ``{layer: eps}`` with layers named by torch tensors (``"0.weight"``,
    ``"enc.linear1.weight"``, ``"rnn.weight_ih_l0"``); layers not named:
    exact fibers.  (A dict or float as the second positional argument is
    read as ``eps``, as before.)  ``data``: an .npz path, ``(x, y)`` or an
    input array: the importer's probe input and the rebuilt module's check.
    ``pin`` (default): where a merge needs nodes no layer of the module's
    classes computes (a LayerNorm over merged units needs their
    multiplicities; attention heads need equal head dims), keep the units of
    the groups the blocking modules read or write whole (no merges, at any
    eps: :meth:`DagCompressor.pin`) and compress the rest, so the result
    stays the module's own class; ``report["exact_for_torch"]`` names those
    groups and a note says why (with ``keep=``, the search then runs over the
    other groups).  ``fallback``: when the base still cannot be rebuilt (or
    ``pin=False``), return an ``OnnxModule`` of the base and say why in
    ``report["fallback"]`` (the module path that blocks), instead of raising.
    ``size_first`` (default): when keeping units whole would miss the size
    asked for, the result is the interpreter at that size; ``False``: the
    module's own class at the size it can reach (``report["keep"]`` says so).
    As everywhere on the hypergraph path, there is no rescaling merge and
    cosine is replaced by the magnitude-aware distance.  ``keep`` (0 < keep
    <= 1, instead of ``eps``): the per-layer eps that keep this fraction of
    the parameters (:func:`fibgraph.importers.keep.keep_search`: data-aware
    when ``data`` is ``(x, y)`` or an .npz with labels, else data-free); the
    report's ``"keep"`` says what it got."""
    from .onnx.runtime import count_params
    from .torch_rebuild import base_tensors, export_named, param_count

    if isinstance(example_inputs, (dict, float, int)) and not isinstance(example_inputs, bool) and eps is None:
        eps, example_inputs = example_inputs, None
    if eps is None:
        eps = eps_by_layer
    ex = _example(model, example_inputs if example_inputs is not None else example)
    mp, src = export_named(model, ex)
    feeds = None
    if data is not None:
        feeds = {"x": np.asarray(_data_x(data)[:1], dtype=ex.cpu().numpy().dtype)}
    mc = _compressor(mp, linkage, metric, rescale, rtol, symmetry, feeds)
    if keep is not None:
        from .keep import check_keep

        if eps:
            raise InputError("keep= chooses the eps itself: give keep= or eps=, not both")
        keep = check_keep(keep)
    elif isinstance(eps, (int, float)) and not isinstance(eps, bool):
        eps = {w: float(eps) for w in mc.tunable} if eps else {}
    else:
        eps = dict(eps or {})
    pinned, small, blocked, first = set(), None, None, None
    for _ in range(_PIN_ROUNDS):
        table, found = _choose(mc, eps, keep, data, pinned)
        m2, base, col = mc.compressed(table, check=True)
        first = first or (table, found, m2, base, col)
        try:
            small = module_from_onnx(m2, model, original=mp, example=ex, data=data)
            break
        except RebuildBlocked as e:
            blocked = e
            more = _groups_at(mc, mp, e.paths) - pinned if pin else set()
            if not more:
                break                     # nothing left to pin
            pinned |= more
            mc.pin(more)
        except InputError as e:
            blocked = e
            break
    if small is not None and pinned and fallback and size_first:
        lost = _pins_lose(first, found, m2, count_params(mp))
        if lost:
            small, blocked = None, f"{blocked}; {lost}"
    if small is None:                 # the base asked for, as an interpreter
        table, found, m2, base, col = first
        pinned = set()
    report = {"params_before": n_params(model), "onnx_params_before": count_params(mp),
              "onnx_params_after": count_params(m2), "eps": mc.eps_file(table),
              "layers": mc.layer_rows(table, base), "notes": list(mc.notes), "fallback": None,
              "exact_for_torch": sorted(mc.name(g) for g in pinned)}
    if pinned and small is not None:
        report["notes"].append(
            f"units kept whole (no merges) so that the base is a {type(model).__name__}: "
            f"{', '.join(report['exact_for_torch'][:6])}{', ...' if len(pinned) > 6 else ''} "
            f"(merging their units needs nodes no torch layer of that class computes: {blocked})")
    if found is not None:
        report["keep"] = found
    if small is not None:
        report["params_after"] = param_count(model, base_tensors(m2, src))
        report["module"] = type(model).__name__
    else:
        if not fallback:
            raise InputError(f"{blocked}; {_REBUILD_HINT}") from None
        from .onnx.to_torch import OnnxModule

        small = OnnxModule(m2).train(model.training)
        report["fallback"] = (f"{blocked} -> the base is an OnnxModule (ONNX interpreter), "
                              f"not a {type(model).__name__}")
        report["params_after"] = small.n_params()
        report["module"] = "OnnxModule"
    return ModuleCompression(small, m2, col, report)


def _pins_lose(first, found, m2, p0):
    """Why the base with units kept whole is not what was asked for (None
    when it is): with ``keep``, it misses the target the unpinned base met;
    with eps, it shrinks nothing where the unpinned base did."""
    from .onnx.runtime import count_params

    f0 = first[1]
    if found is not None and f0 is not None:
        if f0["landed"] and not found["landed"]:
            return (f"kept whole, the units its classes cannot merge leave {found['kept']:.1%} of the parameters "
                    f"(asked: {f0['target']:.0%})")
        return None
    if count_params(m2) >= p0 > count_params(first[2]):
        return "kept whole, the units its classes cannot merge leave every parameter"
    return None


_PIN_ROUNDS = 4     # rebuild tries: each one keeps the groups that blocked the last exact


def _choose(mc, eps, keep, data, pinned):
    """The eps table to write: ``eps`` without the pinned groups, or the
    ``keep`` search over the groups not pinned; and the search's result."""
    if keep is None:
        drop = {w for g in pinned for w in mc.ties[g]}
        return {w: e for w, e in eps.items() if w not in drop}, None
    from .keep import keep_search

    xy = None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        xy = _as_xy(data)
    elif isinstance(data, (str, os.PathLike)):
        xy = data
    found = keep_search(mc, keep, data=xy, fixed=pinned)
    return dict(found["eps"]), found


def _as_xy(data):
    x, y = data
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    return x.astype(np.float32), y.astype(np.int64)


def tune_module(model, cal, tau=0.01, steps=8, linkage="complete", metric="cosine", rescale=True,
                hi=EPS_MAX, example=None) -> TuneResult:
    """Algorithm 3 on a torch module (the loss of each compressed base measured
    with onnxruntime on ``cal`` = (x, y)); returns
    :class:`fibgraph.tune.TuneResult` whose ``eps`` :func:`compress_module`
    reads."""
    from .tuning import tune_model

    mp = _export(model, _example(model, example))
    mc = _compressor(mp, linkage, metric, rescale)
    r = tune_model(mp, _as_xy(cal), tau=tau, steps=steps, linkage=linkage, metric=metric, rescale=rescale,
                   compressor=mc, max_eps=hi)
    return TuneResult(eps=r["eps"], base_loss=r["loss_before"], limit=r["limit"], loss=r["loss_after"], tau=tau,
                      steps=steps, evaluations=r["evaluations"], trace=r["trace"])


def compress_retune(model, train, val, eps0=None, q=1.05, rho=0.05, tau=0.01, steps=8,
                    max_iters=10, linkage="complete", metric="cosine", rescale=True, cal=None,
                    check=None, retune_kw=None, log=None, eps_floor=0.0, example=None) -> RetuneResult:
    """Algorithm 2 on a torch module: :func:`fibgraph.importers.retune_onnx.compress_retune_onnx`
    on its export, the result rebuilt as a module of the base's shapes
    (``result.model``; ``result.onnx`` is the ONNX model, losses and
    accuracies are onnxruntime's on ``check``).

    ``train``/``val``: (x, y); ``val`` is the held-out data for early stopping.
    ``check``: the data of the loss test ``L_c <= (1 + rho) * L`` (``L`` = the
    loss there of the model passed in; default ``val``; the paper uses the
    test set).  ``cal``: calibration data of the greedy eps search (default
    ``check``).  ``eps0``: eps dict (or one float for every layer) used
    instead of the greedy search in the first iteration.  ``eps_floor``: the
    over-compression eps of a layer is at least this (0 = the paper).  Stops
    when the loss test fails, when over-compression no longer shrinks the
    model, or after ``max_iters``.  ``log(dict)`` receives each history entry.
    """
    from .retune_onnx import compress_retune_onnx

    ex = _example(model, example)
    mp = _export(model, ex)
    r = compress_retune_onnx(mp, train, val, check=check, cal=cal, q=q, rho=rho, tau=tau, steps=steps,
                             max_iters=max_iters, linkage=linkage, metric=metric, rescale=rescale,
                             retune_kw=retune_kw, eps_floor=eps_floor, eps0=eps0, log=log)
    small = module_from_onnx(r.onnx, model, original=mp, example=ex).eval()
    return replace(r, model=small, module=small)
