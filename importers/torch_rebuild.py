"""A torch module's ONNX export spoken in torch names, and a base ONNX model
of that export rebuilt as the module's own classes.

- :func:`export_named`: the module exported in memory (legacy exporter) with
  every weight initializer renamed to the torch tensor it holds
  (``encoder.layers.0.linear1.weight``, not ``onnx::MatMul_185``), so the
  hypergraph path's layer names, reports, eps files and errors are torch
  names.  BatchNorm stays visible (the export runs without constant folding
  when the module has a ``_BatchNorm``: folding would fuse it into the Conv
  before us); attention is exported through its ONNX-exportable path (grad
  enabled: in eval mode under ``no_grad`` torch takes the fused
  ``_transformer_encoder_layer_fwd``, which has no ONNX export).
- :func:`rebuild`: ``copy.deepcopy`` of the module whose layers are replaced
  by new ones of the base's shapes (``nn.Linear``, ``nn.Conv1d/2d/3d``,
  ``nn.BatchNorm1d/2d/3d``, ``nn.LSTM``, ``nn.GRU``, transformers'
  ``Conv1D`` (GPT-2's projections); every other layer must
  keep its shapes, e.g. ``nn.MultiheadAttention``, ``nn.LayerNorm``), the
  parameters read back from the base's tensors through the inverse of the
  export's packing (transposed ``MatMul`` copies; LSTM/GRU gates reordered
  from ONNX's iofc / zrh to torch's ifgo / rzn, the two biases split).

How the export packs each tensor is found by value: the ONNX initializer
must equal the torch tensor after the packing (exactly), so a match is never
a guess.  Exporters deduplicate equal initializers; an ``Identity`` whose
output is named by a torch tensor points at its source.
"""
from __future__ import annotations

import copy
import io
import re
import warnings

import numpy as np

from fibgraph.errors import InputError

__all__ = ["export_named", "rebuild", "base_tensors", "param_count", "tensor_sources", "is_hf_conv1d"]

BASE_SUFFIX = re.compile(r"(__base\d+)+$")
REBUILD_HINT = ("the base is kept as fibgraph.importers.onnx.to_torch.OnnxModule (an ONNX interpreter) "
                "where fallback is allowed")
# gate blocks of the ONNX packing, as indices into torch's order
_ONNX_GATES = {"LSTM": [0, 3, 1, 2],      # ONNX i o f c  <- torch i f g o
               "GRU": [1, 0, 2]}          # ONNX z r h    <- torch r z n


def _torch():
    import torch

    return torch


def _tensors(module):
    """``{torch name: tensor}``: parameters and floating buffers (running
    statistics), first name of each shared tensor."""
    out, seen = {}, set()
    for n, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        out[n] = t.detach().cpu().numpy()
    return out


def _blocks(a, order, axis=0):
    k = len(order)
    parts = np.split(a, k, axis=axis)
    return np.concatenate([parts[i] for i in order], axis=axis)


def _inverse(order):
    inv = [0] * len(order)
    for i, j in enumerate(order):
        inv[j] = i
    return inv


def _rnn_packs(module, tensors):
    """``{torch name: (packed array of one direction, rnn kind, part, direction,
    key)}`` for every ``nn.LSTM``/``nn.GRU`` layer; ``key`` names the ONNX
    tensor the part lands in (``W``/``R``/``B`` of one layer, directions
    stacked)."""
    nn = _torch().nn
    out = {}
    for path, m in module.named_modules():
        if type(m) not in (nn.LSTM, nn.GRU):
            continue
        kind = "LSTM" if isinstance(m, nn.LSTM) else "GRU"
        if kind == "LSTM" and m.proj_size:
            continue
        order = _ONNX_GATES[kind]
        pre = f"{path}." if path else ""
        for layer in range(m.num_layers):
            for d, suf in enumerate(("", "_reverse")[:2 if m.bidirectional else 1]):
                for part, nm in (("W", "weight_ih"), ("R", "weight_hh"), ("Bi", "bias_ih"), ("Bh", "bias_hh")):
                    name = f"{pre}{nm}_l{layer}{suf}"
                    if name in tensors:
                        key = f"{pre}{'bias' if part[0] == 'B' else nm}_l{layer}"
                        out[name] = (_blocks(tensors[name], order), kind, part, d, key)
    return out


def tensor_sources(mp, module):
    """``{torch name: (initializer name, how)}`` with ``how`` one of
    ``("id",)``, ``("T",)`` or ``("rnn", kind, part, direction)``; and the
    new name of every matched initializer."""
    from onnx import numpy_helper

    tensors = _tensors(module)
    inits = {t.name: t for t in mp.graph.initializer}
    arrays = {}

    def arr(name):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    src, rename = {}, {}
    alias = {n.output[0]: n.input[0] for n in mp.graph.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits}
    scopes = {}
    for n in mp.graph.node:
        for x in n.input:
            if x in inits:
                scopes.setdefault(x, set()).add(_scope(n.name))
    byshape = {}
    for n, t in inits.items():
        byshape.setdefault(tuple(t.dims), []).append(n)

    def owner_first(name, cands):
        """Candidates read by the tensor's own module first."""
        path = name.rpartition(".")[0]
        return sorted(cands, key=lambda c: path not in scopes.get(c, ()))

    for name, t in tensors.items():
        n = name if name in inits else alias.get(name)
        if n is not None and arr(n).shape == t.shape and np.array_equal(arr(n), t.astype(arr(n).dtype)):
            src[name] = (n, ("id",))
            continue
        for n in owner_first(name, byshape.get(t.shape, [])):          # a deduplicated copy (_split_shared)
            if np.array_equal(arr(n), t.astype(arr(n).dtype)):
                src[name] = (n, ("id",))
                rename.setdefault(n, name)
                break
    rnn = _rnn_packs(module, tensors)
    # RNN W/R/B: direction stacks, B = [b_ih; b_hh] per direction
    for key in sorted({v[4] for v in rnn.values()}):
        members = {n: v for n, v in rnn.items() if v[4] == key}
        ndir = 1 + max(v[3] for v in members.values())
        if any(v[2] in ("Bi", "Bh") for v in members.values()):
            per = []
            for d in range(ndir):
                bi = next((v[0] for v in members.values() if v[3] == d and v[2] == "Bi"), None)
                bh = next((v[0] for v in members.values() if v[3] == d and v[2] == "Bh"), None)
                if bi is None or bh is None:
                    per = None
                    break
                per.append(np.concatenate([bi, bh]))
        else:
            per = [next(v[0] for v in members.values() if v[3] == d) for d in range(ndir)]
        if per is None:
            continue
        want = np.stack(per)
        hit = next((n for n in owner_first(key, byshape.get(want.shape, []))
                    if np.array_equal(arr(n), want.astype(arr(n).dtype))), None)
        if hit is None:
            continue
        for n, v in members.items():
            src[n] = (hit, ("rnn", v[1], v[2], v[3]))
        rename.setdefault(hit, key)
    # transposed copies (MatMul exports of Linear / packed in_proj)
    for name, t in tensors.items():
        if name in src or t.ndim != 2:
            continue
        for n in owner_first(name, byshape.get(t.shape[::-1], [])):
            if np.array_equal(arr(n), t.T.astype(arr(n).dtype)):
                src[name] = (n, ("T",))
                rename.setdefault(n, name)
                break
    missing = [n for n in tensors if n not in src]
    # a tensor of a module the traced forward never reaches (a BERT pooler
    # under last_hidden_state): not in the export, kept as it is
    scopes = {"/" + n.name.strip("/").rsplit("/", 1)[0] + "/" for n in mp.graph.node if "/" in n.name}
    read = {i for n in mp.graph.node for i in n.input}
    missing = [n for n in missing
               if n in read or any(("/" + n.rsplit(".", 1)[0].replace(".", "/") + "/") in s for s in scopes)]
    if missing:
        raise InputError(f"tensors of the module not found in its ONNX export (folded away or packed in a way "
                         f"not read back): {', '.join(missing[:5])}")
    return src, rename


def _scope(node_name):
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else ""


def _split_shared(mp):
    """Exporters deduplicate equal initializers: two torch tensors of equal
    value (the clones of an untrained ``nn.TransformerEncoder``) become one
    initializer read by two modules.  Give each reading module (torch scope
    of the node name) its own copy, so that each tensor is found, and
    shrunk, on its own."""
    g = mp.graph
    inits = {t.name: t for t in g.initializer}
    outs = {o.name for o in g.output}
    for n in [n for n in g.node if n.op_type == "Identity" and n.input and n.input[0] in inits
              and n.output[0] not in outs]:
        t = g.initializer.add()                 # the exporter's dedup Identity -> an initializer of its own
        t.CopyFrom(inits[n.input[0]])
        t.name = n.output[0]
        inits[t.name] = t
        g.node.remove(n)
    users = {}
    for n in g.node:
        for x in n.input:
            if x in inits:
                users.setdefault(x, {}).setdefault(_scope(n.name), []).append(n)
    for name, by in users.items():
        if len(by) < 2 or "" in by:
            continue
        for k, (scope, nodes) in enumerate(sorted(by.items())[1:], 1):
            t = g.initializer.add()
            t.CopyFrom(inits[name])
            t.name = f"{name}__{scope}"
            for n in nodes:
                for i, x in enumerate(n.input):
                    if x == name:
                        n.input[i] = t.name


def _rename(mp, rename):
    """Rename initializers (and every use) in place; a new name already used
    in the graph keeps the ONNX name."""
    g = mp.graph
    used = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | \
        {v.name for v in list(g.input) + list(g.output)}
    done = {}
    for old, new in rename.items():
        if new not in used and new not in done.values():
            done[old] = new
    if not done:
        return {}
    for t in g.initializer:
        t.name = done.get(t.name, t.name)
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in done:
                n.input[i] = done[x]
    for v in list(g.input) + list(g.value_info):
        v.name = done.get(v.name, v.name)
    return done


def _needs(module):
    nn = _torch().nn
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    attn = any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
               for m in module.modules())
    return bn, attn


_CALL_SLOT = "m"


def _Call(module):
    """``module`` called from a module of our own (``forward(x)`` is the first
    tensor of ``module(x)``), held in the attribute ``_CALL_SLOT``."""
    nn = _torch().nn

    class Call(nn.Module):
        def __init__(self, m):
            super().__init__()
            setattr(self, _CALL_SLOT, m)

        def forward(self, x):
            from .torch_train import first_tensor

            return first_tensor(getattr(self, _CALL_SLOT)(x))    # not a cache object (transformers' DynamicCache)

    return Call(module)


def export_named(module, example, opset=17):
    """``(ModelProto, sources)``: the module's ONNX export (input ``x``,
    output ``y``, dynamic batch) with initializers named by the torch tensors
    they hold; ``sources[torch name] = (initializer name, how)``."""
    import onnx

    torch = _torch()
    bn, attn = _needs(module)
    was = module.training
    f = io.BytesIO()
    kw = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
              opset_version=opset)
    if bn:
        kw["do_constant_folding"] = False
    wrapped = False
    try:
        module.eval()
        with warnings.catch_warnings(), torch.set_grad_enabled(attn):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, (example,), f, dynamo=False, **kw)
            except TypeError:
                # a forward behind keyword-binding decorators (transformers'
                # models: "got multiple values for argument 'use_cache'")
                # traces when it is called from a module of our own
                f = io.BytesIO()
                torch.onnx.export(_Call(module), (example,), f, dynamo=False, **kw)
                wrapped = True
    except Exception as e:
        raise InputError(f"torch -> ONNX export failed: {str(e).splitlines()[0][:300]}") from None
    finally:
        module.train(was)
    mp = onnx.load_from_string(f.getvalue())
    if wrapped:
        for n in mp.graph.node:                     # node scopes as the module's own: /encoder/..., not /m/encoder/...
            if n.name.startswith(f"/{_CALL_SLOT}/"):
                n.name = n.name[len(_CALL_SLOT) + 1:]
    _split_shared(mp)
    src, rename = tensor_sources(mp, module)
    done = _rename(mp, rename)
    src = {k: (done.get(i, i), how) for k, (i, how) in src.items()}
    return mp, src


def base_tensors(base, sources):
    """``{torch name: array}``: every tensor of the module read back from the
    base (a rewritten initializer is ``<name>__base<k>``)."""
    from onnx import numpy_helper

    by = {}
    for t in base.graph.initializer:
        by.setdefault(BASE_SUFFIX.sub("", t.name), []).append(t)
    alias = {n.output[0]: n.input[0] for n in base.graph.node if n.op_type == "Identity" and n.input}
    out = {}
    for name, (init, how) in sources.items():
        cands = by.get(init, [])
        if not cands:
            # deduplicated: the base may read it through an Identity named by the tensor
            a = alias.get(name)
            cands = by.get(BASE_SUFFIX.sub("", a), []) if a else []
            cands = [t for t in cands if t.name == a] or cands
        if not cands:
            raise InputError(f"{name}: its tensor {init!r} is not in the base")
        vals = {t.name: numpy_helper.to_array(t) for t in cands}
        got = {_unpack(a, how).tobytes(): _unpack(a, how) for a in vals.values()}
        if len(got) > 1:
            raise InputError(f"{name}: the base holds {len(got)} different versions of it (the layer is used "
                             "in two places that shrink differently)")
        out[name] = next(iter(got.values()))
    return out


def _unpack(a, how):
    if how[0] == "id":
        return a
    if how[0] == "T":
        return a.T
    _, kind, part, d = how
    inv = _inverse(_ONNX_GATES[kind])
    a = a[d]
    if part in ("Bi", "Bh"):
        half = a.shape[0] // 2
        a = a[:half] if part == "Bi" else a[half:]
    return _blocks(a, inv)


def param_count(module, values):
    """Trainable parameters of the base in torch terms: the sizes the base
    gives the module's parameters (each shared parameter once)."""
    seen, n = set(), 0
    for name, p in module.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += int(values[name].size) if name in values else p.numel()   # not in the export: unchanged
    return n


def is_hf_conv1d(mod):
    """transformers' ``Conv1D`` (GPT-2's projections): a linear layer whose
    weight is stored (in, out) and whose output width is the attribute ``nf``;
    known by its class name and fields, so transformers is never imported."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "weight") and \
        getattr(mod, "weight").dim() == 2 and tuple(mod.weight.shape)[1] == mod.nf


def _new_layer(mod, new, path):
    """A layer of ``mod``'s class with the shapes of ``new`` (name -> array),
    or ``mod`` when nothing changes shape; InputError naming ``path`` when the
    class cannot take the new shapes."""
    nn = _torch().nn
    same = all(tuple(new[k].shape) == tuple(getattr(mod, k).shape) for k in new)
    if same:
        return mod
    t = type(mod)
    if t is nn.Linear:
        W = new["weight"]
        return nn.Linear(W.shape[1], W.shape[0], bias=mod.bias is not None)
    if is_hf_conv1d(mod):                  # transformers' Conv1D: weight (nx, nf), y = x @ W + b
        W = new["weight"]
        return t(W.shape[1], W.shape[0])         # Conv1D(nf, nx)
    if t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and mod.groups == 1:
        W = new["weight"]
        return t(W.shape[1], W.shape[0], mod.kernel_size, stride=mod.stride, padding=mod.padding,
                 dilation=mod.dilation, bias=mod.bias is not None, padding_mode=mod.padding_mode)
    if t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        c = next(new[k].shape[0] for k in ("running_mean", "weight") if k in new)
        return t(c, eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                 track_running_stats=mod.track_running_stats)
    if t in (nn.LSTM, nn.GRU):
        gates = 4 if t is nn.LSTM else 3
        H = new["weight_hh_l0"].shape[0] // gates
        if new["weight_hh_l0"].shape[1] != H:
            raise InputError(f"module {path!r} ({t.__name__}): the base's recurrent weight is "
                             f"{tuple(new['weight_hh_l0'].shape)}, not {gates}H x H")
        return t(new["weight_ih_l0"].shape[1], H, num_layers=mod.num_layers, bias=mod.bias,
                 batch_first=mod.batch_first, dropout=mod.dropout, bidirectional=mod.bidirectional)
    changed = [k for k in new if tuple(new[k].shape) != tuple(getattr(mod, k).shape)]
    raise InputError(f"module {path!r} ({t.__name__}) changes shape in the base ({', '.join(changed)}: "
                     f"{tuple(getattr(mod, changed[0]).shape)} -> {tuple(new[changed[0]].shape)}); "
                     f"a {t.__name__} cannot be rebuilt with other shapes")


def rebuild(template, values):
    """``copy.deepcopy(template)`` with every layer of other shapes replaced by
    a new layer of its class, and every parameter/buffer set from ``values``
    (torch name -> array)."""
    torch = _torch()
    canon = {}
    for n, t in list(template.named_parameters(remove_duplicate=False)) + \
            list(template.named_buffers(remove_duplicate=False)):
        canon.setdefault(id(t), n)
    small = copy.deepcopy(template)
    tmods = dict(template.named_modules())
    for path, mod in list(small.named_modules()):
        own = [k for k, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
               if t is not None and t.is_floating_point()]
        own = [k for k in own if canon.get(id(getattr(tmods[path], k))) in values]
        if not own:
            continue
        new = {k: values[canon[id(getattr(tmods[path], k))]] for k in own}
        repl = _new_layer(mod, new, path)
        if repl is not mod:
            ref = getattr(mod, own[0])
            repl = repl.to(dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for k in own:
                p = getattr(repl, k)
                if tuple(p.shape) != tuple(new[k].shape):
                    raise InputError(f"module {path!r}: {k} has shape {tuple(p.shape)} in the rebuilt layer, "
                                     f"{tuple(new[k].shape)} in the base")
                p.copy_(torch.as_tensor(np.array(new[k]), dtype=p.dtype))
        if repl is not mod:
            if hasattr(repl, "flatten_parameters"):
                repl.flatten_parameters()
            parent, _, leaf = path.rpartition(".")
            setattr(small.get_submodule(parent) if parent else small, leaf, repl)
    small.train(template.training)
    return small
