"""Fibration symmetry breaking on ONNX models (:mod:`fibgraph.breaking`), on
the hypergraph pipeline: the importer's graph, the one engine's covers, the
writer's groups and axes.

The covers (``covering``: fibers, then their out-balanced refinement under
the same criteria with the fibers' scales carried, i.e. fibers meet flavoured
opfibers; ``fibration``: fibers alone) are grouped by the writer
(:func:`fibgraph.importers.onnx.write.groups.dag_groups`: one kept node per
group, its representative).  Every linear layer's weight is compressed
exactly as the writer compresses it (rows averaged, columns summed, scales
folded; :class:`~fibgraph.importers.onnx.write.axis.Axis`) and lifted back:
the base block goes to the kept (representative) rows and columns, the other
rows get fresh weights and bias (uniform, bound ``1/sqrt(fan_in)``: torch's
default for ``Linear``/``Conv``), the other columns zero.  Bias adds after a
``MatMul`` are lifted the same way.  Shapes, names and nodes are unchanged.

Reached: ``Gemm``, ``MatMul``, ``Conv`` (group 1) with their bias inputs or
bias ``Add``/``Sub``, element-wise activations, pooling, reshapes (MLPs and
CNNs).  A covered node set read or written by anything else (LSTM/GRU,
attention, norms, residual sums, grouped convs, reductions) is refused with
one line: their lifts are not written yet.  Node sets without covers pass
through whatever op touches them.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import onnx
from onnx import numpy_helper

from fibgraph.breaking import BREAK_SYMMETRIES
from fibgraph.engine import DEFAULT_RTOL, refine
from fibgraph.errors import InputError

from .onnx.records import Kind
from .onnx.write.axis import Axis, column_scales
from .onnx.write.groups import dag_groups

__all__ = ["onnx_covers", "break_onnx_model", "break_torch_via_onnx"]


def onnx_covers(imp, eps=0.0, symmetry="covering", linkage="average", metric="cosine", rtol=DEFAULT_RTOL,
                rescale=True):
    """``(labels, scales)`` per node of a :class:`DagImport`: the covers under
    the hypergraph path's criteria (:func:`fibgraph.importers.dag_api.colour_dag`'s)."""
    from .dag_api import colour_dag

    if symmetry not in BREAK_SYMMETRIES:
        raise InputError(f"--symmetry {symmetry}: breaking takes {' or '.join(BREAK_SYMMETRIES)}")
    fib = colour_dag(imp, "fibration", eps, None, linkage, metric, rtol, rescale)
    if symmetry == "fibration":
        return fib.labels, fib.scales
    r = refine(imp.graph, "out", fib.info["criteria"], fib.labels, scales=fib.scales)
    return r.labels, r.scales


def _oriented(op, attrs, slot, W):
    """The weight as (out, in, ...) and the inverse map back to its stored layout."""
    if op == "Conv":
        return W, lambda M: M
    if op == "Gemm":
        if attrs.get("transB", 0):
            return W, lambda M: M
        return W.T, lambda M: M.T
    if slot == 1:                       # MatMul x @ B: B (K, N)
        return W.T, lambda M: M.T
    return W, lambda M: M               # MatMul A @ x


class _Lifter:
    def __init__(self, imp, labels, scales, rng):
        self.imp, self.rng = imp, rng
        self.gid, self.kept, _ = dag_groups(imp, labels)
        self.cs = column_scales(imp, scales)
        self.model = onnx.ModelProto()
        self.model.CopyFrom(imp.model)
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self.nodes = list(self.model.graph.node)
        self.fan_in = {}                 # output tensor of a linear op -> its fan-in
        self.layers = []

    def axis(self, tname):
        return Axis(self.imp.layouts[tname], self.gid, self.kept, False, self.cs)

    def value(self, name):
        v = self.imp.consts.get(name)
        return None if v is None else np.asarray(v)

    def put(self, node, slot, value, like):
        name = node.input[slot]
        arr = np.asarray(value).astype(like.dtype).reshape(like.shape)
        t = numpy_helper.from_array(arr, name)
        if name in self.inits:
            self.inits[name].CopyFrom(t)
        else:                            # a Constant node's tensor: a new initializer
            new = f"{name}__fsb"
            t.name = new
            self.model.graph.initializer.append(t)
            self.inits[new] = self.model.graph.initializer[-1]
            node.input[slot] = new

    def touched(self, tname):
        """True when the tensor's unit axis holds nodes that are not kept."""
        if tname not in self.imp.layouts:
            return False
        return not self.axis(tname).identity or self.axis(tname).scaled

    def linear(self, rec):
        node = self.nodes[rec.index]
        a = rec.attrs
        if rec.op not in ("Gemm", "MatMul", "Conv") or int(a.get("group", 1)) != 1 or rec.depthwise:
            return self.refuse(rec, f"{rec.op} (group {a.get('group', 1)})")
        ax_in, ax_out = self.axis(rec.input), self.axis(rec.output)
        slot = 1 if rec.op != "MatMul" or rec.x_axis == -1 else 0
        wname = node.input[slot]
        W0 = self.value(wname)
        M, back = _oriented(rec.op, a, slot, W0.astype(np.float64))
        self.fan_in[rec.output] = int(np.prod(M.shape[1:]))
        if ax_in.identity and ax_out.identity and not (ax_in.scaled or ax_out.scaled):
            return
        sh = M.shape
        Rm, C = ax_out.mean_matrix(scaled=True), ax_in.sum_matrix(scaled=True)
        M2 = (Rm @ M.reshape(sh[0], -1)).reshape(ax_out.L_hat, sh[1], -1).transpose(1, 0, 2).reshape(sh[1], -1)
        Wh = (C @ M2).reshape(ax_in.L_hat, ax_out.L_hat, *sh[2:]).swapaxes(0, 1)
        new = np.zeros_like(M)
        new[np.ix_(ax_out.keep_pos, ax_in.keep_pos)] = Wh
        fresh = np.setdiff1d(np.arange(ax_out.L), ax_out.keep_pos)
        bound = 1.0 / math.sqrt(max(self.fan_in[rec.output], 1))
        new[fresh] = self.rng.uniform(-bound, bound, (fresh.size,) + sh[1:])
        self.put(node, slot, back(new), W0)
        if rec.op in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
            b0 = self.value(node.input[2])
            if b0 is not None and b0.size == ax_out.L:
                b = b0.reshape(-1).astype(np.float64)
                bn = np.zeros_like(b)
                bn[ax_out.keep_pos] = ax_out.mean_along(b, 0, scaled=True)
                bn[fresh] = self.rng.uniform(-bound, bound, fresh.size)
                self.put(node, 2, bn, b0)
        self.layers.append({"weight": wname, "op": rec.op, "units": int(ax_out.L),
                            "classes": int(ax_out.L_hat), "cover_sizes": sorted(
                                (int(m) for m in ax_out.m if m > 1), reverse=True),
                            "reinit": [int(i) for i in fresh]})

    def elementwise(self, rec):
        if not self.touched(rec.output):
            return
        if rec.op not in ("Add", "Sub") or not rec.consts or len(rec.streams) != 1:
            return self.refuse(rec, rec.op)
        node = self.nodes[rec.index]
        ax = self.axis(rec.output)
        rank = len(self.imp.shapes[rec.output])
        fresh = np.setdiff1d(np.arange(ax.L), ax.keep_pos)
        bound = 1.0 / math.sqrt(max(self.fan_in.get(rec.streams[0], 1), 1))
        for slot, x in enumerate(node.input):
            if x not in rec.consts:
                continue
            c0 = self.value(x)
            if c0 is None:
                continue
            a = ax.axis - (rank - c0.ndim)
            if a < 0 or c0.shape[a] == 1:
                continue
            c = np.moveaxis(c0.astype(np.float64), a, 0)
            cn = np.zeros_like(c)
            cn[ax.keep_pos] = ax.mean_along(c, 0, scaled=True)
            cn[fresh] = self.rng.uniform(-bound, bound, (fresh.size,) + c.shape[1:])
            self.put(node, slot, np.moveaxis(cn, 0, a), c0)

    def refuse(self, rec, what):
        raise InputError(f"break: covers reach {what} at node {rec.node!r}, which breaking does not lift yet "
                         "(it lifts Gemm/MatMul/Conv layers and their bias adds: MLPs and CNNs)")

    def other(self, rec):
        """Refuse a record of any other kind that reads or writes a node set with
        covers (every tensor name and node set index among its fields)."""
        what = getattr(rec, "op", "") or rec.kind.value
        for f in dataclasses.fields(rec):
            v = getattr(rec, f.name)
            items = v if isinstance(v, (tuple, list)) else (v,)
            for it in items:
                if isinstance(it, str) and self.touched(it):
                    return self.refuse(rec, what)
                if f.name in ("space", "spaces", "hidden") and isinstance(it, (int, np.integer)) \
                        and 0 <= it < len(self.imp.spaces) and not self.kept[self.imp.spaces[it].ids].all():
                    return self.refuse(rec, what)

    def run(self):
        for rec in self.imp.records:
            if rec.kind is Kind.LINEAR:
                self.linear(rec)
            elif rec.kind is Kind.ELEMENTWISE:
                self.elementwise(rec)
            else:
                self.other(rec)
        return self.model


def break_onnx_model(imp, eps=0.0, symmetry="covering", seed=None, linkage="average", metric="cosine",
                     rtol=DEFAULT_RTOL, rescale=True):
    """Break the covers of an imported ONNX model: ``(model, report)`` with the
    lifted model (same shapes) and per layer the covers and units re-initialised."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    t0 = time.perf_counter()
    labels, scales = onnx_covers(imp, eps, symmetry, linkage, metric, rtol, rescale)
    lf = _Lifter(imp, labels, scales, rng)
    model = lf.run()
    rep = {"symmetry": symmetry, "eps": float(eps), "layers": lf.layers,
           "reinit": int(sum(len(r["reinit"]) for r in lf.layers)),
           "seconds": {"break": round(time.perf_counter() - t0, 4)}}
    return model, rep


def break_torch_via_onnx(module, xs, crit, symmetry, rng):
    """Break a torch module that is not a Sequential chain: export it, break
    the export, copy the lifted initializers back by parameter name."""
    import torch

    from fibgraph.engine import Tolerance

    from .onnx.importer import import_dag
    from .torch_export import export_model

    if len(xs) != 1:
        raise InputError("break: a module with several inputs (export takes one example tensor)")
    model = export_model(module, xs[0])
    imp = import_dag(model, feeds={model.graph.input[0].name: xs[0].detach().cpu().numpy()})
    if isinstance(crit, Tolerance):
        kw = {"eps": crit.eps, "linkage": crit.linkage, "metric": crit.metric, "rescale": crit.rescale}
    else:
        kw = {"eps": 0.0, "rtol": crit.rtol}
    lifted, rep = break_onnx_model(imp, symmetry=symmetry, seed=rng, **kw)
    params = dict(module.named_parameters())
    inits = {t.name: t for t in lifted.graph.initializer}
    changed = {r["weight"] for r in rep["layers"]}
    for name, p in params.items():
        t = inits.get(name) or inits.get(f"{name}__fsb")
        if t is None:
            if name in changed:
                raise InputError(f"break: parameter {name} not found in the export")
            continue
        arr = numpy_helper.to_array(t)
        if arr.shape != tuple(p.shape):
            if name in changed:
                raise InputError(f"break: the export stores {name} as {arr.shape}, the module as {tuple(p.shape)}")
            continue
        with torch.no_grad():
            p.copy_(torch.as_tensor(arr.copy(), dtype=p.dtype))
    return {"layers": rep["layers"], "reinit": rep["reinit"]}
