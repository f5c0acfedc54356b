"""Shared model builders for the ONNX / CLI tests.

Everything here is deterministic given a numpy Generator.  Hand-built models
use ``onnx.helper``; torch models are built on demand (torch is imported
lazily so that hand-built-only tests do not pay for it).

Planted fibers
--------------
``planted_layer`` builds a weight matrix whose rows are *balanced* over the
classes of the previous level (equal per-class sums, equal bias inside a
fiber) but, where a class has several members, NOT duplicated: the class sum
is split at random between its members.  Base rows are drawn at random per
fiber, so the coarsest balanced partition is exactly the planted one (two
fibers with equal base rows must differ in the bias: ``same_row_as``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPSET = 17


# ----------------------------------------------------------------- partitions
def canonical(labels):
    """Relabel so that classes are numbered by first occurrence."""
    labels = np.asarray(labels)
    out = np.empty(labels.size, dtype=np.int64)
    seen = {}
    for i, v in enumerate(labels.tolist()):
        out[i] = seen.setdefault(v, len(seen))
    return out


def classes(labels):
    """Classes as sorted index lists, ordered by smallest member (the report's order)."""
    labels = canonical(labels)
    return [np.flatnonzero(labels == c).tolist() for c in range(int(labels.max()) + 1)] if labels.size else []


def refines(fine, coarse):
    """Every class of ``fine`` lies inside one class of ``coarse`` (both as lists of classes)."""
    where = {}
    for c, members in enumerate(coarse):
        for m in members:
            where[m] = c
    return all(len({where[m] for m in cl}) == 1 for cl in fine)


def meet(a, b):
    """Intersection of two partitions given as lists of classes."""
    la, lb = {}, {}
    for c, ms in enumerate(a):
        for m in ms:
            la[m] = c
    for c, ms in enumerate(b):
        for m in ms:
            lb[m] = c
    n = len(la)
    return classes([la[i] * 10_000 + lb[i] for i in range(n)])


# ------------------------------------------------------------ planted weights
def aggregate(W, row_labels, col_labels, row_mean=True):
    """Base weight: rows averaged over row classes, columns summed over column classes."""
    W = np.asarray(W, dtype=np.float64)
    rl, cl = canonical(row_labels), canonical(col_labels)
    R = np.zeros((rl.max() + 1, rl.size))
    R[rl, np.arange(rl.size)] = 1
    if row_mean:
        R /= R.sum(axis=1, keepdims=True)
    C = np.zeros((cl.max() + 1, cl.size))
    C[cl, np.arange(cl.size)] = 1
    return R @ W @ C.T


def planted_layer(rng, in_labels, out_labels, scale=0.6, split=0.8, same_row_as=None,
                  bias_scale=0.5, base_W=None, base_b=None):
    """Weight (n_out, n_in) and bias (n_out,) with the planted fibers ``out_labels``.

    ``in_labels``: the previous level's partition (inputs: all distinct).
    ``same_row_as``: {fiber: other fiber}: the fiber gets the other's base row
    but its own bias (the two must NOT merge).  Returns (W, b, base_W, base_b)
    where base_* are the exact base (compressed) weights.
    """
    il, ol = canonical(in_labels), canonical(out_labels)
    m, k = int(ol.max()) + 1, int(il.max()) + 1
    if base_W is None:
        base_W = rng.normal(0, scale, (m, k))
    if base_b is None:
        base_b = rng.normal(0, bias_scale, m)
        base_b[np.abs(base_b) < 0.1] += 0.3      # nonzero biases
    base_W = np.array(base_W, dtype=np.float64)
    for c, other in (same_row_as or {}).items():
        base_W[c] = base_W[other]
    sizes = np.bincount(il)
    W = np.zeros((ol.size, il.size))
    for i in range(ol.size):
        for c in range(k):
            members = np.flatnonzero(il == c)
            share = np.full(members.size, base_W[ol[i], c] / sizes[c])
            if members.size > 1:
                noise = rng.normal(0, split, members.size)
                share = share + noise - noise.mean()
            W[i, members] = share
    b = base_b[ol].copy()
    return W, b, base_W, base_b


@dataclass
class PlantedMLP:
    Ws: list                      # float64 weights (n_out, n_in)
    bs: list
    labels: list                  # planted canonical labels per hidden layer
    base_Ws: list = field(default_factory=list)   # exact base weights (float64)
    base_bs: list = field(default_factory=list)

    @property
    def n_in(self):
        return self.Ws[0].shape[1]

    def fibers(self):
        """Expected report fibers per layer (output layer: singletons)."""
        out = [classes(lab) for lab in self.labels]
        out.append([[i] for i in range(self.Ws[-1].shape[0])])
        return out

    def params_after(self):
        sizes = [self.n_in] + [int(lab.max()) + 1 for lab in self.labels] + [self.Ws[-1].shape[0]]
        return int(sum(sizes[i + 1] * sizes[i] + sizes[i + 1] for i in range(len(sizes) - 1)))

    def params_before(self):
        return int(sum(W.size + b.size for W, b in zip(self.Ws, self.bs)))


def planted_mlp(rng, n_in, hidden_labels, n_out, same_row_as=None, scale=0.6, split=0.8):
    """An MLP with planted (balanced, not duplicated) fibers in every hidden layer.

    ``hidden_labels``: one label list per hidden layer.  ``same_row_as``:
    {layer index: {fiber: other fiber}}.  The output layer is dense random.
    """
    same_row_as = same_row_as or {}
    prev = np.arange(n_in)
    Ws, bs, labels, bWs, bbs = [], [], [], [], []
    for l, lab in enumerate(hidden_labels):
        lab = canonical(lab)
        W, b, bW, bb = planted_layer(rng, prev, lab, scale=scale, split=split,
                                     same_row_as=same_row_as.get(l))
        Ws.append(W)
        bs.append(b)
        labels.append(lab)
        bWs.append(bW)
        bbs.append(bb)
        prev = lab
    Wo = rng.normal(0, scale, (n_out, prev.size))
    bo = rng.normal(0, 0.5, n_out)
    Ws.append(Wo)
    bs.append(bo)
    bWs.append(aggregate(Wo, np.arange(n_out), prev))
    bbs.append(bo)
    return PlantedMLP(Ws, bs, labels, bWs, bbs)


# ------------------------------------------------------------- ONNX builders
def small_planted_mlp(seed=0):
    """``(planted, model)``: a 32-input MLP with two planted hidden layers (64
    units in 16 fibers of 4, 48 in 12 fibers) and 3 outputs, as ONNX."""
    rng = np.random.default_rng(seed)
    p = planted_mlp(rng, 32, [np.repeat(np.arange(16), 4), np.tile(np.arange(12), 4)], 3)
    return p, mlp_onnx(p.Ws, p.bs)


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)


def mlp_onnx(Ws, bs, act="Relu", form="gemm", out_op=None, batch="N", input_name="x",
             output_name="y", name="mlp", extra_nodes=None, dtype=np.float32, constants=False):
    """A hand-built MLP.  ``form``: 'gemm' (transB=1), 'gemm_ab' (second layer
    stored transB=0 with alpha=0.5 and beta=2), 'matmul' (MatMul + Add) or
    'matmul_rev' (MatMul, then Add(bias, product)).
    ``act``: one op type or a list per hidden layer.  ``out_op``: None,
    'Softmax' or 'LogSoftmax' after the last layer.  Weights are named
    W1, W2, ...; biases b1, b2, ...  ``dtype``: float32 or float64 (weights,
    input and output).  ``constants``: weights as Constant nodes instead of
    initializers (biases stay initializers).
    """
    acts = act if isinstance(act, (list, tuple)) else [act] * (len(Ws) - 1)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []

    def _tensor(name, arr):
        t = numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)
        if constants and name.startswith("W"):
            nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}", value=t))
            return []
        return [t]

    cur = input_name
    for l, (W, b) in enumerate(zip(Ws, bs)):
        wn, bn = f"W{l + 1}", f"b{l + 1}"
        z = f"z{l + 1}"
        if form in ("matmul", "matmul_rev"):
            inits += _tensor(wn, W.T) + _tensor(bn, b)
            nodes.append(helper.make_node("MatMul", [cur, wn], [f"mm{l + 1}"], name=f"matmul{l + 1}"))
            operands = [f"mm{l + 1}", bn] if form == "matmul" else [bn, f"mm{l + 1}"]
            nodes.append(helper.make_node("Add", operands, [z], name=f"add{l + 1}"))
        elif form == "gemm_ab" and l == 1:
            inits += _tensor(wn, 2.0 * W.T) + _tensor(bn, b / 2.0)
            nodes.append(helper.make_node("Gemm", [cur, wn, bn], [z], name=f"gemm{l + 1}",
                                          alpha=0.5, beta=2.0, transB=0))
        else:
            inits += _tensor(wn, W) + _tensor(bn, b)
            nodes.append(helper.make_node("Gemm", [cur, wn, bn], [z], name=f"gemm{l + 1}", transB=1))
        cur = z
        if l < len(Ws) - 1:
            a = f"a{l + 1}"
            nodes.append(helper.make_node(acts[l], [cur], [a], name=f"act{l + 1}"))
            cur = a
            if extra_nodes and l in extra_nodes:
                for nd in extra_nodes[l](cur):
                    nodes.append(nd)
                    cur = nd.output[0]
    if out_op:
        nodes.append(helper.make_node(out_op, [cur], [output_name], name="out_op", axis=1))
    else:
        nodes[-1].output[0] = output_name
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(input_name, elem, [batch, Ws[0].shape[1]])],
        [helper.make_tensor_value_info(output_name, elem, [batch, Ws[-1].shape[0]])],
        inits)
    return finish(g)


def finish(graph):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="fibgraph-tests")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def save(model, path):
    path = str(path)
    onnx.save_model(model, path)
    return path


def run_onnx(model, x):
    """All outputs of ``model`` (path or ModelProto) on ``x`` (cast to the input's float type)."""
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    dt = np.float64 if inp.type == "tensor(double)" else np.float32
    return s.run(None, {inp.name: np.asarray(x, dtype=dt)})


def max_rel_diff(a, b):
    """max |a - b| / max(1, max |a|)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))


def io_signature(model):
    """(name, elem_type, dims as value-or-param) of inputs and outputs."""
    def one(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                for d in t.shape.dim]
        return (vi.name, t.elem_type, dims)
    return [one(v) for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}], \
        [one(v) for v in model.graph.output]


def initializer(model, name):
    """The initializer ``name`` of ``model``, or the one a compressed base
    wrote in its place (the hypergraph writer names a rewritten tensor
    ``<name>__base<k>``; a Constant node's value likewise)."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    renamed = [t for t in model.graph.initializer if t.name.startswith(f"{name}__base")]
    if len(renamed) == 1:
        return numpy_helper.to_array(renamed[0])
    raise KeyError(name)


def node_by_op(model, op):
    return [n for n in model.graph.node if n.op_type == op]


# ----------------------------------------------------------------- the CLI
def spy_sessions(monkeypatch):
    """Record every onnxruntime session fibgraph opens over a model's weights
    (``importers/onnx/external.session``): a list of ``(model, options)``
    that fills as sessions are made."""
    from fibgraph.importers.onnx import external

    made = []
    real = external.session

    def spy(model, options=None, providers=("CPUExecutionProvider",)):
        made.append((model, options))
        return real(model, options, providers)

    monkeypatch.setattr(external, "session", spy)
    return made


def cli_sub(*args, cwd=None):
    """Run the real CLI in a subprocess: (returncode, stdout, stderr)."""
    env = dict(os.environ)
    env.pop("FIBGRAPH_DEBUG", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "fibgraph", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd or ROOT, env=env, timeout=120)
    return p.returncode, p.stdout, p.stderr


def cli(capsys, *args):
    """Run ``fibgraph.cli.main`` in-process: (returncode, stdout, stderr)."""
    from fibgraph.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected ONE line on stderr, got {len(lines)}: {err!r}"
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in err.lower(), f"{n!r} not in {err!r}"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def folder_snapshot(folder):
    """{name: bytes} of the files in ``folder`` (hidden temp files included)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[name] = f.read()
    return out


# ------------------------------------------------------------- torch models
def torch_export(module, x, path, dynamo, input_name="x", output_name="y"):
    """Export with dynamic batch; ``dynamo`` picks the exporter."""
    import warnings

    import torch

    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (x,), str(path), input_names=[input_name], output_names=[output_name],
                              dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                              verbose=False)
        else:
            torch.onnx.export(module, (x,), str(path), input_names=[input_name], output_names=[output_name],
                              dynamo=False, dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                              opset_version=17)
    return str(path)


def torch_mlp(planted: PlantedMLP, act="relu"):
    import torch

    layers = []
    for l, (W, b) in enumerate(zip(planted.Ws, planted.bs)):
        lin = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(W, dtype=torch.float32))
            lin.bias.copy_(torch.tensor(b, dtype=torch.float32))
        layers.append(lin)
        if l < len(planted.Ws) - 1:
            layers.append(torch.nn.ReLU() if act == "relu" else torch.nn.Tanh())
    return torch.nn.Sequential(*layers).eval()


def wrap_module(layer):
    """``layer`` inside a module whose forward is ``layer(x)``: the TorchScript
    exporter passes ``is_causal`` as a tensor to a bare TransformerEncoderLayer
    (torch 2.13: "argument 'is_causal' must be bool, not Tensor"); wrapped, it
    exports fine with both exporters."""
    import torch

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    return Wrap(layer).eval()
