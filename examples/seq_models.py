"""The small sequence models of the digits LSTM/Transformer studies
(``examples/study_digits_seq.py``, ``examples/study_retune_transformer.py``)
and their smaller torch versions: pruned (units removed) or folded (units
merged: incoming weights averaged, outgoing weights summed, the fibration
base's formula) at given unit counts.

An 8x8 digit is a sequence of 8 rows of 8 features.

- :class:`LSTMNet`: ``nn.LSTM(8, H)`` -> last step -> ``Linear(H, 10)``.
- :class:`TfNet`: ``Linear(8, d)`` + learned positions -> L post-norm encoder
  layers (``nn.MultiheadAttention`` with 4 heads, residual, LayerNorm, ReLU
  feed-forward d -> ff -> d, residual, LayerNorm; no dropout: the same maths
  as ``nn.TransformerEncoderLayer(d, 4, ff, dropout=0, batch_first=True)``)
  -> mean over the 8 steps -> ``Linear(d, 10)``.  The feed-forward block is
  applied to the ``(batch * 8, d)`` matrix, so that torch exports it as
  ``Gemm`` with the bias inside the linear node (the baselines' torch code
  relies on this module's layout).  ``ff`` may differ per layer (a
  compressed model).
- :class:`StdTfNet`: the same model from ``nn.TransformerEncoderLayer`` (FF
  exported as ``MatMul`` + ``Add``); since bias adds take their layer's eps it
  compresses like :class:`TfNet` (BENCHMARKS.md, "Sequence models").
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class LSTMNet(nn.Module):
    def __init__(self, hidden=64, n_in=8, n_out=10):
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        o, _ = self.lstm(x)
        return self.head(o[:, -1])


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.linear1 = nn.Linear(d, ff)
        self.linear2 = nn.Linear(ff, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x):
        d = x.shape[-1]
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        f = self.linear2(torch.relu(self.linear1(x.reshape(-1, d)))).reshape(x.shape)
        return self.norm2(x + f)


class TfNet(nn.Module):
    def __init__(self, d=32, ff=64, layers=2, heads=4, n_in=8, seq=8, n_out=10):
        super().__init__()
        ff = [ff] * layers if isinstance(ff, int) else list(ff)
        self.cfg = dict(d=d, ff=ff, layers=len(ff), heads=heads, n_in=n_in, seq=seq, n_out=n_out)
        self.inp = nn.Linear(n_in, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.layers = nn.ModuleList([EncoderLayer(d, heads, f) for f in ff])
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        h = self.inp(x) + self.pos
        for ly in self.layers:
            h = ly(h)
        return self.head(h.mean(1))


class StdTfNet(nn.Module):
    """:class:`TfNet` with torch's own ``nn.TransformerEncoderLayer(d, heads, ff,
    dropout=0, batch_first=True)`` (post-norm, ReLU): the same maths and the
    same parameter creation order (the same initial weights for a seed), but
    the feed-forward block runs on the 3-D tensor, so it exports as ``MatMul`` +
    ``Add`` (bias in its own node) instead of ``Gemm``."""

    def __init__(self, d=32, ff=64, layers=2, heads=4, n_in=8, seq=8, n_out=10):
        super().__init__()
        ff = [ff] * layers if isinstance(ff, int) else list(ff)
        self.cfg = dict(d=d, ff=ff, layers=len(ff), heads=heads, n_in=n_in, seq=seq, n_out=n_out)
        self.inp = nn.Linear(n_in, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d, heads, f, dropout=0.0, batch_first=True)
                                     for f in ff])
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        h = self.inp(x) + self.pos
        for ly in self.layers:
            h = ly(h)
        return self.head(h.mean(1))


def n_params(m):
    return int(sum(p.numel() for p in m.parameters()))


def export(m, path):
    """Legacy torch exporter (opset 17), dynamic batch, input x, output y."""
    from fibgraph.importers.torch_export import export_torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_torch(m.eval(), torch.zeros(2, 8, 8), path, dynamo=False, opset=17)
    return path


# ------------------------------------------------------------ LSTM units
def _gate_rows(idx, H):
    idx = np.asarray(idx)
    return np.concatenate([g * H + idx for g in range(4)])


def lstm_in_weights(m):
    """Per hidden unit: its incoming weights (W_ih and W_hh rows of the 4 gates)."""
    H = m.lstm.hidden_size
    Wi = m.lstm.weight_ih_l0.detach().numpy()
    Wh = m.lstm.weight_hh_l0.detach().numpy()
    return np.stack([np.concatenate([Wi[_gate_rows([i], H)].ravel(), Wh[_gate_rows([i], H)].ravel()])
                     for i in range(H)])


def lstm_fold_features(m):
    """(incoming weights, bias of the 4 gates, outgoing W_hh columns, head columns) per unit."""
    H = m.lstm.hidden_size
    Wh = m.lstm.weight_hh_l0.detach().numpy()
    b = (m.lstm.bias_ih_l0 + m.lstm.bias_hh_l0).detach().numpy()
    Wo = m.head.weight.detach().numpy()
    return np.hstack([lstm_in_weights(m), np.stack([b[_gate_rows([i], H)] for i in range(H)]),
                      Wh.T, Wo.T])


def lstm_merge(m, labels):
    """Smaller LSTMNet with one unit per class of ``labels`` (H,): incoming rows
    (W_ih, biases, and W_hh rows with the columns of each class summed) are
    the class means, head columns are summed.  A partition into singletons
    of a subset = pruning (use :func:`lstm_subset`)."""
    labels = np.asarray(labels)
    H = m.lstm.hidden_size
    k = int(labels.max()) + 1
    A = np.zeros((k, H))                       # class mean
    A[labels, np.arange(H)] = 1.0
    A /= A.sum(1, keepdims=True)
    S = np.zeros((H, k))                        # class sum (columns)
    S[np.arange(H), labels] = 1.0
    new = LSTMNet(k, m.lstm.input_size, m.head.out_features)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            W = getattr(m.lstm, name).detach().double().numpy()
            rows = np.concatenate([A @ W[g * H:(g + 1) * H] for g in range(4)])
            if name == "weight_hh_l0":
                rows = rows @ S
            getattr(new.lstm, name).copy_(torch.as_tensor(rows, dtype=torch.float32))
        new.head.weight.copy_(torch.as_tensor(m.head.weight.detach().double().numpy() @ S, dtype=torch.float32))
        new.head.bias.copy_(m.head.bias)
    return new.eval()


def lstm_subset(m, keep):
    """Smaller LSTMNet keeping the hidden units ``keep`` (pruning)."""
    keep = np.sort(np.asarray(keep))
    H = m.lstm.hidden_size
    r = torch.as_tensor(_gate_rows(keep, H))
    kk = torch.as_tensor(keep)
    new = LSTMNet(len(keep), m.lstm.input_size, m.head.out_features)
    with torch.no_grad():
        new.lstm.weight_ih_l0.copy_(m.lstm.weight_ih_l0[r])
        new.lstm.weight_hh_l0.copy_(m.lstm.weight_hh_l0[r][:, kk])
        new.lstm.bias_ih_l0.copy_(m.lstm.bias_ih_l0[r])
        new.lstm.bias_hh_l0.copy_(m.lstm.bias_hh_l0[r])
        new.head.weight.copy_(m.head.weight[:, kk])
        new.head.bias.copy_(m.head.bias)
    return new.eval()


# ------------------------------------------------- Transformer FF units
def tf_ff_merge(m, labels_per_layer):
    """Smaller TfNet whose feed-forward units are merged per layer by
    ``labels_per_layer[l]`` (ff_l,): linear1 rows and bias averaged, linear2
    columns summed (the fibration base of the FF block); all else copied."""
    cfg = dict(m.cfg)
    labs = [np.asarray(lab) for lab in labels_per_layer]
    cfg["ff"] = [int(lab.max()) + 1 for lab in labs]
    new = TfNet(cfg["d"], cfg["ff"], heads=cfg["heads"], n_in=cfg["n_in"], seq=cfg["seq"], n_out=cfg["n_out"])
    sd = {k: v for k, v in m.state_dict().items() if ".linear1." not in k and ".linear2.weight" not in k}
    new.load_state_dict(sd, strict=False)
    with torch.no_grad():
        for ly_old, ly_new, lab in zip(m.layers, new.layers, labs):
            n = lab.size
            k = int(lab.max()) + 1
            A = np.zeros((k, n))
            A[lab, np.arange(n)] = 1.0
            A /= A.sum(1, keepdims=True)
            S = np.zeros((n, k))
            S[np.arange(n), lab] = 1.0
            W1 = ly_old.linear1.weight.detach().double().numpy()
            b1 = ly_old.linear1.bias.detach().double().numpy()
            W2 = ly_old.linear2.weight.detach().double().numpy()
            ly_new.linear1.weight.copy_(torch.as_tensor(A @ W1, dtype=torch.float32))
            ly_new.linear1.bias.copy_(torch.as_tensor(A @ b1, dtype=torch.float32))
            ly_new.linear2.weight.copy_(torch.as_tensor(W2 @ S, dtype=torch.float32))
            ly_new.linear2.bias.copy_(ly_old.linear2.bias)
    return new.eval()


def tf_ff_subset(m, keep_per_layer):
    """Smaller TfNet keeping the feed-forward units ``keep_per_layer[l]`` (pruning)."""
    cfg = dict(m.cfg)
    keeps = [np.sort(np.asarray(k)) for k in keep_per_layer]
    cfg["ff"] = [len(k) for k in keeps]
    new = TfNet(cfg["d"], cfg["ff"], heads=cfg["heads"], n_in=cfg["n_in"], seq=cfg["seq"], n_out=cfg["n_out"])
    sd = {k: v for k, v in m.state_dict().items() if ".linear1." not in k and ".linear2.weight" not in k}
    new.load_state_dict(sd, strict=False)
    with torch.no_grad():
        for ly_old, ly_new, keep in zip(m.layers, new.layers, keeps):
            kk = torch.as_tensor(keep)
            ly_new.linear1.weight.copy_(ly_old.linear1.weight[kk])
            ly_new.linear1.bias.copy_(ly_old.linear1.bias[kk])
            ly_new.linear2.weight.copy_(ly_old.linear2.weight[:, kk])
            ly_new.linear2.bias.copy_(ly_old.linear2.bias)
    return new.eval()


def ff_in_weights(m, l):
    return m.layers[l].linear1.weight.detach().numpy()


def ff_fold_features(m, l):
    ly = m.layers[l]
    return np.hstack([ly.linear1.weight.detach().numpy(), ly.linear1.bias.detach().numpy()[:, None],
                      ly.linear2.weight.detach().numpy().T])


def labels_from_fibers(fibers, n):
    lab = np.full(n, -1, dtype=np.int64)
    for c, f in enumerate(fibers):
        lab[np.asarray(f, dtype=np.int64)] = c
    if (lab < 0).any():
        raise ValueError("fibers do not cover every unit")
    return lab


def digits_seq_split(seed=0, val=0, check=0, test_size=0.25):
    """scikit-learn digits as (n, 8, 8) sequences, pixels / 16; stratified
    splits: train / [val] / [check] / test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32).reshape(-1, 8, 8)
    y = d.target.astype(np.int64)
    xa, xte, ya, yte = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    out = []
    for n in (val, check):
        if n:
            xa, xb, ya, yb = train_test_split(xa, ya, test_size=n, stratify=ya, random_state=seed)
            out.append((xb, yb))
    return [(xa, ya)] + out + [(xte, yte)]
