"""Element-wise ONNX ops as torch functions (unary, binary, variadic, activations, casts)."""
from __future__ import annotations

from functools import reduce

import torch
import torch.nn.functional as F

from .registry import CHECKS, DTYPES, OPS, axis_index, op, prod, unsupported


def unary(name, fn):
    OPS[name] = lambda n, xs: fn(xs[0])


for _name, _fn in {
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
    "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
    "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus, "Softsign": F.softsign,
    "HardSwish": F.hardswish, "Mish": F.mish, "Not": torch.logical_not, "IsNaN": torch.isnan,
}.items():
    unary(_name, _fn)


def _div(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a, b):
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "MatMul": torch.matmul,
}.items():
    OPS[_name] = (lambda f: lambda n, xs: f(xs[0], xs[1]))(_fn)

for _name, _fn in {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}.items():
    OPS[_name] = (lambda f: lambda n, xs: reduce(f, xs))(_fn)


@op("Mean")
def _mean(n, xs):
    return reduce(torch.add, xs) / len(xs)


@op("Mod")
def _mod(n, xs):
    a, b = xs
    if n.get("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@op("LeakyRelu")
def _leaky(n, xs):
    return F.leaky_relu(xs[0], n.get("alpha", 0.01))


@op("Elu")
def _elu(n, xs):
    return F.elu(xs[0], n.get("alpha", 1.0))


@op("Celu")
def _celu(n, xs):
    return F.celu(xs[0], n.get("alpha", 1.0))


@op("Selu")
def _selu(n, xs):
    a, g = n.get("alpha", 1.67326319217681884765625), n.get("gamma", 1.05070102214813232421875)
    x = xs[0]
    return g * torch.where(x > 0, x, a * (torch.exp(x) - 1))


@op("ThresholdedRelu")
def _trelu(n, xs):
    x = xs[0]
    return torch.where(x > n.get("alpha", 1.0), x, torch.zeros_like(x))


@op("PRelu")
def _prelu(n, xs):
    x, s = xs
    return torch.where(x < 0, s * x, x)


@op("HardSigmoid")
def _hsig(n, xs):
    return torch.clamp(n.get("alpha", 0.2) * xs[0] + n.get("beta", 0.5), 0.0, 1.0)


@op("Gelu")
def _gelu(n, xs):
    return F.gelu(xs[0], approximate=n.get("approximate", "none"))


def _softmax_like(fn):
    def run(n, xs):
        x = xs[0]
        r = x.dim()
        if n.opset >= 13:
            return fn(x, axis_index(n.get("axis", -1), r))
        a = axis_index(n.get("axis", 1), r)
        shape = x.shape
        return fn(x.reshape(prod(shape[:a]), prod(shape[a:])), 1).reshape(shape)
    return run


OPS["Softmax"] = _softmax_like(F.softmax)
OPS["LogSoftmax"] = _softmax_like(F.log_softmax)


@op("Clip")
def _clip(n, xs):
    x = xs[0]
    if n.opset < 11:
        lo, hi = n.get("min"), n.get("max")
    else:
        lo = xs[1] if len(xs) > 1 else None
        hi = xs[2] if len(xs) > 2 else None
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


@op("Identity")
def _identity(n, xs):
    return xs[0]


@op("Dropout")
def _dropout(n, xs):
    x = xs[0]
    if n.want(1):
        return x, torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return x


@op("Cast")
def _cast(n, xs):
    return xs[0].to(DTYPES[n.get("to")])


def _check_cast(n):
    if n.get("to") not in DTYPES:
        raise unsupported(n.op, f"to={n.get('to')}")


CHECKS["Cast"] = _check_cast


@op("CastLike")
def _castlike(n, xs):
    return xs[0].to(xs[1].dtype)


