"""Torch models with PLANTED exact fibers: LSTM, GRU, Transformer encoder,
residual MLP (and a residual Add that breaks fibers).

Planting by lifting (docs/design.md section 7).  Draw a small random model and a
surjective map ``f`` from big units to small (base) units.  Then

* unit -> unit weight:  W[i, k] = W_small[f(i), f(k)] / |f^-1(f(k))|
  (rows copied, columns divided by the fiber size of the input's class);
* weights from raw inputs (never lifted): rows copied, columns as they are;
* biases and per-unit parameters (LayerNorm gamma / beta): copied;
* the output layer is never lifted (rows as they are, columns divided).

Units of one fiber then have identical activations for every input.  Fiber
sizes are non-uniform (e.g. 6 units from 3 with sizes 3, 2, 1) and the big
unit order is shuffled (``perm``) so fibers are not contiguous.  Every small
parameter is drawn at random (biases and LayerNorm gamma / beta included), so
distinct fibers have distinct activations: the planted partition IS the
partition of identical activations, and no two initializers are equal (the
exporters merge equal initializers).

Every builder returns ``(model, info)`` (``return_base=True``: also the small
model, where one exists):

    info = {
      "name":   str,                      # model kind, also the file stem of export_both
      "fibers": {layer: [[unit, ...], ...]},   # fibers of that layer's OUTPUT units,
                                          # sorted lists ordered by smallest member;
                                          # every unit appears once (singletons included)
      "maps":   {map: [base unit of big unit i for i in range(n)]},
      "perms":  {map: perm},              # big unit i copies sorted_base[perm[i]]
      "sizes":  {map: [fiber size of base unit c, ...]},
      "layer_map": {layer: map or None},  # None: not lifted (all singletons)
      ... model-specific keys (documented per builder)
    }

Every model is an ``nn.Module`` in eval mode with ``forward(x) -> y`` and
``taps(x) -> {layer: tensor}`` that recomputes the forward pass by hand and
returns, for every key of ``info["fibers"]``, that layer's output units along
the last axis (``taps(x)["out"]`` equals ``forward(x)``).

``export_both`` writes the model with the legacy (TorchScript) exporter and
the dynamo exporter.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["planted_lstm", "planted_gru", "planted_transformer", "planted_residual_mlp",
           "residual_breaks_fibers", "export_both", "export_one", "example_input", "make_map", "lift", "fibers_of", "meet",
           "RNNNet", "TransformerNet", "ResidualMLP", "BrokenResidualMLP"]

LEGACY_OPSET = 17


# ------------------------------------------------------------------- partitions
def fibers_of(labels):
    """Classes of a label array as sorted index lists, ordered by smallest member."""
    labels = [int(v) for v in labels]
    first = {}
    for i, v in enumerate(labels):
        first.setdefault(v, len(first))
    out = [[] for _ in first]
    for i, v in enumerate(labels):
        out[first[v]].append(i)
    return out


def singletons(n):
    return [[i] for i in range(n)]


def offset(fibers, k):
    return [[i + k for i in cl] for cl in fibers]


def meet(a, b):
    """Common refinement of two partitions given as lists of classes (same unit set)."""
    la = {m: c for c, ms in enumerate(a) for m in ms}
    lb = {m: c for c, ms in enumerate(b) for m in ms}
    assert set(la) == set(lb), "meet of partitions of different unit sets"
    n = max(la) + 1
    return fibers_of([la[i] * (len(b) + 1) + lb[i] for i in range(n)])


def make_map(rng, sizes, contiguous_ok=False):
    """A shuffled surjective map big -> base with the given fiber sizes.

    Returns (f, perm): ``f[i] = sorted_base[perm[i]]`` where ``sorted_base``
    lists base unit c ``sizes[c]`` times.  Unless ``contiguous_ok``, redraws
    until some fiber with two or more members is not a contiguous block.
    """
    sizes = [int(s) for s in sizes]
    base = np.repeat(np.arange(len(sizes)), sizes)
    for _ in range(1000):
        perm = rng.permutation(base.size)
        f = base[perm]
        if contiguous_ok or any(len(cl) > 1 and cl[-1] - cl[0] + 1 != len(cl) for cl in fibers_of(f)):
            return f, perm
    raise AssertionError("could not draw a non-contiguous map")  # pragma: no cover


def lift(W_small, row_map=None, col_map=None):
    """Lift a weight (or bias, 1-D) matrix: rows copied along ``row_map``,
    columns copied along ``col_map`` and divided by the column class size.
    ``None``: that axis is not lifted."""
    W = np.asarray(W_small, dtype=np.float64)
    if row_map is not None:
        W = W[np.asarray(row_map)]
    if col_map is not None:
        col_map = np.asarray(col_map)
        W = W[..., col_map] / np.bincount(col_map)[col_map]
    return W


def lift_blocks(W_small, n_blocks, row_map=None, col_map=None):
    """Lift a matrix made of ``n_blocks`` stacked row blocks (gates, q/k/v)
    with the same row map in every block."""
    W = np.asarray(W_small, dtype=np.float64)
    blocks = np.split(W, n_blocks, axis=0)
    return np.concatenate([lift(b, row_map, col_map) for b in blocks], axis=0)


class _Planter:
    """Bookkeeping shared by the builders: maps, fibers, random base params."""

    def __init__(self, seed, name, scale=0.5):
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.info = {"name": name, "fibers": {}, "maps": {}, "perms": {}, "sizes": {}, "layer_map": {}}

    def map(self, name, sizes):
        f, perm = make_map(self.rng, sizes)
        self.info["maps"][name] = f.tolist()
        self.info["perms"][name] = perm.tolist()
        self.info["sizes"][name] = [int(s) for s in sizes]
        return f

    def layer(self, name, fibers, map_name=None):
        self.info["fibers"][name] = fibers
        self.info["layer_map"][name] = map_name

    def normal(self, *shape, scale=None):
        a = self.rng.normal(0.0, self.scale if scale is None else scale, shape)
        return a

    def bias(self, n):
        b = self.rng.normal(0.0, 0.5, n)
        b[np.abs(b) < 0.1] += 0.3          # clearly nonzero
        return b


def _set(param, arr):
    with torch.no_grad():
        param.copy_(torch.as_tensor(np.asarray(arr), dtype=param.dtype).reshape(param.shape))


# ------------------------------------------------------------------- LSTM / GRU
class RNNNet(nn.Module):
    """x (batch, seq, n_in) [or (seq, batch, n_in)] -> LSTM/GRU -> last time step -> Linear."""

    def __init__(self, kind, n_in, hidden, n_out, batch_first=True, bidirectional=False):
        super().__init__()
        self.kind = kind
        self.batch_first = batch_first
        self.rnn = getattr(nn, kind)(n_in, hidden, num_layers=1, batch_first=batch_first,
                                     bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), n_out)
        self.eval()

    def forward(self, x):
        out, _ = self.rnn(x)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.fc(last)

    def _direction(self, x, suffix):
        """One direction by hand; x (batch, seq, n_in).  Returns gates (b, T, nG*H), h, c."""
        r = self.rnn
        H = r.hidden_size
        Wih, Whh = getattr(r, "weight_ih_l0" + suffix), getattr(r, "weight_hh_l0" + suffix)
        bih, bhh = getattr(r, "bias_ih_l0" + suffix), getattr(r, "bias_hh_l0" + suffix)
        h = x.new_zeros(x.shape[0], H)
        c = x.new_zeros(x.shape[0], H)
        gates, hs, cs = [], [], []
        for t in range(x.shape[1]):
            gi = F.linear(x[:, t], Wih, bih)
            gh = F.linear(h, Whh, bhh)
            if self.kind == "LSTM":
                z = gi + gh
                i, f, g, o = z.split(H, dim=1)
                i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                c = f * c + i * g
                h = o * torch.tanh(c)
                gates.append(torch.cat([i, f, g, o], dim=1))
                cs.append(c)
            else:                       # GRU: gates [r, z, n], n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
                ir, iz, in_ = gi.split(H, dim=1)
                hr, hz, hn = gh.split(H, dim=1)
                rr = torch.sigmoid(ir + hr)
                zz = torch.sigmoid(iz + hz)
                nn_ = torch.tanh(in_ + rr * hn)
                h = (1 - zz) * nn_ + zz * h
                gates.append(torch.cat([rr, zz, nn_], dim=1))
            hs.append(h)
        out = {"gates": torch.stack(gates, 1), "h": torch.stack(hs, 1)}
        if cs:
            out["c"] = torch.stack(cs, 1)
        return out

    def taps(self, x):
        """{"rnn.gates"[, "rnn.gates_reverse"], "rnn.hidden", ["rnn.cell"], "fc", "out"}:
        gates after their nonlinearity in torch order ([i,f,g,o] / [r,z,n]) over all
        time steps (batch, seq, nG*H); hidden (and LSTM cell) state over all steps
        (batch, seq, dirs*H), forward then reverse; fc = out = the output."""
        if not self.batch_first:
            x = x.transpose(0, 1)
        fwd = self._direction(x, "")
        res = {"rnn.gates": fwd["gates"]}
        hidden, cell = [fwd["h"]], [fwd.get("c")]
        if self.rnn.bidirectional:
            rev = self._direction(x.flip(1), "_reverse")
            res["rnn.gates_reverse"] = rev["gates"].flip(1)
            hidden.append(rev["h"].flip(1))
            cell.append(rev["c"].flip(1) if "c" in rev else None)
        res["rnn.hidden"] = torch.cat(hidden, dim=-1)
        if self.kind == "LSTM":
            res["rnn.cell"] = torch.cat(cell, dim=-1)
        y = self.fc(res["rnn.hidden"][:, -1])
        res["fc"] = y
        res["out"] = y
        return res


def _planted_rnn(kind, seed, batch_first, bidirectional, return_base):
    n_in, H, Hs, n_out = 5, 6, 3, 4
    G = 4 if kind == "LSTM" else 3
    P = _Planter(seed, kind.lower() + ("_bi" if bidirectional else ""))
    big = RNNNet(kind, n_in, H, n_out, batch_first=batch_first, bidirectional=bidirectional)
    small = RNNNet(kind, n_in, Hs, n_out, batch_first=batch_first, bidirectional=bidirectional)
    dirs = [("", "hidden", (3, 2, 1))]
    if bidirectional:
        dirs.append(("_reverse", "hidden_reverse", (1, 4, 1)))
    hid_fibers, col_maps = [], []
    for suffix, mname, sizes in dirs:
        f = P.map(mname, sizes)
        Wih, Whh = P.normal(G * Hs, n_in), P.normal(G * Hs, Hs, scale=0.8)
        bih, bhh = P.bias(G * Hs), P.bias(G * Hs)
        for name, arr in (("weight_ih_l0", Wih), ("weight_hh_l0", Whh), ("bias_ih_l0", bih), ("bias_hh_l0", bhh)):
            _set(getattr(small.rnn, name + suffix), arr)
        _set(getattr(big.rnn, "weight_ih_l0" + suffix), lift_blocks(Wih, G, f, None))
        _set(getattr(big.rnn, "weight_hh_l0" + suffix), lift_blocks(Whh, G, f, f))
        _set(getattr(big.rnn, "bias_ih_l0" + suffix), lift_blocks(bih, G, f))
        _set(getattr(big.rnn, "bias_hh_l0" + suffix), lift_blocks(bhh, G, f))
        fib = fibers_of(f)
        gate_fibers = [cl for g in range(G) for cl in offset(fib, g * H)]
        P.layer("rnn.gates" + suffix, sorted(gate_fibers), mname)
        hid_fibers.append(fib)
        col_maps.append(f)
    hidden = hid_fibers[0] + (offset(hid_fibers[1], H) if bidirectional else [])
    P.layer("rnn.hidden", sorted(hidden), "hidden" if not bidirectional else "hidden+hidden_reverse")
    if kind == "LSTM":
        P.layer("rnn.cell", sorted(hidden), P.info["layer_map"]["rnn.hidden"])
    Wo, bo = P.normal(n_out, Hs * len(dirs)), P.bias(n_out)
    col = np.concatenate([m + k * Hs for k, m in enumerate(col_maps)])
    _set(small.fc.weight, Wo)
    _set(small.fc.bias, bo)
    _set(big.fc.weight, lift(Wo, None, col))
    _set(big.fc.bias, bo)
    P.layer("fc", singletons(n_out), None)
    P.info.update(kind=kind, gate_order="torch " + ("[i, f, g, o]" if kind == "LSTM" else "[r, z, n]"),
                  hidden_size=H, base_hidden_size=Hs, n_in=n_in, n_out=n_out, seq=5,
                  batch_first=batch_first, bidirectional=bidirectional, exact_base=True)
    big.eval(), small.eval()
    return (big, P.info, small) if return_base else (big, P.info)


def planted_lstm(seed=0, batch_first=True, bidirectional=False, return_base=False):
    """nn.LSTM(5 -> hidden 6 lifted from 3, fiber sizes 3,2,1) -> last step -> nn.Linear(6, 4).

    Example input: ``example_input(info)`` (batch 3, seq 5, 5 features).
    ``bidirectional``: the reverse direction has its own map (sizes 1,4,1);
    hidden / cell units are [forward 0..5, reverse 6..11] and fc is Linear(12, 4).
    fibers: "rnn.gates" (4H gate units of weight_ih_l0 / weight_hh_l0 rows, torch
    gate order [i, f, g, o]; gate block g holds the hidden fibers shifted by g*H),
    "rnn.gates_reverse" (bidirectional), "rnn.hidden", "rnn.cell" (dirs*H units),
    "fc" (output, singletons).  The lift is exact: big(x) == base(x).
    """
    return _planted_rnn("LSTM", seed, batch_first, bidirectional, return_base)


def planted_gru(seed=0, batch_first=True, bidirectional=False, return_base=False):
    """nn.GRU(5 -> hidden 6 lifted from 3, sizes 3,2,1) -> last step -> nn.Linear(6, 4).

    Same layout as ``planted_lstm`` with 3 gates in torch order [r, z, n]
    ("rnn.gates" has 3H units; no "rnn.cell").  big(x) == base(x).
    """
    return _planted_rnn("GRU", seed, batch_first, bidirectional, return_base)


# ------------------------------------------------------------------ Transformer
class TransformerNet(nn.Module):
    """x (batch, seq, n_in) -> Linear(n_in, d) -> TransformerEncoderLayer(d, nhead, ff,
    dropout 0, batch_first, post-norm, ReLU) -> mean over seq -> Linear(d, n_out)."""

    def __init__(self, n_in=7, d_model=8, nhead=2, dim_ff=12, n_out=3):
        super().__init__()
        self.inp = nn.Linear(n_in, d_model)
        self.enc = nn.TransformerEncoderLayer(d_model, nhead, dim_ff, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(d_model, n_out)
        self.eval()

    def forward(self, x):
        return self.fc(self.enc(self.inp(x)).mean(dim=1))

    def taps(self, x):
        """Recompute by hand.  Keys: "inp", "attn.in_proj" (3d: q;k;v), "attn.q",
        "attn.k", "attn.v", "attn.context" (softmax(qk^T/sqrt(hd)) v, before out_proj),
        "attn.out_proj", "add1", "norm1", "ff.linear1" (before ReLU), "ff.linear2",
        "add2", "norm2", "pool", "fc" (= "out")."""
        enc, mha = self.enc, self.enc.self_attn
        d, nh = mha.embed_dim, mha.num_heads
        hd = d // nh
        B, T = x.shape[0], x.shape[1]
        e = self.inp(x)
        qkv = F.linear(e, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.split(d, dim=-1)

        def heads(t):
            return t.reshape(B, T, nh, hd).transpose(1, 2)

        s = heads(q) @ heads(k).transpose(-1, -2) / (hd ** 0.5)
        ctx = (torch.softmax(s, dim=-1) @ heads(v)).transpose(1, 2).reshape(B, T, d)
        o = mha.out_proj(ctx)
        a1 = e + o
        n1 = enc.norm1(a1)
        f1 = enc.linear1(n1)
        f2 = enc.linear2(torch.relu(f1))
        a2 = n1 + f2
        n2 = enc.norm2(a2)
        pool = n2.mean(dim=1)
        y = self.fc(pool)
        return {"inp": e, "attn.in_proj": qkv, "attn.q": q, "attn.k": k, "attn.v": v, "attn.context": ctx,
                "attn.out_proj": o, "add1": a1, "norm1": n1, "ff.linear1": f1, "ff.linear2": f2,
                "add2": a2, "norm2": n2, "pool": pool, "fc": y, "out": y}


def _head_map(P, name, head_sizes, hd_small):
    """A map on d features that never moves a feature to another head: head h's
    features h*hd .. h*hd+hd-1 map to base features h*hd_small + (0..hd_small-1)."""
    parts, perms = [], []
    for h, sizes in enumerate(head_sizes):
        f, perm = make_map(P.rng, sizes)
        parts.append(f + h * hd_small)
        perms.append(perm + h * sum(sizes))
    f = np.concatenate(parts)
    P.info["maps"][name] = f.tolist()
    P.info["perms"][name] = np.concatenate(perms).tolist()
    P.info["sizes"][name] = [int(s) for sizes in head_sizes for s in sizes]
    return f


def planted_transformer(seed=0, qk_shared=True, return_base=False):
    """x (batch, seq 5, 7) -> Linear(7, d_model 8 lifted from 4) ->
    TransformerEncoderLayer(d 8, nhead 2, ff 12 lifted from 6, dropout 0,
    batch_first, post-norm, ReLU) -> mean over seq -> Linear(8, 3).

    Maps: "residual" (d 8 from 4, sizes 3,2,2,1): rows of inp, out_proj,
    linear2 and norm1/norm2 gamma, beta; columns of every reader (in_proj,
    linear1, fc) divided.  "q", "k", "v": per head (head dim 4 from 2, head
    sizes (3,1)/(2,2) for q, (1,3)/(3,1) for v; a feature never leaves its
    head); "k" is "q" unless ``qk_shared=False`` (then its own, sizes (2,2)/(1,3)).
    out_proj columns divided along "v".  "ff" (12 from 6, sizes 3,1,2,2,3,1).
    The big model keeps torch's 1/sqrt(4) scale and LayerNorm over 8 features,
    so it is NOT equal to the small model (no ``exact_base``); only the fibers
    are exact.  ``return_base``: the small model the parameters came from.

    fibers: "inp", "attn.out_proj", "add1", "norm1", "ff.linear2", "add2",
    "norm2", "pool" (residual fibers, 8 units); "attn.q", "attn.k", "attn.v",
    "attn.context" (8 units each; context follows v); "attn.in_proj" (24 units
    [q; k; v], k and v fibers shifted by 8 and 16); "ff.linear1" (12); "fc"
    (3, singletons).  Extra key "qk_pairs": per head, the classes of that
    head's features (indices 0..3 within the head) by (colour_q, colour_k)
    pairs: the compressed head dim is the number of classes.
    """
    n_in, d, ds, nh, ff, ffs, n_out = 7, 8, 4, 2, 12, 6, 3
    hd, hds = d // nh, ds // nh
    P = _Planter(seed, "transformer")
    big = TransformerNet(n_in, d, nh, ff, n_out)
    small = TransformerNet(n_in, ds, nh, ffs, n_out)
    fr = P.map("residual", (3, 2, 2, 1))
    fq = _head_map(P, "q", [(3, 1), (2, 2)], hds)
    if qk_shared:
        fk = fq
        for key in ("maps", "perms", "sizes"):
            P.info[key]["k"] = P.info[key]["q"]
    else:
        fk = _head_map(P, "k", [(2, 2), (1, 3)], hds)
    fv = _head_map(P, "v", [(1, 3), (3, 1)], hds)
    fff = P.map("ff", (3, 1, 2, 2, 3, 1))

    def put(mod_s, mod_b, name, arr_s, arr_b):
        _set(getattr(mod_s, name), arr_s)
        _set(getattr(mod_b, name), arr_b)

    W, b = P.normal(ds, n_in), P.bias(ds)
    put(small.inp, big.inp, "weight", W, lift(W, fr, None))
    put(small.inp, big.inp, "bias", b, lift(b, fr))
    mha_s, mha_b = small.enc.self_attn, big.enc.self_attn
    Wq, Wk, Wv = P.normal(ds, ds), P.normal(ds, ds), P.normal(ds, ds)
    bq, bk, bv = P.bias(ds), P.bias(ds), P.bias(ds)
    put(mha_s, mha_b, "in_proj_weight", np.concatenate([Wq, Wk, Wv]),
        np.concatenate([lift(Wq, fq, fr), lift(Wk, fk, fr), lift(Wv, fv, fr)]))
    put(mha_s, mha_b, "in_proj_bias", np.concatenate([bq, bk, bv]),
        np.concatenate([lift(bq, fq), lift(bk, fk), lift(bv, fv)]))
    W, b = P.normal(ds, ds), P.bias(ds)
    put(mha_s.out_proj, mha_b.out_proj, "weight", W, lift(W, fr, fv))
    put(mha_s.out_proj, mha_b.out_proj, "bias", b, lift(b, fr))
    enc_s, enc_b = small.enc, big.enc
    for norm in ("norm1", "norm2"):
        g = 1.0 + P.normal(ds, scale=0.3)
        beta = P.bias(ds)
        put(getattr(enc_s, norm), getattr(enc_b, norm), "weight", g, lift(g, fr))
        put(getattr(enc_s, norm), getattr(enc_b, norm), "bias", beta, lift(beta, fr))
    W, b = P.normal(ffs, ds), P.bias(ffs)
    put(enc_s.linear1, enc_b.linear1, "weight", W, lift(W, fff, fr))
    put(enc_s.linear1, enc_b.linear1, "bias", b, lift(b, fff))
    W, b = P.normal(ds, ffs), P.bias(ds)
    put(enc_s.linear2, enc_b.linear2, "weight", W, lift(W, fr, fff))
    put(enc_s.linear2, enc_b.linear2, "bias", b, lift(b, fr))
    W, b = P.normal(n_out, ds), P.bias(n_out)
    put(small.fc, big.fc, "weight", W, lift(W, None, fr))
    put(small.fc, big.fc, "bias", b, b)

    res = fibers_of(fr)
    for name in ("inp", "attn.out_proj", "add1", "norm1", "ff.linear2", "add2", "norm2", "pool"):
        P.layer(name, res, "residual")
    P.layer("attn.q", fibers_of(fq), "q")
    P.layer("attn.k", fibers_of(fk), "k")
    P.layer("attn.v", fibers_of(fv), "v")
    P.layer("attn.context", fibers_of(fv), "v")
    P.layer("attn.in_proj", sorted(fibers_of(fq) + offset(fibers_of(fk), d) + offset(fibers_of(fv), 2 * d)),
            "q+k+v")
    P.layer("ff.linear1", fibers_of(fff), "ff")
    P.layer("fc", singletons(n_out), None)
    P.info["qk_pairs"] = [fibers_of([int(fq[h * hd + j]) * 1000 + int(fk[h * hd + j]) for j in range(hd)])
                          for h in range(nh)]
    P.info.update(n_in=n_in, seq=5, d_model=d, nhead=nh, head_dim=hd, dim_feedforward=ff, n_out=n_out,
                  base_d_model=ds, base_head_dim=hds, base_dim_feedforward=ffs, qk_shared=qk_shared,
                  attention_scale=1.0 / hd ** 0.5, exact_base=False)
    big.eval(), small.eval()
    return (big, P.info, small) if return_base else (big, P.info)


# ---------------------------------------------------------------- residual MLPs
class ResidualMLP(nn.Module):
    """x -> h = relu(fc1(x)); h2 = h + res(relu(h)); y = out(h2)."""

    def __init__(self, n_in=6, width=8, n_out=3):
        super().__init__()
        self.fc1 = nn.Linear(n_in, width)
        self.res = nn.Linear(width, width)
        self.out = nn.Linear(width, n_out)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(h + self.res(torch.relu(h)))

    def taps(self, x):
        """"fc1" / "res" (Linear outputs, before any ReLU), "add" (h2), "fc_out" = "out"."""
        z1 = self.fc1(x)
        h = torch.relu(z1)
        r = self.res(torch.relu(h))
        h2 = h + r
        y = self.out(h2)
        return {"fc1": z1, "res": r, "add": h2, "fc_out": y, "out": y}


def planted_residual_mlp(seed=0, return_base=False):
    """x (batch, 6) -> Linear(6, 8 lifted from 4, sizes 3,1,2,2) -> ReLU -> h;
    h2 = h + Linear(8, 8)(ReLU(h)) (rows and columns along the same map);
    y = Linear(8, 3)(h2).  (ReLU(h) = h: the second ReLU is kept as asked.)

    fibers: "fc1", "res", "add" (all the "hidden" map), "fc_out" (singletons).
    big(x) == base(x).
    """
    n_in, w, ws, n_out = 6, 8, 4, 3
    P = _Planter(seed, "residual_mlp")
    big, small = ResidualMLP(n_in, w, n_out), ResidualMLP(n_in, ws, n_out)
    f = P.map("hidden", (3, 1, 2, 2))
    for name, rows, cols, shape in (("fc1", f, None, (ws, n_in)), ("res", f, f, (ws, ws)),
                                    ("out", None, f, (n_out, ws))):
        W, b = P.normal(*shape, scale=0.7), P.bias(shape[0])
        _set(getattr(small, name).weight, W)
        _set(getattr(small, name).bias, b)
        _set(getattr(big, name).weight, lift(W, rows, cols))
        _set(getattr(big, name).bias, lift(b, rows))
    fib = fibers_of(f)
    for name in ("fc1", "res", "add"):
        P.layer(name, fib, "hidden")
    P.layer("fc_out", singletons(n_out), None)
    P.info.update(n_in=n_in, width=w, base_width=ws, n_out=n_out, exact_base=True)
    big.eval(), small.eval()
    return (big, P.info, small) if return_base else (big, P.info)


class BrokenResidualMLP(nn.Module):
    """x -> h = relu(fc_a(x)); s = fc_skip(x); h2 = h + s; y = fc_out(h2)."""

    def __init__(self, n_in=6, width=8, n_out=3):
        super().__init__()
        self.fc_a = nn.Linear(n_in, width)
        self.fc_skip = nn.Linear(n_in, width)
        self.fc_out = nn.Linear(width, n_out)
        self.eval()

    def forward(self, x):
        return self.fc_out(torch.relu(self.fc_a(x)) + self.fc_skip(x))

    def taps(self, x):
        """"fc_a" (before ReLU), "fc_skip", "add", "fc_out" = "out"."""
        za = self.fc_a(x)
        s = self.fc_skip(x)
        h2 = torch.relu(za) + s
        y = self.fc_out(h2)
        return {"fc_a": za, "fc_skip": s, "add": h2, "fc_out": y, "out": y}


def residual_breaks_fibers(seed=0):
    """A residual Add of two streams with DIFFERENT planted partitions.

    x (batch, 6); h = ReLU(fc_a(x)) with fc_a rows lifted along map "a"
    (classes by position before the shuffle: {0-3}, {4-6}, {7}); skip
    s = fc_skip(x) with rows along map "b" ({0,1}, {2-5}, {6,7}); the SAME
    permutation shuffles both, so the meet is {0,1}, {2,3}, {4,5}, {6}, {7}
    (before the shuffle): three fibers of two and two singletons.
    h2 = h + s: by the AND rule its partition is the meet.  y = fc_out(h2)
    (dense random, Linear(8, 3)).

    fibers: "fc_a" (partition a), "fc_skip" (partition b), "add" (the meet),
    "fc_out" (singletons).  Extra keys "partition_a", "partition_b", "meet".
    """
    n_in, w, n_out = 6, 8, 3
    P = _Planter(seed, "residual_breaks")
    model = BrokenResidualMLP(n_in, w, n_out)
    base_a = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    base_b = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    for _ in range(1000):
        perm = P.rng.permutation(w)
        fa, fb = base_a[perm], base_b[perm]
        m = meet(fibers_of(fa), fibers_of(fb))
        if any(len(cl) > 1 and cl[-1] - cl[0] + 1 != len(cl) for cl in m):
            break
    for name, f in (("a", fa), ("b", fb)):
        P.info["maps"][name] = f.tolist()
        P.info["perms"][name] = perm.tolist()
        P.info["sizes"][name] = np.bincount(f).tolist()
    Wa, ba = P.normal(3, n_in, scale=0.7), P.bias(3)
    Ws, bs = P.normal(3, n_in, scale=0.7), P.bias(3)
    _set(model.fc_a.weight, lift(Wa, fa, None))
    _set(model.fc_a.bias, lift(ba, fa))
    _set(model.fc_skip.weight, lift(Ws, fb, None))
    _set(model.fc_skip.bias, lift(bs, fb))
    _set(model.fc_out.weight, P.normal(n_out, w, scale=0.7))
    _set(model.fc_out.bias, P.bias(n_out))
    pa, pb = fibers_of(fa), fibers_of(fb)
    m = meet(pa, pb)
    P.layer("fc_a", pa, "a")
    P.layer("fc_skip", pb, "b")
    P.layer("add", m, "a&b")
    P.layer("fc_out", singletons(n_out), None)
    P.info.update(partition_a=pa, partition_b=pb, meet=m, n_in=n_in, width=w, n_out=n_out, exact_base=False)
    model.eval()
    return model, P.info


# --------------------------------------------------------------------- inputs
def example_input(info, batch=3, seed=0):
    """A random float32 input of the right shape for the model described by ``info``."""
    g = torch.Generator().manual_seed(seed)
    if "seq" in info:
        shape = (batch, info["seq"], info["n_in"])
        if info.get("batch_first") is False:
            shape = (info["seq"], batch, info["n_in"])
    else:
        shape = (batch, info["n_in"])
    return torch.randn(*shape, generator=g)


# --------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet():
    """No warnings, no stdout prints (the dynamo exporter's progress), no torch.onnx log lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_one(model, example, path, dynamo, dynamic=True, input_name="x", output_name="y"):
    """Export ``model`` to ``path`` with one exporter, check it with onnx.checker."""
    import onnx

    model = model.eval()
    batch_axis = 1 if getattr(model, "batch_first", True) is False else 0
    with _quiet():
        if dynamo:
            shapes = ({batch_axis: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
            torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              dynamo=True, external_data=False, dynamic_shapes=shapes, verbose=False)
        else:
            axes = {input_name: {batch_axis: "batch"}, output_name: {0: "batch"}} if dynamic else None
            torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              dynamo=False, dynamic_axes=axes, opset_version=LEGACY_OPSET)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return str(path)


def export_both(model, example, tmpdir, name=None, dynamic=True):
    """Export with both torch ONNX exporters; returns {"legacy": path, "dynamo": path}.

    legacy: ``torch.onnx.export(..., dynamo=False, opset_version=17)``;
    dynamo: ``dynamo=True, external_data=False`` (its default opset, 20 with
    torch 2.13).  Input "x", output "y".  The batch axis is dynamic for EVERY
    model here with both exporters (LSTM, GRU, Transformer included: dynamic
    export works and onnxruntime matches torch at batch sizes other than the
    example's); ``dynamic=False`` gives static shapes.  For an RNN with
    ``batch_first=False`` the input's batch axis is 1.  Both files pass
    ``onnx.checker.check_model(full_check=True)``.  Files:
    ``tmpdir/<name>_legacy.onnx`` and ``tmpdir/<name>_dynamo.onnx``,
    ``name`` defaulting to the model class name in lower case.
    """
    name = name or type(model).__name__.lower()
    os.makedirs(str(tmpdir), exist_ok=True)
    return {kind: export_one(model, example, os.path.join(str(tmpdir), f"{name}_{kind}.onnx"), dynamo=dyn,
                             dynamic=dynamic)
            for kind, dyn in (("legacy", False), ("dynamo", True))}
