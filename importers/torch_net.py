"""torch ``nn.Sequential`` -> :class:`fibgraph.network.Network`, without ONNX.

For reading a model's weights during training (see :mod:`fibgraph.tracking`):
the modules of an ``nn.Sequential`` (nested Sequentials are flattened) are
read in order, and every one is either mapped or refused with
:class:`~fibgraph.errors.InputError` naming the module, its position and the
supported set.  The resulting layers follow the ONNX importer's conventions
(``importers.onnx_in``): weights in units ``(n_out, n_in, D)``, layer names
``"<module path>.weight"`` (what torch's exporter names the initializers),
``homogeneous`` when everything up to the next layer is positively
homogeneous, ``activation`` the ONNX op names of what follows a layer.

Mapped:
- ``Linear``; ``Conv1d``/``Conv2d``/``Conv3d`` with ``groups=1`` or depthwise
  (``in_channels == groups``); a conv's kernel is the edge's vector weight;
- a ``Linear`` after ``Flatten`` of a ``C x ...`` conv output: feature
  ``(c, p)`` belongs to unit ``c`` (torch flattens channel-major), so the
  weight becomes ``(n_out, C, positions)``;
- element-wise activations (ReLU family, Tanh, Sigmoid, GELU, ...), Dropout,
  Identity, pooling (Max/Avg/Adaptive), Flatten;
- ``BatchNorm1d/2d/3d`` right after a linear layer: folded into it with its
  *running* statistics (the inference function); elsewhere its per-channel
  affine map becomes the layer's ``unit_key`` (units of a fiber must share it);
- ``Softmax``/``LogSoftmax`` only after the last linear layer.

Not mapped (refused): anything else, e.g. ``nn.Module`` subclasses with their
own ``forward`` (pass the inner ``nn.Sequential``), grouped convolutions,
recurrent layers, attention, a ``Linear`` applied to a non-flattened
feature map, ``Unflatten``.
"""
from __future__ import annotations

import numpy as np

from fibgraph.errors import InputError
from fibgraph.network import Layer, Network

__all__ = ["network_from_torch", "SUPPORTED_MODULES"]

# torch class name -> (ONNX-like op name, positively homogeneous?)
_POINTWISE = {
    "ReLU": ("Relu", True), "ReLU6": ("Clip", False), "LeakyReLU": ("LeakyRelu", True),
    "PReLU": ("PRelu", True), "Tanh": ("Tanh", False), "Sigmoid": ("Sigmoid", False),
    "GELU": ("Gelu", False), "ELU": ("Elu", False), "SELU": ("Selu", False), "CELU": ("Celu", False),
    "SiLU": ("Swish", False), "Mish": ("Mish", False), "Softplus": ("Softplus", False),
    "Softsign": ("Softsign", False), "Hardtanh": ("HardTanh", False),
    "Hardsigmoid": ("HardSigmoid", False), "Hardswish": ("HardSwish", False),
    "Tanhshrink": ("Tanhshrink", False),
    "Identity": ("Identity", True), "Dropout": ("Dropout", True), "Dropout1d": ("Dropout", True),
    "Dropout2d": ("Dropout", True), "Dropout3d": ("Dropout", True), "AlphaDropout": ("Dropout", False),
}
_POOL = {"MaxPool1d": "MaxPool", "MaxPool2d": "MaxPool", "MaxPool3d": "MaxPool",
         "AvgPool1d": "AveragePool", "AvgPool2d": "AveragePool", "AvgPool3d": "AveragePool",
         "AdaptiveAvgPool1d": "GlobalAveragePool", "AdaptiveAvgPool2d": "GlobalAveragePool",
         "AdaptiveAvgPool3d": "GlobalAveragePool", "AdaptiveMaxPool1d": "GlobalMaxPool",
         "AdaptiveMaxPool2d": "GlobalMaxPool", "AdaptiveMaxPool3d": "GlobalMaxPool"}
_CONV = {"Conv1d", "Conv2d", "Conv3d"}
_BN = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d"}
_TAIL = {"Softmax", "LogSoftmax"}
SUPPORTED_MODULES = sorted(set(_POINTWISE) | set(_POOL) | _CONV | _BN | _TAIL
                           | {"Linear", "Flatten", "Sequential"})


def _np(t):
    return t.detach().to("cpu").double().numpy().copy()


def _flatten_modules(module, prefix=""):
    """(path, module) of the leaves of nested Sequentials, in forward order."""
    import torch.nn as nn

    out = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            out += _flatten_modules(child, path + ".")
        else:
            out.append((path, child))
    return out


def _unsupported(path, m, why=""):
    raise InputError(f"torch module {path!r} ({type(m).__name__}){': ' + why if why else ''} cannot be mapped; "
                     f"supported: {', '.join(SUPPORTED_MODULES)}")


def network_from_torch(module, input_shape=None, name=None) -> Network:
    """Build a :class:`Network` from an ``nn.Sequential`` (or a list of modules).

    ``input_shape``: the non-batch input shape, only needed when the first
    linear layer is a ``Linear`` that reads a flattened multi-channel input
    and you want the input channels (not the features) as units; by default
    every input feature of a dense first layer is a unit, as in the ONNX
    importer.  Raises :class:`InputError` for modules it cannot map.
    """
    try:
        import torch.nn as nn
    except ImportError:  # pragma: no cover
        raise InputError("network_from_torch needs torch (pip install 'fibgraph[torch]')") from None
    if isinstance(module, (list, tuple)):
        module = nn.Sequential(*module)
    if not isinstance(module, nn.Sequential):
        seqs = [n for n, c in module.named_children() if isinstance(c, nn.Sequential)] \
            if isinstance(module, nn.Module) else []
        hint = (f" (if its forward only runs it, pass model.{seqs[0]})" if len(seqs) == 1
                else " (pass the nn.Sequential inside the model)")
        raise InputError(f"network_from_torch reads an nn.Sequential, whose forward is its child order; "
                         f"got {type(module).__name__}, whose forward fibgraph cannot see{hint}")
    mods = _flatten_modules(module)
    lin_pos = [k for k, (_, m) in enumerate(mods) if isinstance(m, nn.Linear) or type(m).__name__ in _CONV]
    if not lin_pos:
        raise InputError("the nn.Sequential has no Linear or Conv layer")
    last = lin_pos[-1]

    layers = []
    input_units = None
    # state of the stream: 'features' (N, F) or 'map' (N, C, ...); flat_from: channels before Flatten
    shape_kind = "unknown"        # before the first layer: decided by it
    channels = None               # units of the current level
    flat_channels = None          # channels of the map that was flattened (None: not flattened)
    fresh = False                 # straight out of a linear layer (BatchNorm may fold)
    for k, (path, m) in enumerate(mods):
        cls = type(m).__name__
        if k > last:
            if cls in _TAIL or cls in _POINTWISE or cls in ("Flatten",):
                continue
            _unsupported(path, m, "after the last linear layer only activations, Softmax and Flatten are allowed")
        if isinstance(m, nn.Linear):
            W = _np(m.weight)
            n_out, F = W.shape
            b = _np(m.bias) if m.bias is not None else np.zeros(n_out)
            if not layers:
                units, D = F, 1
                if input_shape is not None and len(input_shape) > 1 and flat_channels == "input":
                    C = int(input_shape[0])
                    if F % C:
                        _unsupported(path, m, f"{F} features do not split into {C} input channels")
                    units, D = C, F // C
                input_units = units
                Wu = W.reshape(n_out, units, D)
            elif shape_kind == "map" and flat_channels is None:
                _unsupported(path, m, "Linear applied to a feature map that was not flattened "
                                      "(it would act on the last spatial axis)")
            elif flat_channels is not None:
                C = flat_channels
                if F % C:
                    _unsupported(path, m, f"{F} input features do not split into the previous layer's {C} channels")
                Wu = W.reshape(n_out, C, F // C)
            else:
                if F != channels:
                    _unsupported(path, m, f"reads {F} features, the previous layer has {channels} units")
                Wu = W[:, :, None]
            layers.append(Layer(name=f"{path}.weight", kind="dense", weight=np.ascontiguousarray(Wu), bias=b,
                                homogeneous=True, meta={"module": path, "op": "Linear"}))
            channels, shape_kind, flat_channels, fresh = n_out, "features", None, True
            continue
        if cls in _CONV:
            if shape_kind in ("features",) or flat_channels is not None:
                _unsupported(path, m, "convolution of a flattened tensor")
            W = _np(m.weight)
            c_out, c_in_g = W.shape[:2]
            K = int(np.prod(W.shape[2:]))
            g = int(m.groups)
            if g == 1:
                c_in = c_in_g
                Wu = W.reshape(c_out, c_in, K)
            elif c_in_g == 1 and c_out % g == 0:
                c_in = g
                mult = c_out // g
                Wu = np.zeros((c_out, c_in, K))
                Wu[np.arange(c_out), np.arange(c_out) // mult] = W.reshape(c_out, K)
            else:
                _unsupported(path, m, f"grouped convolution with groups={g} (only 1 or depthwise)")
            if not layers:
                input_units = c_in
            elif c_in != channels:
                _unsupported(path, m, f"expects {c_in} input channels, the previous layer has {channels}")
            b = _np(m.bias) if m.bias is not None else np.zeros(c_out)
            layers.append(Layer(name=f"{path}.weight", kind="conv", weight=np.ascontiguousarray(Wu), bias=b,
                                homogeneous=True,
                                meta={"module": path, "op": cls, "kernel_shape": list(W.shape[2:]),
                                      "depthwise": None if g == 1 else c_out // g}))
            channels, shape_kind, flat_channels, fresh = c_out, "map", None, True
            continue
        if not layers:
            # before the first linear layer: only shape-preserving ops on the input
            if cls == "Flatten":
                if m.start_dim != 1 or m.end_dim != -1:
                    _unsupported(path, m, "Flatten other than start_dim=1, end_dim=-1")
                flat_channels = "input"
                continue
            if cls in ("Identity", "Dropout"):
                continue
            _unsupported(path, m, "before the first linear layer only Flatten, Identity and Dropout are allowed")
        ly = layers[-1]
        if cls in _BN:
            if flat_channels is not None:
                _unsupported(path, m, "BatchNorm of a flattened feature map")
            if m.num_features != channels:
                _unsupported(path, m, f"{m.num_features} features, the layer has {channels} units")
            if m.running_mean is None or m.running_var is None:
                _unsupported(path, m, "BatchNorm without running statistics (track_running_stats=False)")
            mean, var = _np(m.running_mean), _np(m.running_var)
            gamma = _np(m.weight) if m.weight is not None else np.ones(channels)
            beta = _np(m.bias) if m.bias is not None else np.zeros(channels)
            mul = gamma / np.sqrt(var + float(m.eps))
            add = beta - mul * mean
            if fresh and not ly.meta.get("bn_fold"):
                ly.weight = ly.weight * mul[:, None, None]
                ly.bias = mul * ly.bias + add
                ly.meta["bn_fold"] = path
            else:
                key = np.stack([mul, add], 1)
                ly.unit_key = key if ly.unit_key is None else np.hstack([ly.unit_key, key])
                ly.homogeneous = ly.homogeneous and bool(np.all(add == 0) and np.all(mul > 0))
                ly.activation = (ly.activation + "+" if ly.activation else "") + "BatchNormalization"
            continue
        fresh = False
        if cls in _POINTWISE:
            op, homog = _POINTWISE[cls]
            if cls == "LeakyReLU" and m.negative_slope < 0:
                homog = False
            if cls == "PReLU":
                w = _np(m.weight).reshape(-1)
                if w.size > 1:
                    if w.size != channels:
                        _unsupported(path, m, f"{w.size} slopes for {channels} units")
                    ly.unit_key = w[:, None] if ly.unit_key is None else np.hstack([ly.unit_key, w[:, None]])
            ly.homogeneous = ly.homogeneous and homog
            if op not in ("Identity", "Dropout"):
                ly.activation = (ly.activation + "+" if ly.activation else "") + op
            continue
        if cls in _POOL:
            if shape_kind != "map" or flat_channels is not None:
                _unsupported(path, m, "pooling of a tensor that is not a (batch, channels, ...) feature map")
            ly.activation = (ly.activation + "+" if ly.activation else "") + _POOL[cls]
            continue
        if cls == "Flatten":
            if m.start_dim != 1 or m.end_dim != -1:
                _unsupported(path, m, "Flatten other than start_dim=1, end_dim=-1")
            if shape_kind == "map":
                flat_channels = channels
            continue
        if cls in _TAIL:
            _unsupported(path, m, "Softmax/LogSoftmax mixes units; allowed only after the last linear layer")
        _unsupported(path, m)
    layers[-1].is_output = True
    return Network(int(input_units), layers, name=name or type(module).__name__,
                   meta={"source": "torch"})
