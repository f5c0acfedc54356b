"""Fibration compression of torch MLPs to real smaller modules, and the
compression paper's compress-retune procedure (Algorithm 2).

- :func:`network_from_mlp`: an ``nn.Sequential`` of ``nn.Linear`` layers and
  element-wise activations (optionally a leading ``nn.Flatten``) as a
  :class:`fibgraph.network.Network` (layer names ``"<index>.weight"``, the
  names of the state dict and of a legacy ONNX export, so eps files carry
  over).
- :func:`module_from_base`: the base network as a NEW ``nn.Sequential`` whose
  ``nn.Linear`` layers have the base shapes (no masks); the activations are
  copied from the original module.
- :func:`compress_module`: both at once for ``{layer: eps}``.
- :func:`tune_module`: Algorithm 3 with the loss computed by torch.
- :func:`retune`: training with early stopping on held-out data (best state
  restored).
- :func:`compress_retune`: Algorithm 2: over-compress with ``eps * q``,
  retune, repeat while the held-out loss stays within ``(1 + rho)`` of the
  original; return the last model that did, compressed loss-preservingly.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import numpy as np

from fibgraph.errors import InputError
from fibgraph.network import Layer, Network, colour_network, compress_network
from fibgraph.engine import DEFAULT_RTOL
from fibgraph.tune import EPS_MAX, greedy_eps

from .tuning import criteria_for

__all__ = ["network_from_mlp", "module_from_base", "compress_module", "module_loss", "n_params",
           "tune_module", "retune", "compress_retune", "RetuneResult"]


def _torch():
    try:
        import torch
    except ImportError:
        raise InputError("torch is not installed: pip install torch (CPU build)") from None
    return torch


def _kinds():
    nn = _torch().nn
    homog = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
    other = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus, nn.Softmax, nn.LogSoftmax)
    return nn, homog, other


def _linear_indices(model):
    nn, homog, other = _kinds()
    if not isinstance(model, nn.Sequential):
        raise InputError(f"expected an nn.Sequential MLP, got {type(model).__name__}")
    mods = list(model)
    lin = [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)]
    if not lin:
        raise InputError("the module has no nn.Linear layer")
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear) or isinstance(m, homog + other):
            continue
        if isinstance(m, nn.Flatten) and i < lin[0]:
            continue
        raise InputError(f"module {i} ({type(m).__name__}) is not supported in an MLP "
                         "(supported: Linear, element-wise activations, Dropout, a leading Flatten)")
    return mods, lin


def network_from_mlp(model) -> Network:
    """The MLP ``model`` as a format-free :class:`Network`."""
    nn, homog, _ = _kinds()
    mods, lin = _linear_indices(model)
    layers = []
    for j, i in enumerate(lin):
        m = mods[i]
        end = lin[j + 1] if j + 1 < len(lin) else len(mods)
        acts = mods[i + 1:end]
        W = m.weight.detach().cpu().double().numpy()
        b = (m.bias.detach().cpu().double().numpy() if m.bias is not None else np.zeros(W.shape[0]))
        layers.append(Layer(name=f"{i}.weight", kind="dense", weight=W[:, :, None].copy(), bias=b.copy(),
                            homogeneous=all(isinstance(a, homog) for a in acts),
                            activation="+".join(type(a).__name__ for a in acts),
                            is_output=(j == len(lin) - 1), meta={"torch_index": i}))
    return Network(int(mods[lin[0]].in_features), layers, name="torch-mlp")


def module_from_base(base: Network, template):
    """A new ``nn.Sequential`` like ``template`` with ``nn.Linear`` layers of
    the base shapes and weights (float32)."""
    torch = _torch()
    nn = torch.nn
    mods, lin = _linear_indices(template)
    if len(lin) != len(base.layers):
        raise ValueError("the base network does not match the module's Linear layers")
    out = []
    by_index = dict(zip(lin, base.layers))
    for i, m in enumerate(mods):
        if i in by_index:
            ly = by_index[i]
            if ly.weight.shape[2] != 1:
                raise ValueError(f"layer {ly.name}: not a dense layer")
            new = nn.Linear(ly.n_in, ly.n_out, bias=m.bias is not None)
            with torch.no_grad():
                new.weight.copy_(torch.as_tensor(ly.weight[:, :, 0], dtype=torch.float32))
                if m.bias is not None:
                    new.bias.copy_(torch.as_tensor(ly.bias, dtype=torch.float32))
            out.append(new)
        else:
            out.append(copy.deepcopy(m))
    return nn.Sequential(*out).train(template.training)


def n_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def compress_module(model, eps_by_layer=None, linkage="average", metric="cosine", rescale=True,
                    rtol=DEFAULT_RTOL, symmetry="fibration"):
    """(smaller nn.Sequential, base Network, colouring) for ``{layer: eps}``
    (layers not named: exact fibers)."""
    net = network_from_mlp(model)
    crit = criteria_for(eps_by_layer or {}, linkage, metric, rescale, rtol)
    col = colour_network(net, symmetry, crit)
    base, _ = compress_network(col)
    return module_from_base(base, model), base, col


def _as_tensors(data):
    torch = _torch()
    x, y = data
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32) if not isinstance(x, torch.Tensor) else x.float()
    y = torch.as_tensor(np.asarray(y), dtype=torch.long) if not isinstance(y, torch.Tensor) else y.long()
    return x, y


def module_loss(model, data, batch=4096):
    """(mean cross-entropy, accuracy) of ``model``'s logits on ``data`` = (x, y)."""
    torch = _torch()
    x, y = _as_tensors(data)
    was = model.training
    model.eval()
    tot, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            out = model(x[s:s + batch])
            tot += float(torch.nn.functional.cross_entropy(out, y[s:s + batch], reduction="sum"))
            correct += int((out.argmax(1) == y[s:s + batch]).sum())
    model.train(was)
    return tot / x.shape[0], correct / x.shape[0]


def _key(col):
    h = hashlib.sha1(np.ascontiguousarray(col.labels, dtype=np.int64).tobytes())
    h.update(np.round(col.scales, 12).tobytes())
    return h.hexdigest()


def tune_module(model, cal, tau=0.01, steps=8, linkage="average", metric="cosine", rescale=True,
                hi=EPS_MAX, base_loss=None):
    """Algorithm 3 on a torch MLP; returns :class:`fibgraph.tune.TuneResult`."""
    net = network_from_mlp(model)
    names = [ly.name for ly in net.layers if not ly.is_output]
    cache = {}

    def loss(eps):
        col = colour_network(net, "fibration", criteria_for(eps, linkage, metric, rescale))
        k = _key(col)
        if k not in cache:
            base, _ = compress_network(col)
            cache[k] = module_loss(module_from_base(base, model), cal)[0]
        return cache[k]

    if base_loss is None:
        base_loss = module_loss(model, cal)[0]
    return greedy_eps(names, loss, tau=tau, steps=steps, hi=hi, base_loss=base_loss)


def retune(model, train, val, lr=1e-3, batch=100, max_epochs=50, patience=3, seed=0,
           weight_decay=0.0):
    """Adam on ``train`` with early stopping on the loss on ``val``; the best
    state (lowest ``val`` loss, the starting point included) is restored.
    Returns ``{epochs, best_epoch, val_loss, val_loss_start}``."""
    torch = _torch()
    x, y = _as_tensors(train)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best = module_loss(model, val)[0]
    start = best
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, bad, ep = 0, 0, 0
    for ep in range(1, max_epochs + 1):
        model.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for s in range(0, x.shape[0], batch):
            idx = perm[s:s + batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        v = module_loss(model, val)[0]
        if v < best:
            best, best_epoch, bad = v, ep, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": ep, "best_epoch": best_epoch, "val_loss": best, "val_loss_start": start}


@dataclass
class RetuneResult:
    """``model``: the returned module (the last over-compressed-and-retuned
    model whose loss stayed within ``(1 + rho) * loss0``, compressed once more
    with loss-preserving greedy eps); ``eps``: that last greedy eps;
    ``history``: one dict per attempt."""

    model: object
    eps: dict
    loss0: float
    params0: int
    loss: float
    accuracy: float
    params: int
    history: list = field(default_factory=list)
    stopped: str = ""


def compress_retune(model, train, val, eps0=None, q=1.05, rho=0.05, tau=0.01, steps=8,
                    max_iters=10, linkage="average", metric="cosine", rescale=True, cal=None,
                    check=None, retune_kw=None, log=None, eps_floor=0.0):
    """Algorithm 2 on a torch MLP.

    ``train``/``val``: (x, y); ``val`` is the held-out data for early stopping.
    ``check``: the data of the loss test ``L_c <= (1 + rho) * L`` (``L`` = the
    loss there of the model passed in; default ``val``; the paper uses the
    test set).  ``cal``: calibration data of the greedy eps search (default
    ``check``).  ``eps0``: eps dict (or one float for every layer) used
    instead of the greedy search in the first iteration.  ``eps_floor``: the
    over-compression eps of a layer is at least this (0 = the paper: a layer
    whose greedy eps is 0 is not over-compressed).  Stops when the loss test
    fails, when over-compression no longer shrinks the model, or after
    ``max_iters``.  ``log(dict)`` receives each history entry.
    """
    from fibgraph.retune import compress_retune_loop

    check = val if check is None else check
    cal = check if cal is None else cal
    retune_kw = dict(retune_kw or {})
    m = copy.deepcopy(model).eval()
    P0 = n_params(m)
    names = [ly.name for ly in network_from_mlp(m).layers if not ly.is_output]
    if isinstance(eps0, (int, float)):
        eps0 = {n: float(eps0) for n in names}
    bases = {}

    def compress(mod, eps):
        small, base, _ = compress_module(mod, eps, linkage, metric, rescale)
        bases[id(small)] = base
        return small

    def record(mod, eps, over, small):
        lossless = compress_module(mod, eps, linkage, metric, rescale)[0]
        return {"params_lossless": n_params(lossless), "loss_lossless": module_loss(lossless, check)[0],
                "nodes_over": [ly.n_out for ly in bases.pop(id(small)).layers]}

    def tune_again(small):
        return small, retune(small, train, val, **retune_kw)          # in place

    m_o, history, stopped, L = compress_retune_loop(
        m, greedy=lambda mod: tune_module(mod, cal, tau, steps, linkage, metric, rescale).eps,
        compress=compress, retune=tune_again, loss=lambda mod: module_loss(mod, check), params=n_params,
        rho=rho, q=q, max_iters=max_iters, eps_floor=eps_floor, eps0=eps0, record=record, log=log)
    eps = tune_module(m_o, cal, tau, steps, linkage, metric, rescale).eps
    final, _, _ = compress_module(m_o, eps, linkage, metric, rescale)
    loss, acc = module_loss(final, check)
    return RetuneResult(model=final.eval(), eps=eps, loss0=L, params0=P0, loss=loss, accuracy=acc,
                        params=n_params(final), history=history, stopped=stopped)
