"""Linear rules: a MatMul, Gemm, Conv or ConvTranspose with a constant weight
makes one node per output unit, a dense block of its weights (vectors over
kernels or repeated positions) and a bias edge from a constant node; a weight
that mixes positions only keeps the nodes; a MatMul of two streams
contracting a unit axis (q.k) makes factor nodes per pair and a sum node per
output element."""
from __future__ import annotations

import numpy as np

from fibgraph.errors import InputError
from fibgraph.graph import FACTOR, PER_UNIT, Block

from ..build import Barrier, as_float, dedupe_cols, etype
from ..records import ContractRecord, LinearRecord
from .registry import rule

MATMUL = {"MatMul", "Gemm"}
CONV = {"Conv", "ConvTranspose"}
#: ops with a constant weight matrix: a layer of the report
LINEAR = MATMUL | CONV


@rule(*sorted(MATMUL))
def matmul(b, node, name, a, kinds):
    """MatMul / Gemm with a constant weight (or of two streams: :func:`stream_matmul`)."""
    op = node.op_type
    A, B = node.input[0], node.input[1]
    if op == "MatMul" and kinds[0] == "stream" and kinds[1] == "stream":
        return stream_matmul(b, node, name, a, kinds)
    if op == "Gemm":
        if kinds[0] != "stream" or kinds[1] != "const":
            raise Barrier("Gemm whose weight is not constant")
        if a.get("transA", 0):
            raise Barrier("Gemm with transA=1")
        Bm = as_float(b.consts[B])
        W = Bm if a.get("transB", 0) else Bm.T                                   # (N, K), a view
        if float(a.get("alpha", 1.0)) != 1.0:
            W = float(a.get("alpha", 1.0)) * W
        xi, x_axis = A, 1
    else:
        if kinds[1] == "const" and kinds[0] == "stream":
            Bm = as_float(b.consts[B])
            if Bm.ndim != 2:
                raise Barrier("MatMul with a weight of rank != 2")
            W = Bm.T
            xi, x_axis = A, -1
        elif kinds[0] == "const" and kinds[1] == "stream":
            Am = as_float(b.consts[A])
            if Am.ndim != 2:
                raise Barrier("MatMul with a weight of rank != 2")
            W = Am
            xi, x_axis = B, -2
        else:
            raise Barrier("MatMul operand is neither a stream nor a constant")
    ids = b.layout[xi]
    if ids.ndim < 2 and x_axis == -2:
        raise Barrier("MatMul of a constant with a vector")
    ax = x_axis + ids.ndim if x_axis < 0 else x_axis
    other_unit = [k for k in range(ids.ndim) if k != ax and ids.shape[k] > 1]
    if np.any(~np.isfinite(W)):
        raise InputError(f"{b.label}: node {name!r} ({op}): weight {B!r} holds NaN or Inf")
    one_unit = ids.size == 1 and b.shapes[xi][ax] == 1      # one feature: (N, 1) @ W (1, n)
    if ids.shape[ax] == 1 and not one_unit:
        # the weight mixes positions (time, space): the same map for every unit
        b.layout[node.output[0]] = ids
        return "positional"
    if other_unit:
        raise Barrier(f"{op} over a tensor with units on several axes")
    wname = B if xi == A else A
    s = b.new_space(W.shape[0], "linear", name, weight=wname)
    sid = len(b.spaces) - 1
    col_ids = np.moveaxis(ids, ax, -1).reshape(-1)
    if col_ids.size != W.shape[1]:
        raise Barrier(f"{op} weight of {W.shape[1]} inputs reads {col_ids.size} positions")
    src, Wd = dedupe_cols(W[:, :, None], col_ids)
    D = Wd.shape[2]
    b.dense(src, s.ids, Wd, wname)
    bias = None
    if op == "Gemm" and len(node.input) > 2 and node.input[2]:
        c = np.asarray(b.values.get(node.input[2], b.consts.get(node.input[2])), dtype=np.float64)
        if c.size not in (1, W.shape[0]):
            raise Barrier("Gemm bias does not broadcast per unit")
        if not np.all(np.isfinite(c)):
            raise InputError(f"{b.label}: node {name!r} ({op}): bias {node.input[2]!r} holds NaN or Inf")
        bias = float(a.get("beta", 1.0)) * np.broadcast_to(c.reshape(-1), (W.shape[0],))
        cn = b.const_node(name)
        b.sparse(np.full(s.n, cn), s.ids, bias, etype("bias"), f"{wname}:bias")
    shape = [1] * len(b.shapes[node.output[0]])
    out_ax = ax if op == "Gemm" else (len(shape) - 1 if x_axis == -1 else len(shape) - 2)
    shape[out_ax] = s.n
    b.layout[node.output[0]] = s.ids.reshape(shape)
    b.records.append(LinearRecord(node=node.name, op=op, input=xi, weight=wname, space=sid,
                                  output=node.output[0], D=D, x_axis=x_axis, attrs=a))
    return "layer"


def stream_matmul(b, node, name, a, kinds):
    """MatMul of two streams: factor nodes per (a, b) pair, a sum node per output element."""
    A, B = node.input
    ia, ib = b.layout[A], b.layout[B]
    if ia.ndim < 2 or ib.ndim < 2:
        raise Barrier("MatMul of vectors")
    r = max(ia.ndim, ib.ndim)
    ia = ia.reshape((1,) * (r - ia.ndim) + ia.shape)
    ib = ib.reshape((1,) * (r - ib.ndim) + ib.shape)
    batch = np.broadcast_shapes(ia.shape[:-2], ib.shape[:-2])
    Ka, Kb = ia.shape[-1], ib.shape[-2]
    ia_b = np.broadcast_to(ia, batch + ia.shape[-2:])
    ib_b = np.broadcast_to(ib, batch + ib.shape[-2:])
    M, N = ia.shape[-2], ib.shape[-1]
    if Ka == 1 and Kb == 1:
        # contraction over a positional axis (attention weights @ V): AND of both
        return b.combine([ia_b[..., :, :1], ib_b[..., :1, :]], node.output[0], name,
                             ("matmul-pos",), kind=FACTOR)
    K = max(Ka, Kb)
    # factors per (batch, m, k, n): (A[b, m, k], B[b, k, n]); output node per (batch, m, n)
    fa = np.broadcast_to(ia_b[..., :, :, None], batch + (M, K, N))
    fb = np.broadcast_to(ib_b[..., None, :, :], batch + (M, K, N))
    pairs = np.stack([fa.reshape(-1), fb.reshape(-1)], 1)
    uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
    fs = b.new_space(uniq.shape[0], FACTOR, name)
    et = etype("matmul-k", name)
    b.sparse(uniq[:, 0], fs.ids, np.ones(fs.n), etype("matmul-k", 0), f"{name}:a")
    b.sparse(uniq[:, 1], fs.ids, np.ones(fs.n), etype("matmul-k", 1), f"{name}:b")
    n_out = int(np.prod(batch + (M, N)))
    os_ = b.new_space(n_out, "linear", name)
    out_of = np.broadcast_to(np.arange(n_out).reshape(batch + (M, 1, N)), batch + (M, K, N)).reshape(-1)
    b.sparse(fs.start + inv.reshape(-1), os_.start + out_of, np.ones(out_of.size), et, f"{name}:sum")
    b.joins.append((fa.reshape(-1), fb.reshape(-1)))
    b.joins.append((fa.reshape(-1), fs.start + inv.reshape(-1)))
    b.layout[node.output[0]] = os_.ids.reshape(batch + (M, N))
    b.records.append(ContractRecord(node=node.name, inputs=[A, B], output=node.output[0], a_axis=-1, b_axis=-2))
    return FACTOR


@rule(*sorted(CONV))
def conv(b, node, name, a, kinds):
    """Conv / ConvTranspose with a constant weight: one node per output channel (depthwise: sparse)."""
    op = node.op_type
    x = node.input[0]
    if kinds[1] != "const":
        raise Barrier(f"{op} whose weight is not constant")
    ids = b.layout[x]
    if any(ids.shape[k] > 1 for k in range(ids.ndim) if k != 1):
        raise Barrier(f"{op} over a tensor whose units are not on axis 1")
    W = as_float(b.consts[node.input[1]])
    if np.any(~np.isfinite(W)):
        raise InputError(f"{b.label}: node {name!r} ({op}): weight {node.input[1]!r} holds NaN or Inf")
    group = int(a.get("group", 1))
    cin = ids.reshape(-1)
    if op == "ConvTranspose":
        if group != 1:
            raise Barrier("grouped ConvTranspose")
        Wu = np.moveaxis(W, 0, 1)                       # (C_out, C_in, k...)
    else:
        Wu = W
    c_out = Wu.shape[0]
    K = int(np.prod(Wu.shape[2:]))
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = np.asarray(b.consts.get(node.input[2], b.values.get(node.input[2])),
                          dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(bias)):
            raise InputError(f"{b.label}: node {name!r} ({op}): bias {node.input[2]!r} holds NaN or Inf")
    if group == 1:
        if cin.size != Wu.shape[1]:
            raise Barrier(f"{op} weight expects {Wu.shape[1]} channels, the tensor has {cin.size}")
        s = b.new_space(c_out, "linear", name, weight=node.input[1])
        sid = len(b.spaces) - 1
        src, Wd = dedupe_cols(Wu.reshape(c_out, cin.size, K), cin)
        b.dense(src, s.ids, Wd, node.input[1])
    elif op == "Conv" and group == cin.size and c_out % group == 0 and Wu.shape[1] == 1:
        # depthwise (one input channel per group, any multiplier): a layer
        # whose output channel o reads input channel o // multiplier, as a
        # sparse block; the writer keeps it depthwise where the base allows
        # it (see the writer's grouped conv rule)
        s = b.new_space(c_out, "linear", name, weight=node.input[1])
        sid = len(b.spaces) - 1
        gi, go = cin.size // group, c_out // group
        rows = np.repeat(np.arange(c_out), gi)
        cols = (rows // go) * gi + np.tile(np.arange(gi), c_out)
        b.blocks.append(Block(src=cin, dst=s.ids, rows=rows, cols=cols,
                                 values=Wu.reshape(c_out * gi, K), name=node.input[1]))
    else:
        raise Barrier(f"grouped {op} (group={group})")
    if bias is not None:
        cn = b.const_node(name)
        b.sparse(np.full(s.n, cn), s.ids, bias, etype("bias"), f"{node.input[1]}:bias")
    shape = [1] * ids.ndim
    shape[1] = c_out
    b.layout[node.output[0]] = s.ids.reshape(shape)
    depthwise = s.kind == PER_UNIT
    b.records.append(LinearRecord(node=node.name, op=op, input=x, weight=node.input[1], space=sid,
                                  output=node.output[0], x_axis=1, attrs=a, depthwise=depthwise))
    return PER_UNIT if depthwise else "layer"
