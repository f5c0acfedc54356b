"""torch glue of the analysis modules: torch modules -> the hypergraph view,
activations by forward hooks, the theorem checks on torch models, and the
training tracker that reads torch modules.

The format-free work lives in ``fibgraph`` (:mod:`fibgraph.layerview`,
:mod:`fibgraph.tracking`, :mod:`fibgraph.activity`, :mod:`fibgraph.theorems`,
:mod:`fibgraph.compare`); this module only turns a torch model into what they
read:

- :func:`torch_view`: export the module to ONNX in memory (torch's legacy
  exporter, eval mode, the module's training flag restored) and read it with
  the hypergraph importer (:func:`fibgraph.importers.onnx.importer.import_dag`), so any
  model that importer reads works: ``nn.Sequential`` MLPs and CNNs,
  branches, residual sums, attention, LSTM/GRU.  Weight layers are named by
  their initializers, which the legacy exporter names after the torch
  parameters (``0.weight``, ``4.0.weight``); weights the exporter makes
  from a parameter get the parameter's name back (a Conv with a BatchNorm
  folded in: the conv's weight, with the folded values of the inference
  function; a Linear on 3-D inputs, stored transposed for MatMul; an
  attention's packed ``in_proj_weight``; a one-direction LSTM/GRU/RNN's
  ``weight_ih_l0`` / ``weight_hh_l0`` with their gates reordered).  The export is cached per module:
  while the module's structure is unchanged, later calls only copy the
  current parameter values into the cached ONNX graph (when every weight of
  the graph is a torch parameter or buffer as it is).
- :func:`read_view`: a :class:`~fibgraph.layerview.LayerView` from a torch
  module, an ONNX model or path, or a :class:`~fibgraph.importers.onnx.importer.DagImport`.
- :func:`torch_activations`: per weight layer, the activity of its units
  (forward hooks; see there for which tensor counts as the activity).
- :class:`FiberTracker`, :func:`activity_report`, :func:`check_activity_sync`,
  :func:`check_error_sync`, :func:`check_cover_persistence`: the torch-facing
  forms of the fibgraph analyses (same names and arguments as before the
  hypergraph became the only representation).
"""
from __future__ import annotations

import io
import os
import warnings
import weakref

import numpy as np
import onnx
from onnx import numpy_helper

from fibgraph import tracking
from fibgraph.activity import fiber_activity_report
from fibgraph.errors import InputError
from fibgraph.layerview import LayerView
from fibgraph.engine import Exact
from fibgraph.theorems import activity_sync, cover_state, error_sync, grouped_initial

from .dag_units import layer_view
from .onnx.importer import DagImport, import_dag

__all__ = ["example_input", "export_model", "torch_import", "torch_view", "read_view", "FiberTracker",
           "torch_activations", "activity_report", "torch_mlp", "forward_with_deltas", "check_activity_sync",
           "check_error_sync", "check_cover_persistence"]

_CACHE = weakref.WeakKeyDictionary()      # module -> (signature, ONNX model, values can be copied in)
_LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_RNN_OPS = {"LSTM", "GRU", "RNN"}


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise InputError("this needs torch: pip install torch==2.13.0 (CPU build)") from None
    return torch


def _dtype(module):
    torch = _torch()
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32


# ------------------------------------------------------------------ export
def example_input(module, input_shape=None):
    """A batch-1 zero input for ``module``: of ``input_shape`` (the non-batch
    shape) when given; else read off a first ``Linear`` (its features), or
    found for a first ``Conv`` by trying square sizes."""
    torch = _torch()
    nn = torch.nn
    dt = _dtype(module)
    if input_shape is not None:
        return torch.zeros((1, *[int(d) for d in input_shape]), dtype=dt)
    first = next((m for m in module.modules() if not list(m.children()) and list(m.parameters(recurse=False))),
                 None)
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features, dtype=dt)
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        d = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
        was = module.training
        module.eval()
        try:
            for size in (32, 28, 16, 8, 64, 24, 12, 48, 96, 128, 224):
                x = torch.zeros((1, first.in_channels) + (size,) * d, dtype=dt)
                try:
                    with torch.no_grad():
                        module(x)
                    return x
                except Exception:  # this size does not fit the model; try the next
                    continue
        finally:
            module.train(was)
    raise InputError(f"cannot guess the input of {type(module).__name__}: give input_shape (the non-batch "
                     "input shape) or an example input")


def _signature(module, x):
    return (tuple((k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()),
            tuple(x.shape), str(x.dtype))


def _rename_exported(model, module):
    """Give the weights that the exporter made (a Conv with a BatchNorm folded in,
    a Linear on 3-D inputs stored transposed for MatMul, LSTM/GRU/RNN weights
    with their gates reordered; named ``onnx::Conv_12`` and the like) the
    name of the torch parameter they come from, found through the node's
    scope (``/enc/linear1/MatMul`` -> module ``enc.linear1``); returns whether
    anything was renamed."""
    params = {k for k, _ in module.named_parameters()}
    mods = dict(module.named_modules())
    inits = {t.name: t for t in model.graph.initializer}
    renamed, used = {}, set(inits)
    rnn_seen = {}
    for node in model.graph.node:
        if node.op_type not in _LINEAR_OPS | _RNN_OPS or not node.name.startswith("/"):
            continue
        parts = node.name.split("/")[1:-1]
        path = next((c for c in ((".".join(parts), parts[-1]) if parts else ()) if c and c in mods), None)
        if path is None:
            continue
        if node.op_type in _RNN_OPS:
            k = rnn_seen[path] = rnn_seen.get(path, -1) + 1
            if getattr(mods[path], "bidirectional", False):
                continue                              # W holds both directions: no one parameter
            slots = {1: f"weight_ih_l{k}", 2: f"weight_hh_l{k}"}
        else:
            own = [n for n, q in mods[path].named_parameters(recurse=False) if q.ndim >= 2]
            slots = {1: "weight" if "weight" in own else (own[0] if len(own) == 1 else None), 2: "bias"}
        for slot, attr in slots.items():
            if attr is None or len(node.input) <= slot:
                continue
            old, new = node.input[slot], f"{path}.{attr}"
            if old in inits and old not in params and new in params and new not in used and old not in renamed:
                renamed[old] = new
                used.add(new)
    for old, new in renamed.items():
        inits[old].name = new
    for node in model.graph.node:
        for k, x in enumerate(node.input):
            if x in renamed:
                node.input[k] = renamed[x]
    return bool(renamed)


def export_model(module, example) -> onnx.ModelProto:
    """``module`` as an ONNX model (legacy exporter, eval mode, in memory;
    cached per module, see the module doc)."""
    torch = _torch()
    sig = _signature(module, example)
    hit = _CACHE.get(module)
    if hit is not None and hit[0] == sig and hit[2]:
        state = module.state_dict()
        model = onnx.ModelProto()
        model.CopyFrom(hit[1])
        for t in model.graph.initializer:
            if t.name in state:
                t.CopyFrom(numpy_helper.from_array(state[t.name].detach().cpu().numpy(), t.name))
        return model
    was = module.training
    module.eval()
    f = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), f, dynamo=False, input_names=["x"])
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"torch cannot export {type(module).__name__} to ONNX: "
                         f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    finally:
        module.train(was)
    model = onnx.load_from_string(f.getvalue())
    state = module.state_dict()
    renamed = _rename_exported(model, module)
    copyable = not renamed and all(
        t.name in state and tuple(t.dims) == tuple(state[t.name].shape)
        and onnx.helper.tensor_dtype_to_np_dtype(t.data_type) == state[t.name].detach().cpu().numpy().dtype
        for t in model.graph.initializer
        if onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f")
    _CACHE[module] = (sig, model, copyable)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def torch_import(module, example=None, input_shape=None) -> DagImport:
    """The hypergraph import of ``module`` (see :func:`export_model`)."""
    x = example_input(module, input_shape) if example is None else _as_tensor(example, module)[:1]
    return import_dag(export_model(module, x), label=type(module).__name__)


def torch_view(module, example=None, input_shape=None) -> LayerView:
    """The :class:`~fibgraph.layerview.LayerView` of a torch module."""
    return layer_view(torch_import(module, example, input_shape), name=type(module).__name__)


def read_view(model, example=None, input_shape=None) -> LayerView:
    """A :class:`LayerView` of a view, a hypergraph import, an ONNX model or
    path, or a torch module."""
    if isinstance(model, LayerView):
        return model
    if isinstance(model, DagImport):
        return layer_view(model)
    if isinstance(model, onnx.ModelProto):
        return layer_view(import_dag(model), name=model.graph.name or "model")
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise InputError(f"{model}: no such file")
        return layer_view(import_dag(model), name=os.path.basename(os.fspath(model)))
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        return torch_view(model, example, input_shape)
    raise InputError(f"cannot read a {type(model).__name__}: give a torch module, an ONNX model or path, "
                     "a hypergraph import or a LayerView")


class FiberTracker(tracking.FiberTracker):
    """:class:`fibgraph.tracking.FiberTracker` that reads torch modules (and ONNX
    models) through :func:`read_view`; ``input_shape`` (the non-batch input
    shape) or ``example`` (an input) for models whose input cannot be guessed
    (see :func:`example_input`)."""

    def __init__(self, *args, input_shape=None, example=None, **kw):
        self.input_shape, self.example = input_shape, example
        super().__init__(*args, reader=lambda m: read_view(m, self.example, self.input_shape), **kw)


# -------------------------------------------------------------- activities
def _as_tensor(x, module):
    torch = _torch()
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(_dtype(module)) if t.dtype.is_floating_point else t


def _as_units(t, axis):
    """(N, C, ...) with ``axis`` 1, or (..., F) with ``axis`` -1 -> (samples, units)."""
    a = t.detach().to("cpu").double().numpy()
    a = np.moveaxis(a, axis, -1)
    return a.reshape(-1, a.shape[-1])


def torch_activations(module, x, batch=4096) -> dict:
    """``{weight name: (samples, units)}`` for every Linear and Conv module that
    runs on ``x``.  The activity of a layer is the output of the last leaf
    module that runs after it (before the next Linear/Conv) and keeps its
    shape along the unit axis (channels of a conv, the last axis of a
    Linear): the activation, pooling, BatchNorm after it; Flatten, and a
    final Softmax/LogSoftmax, are not taken; otherwise the layer's own output.
    Conv channels: positions count as samples.  Activations applied as
    functions in a custom ``forward`` (``F.relu``) are not seen by hooks."""
    torch = _torch()
    nn = torch.nn
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    tails = (nn.Softmax, nn.LogSoftmax)
    names = {}
    for path, m in module.named_modules():
        if isinstance(m, (nn.Linear,) + conv):
            names[id(m)] = (f"{path}.weight" if path else "weight", 1 if isinstance(m, conv) else -1)
    state = {"cur": None}
    current = {}

    def hook(mod, inp, out):
        if not isinstance(out, torch.Tensor):
            return
        if id(mod) in names:
            name, axis = names[id(mod)]
            state.update(cur=name, axis=axis, ndim=out.ndim, units=out.shape[axis])
            current[name] = (out, axis)
        elif state["cur"] is not None and not isinstance(mod, tails):
            if out.ndim == state["ndim"] and out.shape[state["axis"]] == state["units"]:
                current[state["cur"]] = (out, state["axis"])

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    xt = _as_tensor(x, module)
    outs = {}
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            for s in range(0, xt.shape[0], batch):
                state["cur"] = None
                current.clear()
                module(xt[s:s + batch])
                for name, (t, axis) in current.items():
                    outs.setdefault(name, []).append(_as_units(t, axis))
    finally:
        for h in handles:
            h.remove()
        module.train(was)
    return {k: np.concatenate(v) for k, v in outs.items()}


def activity_report(model, x, y=None, symmetry="fibration", criterion=None, threshold=0.9,
                    method="average", include_output=False) -> list:
    """Weight fibers vs activity synchrony clusters of a torch model on inputs
    ``x`` (labels ``y`` for the class-conditional clusters), per weight layer:
    :func:`fibgraph.activity.fiber_activity_report` on :func:`torch_view` and
    :func:`torch_activations`."""
    view = torch_view(model, x)
    labels = view.colour(symmetry, criterion)
    return fiber_activity_report(view, labels, torch_activations(model, x), len(x), y, threshold, method,
                                 include_output)


# ---------------------------------------------------------------- theorems
def torch_mlp(layers, act="tanh", dtype=None):
    """``nn.Sequential`` of Linear layers with weights ``[(W, b), ...]`` and
    activation ``act`` ('tanh', 'relu', 'sigmoid') between them (float64)."""
    torch = _torch()
    nn = torch.nn
    dtype = dtype or torch.float64
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
    mods = []
    for l, (W, b) in enumerate(layers):
        lin = nn.Linear(W.shape[1], W.shape[0]).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(W, dtype=dtype))
            lin.bias.copy_(torch.as_tensor(b, dtype=dtype))
        mods.append(lin)
        if l < len(layers) - 1:
            mods.append(acts[act]())
    return nn.Sequential(*mods)


def _linear_names(model):
    nn = _torch().nn
    return [f"{k}.weight" for k, m in model.named_children() if isinstance(m, nn.Linear)]


def forward_with_deltas(model, x, targets=None, loss="mse"):
    """Per Linear layer of an ``nn.Sequential``: activations ``h`` (after the
    activation; the output layer: its output) and errors ``delta = dL/dz``
    (pre-activation), each ``(N, units)`` numpy arrays.  ``loss``: 'mse' (sum
    over samples and outputs of ``(y - t)^2 / 2``) or 'ce' (cross-entropy,
    integer targets)."""
    torch = _torch()
    nn = torch.nn
    dtype = next(model.parameters()).dtype
    h = torch.as_tensor(np.asarray(x), dtype=dtype)
    zs, hs = [], []
    mods = list(model)
    for k, m in enumerate(mods):
        h = m(h)
        if isinstance(m, nn.Linear):
            h.retain_grad()
            zs.append(h)
            if k == len(mods) - 1 or isinstance(mods[k + 1], nn.Linear):
                hs.append(h)
        elif zs and len(hs) < len(zs):
            hs.append(h)
    out = zs[-1]
    if targets is None:
        return [a.detach().numpy() for a in hs], None
    t = torch.as_tensor(np.asarray(targets))
    if loss == "mse":
        L = 0.5 * ((out - t.to(dtype)) ** 2).sum()
    elif loss == "ce":
        L = nn.functional.cross_entropy(out, t.long(), reduction="sum")
    else:
        raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")
    L.backward()
    model.zero_grad(set_to_none=True)
    return [a.detach().numpy() for a in hs], [z.grad.detach().numpy() for z in zs]


def check_activity_sync(model, x, symmetry="fibration", rtol=1e-5) -> list:
    """Per hidden layer of an ``nn.Sequential`` MLP: fibers (engine, exact) and
    the largest in-fiber and the smallest between-fiber activity difference
    on ``x`` (:func:`fibgraph.theorems.activity_sync`)."""
    view = torch_view(model, x)
    hs, _ = forward_with_deltas(model, x)
    return activity_sync(view, view.colour(symmetry, Exact(rtol)), dict(zip(_linear_names(model), hs)))


def check_error_sync(model, x, targets, loss="mse", output_groups=None, rtol=1e-5) -> list:
    """Per layer: flavoured opfibers (engine, exact; ``output_groups`` merges
    output units in the initial colouring, a list of index lists) and the
    largest in-class and smallest between-class difference of the errors, plus
    the same for the plain (unflavoured) opfibers' extra pairs
    (:func:`fibgraph.theorems.error_sync`)."""
    view = torch_view(model, x)
    initial = grouped_initial(view, output_groups)
    flav = view.colour("opfibration-flavoured", Exact(rtol), initial)
    plain = view.colour("opfibration", Exact(rtol), initial)
    _, ds = forward_with_deltas(model, x, targets, loss)
    return error_sync(view, flav, plain, dict(zip(_linear_names(model), ds)))


def check_cover_persistence(model, x, targets, planted, steps=200, lr=0.05, loss="mse",
                            symmetry="covering-strict", rtol=1e-5, every=1, optimizer="gd"):
    """Train ``model`` in place by full-batch gradient descent (``optimizer='gd'``,
    or ``'momentum'``) for ``steps`` steps; after every ``every`` steps recolour
    (``symmetry``, exact) and record whether the planted hidden partitions
    (``planted[l]`` for hidden layer ``l + 1``) still refine the colouring and
    whether they are equal.  Returns a dict with per-check records and the loss."""
    torch = _torch()
    X = torch.as_tensor(np.asarray(x), dtype=next(model.parameters()).dtype)
    T = torch.as_tensor(np.asarray(targets))
    if loss == "mse":
        T = T.to(X.dtype)
        lossf = lambda y: 0.5 * ((y - T) ** 2).sum() / len(X)  # noqa: E731
    else:
        lossf = lambda y: torch.nn.functional.cross_entropy(y, T.long())  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if optimizer == "momentum" else 0.0)
    records = []

    def check(step, L):
        view = torch_view(model, X)
        records.append({"step": step, "loss": L, **cover_state(view, view.colour(symmetry, Exact(rtol)), planted)})

    with torch.no_grad():
        check(0, float(lossf(model(X))))
    for step in range(1, steps + 1):
        opt.zero_grad()
        L = lossf(model(X))
        L.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                check(step, float(lossf(model(X))))
    return {"records": records, "all_refine": all(r["refines"] for r in records),
            "all_equal": all(r["equal"] for r in records),
            "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"]}
