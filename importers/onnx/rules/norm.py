"""Normalisation rules: BatchNormalization / InstanceNormalization (one
per-unit node per channel with the channel's affine map as a constant edge)
and LayerNormalization (statistics nodes over the normalised axes, then the
AND rule with per-unit gamma and beta)."""
from __future__ import annotations

import numpy as np

from fibgraph.graph import NORM, PER_UNIT

from ..build import Barrier, etype, opset
from ..records import ChannelNormRecord, LayerNormRecord
from .registry import rule

CHANNEL_NORM = {"BatchNormalization", "InstanceNormalization"}
NORM_OPS = CHANNEL_NORM | {"LayerNormalization"}


@rule(*sorted(CHANNEL_NORM))
def channel_norm(b, node, name, a, kinds):
    """BatchNormalization / InstanceNormalization: one per-unit node per
    channel (axis 1) reading its channel, with the channel's parameters as a
    constant edge, so that a fiber's channels must share them (the base keeps
    one entry per group; see the writer's channel_norm rule).

    BatchNormalization with running statistics (inference) is the affine map
    ``mul * x + add`` with ``mul = scale / sqrt(var + epsilon)`` and
    ``add = B - mul * mean``: the edge carries ``(mul, add)``, so channels
    whose raw (scale, B, mean, var) differ but whose maps agree are one
    fiber, and with eps > 0 the maps are clustered (with their layer's
    criterion, docs/design.md section 5).  In training mode (``training_mode=1``,
    or running-statistics outputs before opset 14) each channel is
    normalised by its own batch statistics, a function of that channel
    alone, so the edge carries ``(scale, B)``; the running-statistics
    outputs must be unused (they would be a second stream).  InstanceNorm:
    per-sample statistics of the channel, the edge carries ``(scale, B)``."""
    x = node.input[0]
    ids = b.layout[x]
    if node.op_type == "BatchNormalization":
        if not int(a.get("spatial", 1)):
            raise Barrier("BatchNormalization with spatial=0 (parameters per position)")
        extra = [o for o in node.output[1:] if o]
        if any(o in b.consumers or o in {v.name for v in b.model.graph.output} for o in extra):
            raise Barrier("BatchNormalization whose running statistics are used")
        sc, shift, mean, var = (np.asarray(b.values[t], dtype=np.float64).reshape(-1) for t in node.input[1:5])
        training = bool(int(a.get("training_mode", 0)) or (extra and opset(b.model) < 14))
        if training:
            params = np.stack([sc, shift], 1)
        else:
            mul = sc / np.sqrt(var + float(a.get("epsilon", 1e-5)))
            add = shift - mul * mean
            params = np.stack([mul, add], 1)
    else:
        training = False
        sc, shift = (np.asarray(b.values[t], dtype=np.float64).reshape(-1) for t in node.input[1:3])
        params = np.stack([sc, shift], 1)
    if ids.ndim < 2 or any(ids.shape[k] > 1 for k in range(ids.ndim) if k != 1) or ids.shape[1] != params.shape[0]:
        if ids.ndim >= 2 and ids.shape[1] == 1 and np.allclose(params, params[:1]):
            b.layout[node.output[0]] = ids
            return NORM
        raise Barrier(f"{node.op_type} over a tensor whose units are not on axis 1")
    shape = [1] * ids.ndim
    shape[1] = params.shape[0]
    s = b.new_space(params.shape[0], PER_UNIT, name)
    b.sparse(ids.reshape(-1), s.ids, np.ones(s.n), etype(node.op_type, "x"), f"{name}:x")
    b.joins.append((ids.reshape(-1), s.ids))
    cn = b.const_node(name)
    b.sparse(np.full(s.n, cn), s.ids, params, etype(node.op_type, "p"), f"{name}:params")
    b.layout[node.output[0]] = s.ids.reshape(shape)
    b.records.append(ChannelNormRecord(node=node.name, op=node.op_type, input=x, output=node.output[0],
                                       training=training, epsilon=float(a.get("epsilon", 1e-5))))
    return NORM


@rule("LayerNormalization")
def layernorm(b, node, name, a, kinds):
    """LayerNormalization: statistics nodes over the normalised axes, then gamma and beta per unit."""
    x = node.input[0]
    ids = b.layout[x]
    ax = int(a.get("axis", -1))
    ax = ax + ids.ndim if ax < 0 else ax
    axes = list(range(ax, ids.ndim))
    gam = np.asarray(b.values[node.input[1]], dtype=np.float64)
    bet = np.asarray(b.values[node.input[2]], dtype=np.float64) if len(node.input) > 2 and node.input[2] \
        else np.zeros_like(gam)
    if any(o for o in node.output[1:]):
        raise Barrier("LayerNormalization with mean/inv-std outputs")
    if all(ids.shape[k] == 1 for k in axes):
        b.layout[node.output[0]] = ids
        return NORM
    stat_ids, _ = b.reduce_nodes(ids, axes, "layernorm", name)
    rank = ids.ndim
    g = gam.reshape((1,) * (rank - gam.ndim) + gam.shape)
    beta = bet.reshape((1,) * (rank - bet.ndim) + bet.shape)
    role = b.combine([ids, stat_ids], node.output[0], name, ("layernorm", float(a.get("epsilon", 1e-5))),
                     consts=[(1, g), (2, beta)], kind=NORM)
    b.records.append(LayerNormRecord(node=node.name, input=x, axes=axes, output=node.output[0]))
    return role
