"""What keeps a base from being rebuilt as the torch module's own classes.

A base is written on the module's ONNX export; it can be read back into the
module's layers (:mod:`fibgraph.importers.torch_rebuild`) only where it
computes with the export's own nodes.  :func:`blocking` finds the computing
nodes the base has beyond the export (a LayerNorm of merged units replaced
by its multiplicity-weighted form, attention with shrunk head dims, a
rewritten shape vector) and the torch modules where they sit;
:func:`same_nodes` raises :class:`RebuildBlocked` naming those modules, so
:func:`fibgraph.importers.torch_base.compress_module` can keep their units
whole and try again.

Example
-------
>>> from fibgraph.importers.torch_blocking import node_scope
>>> node_scope("/encoder/layer.0/attention/self/query/MatMul")
'encoder.layer.0.attention.self.query'
"""
from __future__ import annotations

from fibgraph.errors import InputError

from .onnx.write.writer import SHAPE_REWRITE

__all__ = ["RebuildBlocked", "blocking", "same_nodes", "sizes_itself", "node_scope", "SHAPE_OPS"]


def node_scope(node_name):
    """``enc.norm1`` from a legacy export's node name ``/enc/norm1/Mul``
    (:func:`fibgraph.importers.onnx.groups.join_scopes`: ``/enc/enc.0/Mul`` is
    ``enc.0``)."""
    from .onnx.groups import join_scopes

    parts = [p for p in node_name.split("/") if p]
    return join_scopes(parts[:-1]) if len(parts) > 1 else node_name


SHAPE_OPS = frozenset({"Shape", "Constant", "ConstantOfShape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice",
                        "Reshape", "Transpose", "Cast", "Identity", "Expand", "Range", "Size"})


class RebuildBlocked(InputError):
    """The base computes some modules with nodes of its own; ``paths`` names
    them (torch module paths)."""

    def __init__(self, message, paths):
        super().__init__(message)
        self.paths = paths


def blocking(original, base, shape_ok=None):
    """``(extra op types, module paths)``: computing ops the base has beyond
    the export's, and the torch modules where they sit (a layer the writer
    replaced, e.g. a LayerNorm of merged units; else the nearest named node
    before each new node).  The writer's rewrites of a shape vector
    (``Where`` nodes named ``fib_shape``) count only where they feed a module
    for which ``shape_ok(path)`` is false: a module that derives the shape
    from its own new size (transformers' ``Conv1D``: ``nf``) needs none."""
    from collections import Counter

    def compute(m):
        return Counter(n.op_type for n in m.graph.node
                       if n.op_type not in SHAPE_OPS and not n.name.startswith(SHAPE_REWRITE))

    extra = compute(base) - compute(original)
    nodes = list(base.graph.node)
    rewrites = [k for k, n in enumerate(nodes) if n.name.startswith(SHAPE_REWRITE)]
    if not extra and not rewrites:
        return [], []
    kept = {n.name for n in nodes}
    own = {m.name for m in original.graph.node}
    gone = [n for n in original.graph.node if n.op_type not in SHAPE_OPS and n.name not in kept and "/" in n.name]
    paths = [node_scope(n.name) for n in gone]          # a torch layer the writer replaced (LayerNormalization)
    producer = {t: k for k, n in enumerate(nodes) for t in n.output}
    readers = {}
    for k, n in enumerate(nodes):
        for t in n.input:
            readers.setdefault(t, []).append(k)
    covered = set()                                 # the nodes that stand for a replaced layer
    for g in gone:
        stack = [producer[t] for t in g.output if t in producer]
        while stack:
            k = stack.pop()
            if k in covered or nodes[k].name in own:
                continue
            covered.add(k)
            stack += [producer[t] for t in nodes[k].input if t in producer and t not in g.input]
    counted = set(rewrites)
    for k in rewrites:
        path = _fed(nodes, k, readers, own)
        if path is not None and shape_ok is not None and shape_ok(node_scope(path)):
            counted.discard(k)
    if counted:
        extra = extra + Counter(nodes[k].op_type for k in counted)
    if not extra:
        return [], []
    for k, n in enumerate(nodes):
        if (n.op_type not in extra or n.name in own or k in covered or
                (n.name.startswith(SHAPE_REWRITE) and k not in counted)):
            continue
        hit = _fed(nodes, k, readers, own)    # a node of the writer's own (no scope): the module it feeds
        if hit:
            paths.append(node_scope(hit))
    return sorted(extra), list(dict.fromkeys(paths))


def _fed(nodes, k, readers, own):
    """The name of the first original (scoped) node that node ``k`` feeds, or None."""
    seen, stack, hit = set(), [k], None
    while stack and hit is None:
        j = stack.pop(0)
        for t in nodes[j].output:
            for r in readers.get(t, []):
                if nodes[r].name in own and "/" in nodes[r].name:
                    hit = nodes[r].name
                    break
                if r not in seen:
                    seen.add(r)
                    stack.append(r)
    return hit


def sizes_itself(template, path):
    """Whether the module at ``path`` of ``template`` computes its output's shape
    from its own size (transformers' ``Conv1D``: ``view(..., nf)``), so a
    rebuilt one needs no rewritten shape."""
    from .torch_rebuild import is_hf_conv1d

    try:
        return is_hf_conv1d(template.get_submodule(path)) if path else False
    except AttributeError:
        return False


def same_nodes(original, base, shape_ok=None):
    """Refuse a base that computes with nodes the export does not have (e.g.
    multiplicities of merged units read by a LayerNorm, attention heads of
    shrunk dims), naming the torch modules where they sit
    (:class:`RebuildBlocked`).  The writer may drop or rewrite shape
    arithmetic (an LSTM's initial state): only computing ops count."""
    extra, paths = blocking(original, base, shape_ok)
    if not extra:
        return
    where = ", ".join(repr(w) for w in paths[:4]) + (", ..." if len(paths) > 4 else "") if paths else "a node"
    raise RebuildBlocked(f"module {where}: the base computes it with {', '.join(extra)} nodes of its own "
                         f"(multiplicities of merged units read by a LayerNorm, attention with shrunk head dims): "
                         f"no torch layer of that class computes them", paths)
