"""Reductions (ReduceMean/Sum/Max/Min): over positional axes the nodes stay,
over unit axes one node per remaining position reads all of them."""
from __future__ import annotations

import numpy as np

from ..build import etype
from ..records import ReduceRecord
from .registry import rule

REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}


@rule(*sorted(REDUCE))
def reduce(b, node, name, a, kinds):
    """A reduction: over unit axes a node per remaining position reads them all."""
    x = node.input[0]
    ids = b.layout[x]
    if len(node.input) > 1 and node.input[1]:
        axes = [int(v) for v in np.asarray(b.values[node.input[1]]).reshape(-1)]
    else:
        axes = list(a.get("axes", [])) or list(range(ids.ndim))
    axes = sorted({k + ids.ndim if k < 0 else k for k in axes})
    keepdims = int(a.get("keepdims", 1))
    over_units = [k for k in axes if ids.shape[k] > 1]
    if not over_units:
        out = ids if keepdims else np.squeeze(ids, axis=tuple(axes))
        b.layout[node.output[0]] = out
        return "pool"
    op = node.op_type
    kind = {"ReduceMean": "mean", "ReduceSum": "sum"}.get(op, op)
    rid, _ = b.reduce_nodes(ids, axes, "reduce", f"{name}", weight="mean" if op == "ReduceMean" else "count")
    if op in ("ReduceMax", "ReduceMin"):
        # depends on the set of values only; re-key the edges as unit weights of their op
        b.blocks[-1].etype[:] = etype("reduce", op)
        b.blocks[-1].values[:] = 1.0
    out = rid if keepdims else np.squeeze(rid, axis=tuple(axes))
    b.layout[node.output[0]] = out
    b.records.append(ReduceRecord(node=node.name, op=op, input=x, axes=axes, output=node.output[0], mode=kind))
    return "reduce"
