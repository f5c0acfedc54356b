"""Write a base (compressed) network back into the original ONNX model.

The original model is copied and only what the compression changes is
rewritten: each layer's weight and bias tensors (in their original layout:
Gemm alpha/transB, MatMul (in, out), Conv kernels), folded BatchNorm nodes
(removed: their parameters now live in the layer), per-channel parameters
after a layer (sliced to one representative per fiber), and the constant
shapes of flattening Reshapes.  Input and output names, dtypes and the
dynamic batch stay as they were; stale intermediate shape annotations are
dropped.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fibgraph.errors import InputError

__all__ = ["write_base_onnx"]


class _Tensors:
    """The model's constant tensors: initializers, Constant nodes, and constants
    computed by other nodes (folded at import; replaced by initializers when set)."""

    def __init__(self, model, computed=None):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.computed = dict(computed or {})
        self.removed_inputs = set()

    def drop_unused(self, names):
        """Remove initializers among ``names`` that no node reads any more."""
        g = self.model.graph
        used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        for name in names:
            if name in self.inits and name not in used:
                g.initializer.remove(self.inits.pop(name))
                for vi in list(g.input):
                    if vi.name == name:
                        g.input.remove(vi)

    def get(self, name):
        if name in self.computed and name not in self.inits:
            return self.computed[name]
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.consts[name]
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_floats", "value_ints"):
                return np.array(list(helper.get_attribute_value(a)))
            if a.name in ("value_float", "value_int"):
                return np.array(helper.get_attribute_value(a))
        raise KeyError(name)

    def dtype(self, name):
        return self.get(name).dtype

    def set(self, name, value):
        value = np.ascontiguousarray(value)
        if name in self.inits:
            t = self.inits[name]
            old = numpy_helper.to_array(t)
            new = numpy_helper.from_array(value.astype(old.dtype), name)
            t.CopyFrom(new)
            return
        if name in self.computed:  # drop the producing node, store the value
            old = self.computed[name]
            for n in list(self.model.graph.node):
                if name in n.output:
                    self.removed_inputs.update(x for x in n.input if x)
                    self.model.graph.node.remove(n)
            self.add(name, value.astype(old.dtype))
            return
        node = self.consts[name]
        old = self.get(name)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value.astype(old.dtype), name)))

    def add(self, name, value):
        t = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.model.graph.initializer.append(t)
        self.inits[name] = self.model.graph.initializer[-1]
        if self.model.ir_version < 4:  # old IR: every initializer is also a graph input
            self.model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))


def _node_by_name(model, name, index):
    nodes = model.graph.node
    if name:
        for n in nodes:
            if n.name == name:
                return n
    return nodes[index]


def _dense_layout(W, meta, n_in_base):
    """(n', m', D) in units -> (n', F') flat weight for the base."""
    S = list(meta["dense_in"]["S"])
    axis = meta["dense_in"]["axis"]
    n = W.shape[0]
    S[axis] = n_in_base
    rest = [d for k, d in enumerate(S) if k != axis]
    Wr = W.reshape([n, n_in_base] + rest)
    Wr = np.moveaxis(Wr, 1, 1 + axis)
    return Wr.reshape(n, int(np.prod(S))), S


def write_base_onnx(model: onnx.ModelProto, base, check=True) -> onnx.ModelProto:
    """A new ModelProto computing the base network ``base`` (from
    :func:`fibgraph.network.compress_network` on a network imported from ``model``)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    T = _Tensors(m, base.meta.get("computed"))
    remove = []
    for ly in base.layers:
        meta = ly.meta
        node = _node_by_name(m, meta["node"], meta["node_index"])
        n_out, n_in = ly.weight.shape[:2]
        wname = meta["weight_input"]
        wdtype = T.dtype(wname)
        if meta["op"] == "Conv":
            kshape = meta["kernel_shape"]
            W = ly.weight
            if meta.get("depthwise"):
                mult = meta["depthwise"]
                rep = meta["rep"]
                j = meta["in_labels"][rep // mult]
                support = np.abs(W).sum(axis=2) > 0
                single = np.all(support.sum(axis=1) <= 1) and np.all(support[~(support[np.arange(n_out), j])].sum() == 0)
                if single:
                    Wd = W[np.arange(n_out), j].reshape([n_out, 1] + kshape)
                    T.set(wname, Wd.astype(wdtype))
                    for a in node.attribute:
                        if a.name == "group":
                            a.i = n_out
                    if not np.array_equal(j, np.arange(n_out)) or n_in != n_out:
                        idx_name = f"{wname}__fibgraph_gather"
                        T.add(idx_name, np.asarray(j, dtype=np.int64))
                        gout = f"{node.input[0]}__fibgraph_gathered_{wname}"
                        g = helper.make_node("Gather", [node.input[0], idx_name], [gout], axis=1,
                                             name=f"{node.name or wname}__fibgraph_gather")
                        pos = list(m.graph.node).index(node)
                        m.graph.node.insert(pos, g)
                        node.input[0] = gout
                else:
                    T.set(wname, W.reshape([n_out, n_in] + kshape).astype(wdtype))
                    for a in node.attribute:
                        if a.name == "group":
                            a.i = 1
            else:
                T.set(wname, W.reshape([n_out, n_in] + kshape).astype(wdtype))
        else:
            Wf, S = _dense_layout(ly.weight, meta, n_in)
            if meta["op"] == "Gemm":
                alpha = meta["alpha"] or 1.0
                Wi = Wf / alpha
                T.set(wname, (Wi if meta["transB"] else Wi.T).astype(wdtype))
            else:
                T.set(wname, Wf.T.astype(wdtype))
            for r in meta.get("reshapes", []):
                t = list(r["target"])
                F_old = int(np.prod(meta["dense_in"]["S"]))
                t = [int(np.prod(S)) if (k == 1 and x == F_old) else x for k, x in enumerate(t)]
                T.set(r["shape"], np.asarray(t, dtype=np.int64))
        # bias
        b = ly.bias
        if meta.get("bias_add"):
            ba = meta["bias_add"]
            shape = list(ba["shape"])
            if meta.get("bias_input"):  # Gemm/Conv bias plus an Add: put all into the Add
                T.set(meta["bias_input"], np.zeros(_bias_shape(meta.get("bias_shape") or [meta.get("n_out_before", n_out)], n_out)))
            T.set(ba["const"], _shape_like(b, shape, n_out))
        elif meta.get("bias_input"):
            beta = meta.get("beta", 1.0) if meta["op"] == "Gemm" else 1.0
            shape = meta.get("bias_shape") or [n_out]
            vals = b / beta if beta != 0 else np.zeros(n_out)
            T.set(meta["bias_input"], _shape_like(vals, shape, n_out))
        elif np.any(b != 0):
            if meta["op"] == "MatMul":
                raise InputError(f"layer {wname!r}: a bias appeared where the model has none")
            bname = f"{wname}__fibgraph_bias"
            T.add(bname, b.astype(wdtype))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = bname
            if meta["op"] == "Gemm":
                for a in node.attribute:
                    if a.name == "beta":
                        a.f = 1.0
        if meta.get("bn_fold"):
            bn = _node_by_name(m, meta["bn_fold"]["node"], -1)
            src = bn.input[0]
            remove.append(bn)
            for n2 in m.graph.node:
                for k, x in enumerate(n2.input):
                    if x == bn.output[0]:
                        n2.input[k] = src
            for o in m.graph.output:
                if o.name == bn.output[0]:
                    # keep the output name: rename the producer's output instead
                    for n2 in m.graph.node:
                        for k, x in enumerate(n2.output):
                            if x == src:
                                n2.output[k] = o.name
        for p in meta.get("post_params", []):
            arr = T.get(p["name"])
            ax = p["axis"]
            T.set(p["name"], np.take(arr, meta["rep"], axis=ax))
    for bn in remove:
        m.graph.node.remove(bn)
    T.drop_unused({x for bn in remove for x in bn.input[1:]} | T.removed_inputs)
    del m.graph.value_info[:]
    if check:
        try:
            onnx.checker.check_model(m, full_check=True)
        except Exception as e:
            raise InputError(f"the written model does not pass the ONNX checker: {str(e).splitlines()[0]}") from None
    return m


def _bias_shape(shape, n):
    return [n if d != 1 or len(shape) == 1 else d for d in shape] if shape else [n]


def _shape_like(vals, shape, n):
    vals = np.asarray(vals, dtype=np.float64)
    if len(shape) == 0 or int(np.prod(shape)) == 1 and n > 1:
        if not np.allclose(vals, vals[0]):
            raise InputError("a scalar bias would have to differ between fibers")
        return np.full(shape, vals[0]) if shape else np.asarray(vals[0])
    new = [n if d not in (1,) else 1 for d in shape]
    if int(np.prod(new)) != n:
        new = [n]
    return vals.reshape(new)
