"""``fibgraph inspect``: what a model holds and what fibgraph makes of it."""
from __future__ import annotations

from rich.table import Table

from fibgraph.report import console

from .api import count_params
from .onnx.load import float_tensors, load_onnx
from .onnx.importer import DAG_OPS

__all__ = ["inspect_model", "op_census"]


def op_census(model, barrier_nodes=None):
    """Per op type: node count, whether fibgraph maps it, floating-point
    parameters it reads (initializers and Constant tensors).  With
    ``barrier_nodes`` (the hypergraph importer's barriers), an op type is
    supported unless one of its nodes is a barrier."""
    sizes = dict(float_tensors(model))
    total = sum(sizes.values()) or 1
    rows = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Constant":
            continue
        r = rows.setdefault(node.op_type, {"op": node.op_type, "count": 0, "params": 0,
                                           "supported": node.op_type in DAG_OPS if barrier_nodes is None
                                           else True,
                                           "nodes": []})
        r["count"] += 1
        if barrier_nodes is not None and (node.name or f"{node.op_type}_{i}") in barrier_nodes:
            r["supported"] = False
        r["params"] += sum(sizes.get(x, 0) for x in node.input)
        if len(r["nodes"]) < 3:
            r["nodes"].append(node.name)
    for r in rows.values():
        r["param_share"] = r["params"] / total
    return sorted(rows.values(), key=lambda r: (r["supported"], -r["params"]))


def _print_roles(ops_list):
    """One line per role (layer, activation, shape, barrier, ...): its op types and counts."""
    roles = {}
    for _, op, role in ops_list:
        roles.setdefault(role, []).append(op)
    for role, ops in roles.items():
        console.print(f"{role}: " + ", ".join(f"{o} x{ops.count(o)}" for o in sorted(set(ops))))


def _census_table(path, census):
    t = Table(title=f"{path}: op types", title_justify="left")
    for c in ("op", "nodes", "params read", "share", "supported", "e.g."):
        t.add_column(c)
    for r in census:
        t.add_row(r["op"], str(r["count"]), f"{r['params']:,}", f"{r['param_share']:.1%}",
                  "yes" if r["supported"] else "[bold red]no[/bold red]", ", ".join(n for n in r["nodes"] if n))
    console.print(t)


def inspect_model(path):
    """Inspect a model: every model is read by the hypergraph importer."""
    return inspect_dag(path, load_onnx(path))


def inspect_dag(path, model, chain_error=""):
    """Inspect a model through the hypergraph importer: its op census (barrier
    ops unsupported), compressible weights, barriers and their share."""
    from .onnx.groups import weight_uses
    from .onnx.importer import import_dag

    imp = import_dag(model, label=str(path))
    census = op_census(model, {b["node"] for b in imp.barriers})
    _census_table(path, census)
    total = count_params(model)
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    console.print(f"[bold]{path}[/bold]  producer: {model.producer_name or '?'} {model.producer_version}  "
                  f"opset: {opset.get('ai.onnx', '?')}  IR: {model.ir_version}")
    console.print("read as a hypergraph" + (f" ({chain_error.split(': ', 1)[-1]})" if chain_error else ""))
    console.print(f"inputs: {', '.join(imp.inputs)}  outputs: {', '.join(imp.outputs)}  "
                  f"nodes: {imp.graph.n:,}  edge blocks: {len(imp.graph.blocks):,}")
    t = Table(title="compressible weights", title_justify="left")
    for c in ("weight", "op", "units", "homogeneous", "group"):
        t.add_column(c)
    layers = []
    homog = imp.graph.homogeneous
    for u, g in weight_uses(imp):
        w, op, ids = u.weight, u.op, u.units
        h = bool(ids.size) and bool(homog[ids].all())
        t.add_row(w, op, str(ids.size), "yes" if h else "no", f"{g.name} ({g.kind.value})")
        layers.append({"weight": w, "op": op, "units_out": int(ids.size), "homogeneous": h, "group": g.name,
                       "group_kind": g.kind.value})
    if layers:
        console.print(t)
    else:
        console.print("compressible weights: none (no linear, conv, embedding or LSTM/GRU weight outside "
                      "the barriers below), so color and compress keep the model as it is", soft_wrap=True)
    for b in imp.barriers:
        console.print(f"barrier: {b['op']} at node {b['node']!r}: {b['why']} "
                      f"(covers {b['params']:,} parameters, {b['params'] / max(total, 1):.1%})")
    _print_roles(imp.ops)
    supported = not imp.barriers
    console.print(f"parameters: {total:,}  -  supported: " +
                  ("yes, every node is mapped" if supported else f"partly, {len(imp.barriers)} barrier node(s)"))
    return {"model": str(path), "graph": "hypergraph", "inputs": imp.inputs, "outputs": imp.outputs,
            "op_types": census, "params": total, "supported": supported,
            "barriers": [{**b, "share": b["params"] / max(total, 1)} for b in imp.barriers],
            "layers": layers, "ops": [{"node": n, "op": o, "role": r} for n, o, r in imp.ops]}
