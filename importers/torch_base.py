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

import copy
import re
from dataclasses import replace

import numpy as np

from fibgraph.errors import InputError
from fibgraph.engine import DEFAULT_RTOL
from fibgraph.retune import RetuneResult
from fibgraph.tune import EPS_MAX, TuneResult

from .torch_train import as_tensors, module_loss, retune  # noqa: F401  (part of this API)

__all__ = ["compress_module", "module_from_onnx", "module_loss", "n_params", "tune_module", "retune",
           "compress_retune", "RetuneResult"]

_BASE_SUFFIX = re.compile(r"(__base\d+)+$")
_REBUILD_HINT = ("use the base ONNX model as it is (fibgraph.importers.onnx_torch.OnnxModule, "
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
    from .torch_export import export_model

    return export_model(model, example)


def _sources(original, template):
    """``{initializer name of the export: (parameter name, transposed)}``.  The
    legacy exporter names a parameter's initializer by its state-dict key; a
    ``MatMul`` export stores a transposed copy under another name, matched by
    value."""
    from onnx import numpy_helper

    params = {n: p.detach().cpu().numpy() for n, p in template.named_parameters()}
    out = {}
    for t in original.graph.initializer:
        if t.name in params:
            out[t.name] = (t.name, False)
    found = {v[0] for v in out.values()}
    for t in original.graph.initializer:
        if t.name in out or len(t.dims) != 2:
            continue
        a = numpy_helper.to_array(t)
        if a.dtype.kind != "f":
            continue
        for n, p in params.items():
            if p.ndim == 2 and p.shape == a.shape[::-1] and np.array_equal(p.T, a.astype(p.dtype)):
                out[t.name] = (n, True)
                found.add(n)
                break
    missing = [n for n in params if n not in found]
    if missing:
        raise InputError(f"parameters not in the module's ONNX export (folded away by the exporter, e.g. a "
                         f"BatchNorm after a layer): {', '.join(missing[:5])}; {_REBUILD_HINT}")
    return out


def _base_values(base, original, src):
    """``{parameter name: array}`` from the base's initializers."""
    from onnx import numpy_helper

    before = {t.name: t for t in original.graph.initializer}
    values = {}
    for t in base.graph.initializer:
        name = _BASE_SUFFIX.sub("", t.name)
        a = numpy_helper.to_array(t)
        if name in src:
            pname, transposed = src[name]
            a = a.T if transposed else a
            if pname in values and not np.array_equal(values[pname], a):
                raise InputError(f"the base gives parameter {pname!r} two different values; {_REBUILD_HINT}")
            values[pname] = a
        elif name not in before or not np.array_equal(numpy_helper.to_array(before[name]), a):
            raise InputError(f"the base has a tensor {t.name!r} that is no parameter of the module; "
                             f"{_REBUILD_HINT}")
    return values


def _set_child(root, path, new):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def module_from_onnx(base, template, original=None, example=None, check=True):
    """A copy of ``template`` whose layers have the shapes and weights of
    ``base``, a compressed model of ``template``'s ONNX export ``original``
    (exported here from ``example`` when not given).

    Every parameter is copied by name from the base's initializers (a
    rewritten tensor is named ``<name>__base<k>`` by the writer); ``nn.Linear``
    and ``nn.Conv1d/2d/3d`` (groups 1) layers are replaced by new ones of the
    base's shapes, any other module with parameters must keep its shapes.
    ``check``: run the new module and the base (onnxruntime) on random input
    and require equal outputs (1e-4 relative)."""
    torch = _torch()
    nn = torch.nn
    ex = _example(template, example)
    if original is None:
        original = _export(template, ex)
    src = _sources(original, template)
    ops0 = [n.op_type for n in original.graph.node]
    ops1 = [n.op_type for n in base.graph.node]
    if ops0 != ops1:
        raise InputError(f"the base has other ONNX nodes than the module's export ({len(ops1)} vs {len(ops0)}): "
                         f"it cannot be rebuilt from the module's own layers; {_REBUILD_HINT}")
    values = _base_values(base, original, src)
    canon = {}                                  # id(parameter) -> its state-dict name
    for n, p in template.named_parameters(remove_duplicate=False):
        canon.setdefault(id(p), n)
    small = copy.deepcopy(template)
    tmods = dict(template.named_modules())
    for path, mod in list(small.named_modules()):
        own = [k for k, _ in mod.named_parameters(recurse=False)]
        if not own:
            continue
        tmod = tmods[path]
        new = {k: values[canon[id(getattr(tmod, k))]] for k in own}
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        if isinstance(mod, nn.Linear):
            W = new["weight"]
            repl = nn.Linear(W.shape[1], W.shape[0], bias=mod.bias is not None)
        elif isinstance(mod, conv) and type(mod) in conv and mod.groups == 1:
            W = new["weight"]
            repl = type(mod)(W.shape[1], W.shape[0], mod.kernel_size, stride=mod.stride, padding=mod.padding,
                             dilation=mod.dilation, bias=mod.bias is not None, padding_mode=mod.padding_mode)
        elif all(tuple(new[k].shape) == tuple(getattr(mod, k).shape) for k in own):
            repl = mod
        else:
            raise InputError(f"module {path!r} ({type(mod).__name__}) changes shape in the base; only Linear and "
                             f"Conv layers are rebuilt; {_REBUILD_HINT}")
        repl = repl.to(dtype=getattr(mod, own[0]).dtype)
        with torch.no_grad():
            for k in own:
                p = getattr(repl, k)
                if tuple(p.shape) != tuple(new[k].shape):
                    raise InputError(f"module {path!r}: parameter {k} has shape {tuple(p.shape)} in the module, "
                                     f"{tuple(new[k].shape)} in the base; {_REBUILD_HINT}")
                p.copy_(torch.as_tensor(np.array(new[k]), dtype=p.dtype))
        if repl is not mod:
            _set_child(small, path, repl)
    small.train(template.training)
    if check:
        _check_same(small, base, ex)
    return small


def _check_same(small, base, example):
    import onnxruntime as ort

    torch = _torch()
    if example.is_floating_point():
        g = torch.Generator().manual_seed(0)
        x = torch.randn((3,) + tuple(example.shape[1:]), generator=g, dtype=example.dtype)
    else:
        x = example
    was = small.training
    small.eval()
    try:
        with torch.no_grad():
            got = small(x)
    except Exception as e:
        raise InputError(f"the rebuilt module does not run ({str(e).splitlines()[0][:200]}); {_REBUILD_HINT}") \
            from None
    finally:
        small.train(was)
    got = got.detach().cpu().double().numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(base.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})[0], dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    if got.shape != want.shape or float(np.max(np.abs(got - want))) > 1e-4 * scale:
        raise InputError(f"the rebuilt module does not compute the base; {_REBUILD_HINT}")


def n_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _compressor(mp, linkage, metric, rescale, rtol=DEFAULT_RTOL, symmetry="fibration"):
    from .tuning import DagCompressor

    return DagCompressor(mp, linkage, metric, rescale, symmetry=symmetry, rtol=rtol)


def compress_module(model, eps_by_layer=None, linkage="average", metric="cosine", rescale=True,
                    rtol=DEFAULT_RTOL, symmetry="fibration", example=None):
    """(smaller module, base ONNX ``ModelProto``, colouring) for ``{layer: eps}``
    (layers not named: exact fibers; names are the weights' parameter names).
    ``example``: an input batch for the export (default for a module starting
    with ``nn.Linear``: one zero vector).  As everywhere on the hypergraph path,
    there is no rescaling merge and cosine is replaced by the magnitude-aware
    distance."""
    ex = _example(model, example)
    mp = _export(model, ex)
    mc = _compressor(mp, linkage, metric, rescale, rtol, symmetry)
    m2, _, col = mc.compressed(eps_by_layer or {}, check=True)
    return module_from_onnx(m2, model, original=mp, example=ex), m2, col


def _as_xy(data):
    x, y = data
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    return x.astype(np.float32), y.astype(np.int64)


def tune_module(model, cal, tau=0.01, steps=8, linkage="average", metric="cosine", rescale=True,
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
                    max_iters=10, linkage="average", metric="cosine", rescale=True, cal=None,
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
