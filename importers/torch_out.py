"""An ONNX model (a compressed base) as a torch module, saved and loaded.

- :func:`onnx_to_torch`: a chain graph (each node reads the previous node's
  output; Gemm / MatMul(+Add), Conv, BatchNormalization, pools, Flatten,
  elementwise activations, Softmax) becomes an ``nn.Sequential`` of the real
  layers (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm*d``, ``nn.ReLU``, ...);
  anything else is :class:`fibgraph.importers.onnx.to_torch.OnnxModule` (the
  ONNX interpreter, differentiable).  The Sequential is checked against
  onnxruntime on random input (1e-5 of the output scale) and replaced by the
  interpreter when it does not match.
- :func:`save_torch` writes ``torch.save(module)`` (the whole module);
  :func:`load_torch` reads it back (``torch.load(path, weights_only=False)``:
  the file holds classes, so load only files you trust; an ``OnnxModule``
  needs fibgraph installed to load).
"""
from __future__ import annotations

import os

import numpy as np

from fibgraph.errors import InputError

__all__ = ["onnx_to_torch", "pad_widths", "save_torch", "load_torch"]

_ACT = {"Relu": "ReLU", "Tanh": "Tanh", "Sigmoid": "Sigmoid", "Softplus": "Softplus", "Gelu": "GELU",
        "Identity": None, "Dropout": None}


def _attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _sym_pads(pads, k):
    pads = list(pads or [0] * (2 * k))
    if pads[:k] != pads[k:]:
        return None
    return tuple(pads[:k])


def _layers(model):
    """The layers of a chain graph, or None."""
    import torch
    from onnx import numpy_helper

    nn = torch.nn
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    ins = [i.name for i in g.input if i.name not in inits]
    if len(ins) != 1 or len(g.output) != 1:
        return None
    cur, layers, nodes, k = ins[0], [], list(g.node), 0
    last = None

    def P(a):
        return nn.Parameter(torch.as_tensor(np.array(a, dtype=np.float32)))

    while k < len(nodes):
        n, a = nodes[k], _attrs(nodes[k])
        k += 1
        data = [x for x in n.input if x and x not in inits]
        if data != [cur] or len(n.output) < 1:
            return None
        op = n.op_type
        if op == "Gemm":
            if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
                return None
            W = inits[n.input[1]]
            W = W if a.get("transB", 0) else W.T
            lin = nn.Linear(W.shape[1], W.shape[0], bias=len(n.input) > 2 and bool(n.input[2]))
            lin.weight = P(W)
            if lin.bias is not None:
                b = np.broadcast_to(inits[n.input[2]], (W.shape[0],))
                lin.bias = P(b)
            layers.append(lin)
        elif op == "MatMul" and n.input[1] in inits and inits[n.input[1]].ndim == 2:
            W = inits[n.input[1]].T
            nxt = nodes[k] if k < len(nodes) else None
            bias = None
            if nxt is not None and nxt.op_type == "Add" and n.output[0] in nxt.input:
                other = [x for x in nxt.input if x != n.output[0]]
                if len(other) == 1 and other[0] in inits and inits[other[0]].size == W.shape[0]:
                    bias, k = inits[other[0]].reshape(-1), k + 1
                    n = nxt
            lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
            lin.weight = P(W)
            if bias is not None:
                lin.bias = P(bias)
            layers.append(lin)
        elif op == "Conv":
            W = inits.get(n.input[1])
            if W is None or W.ndim != 4 or a.get("group", 1) != 1 or a.get("auto_pad", b"NOTSET") not in \
                    (b"NOTSET", "NOTSET"):
                return None
            pads = _sym_pads(a.get("pads"), 2)
            if pads is None:
                return None
            conv = nn.Conv2d(W.shape[1], W.shape[0], tuple(W.shape[2:]), stride=tuple(a.get("strides", (1, 1))),
                             padding=pads, dilation=tuple(a.get("dilations", (1, 1))),
                             bias=len(n.input) > 2 and bool(n.input[2]))
            conv.weight = P(W)
            if conv.bias is not None:
                conv.bias = P(inits[n.input[2]])
            layers.append(conv)
        elif op == "BatchNormalization" and len([o for o in n.output if o]) == 1:
            s, b, m, v = (inits.get(x) for x in n.input[1:5])
            if any(t is None for t in (s, b, m, v)) or last not in ("Conv", "Linear"):
                return None
            bn = (nn.BatchNorm2d if last == "Conv" else nn.BatchNorm1d)(s.shape[0], eps=a.get("epsilon", 1e-5))
            bn.weight, bn.bias = P(s), P(b)
            bn.running_mean.copy_(torch.as_tensor(m.astype(np.float32)))
            bn.running_var.copy_(torch.as_tensor(v.astype(np.float32)))
            layers.append(bn)
        elif op in ("MaxPool", "AveragePool"):
            ks = tuple(a.get("kernel_shape", ()))
            pads = _sym_pads(a.get("pads"), len(ks))
            if len(ks) != 2 or pads is None or a.get("ceil_mode", 0) or a.get("auto_pad", b"NOTSET") not in \
                    (b"NOTSET", "NOTSET") or any(d != 1 for d in a.get("dilations", (1, 1))):
                return None
            st = tuple(a.get("strides", ks))
            if op == "MaxPool":
                layers.append(nn.MaxPool2d(ks, st, pads))
            else:
                layers.append(nn.AvgPool2d(ks, st, pads, count_include_pad=bool(a.get("count_include_pad", 0))))
        elif op == "GlobalAveragePool":
            layers.append(nn.AdaptiveAvgPool2d(1))
        elif op == "Flatten":
            if a.get("axis", 1) != 1:
                return None
            layers.append(nn.Flatten())
        elif op in ("Softmax", "LogSoftmax"):
            layers.append(getattr(nn, op)(dim=int(a.get("axis", -1))))
        elif op == "LeakyRelu":
            layers.append(nn.LeakyReLU(float(a.get("alpha", 0.01))))
        elif op in _ACT:
            if _ACT[op] is not None:
                layers.append(getattr(nn, _ACT[op])())
        else:
            return None
        last = {"Gemm": "Linear", "MatMul": "Linear", "Add": "Linear"}.get(op, op)
        cur = n.output[0]
    if cur != g.output[0].name:
        return None
    return layers


def _check(module, model):
    """Outputs of ``module`` equal onnxruntime's on random input (1e-5 of the scale)."""
    import torch

    from .onnx.runtime import inputs_for, run, session

    sess = session(model)
    try:
        feeds = inputs_for(sess, None, n=3)
    except InputError:
        return False
    want = np.asarray(run(sess, None, feeds)[0], dtype=np.float64)
    with torch.no_grad():
        got = module.eval()(torch.as_tensor(next(iter(feeds.values())))).double().numpy()
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    return got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-5 * scale


def onnx_to_torch(model):
    """``(module, how)``: the model as ``nn.Sequential`` of real torch layers
    (``how = "sequential"``) when it is a chain this function reads and the
    result matches onnxruntime, else as ``OnnxModule`` (``how = "onnx
    interpreter"``)."""
    import torch

    from .onnx.load import load_onnx
    from .onnx.to_torch import OnnxModule

    if isinstance(model, (str, os.PathLike)):
        model = load_onnx(model)
    layers = _layers(model)
    if layers:
        seq = torch.nn.Sequential(*layers).eval()
        if _check(seq, model):
            return seq, "sequential"
    return OnnxModule(model).eval(), "onnx interpreter"


def pad_widths(module, multiple=8):
    """A copy of the ``nn.Sequential`` ``module`` whose hidden widths are
    rounded up to a multiple of ``multiple``, computing the same function.

    A merged base has widths like 142 or 7 that the CPU's and GPU's matrix
    kernels run at a fraction of the speed of 144 or 8 (measured in
    BENCHMARKS.md).  Each hidden ``nn.Linear`` / ``nn.Conv*d`` gets zero rows
    (filters) and a zero bias for its new units; a ``BatchNorm*d`` after it
    gets gamma 0, beta 0, mean 0, var 1 for them (so they stay 0); the next
    ``Linear`` / ``Conv`` reads them with zero columns (after a ``Flatten``:
    zero columns at the end, one block of positions per new channel).  So
    whatever an activation makes of 0, the new units add nothing.  The
    output layer keeps its width.  Returns ``(padded, zeros added)``."""
    import copy

    import torch
    from torch import nn

    if not isinstance(module, nn.Sequential):
        raise InputError("pad_widths reads an nn.Sequential (a chain of layers)")
    if not isinstance(multiple, int) or multiple < 1:
        raise InputError(f"the width multiple must be a positive integer, not {multiple!r}")
    m = copy.deepcopy(module)
    layers = list(m)
    lin = [i for i, x in enumerate(layers) if isinstance(x, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    added = 0
    for a, b in zip(lin[:-1], lin[1:]):
        L, N = layers[a], layers[b]
        if isinstance(L, nn.Linear):
            old = L.out_features
        else:
            if L.groups != 1:
                continue
            old = L.out_channels
        new = -(-old // multiple) * multiple
        between = layers[a + 1:b]
        if new == old or any(not _width_free(x) for x in between):
            continue
        if isinstance(N, nn.Conv1d | nn.Conv2d | nn.Conv3d) and N.groups != 1:
            continue
        flat = any(isinstance(x, nn.Flatten) for x in between)
        if flat and not isinstance(N, nn.Linear):
            continue
        per = N.in_features // old if flat else 1
        if flat and per * old != N.in_features:
            continue
        with torch.no_grad():
            w = L.weight
            L.weight = nn.Parameter(torch.cat([w, w.new_zeros((new - old,) + tuple(w.shape[1:]))]))
            if L.bias is not None:
                L.bias = nn.Parameter(torch.cat([L.bias, L.bias.new_zeros(new - old)]))
            if isinstance(L, nn.Linear):
                L.out_features = new
            else:
                L.out_channels = new
            for x in between:
                if isinstance(x, nn.modules.batchnorm._BatchNorm):
                    for name, fill in (("weight", 0.0), ("bias", 0.0)):
                        t = getattr(x, name)
                        if t is not None:
                            setattr(x, name, nn.Parameter(torch.cat([t, t.new_full((new - old,), fill)])))
                    x.running_mean = torch.cat([x.running_mean, x.running_mean.new_zeros(new - old)])
                    x.running_var = torch.cat([x.running_var, x.running_var.new_ones(new - old)])
                    x.num_features = new
            v = N.weight
            extra = (new - old) * per
            N.weight = nn.Parameter(torch.cat([v, v.new_zeros((v.shape[0], extra) + tuple(v.shape[2:]))], dim=1))
            if isinstance(N, nn.Linear):
                N.in_features += extra
            else:
                N.in_channels = new
        added += (new - old) * (int(np.prod(w.shape[1:])) + (L.bias is not None) + per * int(np.prod(v.shape[2:])) *
                                v.shape[0]) + sum(2 * (new - old) for x in between
                                                  if isinstance(x, nn.modules.batchnorm._BatchNorm) and x.affine)
    return m, added


def _width_free(layer):
    """Whether ``layer`` maps each unit (channel) on its own: activations,
    dropout, per-channel norms and pools, Flatten."""
    from torch import nn

    return isinstance(layer, (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, nn.SiLU,
                              nn.Identity, nn.Dropout, nn.modules.batchnorm._BatchNorm, nn.MaxPool1d, nn.MaxPool2d,
                              nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                              nn.AdaptiveAvgPool2d, nn.Flatten))


def save_torch(module, path):
    """``torch.save(module, path)``, atomically."""
    import io

    import torch

    from fibgraph.fileio import write_atomic

    d = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(d):
        raise InputError(f"{path}: folder {d} does not exist")
    buf = io.BytesIO()
    torch.save(module, buf)
    write_atomic(path, buf.getvalue())
    return path


def load_torch(path):
    """A module saved by :func:`save_torch` (or any ``torch.save``'d
    ``nn.Module``); ``torch.load(..., weights_only=False)``: trusted files only."""
    import torch

    try:
        m = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:
        raise InputError(f"{path}: not a torch.save'd module ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(m, torch.nn.Module):
        raise InputError(f"{path}: holds a {type(m).__name__}, not an nn.Module")
    return m
