"""An ONNX graph as a differentiable torch module, and back to ONNX.

For retraining a compressed (or any) ONNX model in torch (the compression
paper's compress-retune, Algorithm 2) without onnx2torch:

    m = OnnxModule(onnx.load("small.onnx"))
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    loss = F.cross_entropy(m(x), y); loss.backward(); opt.step()
    onnx.save(m.to_onnx(), "small_retuned.onnx")

- Every floating initializer of rank >= 1, and every floating ``Constant``
  node tensor of more than one element, is an ``nn.Parameter`` of the same
  shape and dtype, registered under a sanitised unique name
  (``m.onnx_names[param name] -> ONNX name``; ``m.parameter(onnx_name)``).
  Integer / bool tensors and floating scalars are buffers (they follow
  ``.to(device)`` but are not trained).
- ``forward(*inputs, **by_onnx_name)`` runs the nodes in graph order with
  torch ops (exact ONNX semantics for the supported ops, see
  :data:`SUPPORTED_OPS`) and returns the graph outputs (one tensor, or a
  tuple).  Shape-valued tensors (``Shape``, ``Gather`` on shapes, ``Concat``
  of shapes) are small int64 tensors computed on every call, so batch sizes
  other than the export's work.
  ``OnnxModule(model, freeze=names or predicate)`` keeps chosen tensors
  fixed (``requires_grad=False``).
- ``to_onnx()`` returns a copy of the model with every parameter's current
  value written into its initializer / Constant node (dtype preserved); the
  graph is unchanged.
- An op outside :data:`SUPPORTED_OPS` (or a supported op with an attribute
  value this module does not implement) raises
  :class:`fibgraph.errors.InputError` at construction, naming the op.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from fibgraph.errors import InputError
from torch import nn

from . import ops_elementwise, ops_nn, ops_recurrent, ops_shape  # noqa: F401  (they register the ops)
from .registry import (
    CHECKS,
    FLOATS,
    OPS,
    Node,
    sanitize,
    tensor_from_proto,
    unsupported,
    write_tensor,
)

#: the ONNX op types :class:`OnnxModule` runs
SUPPORTED_OPS = frozenset(OPS) | {"Constant"}


# ------------------------------------------------------------------ the module
def constant_value(node):
    """(tensor, is a floating TensorProto 'value' of size > 1 or floats list) of a Constant node."""
    for a in node.attribute:
        if a.name == "value":
            return tensor_from_proto(a.t), "value"
        if a.name == "value_float":
            return torch.tensor(a.f, dtype=torch.float32), None
        if a.name == "value_floats":
            return torch.tensor(list(a.floats), dtype=torch.float32), "value_floats"
        if a.name == "value_int":
            return torch.tensor(a.i, dtype=torch.int64), None
        if a.name == "value_ints":
            return torch.tensor(list(a.ints), dtype=torch.int64), None
    raise unsupported("Constant", "only value, value_float(s), value_int(s)")


#: ops never treated as fixed by the input shapes (random draws)
_NEVER_STATIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                           "Bernoulli", "Dropout"})


def _with_host(t):
    """``t`` carrying its values as Python ints (``registry.ints`` reads them
    without a device sync); integer tensors of up to 4096 elements only."""
    if isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.numel() <= 4096:
        t = t.detach().clone()
        t._fib_host = [int(v) for v in t.reshape(-1).tolist()]
    return t


def _unpickle(data, frozen, training):
    return OnnxModule(onnx.load_from_string(data), freeze=frozen).train(training)


class OnnxModule(nn.Module):
    """Run an ONNX graph (default domain, opsets 7-23) as a differentiable torch module."""

    def __init__(self, model: onnx.ModelProto, freeze=None):
        """``freeze``: ONNX names (an iterable) or a predicate ``name -> bool`` of
        floating tensors that stay parameters but with ``requires_grad=False``
        (e.g. a compressed base's multiplicity constants); they are still
        written back by :meth:`to_onnx`."""
        super().__init__()
        if freeze is None:
            frozen = lambda name: False  # noqa: E731
        elif callable(freeze):
            frozen = freeze
        else:
            names = set(freeze)
            frozen = names.__contains__
        if not isinstance(model, onnx.ModelProto):
            raise InputError("onnx -> torch: expected an onnx.ModelProto")
        self._model = onnx.ModelProto()
        self._model.CopyFrom(model)
        g = self._model.graph
        self.opset = next((o.version for o in self._model.opset_import if o.domain in ("", "ai.onnx")), 13)
        bad = sorted({(nd.op_type if nd.domain in ("", "ai.onnx") else f"{nd.domain}.{nd.op_type}")
                      for nd in g.node if nd.domain not in ("", "ai.onnx") or nd.op_type not in SUPPORTED_OPS})
        if bad:
            raise unsupported(", ".join(bad))
        self.onnx_names = {}          # parameter / buffer attribute name -> ONNX name
        self._value_attr = {}         # ONNX name -> attribute name (parameters and buffers)
        self._where = {}              # parameter attribute -> ("init", index) | ("const", node index, attr)
        taken = set()

        def register(onnx_name, tensor, trainable, where=None):
            base = sanitize(onnx_name)
            attr, k = base, 1
            while attr in taken or hasattr(self, attr):
                k += 1
                attr = f"{base}_{k}"
            taken.add(attr)
            if trainable:
                self.register_parameter(attr, nn.Parameter(tensor, requires_grad=not frozen(onnx_name)))
                self._where[attr] = where
            else:
                self.register_buffer(attr, tensor)
            self.onnx_names[attr] = onnx_name
            self._value_attr[onnx_name] = attr

        for i, t in enumerate(g.initializer):
            v = tensor_from_proto(t)
            register(t.name, v, t.data_type in FLOATS and v.dim() >= 1, ("init", i))
        self._nodes = []
        for i, nd in enumerate(g.node):
            if nd.op_type == "Constant":
                v, attr = constant_value(nd)
                trainable = attr is not None and v.is_floating_point() and v.numel() > 1
                register(nd.output[0], v, trainable, ("const", i, attr))
                continue
            node = Node(nd, self.opset)
            check = CHECKS.get(node.op)
            if check is not None:
                check(node)
            self._nodes.append(node)
        inits = {t.name for t in g.initializer}
        self.input_names = [vi.name for vi in g.input if vi.name not in inits]
        self.output_names = [vi.name for vi in g.output]
        self._static_plan()

    # -------------------------------------------------------------- shape arithmetic
    def _static_plan(self):
        """Which node outputs are fixed once the input shapes are: ``Shape`` /
        ``Size`` of anything, and any node reading only such values or
        integer constants (the Gather / Concat / Unsqueeze / Cast arithmetic
        of a Reshape's target, ConstantOfShape of an LSTM's initial state).
        They are computed on the first call for each input signature and
        then reused (with their values as Python ints), so later calls run
        only the data nodes: no ``torch.tensor(shape)`` host-to-device copy
        and no ``.tolist()`` device-to-host sync inside the forward, which a
        CUDA graph capture forbids."""
        static = {nm for nm, attr in self._value_attr.items() if not getattr(self, attr).is_floating_point()}
        self._static_nodes = set()
        for k, node in enumerate(self._nodes):
            if node.op in _NEVER_STATIC:
                continue
            ins = [x for x in node.inputs if x]
            if node.op in ("Shape", "Size") or (ins and all(x in static for x in ins)):
                self._static_nodes.add(k)
                static.update(x for x in node.outputs if x)
        made = {x for k in self._static_nodes for x in self._nodes[k].outputs if x}
        used = {x for k, nd in enumerate(self._nodes) if k not in self._static_nodes for x in nd.inputs}
        used.update(self.output_names)
        #: static values a data node (or a graph output) reads: what a plan keeps
        self._static_needed = sorted((made | {nm for nm in static if nm in self._value_attr}) & used)
        self._plans = {}

    def __reduce__(self):
        """Pickled (``torch.save``, ``copy.deepcopy``) as its ONNX model with the
        current parameter values, frozen flags and mode: the decoded nodes hold
        closures that do not pickle."""
        frozen = [self.onnx_names[a] for a, p in self._parameters.items() if p is not None and not p.requires_grad]
        return _unpickle, (self.to_onnx().SerializeToString(), frozen, self.training)

    def _signature(self, env):
        xs = tuple((tuple(env[nm].shape), env[nm].dtype, env[nm].device) for nm in self.input_names)
        p = next(iter(self._buffers.values()), None) if self._buffers else None
        return xs, (p.device if p is not None else None)

    # -------------------------------------------------------------- API
    def parameter(self, onnx_name):
        """The parameter (or buffer) holding the ONNX tensor ``onnx_name``."""
        return getattr(self, self._value_attr[onnx_name])

    def n_params(self):
        """Number of trainable parameter values."""
        return int(sum(p.numel() for p in self.parameters() if p.requires_grad))

    def forward(self, *inputs, **named):
        if len(inputs) > len(self.input_names):
            raise InputError(f"onnx -> torch: {len(inputs)} inputs given, the graph has {len(self.input_names)}")
        env = {}
        for onnx_name, attr in self._value_attr.items():
            env[onnx_name] = getattr(self, attr)
        for name, x in zip(self.input_names, inputs):
            env[name] = x
        for name, x in named.items():
            if name not in self.input_names:
                raise InputError(f"onnx -> torch: no graph input named {name!r}")
            if name in env and name in self.input_names[:len(inputs)]:
                raise InputError(f"onnx -> torch: input {name!r} given twice")
            env[name] = x
        missing = [nm for nm in self.input_names if nm not in env]
        if missing:
            raise InputError(f"onnx -> torch: missing graph input(s) {', '.join(missing)}")
        for name in self.input_names:
            x = env[name]
            if not isinstance(x, torch.Tensor):
                env[name] = torch.as_tensor(np.asarray(x))
        key = self._signature(env) if self._static_nodes else None
        plan = self._plans.get(key) if key is not None else None
        if plan is not None:
            env.update(plan)
        for k, node in enumerate(self._nodes):
            if plan is not None and k in self._static_nodes:
                continue
            xs = [env[nm] if nm else None for nm in node.inputs]
            while xs and xs[-1] is None:
                xs.pop()
            ys = OPS[node.op](node, xs)
            if isinstance(ys, (tuple, list)):
                for nm, y in zip(node.outputs, ys):
                    if nm:
                        env[nm] = y
            else:
                env[node.outputs[0]] = ys
        if key is not None and plan is None:
            if len(self._plans) >= 16:
                self._plans.clear()
            self._plans[key] = {nm: _with_host(env[nm]) for nm in self._static_needed}
        outs = tuple(env[nm] for nm in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the model with the current parameter values written back."""
        m = onnx.ModelProto()
        m.CopyFrom(self._model)
        g = m.graph
        for attr, where in self._where.items():
            p = getattr(self, attr)
            if where[0] == "init":
                write_tensor(g.initializer[where[1]], p)
                continue
            node = g.node[where[1]]
            for a in node.attribute:
                if a.name != where[2]:
                    continue
                if where[2] == "value":
                    write_tensor(a.t, p)
                else:
                    del a.floats[:]
                    a.floats.extend(float(v) for v in p.detach().cpu().double().reshape(-1).tolist())
        return m

    def extra_repr(self):
        return f"opset={self.opset}, nodes={len(self._nodes)}, params={self.n_params()}"
