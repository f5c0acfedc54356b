"""ONNX -> :class:`fibgraph.network.Network` for feed-forward models.

The importer walks the graph in topological order and follows one stream of
activations from the single real input.  Linear ops with constant weights
(Gemm, MatMul [+ Add bias], Conv) become layers; what lies between two layers
(element-wise activations, pooling, flatten) keeps colours.  Every node is
either mapped or refused with the op type, the node name and the supported
set.  Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from fibgraph.errors import InputError
from fibgraph.network import Layer, Network

from .onnx.load import load_onnx

__all__ = ["SUPPORTED_OPS", "import_onnx", "load_onnx", "ImportResult"]

LINEAR = {"Gemm", "MatMul", "Conv"}
HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "Identity", "Dropout", "Cast", "MaxPool",
               "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "Softsign",
         "HardSigmoid", "HardSwish", "Clip", "Identity", "Dropout", "Erf", "Cast", "Mish", "Abs",
         "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Sign", "Not", "ThresholdedRelu", "Celu"}
# element-wise ops of several operands: each operand is the stream (same layout) or a constant
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Greater", "Less", "Equal",
          "GreaterOrEqual", "LessOrEqual", "And", "Or", "Where"}
POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
SHAPE = {"Flatten", "Reshape", "Transpose", "Squeeze"}
OUTPUT_ONLY = {"Softmax", "LogSoftmax", "ArgMax"}
TAIL = OUTPUT_ONLY | UNARY | {"ArrayFeatureExtractor", "ZipMap", "Reshape", "Flatten", "Squeeze",
                              "Unsqueeze", "Cast"}
SUPPORTED_OPS = sorted(LINEAR | {"BatchNormalization", "PRelu", "Constant"} | UNARY | BINARY | POOL
                       | SHAPE | OUTPUT_ONLY)
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
          onnx.TensorProto.BFLOAT16}


@dataclass
class Stream:
    """Where a tensor's elements live: units of ``level`` along ``axis`` of the
    non-batch shape ``S`` (``flat``: the tensor is ``S`` flattened).  ``axis``
    None: graph input whose unit axis is not decided yet."""

    level: int
    S: list
    axis: int | None
    flat: bool = False
    fresh: bool = False          # straight out of a linear op (bias / BN may fold)


@dataclass
class ImportResult:
    model: onnx.ModelProto
    network: Network
    ops: list            # (node name, op type, role)
    input_name: str
    output_names: list


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _nodename(node, i):
    return node.name or f"{node.op_type}_{i}"


def _shape_of(vi):
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


class _Importer:
    def __init__(self, model, path="model"):
        self.path = path
        self.model = model
        g = model.graph
        self.consts = {}
        self.computed = {}
        self.const_nodes = {}
        for t in g.initializer:
            self.consts[t.name] = numpy_helper.to_array(t)
        for i, node in enumerate(g.node):
            if node.op_type == "Constant":
                self.consts[node.output[0]] = self._constant_value(node)
                self.const_nodes[node.output[0]] = node
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            inferred = model
        self.shapes = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            s = _shape_of(vi)
            if s is not None:
                self.shapes[vi.name] = s
        self.consumers = {}
        for node in g.node:
            for x in node.input:
                if x:
                    self.consumers.setdefault(x, []).append(node)
        inputs = [vi for vi in g.input if vi.name not in self.consts]
        if len(inputs) != 1:
            raise InputError(f"{path}: a feed-forward model has one input; this one has {len(inputs)} "
                             f"({', '.join(v.name for v in inputs)})")
        self.input = inputs[0]
        if self.input.type.tensor_type.elem_type not in FLOATS:
            pass  # integer inputs may be Cast to float first
        self.streams = {}
        self.layers = []
        self.ops = []

    # ------------------------------------------------------------ helpers
    def _constant_value(self, node):
        a = _attrs(node)
        if "value" in a:
            return numpy_helper.to_array(a["value"])
        for k in ("value_float", "value_int"):
            if k in a:
                return np.array(a[k])
        for k in ("value_floats", "value_ints"):
            if k in a:
                return np.array(list(a[k]))
        raise InputError(f"{self.path}: Constant node {node.name!r} holds no tensor value")

    def fail(self, node, i, why):
        raise InputError(f"{self.path}: node {_nodename(node, i)!r} ({node.op_type}): {why}")

    def unsupported(self, node, i, where=""):
        raise InputError(
            f"{self.path}: unsupported op {node.op_type} at node {_nodename(node, i)!r}{where}; "
            f"supported: {', '.join(SUPPORTED_OPS)}")

    def weight(self, name, node, i, what="weight"):
        if name not in self.consts:
            self.fail(node, i, f"{what} {name!r} is not a constant (initializer or Constant)")
        w = np.asarray(self.consts[name])
        if w.dtype.kind == "f" and not np.all(np.isfinite(w)):
            self.fail(node, i, f"{what} {name!r} holds NaN or Inf")
        return w

    # ------------------------------------------------------------ the walk
    def run(self):
        g = self.model.graph
        ishape = _shape_of(self.input)
        if ishape is None or len(ishape) < 2:
            raise InputError(f"{self.path}: input {self.input.name!r} needs a rank >= 2 shape (batch first)")
        self.streams[self.input.name] = Stream(0, list(ishape[1:]), None)
        self.input_units = None
        linear_idx = [i for i, n in enumerate(g.node) if n.op_type in LINEAR]
        self.last_linear = linear_idx[-1] if linear_idx else -1
        if not linear_idx:
            raise InputError(f"{self.path}: no linear layer (Gemm, MatMul, Conv) found")
        self.tail = False
        for i, node in enumerate(g.node):
            if node.op_type == "Constant":
                continue
            ins = [x for x in node.input if x]
            sin = [x for x in ins if x in self.streams]
            if not sin:
                if all(x in self.consts for x in ins):
                    self._fold_constant(node, i)
                    continue
                if self.tail:
                    continue
                self.fail(node, i, "reads no tensor of the network's stream")
            if not self.tail and i > self.last_linear:
                st = self.streams[sin[0]]
                folds = st.fresh and (node.op_type == "BatchNormalization" or
                                      (node.op_type == "Add" and len(sin) == 1))
                if not folds:
                    self.tail = True
            if self.tail:
                self._tail(node, i)
                continue
            self._node(node, i, sin)
        # outputs that expose a level's units are kept (like the output layer)
        outs = [o.name for o in g.output]
        for o in outs:
            st = self.streams.get(o)
            if st is not None and st.level > 0:
                self.layers[st.level - 1].is_output = True
        self.layers[-1].is_output = True
        net = Network(int(self.input_units), self.layers, name=g.name or "model",
                      meta={"input": self.input.name, "outputs": outs,
                            # constants computed by nodes (e.g. ConstantOfShape): the
                            # writer replaces those it changes by initializers
                            "computed": self.computed})
        return ImportResult(self.model, net, self.ops, self.input.name, outs)

    def _fold_constant(self, node, i):
        try:
            from onnx.reference import ReferenceEvaluator

            sub = onnx.helper.make_graph([node], "c", [], [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o])
            ev = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=self.model.opset_import))
            feeds = {x: self.consts[x] for x in node.input if x}
            res = ev.run(None, feeds)
            for o, v in zip([o for o in node.output if o], res):
                self.consts[o] = np.asarray(v)
                self.computed[o] = self.consts[o]
            self.ops.append((_nodename(node, i), node.op_type, "constant"))
        except Exception:
            self.fail(node, i, "constant sub-expression that fibgraph cannot evaluate")

    def _tail(self, node, i):
        if node.op_type not in TAIL:
            self.unsupported(node, i, " after the output layer")
        self.ops.append((_nodename(node, i), node.op_type, "output"))

    def _node(self, node, i, sin):
        op = node.op_type
        st = self.streams[sin[0]]
        if op in LINEAR:
            return self._linear(node, i, st)
        if op == "Add" and st.fresh and self._try_bias_add(node, i, st):
            return
        if op == "BatchNormalization":
            return self._batchnorm(node, i, st)
        if op == "PRelu":
            return self._prelu(node, i, st)
        if op in UNARY:
            if op == "Dropout" and len(node.output) > 1 and node.output[1] and node.output[1] in self.consumers:
                self.fail(node, i, "Dropout mask output is used")
            return self._pointwise(node, i, st, op in HOMOGENEOUS)
        if op in BINARY:
            return self._binary(node, i, sin)
        if op in POOL:
            if st.axis not in (0, None) or st.flat:
                self.fail(node, i, "pooling over a tensor whose channel axis is not axis 1")
            S = self._out_shape(node.output[0], st)
            new = Stream(st.level, S, st.axis)
            return self._set(node, i, new, "pool", homog=True)
        if op == "Flatten":
            if _attrs(node).get("axis", 1) != 1:
                self.fail(node, i, "Flatten with axis != 1 (only batch flatten is supported)")
            return self._set(node, i, self._flat(st), "shape", homog=True)
        if op == "Reshape":
            return self._reshape(node, i, st)
        if op == "Squeeze":
            return self._squeeze(node, i, st)
        if op == "Transpose":
            perm = list(_attrs(node).get("perm", []))
            if not perm or perm[0] != 0 or st.flat:
                self.fail(node, i, "Transpose that moves the batch axis or permutes a flat tensor")
            p = [q - 1 for q in perm[1:]]
            S = [st.S[q] for q in p]
            axis = None if st.axis is None else p.index(st.axis)
            new = Stream(st.level, S, axis)
            return self._set(node, i, new, "shape", homog=True)
        if op in OUTPUT_ONLY:
            self.fail(node, i, f"{op} is supported only after the output layer")
        self.unsupported(node, i)

    def _set(self, node, i, st, role, homog):
        st.fresh = False
        st.homog = getattr(self.streams[[x for x in node.input if x in self.streams][0]], "homog", True) and homog
        for o in node.output[:1]:
            self.streams[o] = st
        self.ops.append((_nodename(node, i), node.op_type, role))
        if st.level > 0:
            ly = self.layers[st.level - 1]
            ly.homogeneous = ly.homogeneous and homog
            if role in ("activation", "pool", "norm"):
                ly.activation = (ly.activation + "+" if ly.activation else "") + node.op_type

    def _pointwise(self, node, i, st, homog):
        new = Stream(st.level, list(st.S), st.axis, st.flat)
        self._set(node, i, new, "activation", homog)

    def _out_shape(self, name, st):
        s = self.shapes.get(name)
        if s is not None and len(s) == len(st.S) + 1:
            return list(s[1:])
        return [st.S[0]] + [None] * (len(st.S) - 1)

    def _flat(self, st):
        return Stream(st.level, list(st.S), st.axis, True)

    def _reshape(self, node, i, st):
        shape_name = node.input[1]
        if shape_name not in self.consts:
            self.fail(node, i, "Reshape with a shape that is not constant")
        t = [int(x) for x in np.asarray(self.consts[shape_name]).reshape(-1)]
        known = [d for d in st.S if d is not None]
        F = int(np.prod(st.S)) if len(known) == len(st.S) else None
        ok = len(t) == 2 and (t[1] == -1 or F is None or t[1] == F) and (t[0] in (0, -1) or t[0] > 0)
        if len(t) == 2 and t[1] > 0 and t[0] > 0 and F is not None and t[1] != F:
            ok = False
        if not ok:
            self.fail(node, i, f"Reshape to {t} is not a flatten (batch, features)")
        self._set(node, i, self._flat(st), "shape", homog=True)
        self._reshapes.setdefault(st.level, []).append({"shape": shape_name, "target": t})

    def _squeeze(self, node, i, st):
        a = _attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = [int(x) for x in np.asarray(self.consts.get(node.input[1], [])).reshape(-1)]
        if not axes:
            self.fail(node, i, "Squeeze without explicit axes")
        axes = [(x if x >= 0 else x + len(st.S) + 1) - 1 for x in axes]
        if any(x < 0 or x == st.axis or st.S[x] not in (1, None) for x in axes) or st.flat:
            self.fail(node, i, "Squeeze of a non-singleton or unit axis")
        S = [d for k, d in enumerate(st.S) if k not in axes]
        axis = None if st.axis is None else st.axis - sum(1 for x in axes if x < st.axis)
        new = Stream(st.level, S, axis, len(S) == 1)
        self._set(node, i, new, "shape", homog=True)

    # ----------------------------------------------------------- layers
    def _linear(self, node, i, st):
        op = node.op_type
        a = _attrs(node)
        level = len(self.layers)
        if st.level != level:
            self.fail(node, i, "the model branches (a layer reads an earlier layer): not a feed-forward chain")
        for w in node.input[1:2]:
            if len(self.consumers.get(w, [])) > 1:
                self.fail(node, i, f"weight {w!r} is shared by several nodes")
        meta = {"node": node.name, "node_index": i, "op": op, "weight_input": node.input[1],
                "reshapes": list(self._reshapes.get(level, [])), "post_params": []}
        if op == "Conv":
            W = self.weight(node.input[1], node, i)
            if W.ndim < 3:
                self.fail(node, i, "Conv weight of rank < 3")
            if st.flat or st.axis not in (0, None):
                self.fail(node, i, "Conv reads a tensor whose channel axis is not axis 1")
            group = int(a.get("group", 1))
            c_out, c_in_g = W.shape[:2]
            K = int(np.prod(W.shape[2:]))
            if group == 1:
                c_in = c_in_g
                Wu = W.reshape(c_out, c_in, K).astype(np.float64)
                meta["depthwise"] = None
            elif c_in_g == 1 and c_out % group == 0:
                c_in = group
                mult = c_out // group
                Wu = np.zeros((c_out, c_in, K))
                Wu[np.arange(c_out), np.arange(c_out) // mult] = W.reshape(c_out, K)
                meta["depthwise"] = mult
            else:
                self.fail(node, i, f"grouped Conv with group={group} (only 1 or depthwise) is not supported")
            self._check_units(node, i, st, c_in)
            b = np.zeros(c_out)
            if len(node.input) > 2 and node.input[2]:
                b = self.weight(node.input[2], node, i, "bias").astype(np.float64).reshape(-1)
                meta["bias_input"] = node.input[2]
            meta["kernel_shape"] = list(W.shape[2:])
            kind = "conv"
            S = self._out_shape(node.output[0], Stream(0, [c_out] + list(st.S[1:]), 0))
            S[0] = c_out
            out = Stream(level + 1, S, 0, fresh=True)
        else:
            if op == "Gemm":
                if a.get("transA", 0):
                    self.fail(node, i, "Gemm with transA=1 is not supported")
                B = self.weight(node.input[1], node, i).astype(np.float64)
                if B.ndim != 2:
                    self.fail(node, i, "Gemm weight must be 2-D")
                alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
                trans = int(a.get("transB", 0))
                Weff = alpha * (B if trans else B.T)
                meta.update(alpha=alpha, beta=beta, transB=trans)
                n_out = Weff.shape[0]
                b = np.zeros(n_out)
                if len(node.input) > 2 and node.input[2]:
                    C = self.weight(node.input[2], node, i, "bias").astype(np.float64)
                    if C.size not in (1, n_out):
                        self.fail(node, i, f"Gemm bias of shape {C.shape} does not broadcast per unit")
                    b = beta * np.broadcast_to(C.reshape(-1), (n_out,)).copy()
                    meta["bias_input"] = node.input[2]
                    meta["bias_shape"] = list(C.shape)
            else:  # MatMul
                if node.input[1] not in self.consts:
                    self.fail(node, i, "MatMul whose second operand is not a constant weight")
                B = self.weight(node.input[1], node, i).astype(np.float64)
                if B.ndim != 2:
                    self.fail(node, i, "MatMul weight must be 2-D")
                Weff = B.T
                b = np.zeros(B.shape[1])
            Wu = self._dense_units(node, i, st, Weff, meta)
            kind = "dense"
            out = Stream(level + 1, [Weff.shape[0]], 0, fresh=True)
        name = node.input[1]
        layer = Layer(name=name, kind=kind, weight=Wu, bias=b, homogeneous=True, meta=meta)
        self.layers.append(layer)
        out.homog = True
        self.streams[node.output[0]] = out
        self.ops.append((_nodename(node, i), op, "layer"))

    def _check_units(self, node, i, st, n_units):
        if st.level == 0:
            if self.input_units is None:
                self.input_units = n_units
            elif self.input_units != n_units:
                self.fail(node, i, "input unit count mismatch")
        elif self.layers[st.level - 1].n_out != n_units:
            self.fail(node, i, f"weight expects {n_units} input channels, the previous layer has "
                               f"{self.layers[st.level - 1].n_out}")
        if st.axis is not None and st.S[st.axis] not in (None, n_units):
            self.fail(node, i, f"weight expects {n_units} input channels, tensor has {st.S[st.axis]}")

    def _dense_units(self, node, i, st, Weff, meta):
        """Weight (n_out, F) -> (n_out, units, positions) using the stream's layout."""
        n_out, F = Weff.shape
        S = list(st.S)
        if not st.flat and len(S) != 1:
            self.fail(node, i, f"{node.op_type} reads a rank-{len(S) + 1} tensor (only (batch, features) is supported)")
        if st.axis is None:  # graph input: every feature is a unit
            if all(d is not None for d in S) and int(np.prod(S)) != F:
                self.fail(node, i, f"weight expects {F} input features, the input has {int(np.prod(S))}")
            self._check_units(node, i, Stream(0, [F], 0), F)
            meta["dense_in"] = {"S": [F], "axis": 0}
            return Weff[:, :, None]
        unknown = [k for k, d in enumerate(S) if d is None]
        if unknown:
            known = int(np.prod([d for d in S if d is not None]))
            if len(unknown) == 1 and F % known == 0:
                S[unknown[0]] = F // known
            elif st.axis in (0, len(S) - 1) and F % S[st.axis] == 0 and S[st.axis] is not None:
                # units first or last: positions are a single block of size F / C
                P = F // S[st.axis]
                S = [S[st.axis], P] if st.axis == 0 else [P, S[st.axis]]
                axis = 0 if st.axis == 0 else 1
                st = Stream(st.level, S, axis, True)
            else:
                self.fail(node, i, f"unknown non-batch dimension of the tensor it reads (shape {['?' if d is None else d for d in st.S]}); "
                                   "the weight layout cannot be mapped")
        if int(np.prod(S)) != F:
            self.fail(node, i, f"weight expects {F} input features, the tensor has {int(np.prod(S))}")
        C = S[st.axis]
        prev = self.layers[st.level - 1] if st.level > 0 else None
        if prev is not None and prev.n_out != C:
            self.fail(node, i, f"weight reads {C} units, the previous layer has {prev.n_out}")
        Wr = Weff.reshape([n_out] + S)
        Wr = np.moveaxis(Wr, 1 + st.axis, 1).reshape(n_out, C, -1)
        meta["dense_in"] = {"S": S, "axis": st.axis}
        return np.ascontiguousarray(Wr)

    def _try_bias_add(self, node, i, st):
        ly = self.layers[st.level - 1]
        other = [x for x in node.input if x != [x2 for x2 in node.input if x2 in self.streams][0]]
        if len(other) != 1 or other[0] not in self.consts or ly.meta.get("bias_add") or \
                (ly.meta["op"] == "Gemm" and False):
            return False
        c = np.asarray(self.consts[other[0]]).astype(np.float64)
        n = ly.n_out
        ok_shape = c.size in (1, n) and (
            c.ndim <= 1 or (ly.kind == "dense" and c.ndim == 2 and c.shape[0] == 1)
            or (ly.kind == "conv" and c.shape[:2] in ((1, n), (1, 1)) and all(d == 1 for d in c.shape[2:])))
        if ly.kind == "conv" and c.ndim == 1 and c.size == n and n > 1:
            ok_shape = False  # (C,) broadcasts over the last (spatial) axis, not channels
        if not ok_shape:
            return False
        if not np.all(np.isfinite(c)):
            self.fail(node, i, f"bias {other[0]!r} holds NaN or Inf")
        if len(self.consumers.get(other[0], [])) > 1:
            return False
        ly.bias = ly.bias + np.broadcast_to(c.reshape(-1), (n,))
        ly.meta["bias_add"] = {"node": node.name, "const": other[0], "shape": list(c.shape)}
        new = Stream(st.level, list(st.S), st.axis, st.flat, fresh=True)
        new.homog = True
        self.streams[node.output[0]] = new
        self.ops.append((_nodename(node, i), node.op_type, "bias"))
        return True

    def _per_unit(self, node, i, st, arr, what):
        """A constant broadcast against the stream -> per-unit vector, or None if scalar."""
        arr = np.asarray(arr, dtype=np.float64)
        if arr.size == 1:
            return None, None
        n = self.layers[st.level - 1].n_out if st.level > 0 else None
        rank = len(st.S) + 1
        shp = list(arr.shape)
        shp = [1] * (rank - len(shp)) + shp
        ch = 1 + (st.axis if st.axis is not None else 0)
        if st.flat and len(st.S) > 1:
            self.fail(node, i, f"{what} on a flattened tensor is not supported")
        if shp[ch] == n and all(d == 1 for k, d in enumerate(shp) if k != ch):
            return arr.reshape(-1), ch - (rank - arr.ndim)
        self.fail(node, i, f"{what} of shape {list(arr.shape)} is neither scalar nor per-channel")

    def _add_unit_key(self, st, vec, params):
        ly = self.layers[st.level - 1]
        k = vec.reshape(ly.n_out, -1)
        ly.unit_key = k if ly.unit_key is None else np.hstack([ly.unit_key, k])
        ly.meta["post_params"].extend(params)

    def _batchnorm(self, node, i, st):
        a = _attrs(node)
        if a.get("training_mode", 0) or (len(node.output) > 1 and any(node.output[1:])):
            self.fail(node, i, "BatchNormalization in training mode")
        if st.level == 0:
            self.fail(node, i, "BatchNormalization on the input is not supported")
        scale, B, mean, var = (self.weight(x, node, i, "BatchNorm parameter").astype(np.float64)
                               for x in node.input[1:5])
        eps = float(a.get("epsilon", 1e-5))
        mul = scale / np.sqrt(var + eps)
        add = B - mul * mean
        ly = self.layers[st.level - 1]
        if mul.size != ly.n_out:
            self.fail(node, i, "BatchNorm size does not match the layer")
        if st.fresh and (ly.meta["op"] != "MatMul" or ly.meta.get("bias_add")) and not ly.meta.get("bn_fold") \
                and (st.axis == 0):
            ly.weight = ly.weight * mul[:, None, None]
            ly.bias = mul * ly.bias + add
            ly.meta["bn_fold"] = {"node": node.name, "output": node.output[0]}
            new = Stream(st.level, list(st.S), st.axis, st.flat, fresh=True)
            new.homog = True
            self.streams[node.output[0]] = new
            self.ops.append((_nodename(node, i), node.op_type, "norm (folded)"))
            return
        if st.axis != 0 or st.flat:
            self.fail(node, i, "BatchNormalization over a non-channel axis")
        self._add_unit_key(st, np.stack([mul, add], 1),
                           [{"name": x, "axis": 0} for x in node.input[1:5]])
        homog = bool(np.all(add == 0) and np.all(mul > 0))
        new = Stream(st.level, list(st.S), st.axis, st.flat)
        self._set(node, i, new, "norm", homog)

    def _prelu(self, node, i, st):
        slope = self.weight(node.input[1], node, i, "PRelu slope")
        vec, ax = self._per_unit(node, i, st, slope, "PRelu slope")
        if vec is not None:
            self._add_unit_key(st, vec, [{"name": node.input[1], "axis": ax}])
        self._pointwise(node, i, st, True)

    def _binary(self, node, i, sin):
        """Element-wise op of the stream with itself (AND rule: one stream, same
        colours) and/or constants (scalar: colour-preserving; per-channel: its
        values join the units' criterion)."""
        op = node.op_type
        ins = [x for x in node.input if x]
        st = self.streams[sin[0]]
        for x in sin[1:]:
            s2 = self.streams[x]
            if s2.level != st.level or s2.S != st.S or s2.axis != st.axis or s2.flat != st.flat:
                self.fail(node, i, "joins two different streams (residual or branch): not a feed-forward chain")
        others = [x for x in ins if x not in self.streams]
        homog = len(sin) == 1 and op in ("Mul", "Div")
        for k, other in enumerate(others):
            if other not in self.consts:
                self.fail(node, i, f"operand {other!r} is neither the stream nor a constant")
            c = np.asarray(self.consts[other])
            if c.dtype.kind == "f" and not np.all(np.isfinite(c)):
                self.fail(node, i, f"constant {other!r} holds NaN or Inf")
            if c.size == 1:
                positive = c.dtype.kind in "fiu" and float(c.reshape(-1)[0]) > 0
                homog = homog and positive and (op == "Mul" or other == ins[-1])
                continue
            if st.level == 0:
                self.fail(node, i, "per-feature constant on the input is not supported")
            vec, ax = self._per_unit(node, i, st, c, f"{op} constant")
            self._add_unit_key(st, vec, [{"name": other, "axis": ax}])
            homog = homog and op == "Mul" and bool(np.all(vec > 0))
        return self._pointwise(node, i, st, homog)


def import_onnx(path_or_model, path_label=None) -> ImportResult:
    """Import a feed-forward ONNX model (a path or a ModelProto)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model, label = path_or_model, path_label or "model"
    else:
        model, label = load_onnx(path_or_model), str(path_or_model)
    imp = _Importer(model, label)
    imp._reshapes = {}
    return imp.run()
