"""Training a torch classifier: mean cross-entropy and accuracy of its logits,
and retuning (Adam with early stopping), as compress-retune (Algorithm 2,
docs/design.md section 8) uses them on every round's base."""
from __future__ import annotations

import copy

import numpy as np

__all__ = ["as_tensors", "first_tensor", "module_loss", "retune"]


def first_tensor(out):
    """The first tensor of a module's output: the tensor itself, the first of
    a tuple/list (an LSTM's ``(y, (h, c))``), or the first field of a
    ``dict``/transformers ``ModelOutput`` (``last_hidden_state``, ``logits``),
    which is what the ONNX export's first output holds."""
    import torch

    while not isinstance(out, torch.Tensor):
        if isinstance(out, dict) and any(v is not None for v in out.values()):
            out = next(v for v in out.values() if v is not None)
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
        else:
            raise TypeError(f"a module output of type {type(out).__name__} holds no tensor")
    return out


def as_tensors(data):
    import torch
    x, y = data
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32) if not isinstance(x, torch.Tensor) else x.float()
    y = torch.as_tensor(np.asarray(y), dtype=torch.long) if not isinstance(y, torch.Tensor) else y.long()
    return x, y


def module_loss(model, data, batch=4096):
    """(mean cross-entropy, accuracy) of ``model``'s logits on ``data`` = (x, y)."""
    import torch
    x, y = as_tensors(data)
    was = model.training
    model.eval()
    tot, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            out = first_tensor(model(x[s:s + batch]))
            tot += float(torch.nn.functional.cross_entropy(out, y[s:s + batch], reduction="sum"))
            correct += int((out.argmax(1) == y[s:s + batch]).sum())
    model.train(was)
    return tot / x.shape[0], correct / x.shape[0]


def retune(model, train, val, lr=1e-3, batch=100, max_epochs=50, patience=3, seed=0,
           weight_decay=0.0):
    """Adam on ``train`` with early stopping on the loss on ``val``; the best
    state (lowest ``val`` loss, the starting point included) is restored.
    Returns ``{epochs, best_epoch, val_loss, val_loss_start}``."""
    import torch
    x, y = as_tensors(train)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best = module_loss(model, val)[0]
    start = best
    best_state = copy.deepcopy(model.state_dict())
    from fibgraph.progress import task

    with task(f"retuning (at most {max_epochs} epochs, early stopping)", total=max_epochs) as advance:
        ep, best_epoch, best, best_state = _epochs(model, x, y, val, g, opt, batch, max_epochs, patience,
                                                   advance, best, best_state)
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": ep, "best_epoch": best_epoch, "val_loss": best, "val_loss_start": start}


def _epochs(model, x, y, val, g, opt, batch, max_epochs, patience, advance, best, best_state):
    import torch

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
        advance(1, f"retuning: epoch {ep}, val loss {v:.4f} (best {best:.4f})")
    return ep, best_epoch, best, best_state
