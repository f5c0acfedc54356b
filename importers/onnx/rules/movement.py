"""Movement rules: ops that move values without mixing them (Reshape,
Transpose, Gather, Slice, Concat, ...) are applied to the layouts' id arrays
themselves (onnxruntime, else the ONNX reference evaluator), so no op's layout rule is
guessed; a cut of q, k or v out of a packed projection is recorded
(``packed``); pooling, resizing and padding act on positional axes; shape ops
make shape values."""
from __future__ import annotations

import numpy as np
import onnx

from ..build import META, Barrier, attrs, collapse, unit_axes
from ..feeds import short_error
from ..records import PackedRecord
from .registry import rule

MOVE = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Slice", "Split",
        "Concat", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"}
POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
        "Resize", "Upsample", "Pad"}
#: ops producing constants: ``Constant`` is read before the walk, ``ConstantOfShape``
#: reads a shape (never a stream); their values are constants of the walk
CONSTANT = {"Constant", "ConstantOfShape"}
#: the layout ops a packed projection's output may pass through before its cut
PACK_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten")


@rule(*sorted(META | CONSTANT))
def shape_op(b, node, name, a, kinds):
    """Shape, Size (and the constant ops): their outputs are shape values."""
    for o in node.output:
        b.meta.add(o)
    return "shape"


@rule(*sorted(MOVE))
def move(b, node, name, a, kinds):
    """Apply the op to the operands' id arrays (:func:`run_small`)."""
    ins, feeds = [], {}
    for k, x in enumerate(node.input):
        if not x:
            ins.append("")
            continue
        nm = f"i{k}"
        ins.append(nm)
        if kinds[k] == "stream":
            ids = b.layout[x]
            full = b.shapes[x]
            feeds[nm] = np.ascontiguousarray(np.broadcast_to(ids + 1, full)).astype(np.int64)
        else:
            v = b.values.get(x, b.consts.get(x))
            if v is None:
                raise Barrier(f"operand {x!r} has no value")
            v = np.asarray(v)
            if k == 0 or (node.op_type == "Concat") or (node.op_type == "Where"):
                v = np.zeros(v.shape, np.int64)      # data operands that are constants: no node
            feeds[nm] = v
    outs = [f"o{k}" for k in range(len(node.output))]
    sub = onnx.helper.make_node(node.op_type, ins, outs, **attrs(node))
    gi = [onnx.helper.make_tensor_value_info(nm, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
          for nm, v in feeds.items()]
    go = [onnx.ValueInfoProto(name=o) for o in outs]        # untyped: onnxruntime infers them
    gm = onnx.helper.make_model(onnx.helper.make_graph([sub], "move", gi, go),
                                opset_imports=b.model.opset_import)
    try:
        res = run_small(gm, feeds)
    except Exception as e:
        raise Barrier(f"cannot follow units through {node.op_type} ({short_error(e, 200)})")
    for o, r in zip(node.output, res):
        if not o:
            continue
        r = np.asarray(r).astype(np.int64) - 1
        if list(r.shape) != list(b.shapes.get(o, r.shape)):
            raise Barrier(f"{node.op_type} layout shape mismatch")
        if (r < 0).any():
            if (r >= 0).any():
                raise Barrier("mixes constants into the units")
            raise Barrier("moves no units")
        b.layout[o] = collapse(r)
    if node.op_type in ("Gather", "Slice", "Split") and len(unit_axes(b.layout[node.input[0]])) > 1:
        packed_cut(b, node)
    return "shape"


def run_small(gm, feeds):
    """Outputs of the small graph ``gm`` (one op, or a short chain) on integer
    ``feeds``: onnxruntime (one thread, no optimisation), else the ONNX
    reference evaluator for what onnxruntime has no integer kernel for
    (``Resize``, ``DepthToSpace``).  The reference evaluator is imported only
    then: with the schemas it builds it holds 12 MB for the rest of the run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4                 # a missing kernel comes back as an exception
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = False
    try:
        sess = ort.InferenceSession(gm.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    except Exception:                          # noqa: BLE001 - the reference evaluator decides
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(gm).run(None, feeds)


def packed_cut(b, node):
    """An output of a Gather/Slice/Split with ONE unit axis, cut from a tensor
    with several (torch's packed in_proj reshaped to (..., 3, d) and Gathered),
    that equals a contiguous slice of an earlier tensor with one unit axis
    (reached back through Reshape/Transpose/Squeeze/Unsqueeze) is recorded
    as ``packed``: the writer reads it as a Slice of that tensor, so q, k and
    v keep their own sizes instead of equal ones.  The equality is checked
    on an integer probe of the source's concrete shape (every position and
    unit labelled), not assumed from the op pattern."""
    producer = {o: n for n in b.model.graph.node for o in n.output if o}
    chain, region, t = [node], [], node.input[0]
    for _ in range(16):
        ua = unit_axes(b.layout[t])
        if len(ua) <= 1:
            break
        p = producer.get(t)
        if p is None or p.op_type not in PACK_OPS or not p.name or \
                any(b.kind(x) == "stream" for x in p.input[1:]):
            return
        region.append(t)
        chain.insert(0, p)
        t = p.input[0]
    src = t
    ua = unit_axes(b.layout[src])
    if len(ua) != 1 or len(region) == 0 or not node.name or src not in b.shapes:
        return
    u = ua[0]
    shape = b.shapes[src]
    inits, seen = [], {src}
    for n in chain:
        for x in n.input:
            if x and x not in seen:
                seen.add(x)
                v = b.values.get(x, b.consts.get(x))
                if v is None:
                    return
                inits.append(onnx.numpy_helper.from_array(np.asarray(v), x))
    outs = [o for o in node.output if o and o in b.layout and len(unit_axes(b.layout[o])) == 1]
    if not outs:
        return
    gi = [onnx.helper.make_tensor_value_info(src, onnx.TensorProto.INT64, None)]
    go = [onnx.ValueInfoProto(name=o) for o in outs]        # untyped: onnxruntime infers them
    gm = onnx.helper.make_model(onnx.helper.make_graph(list(chain), "packed", gi, go, initializer=inits),
                                opset_imports=b.model.opset_import)
    P = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    try:
        res = run_small(gm, {src: P})
    except Exception:
        return
    for o, Y in zip(outs, res):
        Y = np.asarray(Y)
        if Y.ndim != P.ndim or Y.size == 0 or unit_axes(b.layout[o]) != [u]:
            continue
        start = int(np.unravel_index(int(Y.reshape(-1)[0]), P.shape)[u])
        end = start + Y.shape[u]
        if end > P.shape[u] or not np.array_equal(Y, np.take(P, np.arange(start, end), axis=u)):
            continue
        b.records.append(PackedRecord(node=node.name, output=o, source=src, axis=u, start=start, end=end,
                                      region=list(region), chain=[n.name for n in chain]))


@rule(*sorted(POOL))
def pool(b, node, name, a, kinds):
    """Pooling, resizing and padding: the same nodes, if they act on positional axes only."""
    x = node.input[0]
    ids = b.layout[x]
    op = node.op_type
    if op in ("Resize", "Upsample", "Pad"):
        # act on positional axes only: every unit axis must keep its size
        shp_in, shp_out = b.shapes[x], b.shapes[node.output[0]]
        if len(shp_in) != len(shp_out) or any(ids.shape[k] > 1 and shp_in[k] != shp_out[k]
                                              for k in range(len(shp_in))):
            raise Barrier(f"{op} changes a unit axis")
        if op == "Pad" and len(node.input) > 2 and node.input[2]:
            c = np.asarray(b.values.get(node.input[2], 0))
            if c.size > 1:
                raise Barrier("Pad with a tensor value")
        b.layout[node.output[0]] = ids
        return "pool"
    if ids.ndim < 3 or any(ids.shape[k] > 1 for k in range(ids.ndim) if k != 1):
        raise Barrier(f"{op} over a tensor whose units are not on axis 1")
    b.layout[node.output[0]] = ids
    if len(node.output) > 1 and node.output[1]:
        b.meta.add(node.output[1])
    return "pool"
