"""Gemm, Einsum, normalisations, convolutions and pooling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import CHECKS, axis_index, op, unsupported


# ------------------------------------------------------------------ linear algebra, norms
@op("Gemm")
def _gemm(n, xs):
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    if n.get("transA", 0):
        a = a.t()
    if n.get("transB", 0):
        b = b.t()
    alpha, beta = n.get("alpha", 1.0), n.get("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = alpha * y
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else beta * c)
    return y


@op("Einsum")
def _einsum(n, xs):
    return torch.einsum(n.get("equation").replace(" ", ""), *xs)


@op("LayerNormalization")
def _layernorm(n, xs):
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    r = x.dim()
    a = axis_index(n.get("axis", -1), r)
    eps = n.get("epsilon", 1e-5)
    dims = tuple(range(a, r))
    norm_shape = tuple(x.shape[a:])
    if not n.want(1) and not n.want(2) and tuple(scale.shape) == norm_shape and (
            bias is None or tuple(bias.shape) == norm_shape):
        return F.layer_norm(x, norm_shape, scale, bias, eps)
    xf = x.float() if n.get("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(dims, keepdim=True)
    d = xf - mean
    inv = torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)
    y = (d * inv).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    outs = [y, mean, inv]
    return tuple(outs[:len(n.outputs)]) if len(n.outputs) > 1 else y


@op("BatchNormalization")
def _batchnorm(n, xs):
    x, scale, b, mean, var = xs[:5]
    shp = (1, -1) + (1,) * (x.dim() - 2)
    eps = n.get("epsilon", 1e-5)
    k = scale / torch.sqrt(var + eps)
    return (x - mean.reshape(shp)) * k.reshape(shp) + b.reshape(shp)


def _check_bn(n):
    if n.get("training_mode", 0):
        raise unsupported(n.op, "training_mode=1; only inference")
    if any(n.want(k) for k in (1, 2, 3, 4)):
        raise unsupported(n.op, "running statistics outputs; only inference")


CHECKS["BatchNormalization"] = _check_bn


# ------------------------------------------------------------------ conv / pool
def _spatial_pads(n, x, kernel, strides, dilations, transpose=False):
    """(begin, end) pads per spatial axis for Conv / pools."""
    nsp = len(kernel)
    auto = n.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nsp):
            d = x.shape[2 + i]
            out = -(-d // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - d, 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
        return begin, end
    if auto == "VALID":
        return [0] * nsp, [0] * nsp
    pads = n.get("pads") or [0] * (2 * nsp)
    return list(pads[:nsp]), list(pads[nsp:])


def _flat_pads(begin, end):
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return flat


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_spatial(n):
    if n.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise unsupported(n.op, f"auto_pad {n.get('auto_pad')}")
    k = n.get("kernel_shape")
    if k is not None and len(k) not in (1, 2, 3):
        raise unsupported(n.op, f"{len(k)} spatial axes")


def _conv_args(n, xs, table):
    """x, w, bias, spatial rank, kernel, strides, dilations of a Conv/ConvTranspose."""
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nsp = x.dim() - 2
    if nsp not in table:
        raise unsupported(n.op, f"{nsp} spatial axes")
    kernel = list(n.get("kernel_shape") or w.shape[2:])
    strides = list(n.get("strides") or [1] * nsp)
    dil = list(n.get("dilations") or [1] * nsp)
    return x, w, b, nsp, kernel, strides, dil


@op("Conv", check=_check_spatial)
def _conv(n, xs):
    x, w, b, nsp, kernel, strides, dil = _conv_args(n, xs, _CONV)
    begin, end = _spatial_pads(n, x, kernel, strides, dil)
    if begin != end:
        x = F.pad(x, _flat_pads(begin, end))
        begin = [0] * nsp
    return _CONV[nsp](x, w, b, strides, begin, dil, n.get("group", 1))


@op("ConvTranspose")
def _convt(n, xs):
    x, w, b, nsp, kernel, strides, dil = _conv_args(n, xs, _CONVT)
    opad = list(n.get("output_padding") or [0] * nsp)
    full = [strides[i] * (x.shape[2 + i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nsp)]
    out_shape = n.get("output_shape")
    auto = n.get("auto_pad", "NOTSET")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is None:
            out_shape = [x.shape[2 + i] * strides[i] for i in range(nsp)]
        out_shape = list(out_shape)[-nsp:]
        begin, end = [], []
        for i in range(nsp):
            total = full[i] - out_shape[i]
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
    elif auto == "VALID":
        begin, end = [0] * nsp, [0] * nsp
    else:
        pads = n.get("pads") or [0] * (2 * nsp)
        begin, end = list(pads[:nsp]), list(pads[nsp:])
    y = _CONVT[nsp](x, w, None, strides, 0, 0, n.get("group", 1), dil)
    if any(opad):
        y = F.pad(y, _flat_pads([0] * nsp, opad))
    idx = [slice(None), slice(None)] + [slice(begin[i], y.shape[2 + i] - end[i]) for i in range(nsp)]
    y = y[tuple(idx)]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nsp)
    return y


CHECKS["ConvTranspose"] = _check_spatial


def _pool_args(n, x):
    kernel = list(n.get("kernel_shape"))
    nsp = len(kernel)
    strides = list(n.get("strides") or [1] * nsp)
    dil = list(n.get("dilations") or [1] * nsp)
    begin, end = _spatial_pads(n, x, kernel, strides, dil)
    return kernel, strides, dil, begin, end


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _check_pool(n):
    _check_spatial(n)
    if n.get("kernel_shape") is None:
        raise unsupported(n.op, "no kernel_shape")
    if n.op == "MaxPool" and n.want(1):
        raise unsupported(n.op, "the Indices output")
    if n.op == "AveragePool" and any(d != 1 for d in (n.get("dilations") or [])):
        raise unsupported(n.op, "dilations")


@op("MaxPool", check=_check_pool)
def _maxpool(n, xs):
    x = xs[0]
    kernel, strides, dil, begin, end = _pool_args(n, x)
    nsp = len(kernel)
    ceil = bool(n.get("ceil_mode", 0))
    if begin != end or any(2 * p > k for p, k in zip(begin, kernel)):
        x = F.pad(x, _flat_pads(begin, end), value=-math.inf)
        begin = [0] * nsp
    return _MAXPOOL[nsp](x, kernel, strides, begin, dil, ceil_mode=ceil)


@op("AveragePool", check=_check_pool)
def _avgpool(n, xs):
    x = xs[0]
    kernel, strides, dil, begin, end = _pool_args(n, x)
    nsp = len(kernel)
    ceil = bool(n.get("ceil_mode", 0))
    incl = bool(n.get("count_include_pad", 0))
    pool = _AVGPOOL[nsp]
    if begin == end and all(2 * p <= k for p, k in zip(begin, kernel)):
        return pool(x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=incl)
    flat = _flat_pads(begin, end)
    xp = F.pad(x, flat)
    s = pool(xp, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if incl:
        return s
    ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), flat)
    return s / pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)


@op("GlobalAveragePool")
def _gap(n, xs):
    x = xs[0]
    return x.mean(tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _gmp(n, xs):
    x = xs[0]
    return torch.amax(x, tuple(range(2, x.dim())), keepdim=True)


