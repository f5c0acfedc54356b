"""LSTM, GRU, RNN (masked steps, both directions) and the opset-23 Attention op."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fibgraph.errors import InputError

from .registry import op, unsupported

# ------------------------------------------------------------------ recurrent
_RNN_ACTS = {   # name -> (uses alpha, uses beta, default alpha, default beta, fn)
    "sigmoid": (0, 0, 0, 0, lambda x, a, b: torch.sigmoid(x)),
    "tanh": (0, 0, 0, 0, lambda x, a, b: torch.tanh(x)),
    "relu": (0, 0, 0, 0, lambda x, a, b: torch.relu(x)),
    "hardsigmoid": (1, 1, 0.2, 0.5, lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0)),
    "leakyrelu": (1, 0, 0.01, 0, lambda x, a, b: F.leaky_relu(x, a)),
    "thresholdedrelu": (1, 0, 1.0, 0, lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x))),
    "scaledtanh": (1, 1, 1.0, 1.0, lambda x, a, b: a * torch.tanh(b * x)),
    "affine": (1, 1, 1.0, 0.0, lambda x, a, b: a * x + b),
    "elu": (1, 0, 1.0, 0, lambda x, a, b: F.elu(x, a)),
    "softsign": (0, 0, 0, 0, lambda x, a, b: F.softsign(x)),
    "softplus": (0, 0, 0, 0, lambda x, a, b: F.softplus(x)),
}
_RNN_DEFAULT = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _rnn_acts(n):
    """Per direction, the list of activation callables (alpha / beta consumed in order)."""
    dirs = 2 if n.get("direction", "forward") == "bidirectional" else 1
    names = n.get("activations")
    base = _RNN_DEFAULT[n.op]
    if not names:
        names = base * dirs
    if len(names) != len(base) * dirs:
        raise unsupported(n.op, f"{len(names)} activations for {dirs} direction(s)")
    alphas, betas = list(n.get("activation_alpha") or []), list(n.get("activation_beta") or [])
    out = []
    for name in names:
        key = name.lower()
        if key not in _RNN_ACTS:
            raise unsupported(n.op, f"activation {name}")
        ua, ub, da, db, fn = _RNN_ACTS[key]
        a = alphas.pop(0) if ua and alphas else da
        b = betas.pop(0) if ub and betas else db
        out.append((lambda f, a, b: lambda x: f(x, a, b))(fn, a, b))
    k = len(base)
    return [out[d * k:(d + 1) * k] for d in range(dirs)]


def _check_rnn(n):
    if n.get("direction", "forward") not in ("forward", "reverse", "bidirectional"):
        raise unsupported(n.op, f"direction {n.get('direction')}")
    if n.get("layout", 0) not in (0, 1):
        raise unsupported(n.op, f"layout {n.get('layout')}")
    n.acts = _rnn_acts(n)


def _rnn_common(n, xs, n_state):
    """Inputs in layout 0 plus bookkeeping for LSTM / GRU / RNN."""
    xs = list(xs) + [None] * (8 - len(xs))
    X, W, R, B, lens = xs[:5]
    init = xs[5:5 + n_state]
    layout = n.get("layout", 0)
    if layout:
        X = X.transpose(0, 1)
        init = [None if s is None else s.transpose(0, 1) for s in init]
    T, Bsz = X.shape[0], X.shape[1]
    H = n.get("hidden_size") or R.shape[-1]
    direction = n.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    mask = None
    if lens is not None:
        lens = lens.to(X.device).long()
        if bool((lens != T).any()):
            mask = torch.arange(T, device=X.device)[:, None] < lens[None, :]   # [T, B]
    return X, W, R, B, init, T, Bsz, H, dirs, direction, mask, layout, xs


def _rnn_outputs(n, ys, finals, layout):
    """ys: per direction [T, B, H]; finals: list over states of per-direction [B, H]."""
    Y = torch.stack(ys, 1)                                  # [T, dirs, B, H]
    states = [torch.stack(f, 0) for f in finals]            # [dirs, B, H]
    if layout:
        Y = Y.permute(2, 0, 1, 3)
        states = [s.transpose(0, 1) for s in states]
    outs = [Y] + states
    return tuple(outs[:len(n.outputs)]) if len(n.outputs) > 1 else Y


def _step_mask(mask, t, new, old):
    if mask is None:
        return new
    return torch.where(mask[t][:, None], new, old)


def _step(mask, t, h_new, h, out):
    """Output ``out[t]`` of step ``t`` (zero where the sequence has ended) and
    the state after it (held there)."""
    out[t] = h_new if mask is None else torch.where(mask[t][:, None], h_new, torch.zeros_like(h_new))
    return _step_mask(mask, t, h_new, h)


def _time_order(T, rev):
    return range(T - 1, -1, -1) if rev else range(T)


@op("LSTM", check=_check_rnn)
def _lstm(n, xs):
    X, W, R, B, init, T, Bsz, H, dirs, direction, mask, layout, xs = _rnn_common(n, xs, 2)
    P = xs[7]
    clip = n.get("clip")
    fgate_coupled = bool(n.get("input_forget", 0))
    ys, hs, cs = [], [], []
    cl = (lambda v: v) if clip is None else (lambda v: torch.clamp(v, -clip, clip))
    for d in range(dirs):
        f, g, h_act = n.acts[d]
        rev = direction == "reverse" or d == 1
        gx = X @ W[d].t()
        if B is not None:
            gx = gx + (B[d, :4 * H] + B[d, 4 * H:])
        h = init[0][d] if init[0] is not None else X.new_zeros(Bsz, H)
        c = init[1][d] if init[1] is not None else X.new_zeros(Bsz, H)
        pi = po = pf = None
        if P is not None:
            pi, po, pf = P[d, :H], P[d, H:2 * H], P[d, 2 * H:]
        Rt = R[d].t()
        out = [None] * T
        for t in _time_order(T, rev):
            z = gx[t] + h @ Rt
            zi, zo, zf, zc = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
            if pi is not None:
                zi = zi + pi * c
                zf = zf + pf * c
            i = f(cl(zi))
            ft = 1 - i if fgate_coupled else f(cl(zf))
            c_new = ft * c + i * g(cl(zc))
            if po is not None:
                zo = zo + po * c_new
            h_new = f(cl(zo)) * h_act(c_new)
            h, c = _step(mask, t, h_new, h, out), _step_mask(mask, t, c_new, c)
        ys.append(torch.stack(out, 0))
        hs.append(h)
        cs.append(c)
    return _rnn_outputs(n, ys, [hs, cs], layout)


@op("GRU", check=_check_rnn)
def _gru(n, xs):
    X, W, R, B, init, T, Bsz, H, dirs, direction, mask, layout, xs = _rnn_common(n, xs, 1)
    clip = n.get("clip")
    lbr = bool(n.get("linear_before_reset", 0))
    cl = (lambda v: v) if clip is None else (lambda v: torch.clamp(v, -clip, clip))
    ys, hs = [], []
    for d in range(dirs):
        f, g = n.acts[d]
        rev = direction == "reverse" or d == 1
        gx = X @ W[d].t()
        if B is not None:
            gx = gx + B[d, :3 * H]
            rb = B[d, 3 * H:]
        else:
            rb = None
        h = init[0][d] if init[0] is not None else X.new_zeros(Bsz, H)
        Rzr, Rh = R[d, :2 * H].t(), R[d, 2 * H:].t()
        out = [None] * T
        for t in _time_order(T, rev):
            hzr = h @ Rzr
            if rb is not None:
                hzr = hzr + rb[:2 * H]
            z = f(cl(gx[t, :, :H] + hzr[:, :H]))
            r = f(cl(gx[t, :, H:2 * H] + hzr[:, H:]))
            if lbr:
                hh = h @ Rh
                if rb is not None:
                    hh = hh + rb[2 * H:]
                hh = r * hh
            else:
                hh = (r * h) @ Rh
                if rb is not None:
                    hh = hh + rb[2 * H:]
            ht = g(cl(gx[t, :, 2 * H:] + hh))
            h_new = (1 - z) * ht + z * h
            h = _step(mask, t, h_new, h, out)
        ys.append(torch.stack(out, 0))
        hs.append(h)
    return _rnn_outputs(n, ys, [hs], layout)


@op("RNN", check=_check_rnn)
def _rnn(n, xs):
    X, W, R, B, init, T, Bsz, H, dirs, direction, mask, layout, xs = _rnn_common(n, xs, 1)
    clip = n.get("clip")
    cl = (lambda v: v) if clip is None else (lambda v: torch.clamp(v, -clip, clip))
    ys, hs = [], []
    for d in range(dirs):
        (f,) = n.acts[d]
        rev = direction == "reverse" or d == 1
        gx = X @ W[d].t()
        if B is not None:
            gx = gx + (B[d, :H] + B[d, H:])
        h = init[0][d] if init[0] is not None else X.new_zeros(Bsz, H)
        Rt = R[d].t()
        out = [None] * T
        for t in _time_order(T, rev):
            h_new = f(cl(gx[t] + h @ Rt))
            h = _step(mask, t, h_new, h, out)
        ys.append(torch.stack(out, 0))
        hs.append(h)
    return _rnn_outputs(n, ys, [hs], layout)


# ------------------------------------------------------------------ attention (opset 23)
def _check_attention(n):
    if n.get("qk_matmul_output_mode", 0) not in (0, 1, 2, 3):
        raise unsupported(n.op, f"qk_matmul_output_mode {n.get('qk_matmul_output_mode')}")
    if len(n.inputs) > 6 and n.inputs[6]:
        raise unsupported(n.op, "nonpad_kv_seqlen")


@op("Attention", check=_check_attention)
def _attention(n, xs):
    xs = list(xs) + [None] * (6 - len(xs))
    q, k, v, mask, past_k, past_v = xs[:6]
    three_d = q.dim() == 3
    if three_d:
        qh, kvh = n.get("q_num_heads"), n.get("kv_num_heads")
        if not qh or not kvh:
            raise InputError("onnx -> torch: Attention with 3-D inputs needs q_num_heads and kv_num_heads")
        Bq, Sq = q.shape[0], q.shape[1]
        q = q.reshape(Bq, Sq, qh, -1).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], kvh, -1).transpose(1, 2)
        v = v.reshape(v.shape[0], v.shape[1], kvh, -1).transpose(1, 2)
    if past_k is not None:
        k = torch.cat([past_k, k], 2)
    if past_v is not None:
        v = torch.cat([past_v, v], 2)
    present_k, present_v = k, v
    nq, nkv = q.shape[1], k.shape[1]
    if nq != nkv:
        k = k.repeat_interleave(nq // nkv, 1)
        v = v.repeat_interleave(nq // nkv, 1)
    hd = q.shape[-1]
    scale = n.get("scale")
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    qk0 = s
    cap = n.get("softcap", 0.0)
    if cap and cap > 0:
        s = cap * torch.tanh(s / cap)
    qk1 = s
    Sq, Skv = s.shape[-2], s.shape[-1]
    bias = None
    if n.get("is_causal", 0):
        off = past_k.shape[2] if past_k is not None else 0
        keep = torch.ones(Sq, Skv, dtype=torch.bool, device=s.device).tril(off)
        bias = torch.zeros(Sq, Skv, dtype=s.dtype, device=s.device).masked_fill(~keep, -math.inf)
    if mask is not None:
        if mask.shape[-1] < Skv:
            padv = False if mask.dtype == torch.bool else -math.inf
            mask = F.pad(mask, (0, Skv - mask.shape[-1]), value=padv)
        if mask.dtype == torch.bool:
            mb = torch.zeros(mask.shape, dtype=s.dtype, device=s.device).masked_fill(~mask, -math.inf)
        else:
            mb = mask.to(s.dtype)
        bias = mb if bias is None else bias + mb
    if bias is not None:
        s = s + bias
    qk2 = s
    p = torch.softmax(s, -1)
    if bias is not None:       # a fully masked row gives zeros, not NaN
        dead = torch.isneginf(bias.amax(-1, keepdim=True))
        if bool(dead.any()):
            p = torch.where(dead, torch.zeros_like(p), p)
    y = p @ v
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    outs = [y, present_k, present_v, [qk0, qk1, qk2, p][n.get("qk_matmul_output_mode", 0)]]
    return tuple(outs[:len(n.outputs)]) if len(n.outputs) > 1 else y




