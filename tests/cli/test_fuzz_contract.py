"""Fuzzing the command-line contract with seeded mutants of three tiny models.

Byte mutations of the serialized files and structural mutations made with the
onnx API (dims, data types, attributes, dropped/duplicated/reordered nodes,
swapped inputs, opsets, a ConstantOfShape bomb, external-data offsets, lengths,
locations and weight files).  For every mutant,
``fibgraph inspect`` and ``fibgraph compress --eps 0`` (in-process) must:

- exit 0 or 2 (exit 1 is an internal error: a bug);
- on exit 2 print exactly one line on stderr and write nothing;
- leave the input file byte-for-byte unchanged;
- stay within bounded memory: ``--max-memory 64M`` and, as a backstop, the
  process's address space capped at what it had plus 4 GiB while the mutants run
  (an allocation past it is a MemoryError, i.e. exit 1, i.e. a failure here).

One test per mutation family, each a fixed set of seeded mutants (about 170
mutants in all, a few seconds per family).
"""
import os
import tempfile
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import _init, cli, finish, mlp_onnx

try:
    import resource
except ImportError:                      # pragma: no cover - not Linux
    resource = None


# ------------------------------------------------------------------ models
def _mlp():
    rng = np.random.default_rng(5)
    W1, b1 = rng.normal(0, 1, (5, 4)), rng.normal(0, 1, 5)
    W1[3], b1[3] = W1[1], b1[1]
    return mlp_onnx([W1, rng.normal(0, 1, (3, 5))], [b1, rng.normal(0, 1, 3)])


def _matmul_constants():
    rng = np.random.default_rng(6)
    W1, b1 = rng.normal(0, 1, (6, 3)), rng.normal(0, 1, 6)
    W1[4], b1[4] = W1[0], b1[0]
    return mlp_onnx([W1, rng.normal(0, 1, (2, 6))], [b1, rng.normal(0, 1, 2)], act="Tanh", form="matmul",
                    constants=True)


def _conv():
    rng = np.random.default_rng(7)
    Wc = rng.normal(0, 0.5, (3, 1, 3, 3))
    Wc[2] = Wc[0]
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], name="gemm", transB=1)]
    inits = [_init("Wc", Wc), _init("bc", [0.1, -0.2, 0.1]), _init("Wg", rng.normal(0, 0.3, (2, 48))),
             _init("bg", [0.0, 0.5])]
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    return finish(g)


MODELS = {"mlp": _mlp, "matmul_constants": _matmul_constants, "conv": _conv}


# --------------------------------------------------------------- mutations
def _copy(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _tensors(m):
    out = list(m.graph.initializer)
    for n in m.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                out.append(a.t)
    return out


def mut_init_dims(m, rng):
    t = rng.choice(_tensors(m))
    k = int(rng.integers(len(t.dims))) if len(t.dims) else None
    v = int(rng.choice([0, 1, -1, 2, 7, 10 ** 12, 2 ** 62]))
    if k is None or rng.random() < 0.2:
        t.dims.append(v)
        return f"tensor {t.name!r}: dim {v} appended"
    old = t.dims[k]
    t.dims[k] = v
    return f"tensor {t.name!r}: dim {k} {old} -> {v}"


def mut_init_dtype(m, rng):
    t = rng.choice(_tensors(m))
    v = int(rng.choice([0, 2, 3, 6, 7, 8, 9, 10, 11, 16, 99]))
    t.data_type = v
    return f"tensor {t.name!r}: data_type -> {v}"


def mut_input(m, rng):
    vi = m.graph.input[0]
    tt = vi.type.tensor_type
    if rng.random() < 0.4:
        v = int(rng.choice([0, 6, 7, 8, 9, 10, 11, 99]))
        tt.elem_type = v
        return f"input elem_type -> {v}"
    k = int(rng.integers(len(tt.shape.dim)))
    d = tt.shape.dim[k]
    v = rng.choice(["0", "-3", "1e12", "1", "sym", "drop"])
    if v == "drop":
        del tt.shape.dim[k]
    elif v == "sym":
        d.dim_param = "S"
    else:
        d.dim_value = int(float(v))
    return f"input dim {k} -> {v}"


def mut_attr(m, rng):
    nodes = [n for n in m.graph.node if n.attribute]
    n = rng.choice(nodes)
    a = rng.choice(list(n.attribute))
    how = rng.choice(["int", "type", "drop", "bogus", "floats"])
    if how == "int":
        v = int(rng.choice([-1, 0, 2, 5, 10 ** 9]))
        new = helper.make_attribute(a.name, v)
    elif how == "type":
        new = helper.make_attribute(a.name, "nonsense")
    elif how == "floats":
        new = helper.make_attribute(a.name, [1.5, -2.0])
    if how == "drop":
        n.attribute.remove(a)
        return f"node {n.name!r}: attribute {a.name!r} removed"
    if how == "bogus":
        n.attribute.append(helper.make_attribute("bogus", 3))
        return f"node {n.name!r}: attribute 'bogus' added"
    n.attribute.remove(a)
    n.attribute.append(new)
    return f"node {n.name!r}: attribute {a.name!r} -> {how}"


def mut_drop_node(m, rng):
    k = int(rng.integers(len(m.graph.node)))
    n = m.graph.node[k]
    del m.graph.node[k]
    return f"node {k} ({n.op_type} {n.name!r}) dropped"


def mut_dup_node(m, rng):
    k = int(rng.integers(len(m.graph.node)))
    n = m.graph.node[k]
    c = onnx.NodeProto()
    c.CopyFrom(n)
    m.graph.node.insert(int(rng.integers(len(m.graph.node) + 1)), c)
    return f"node {k} ({n.op_type} {n.name!r}) duplicated"


def mut_inputs(m, rng):
    nodes = [n for n in m.graph.node if n.input]
    n = rng.choice(nodes)
    names = sorted({x for nd in m.graph.node for x in list(nd.input) + list(nd.output) if x})
    how = rng.choice(["swap", "other", "unknown", "empty", "extra"])
    if how == "swap" and len(n.input) >= 2:
        i, j = rng.choice(len(n.input), 2, replace=False)
        n.input[int(i)], n.input[int(j)] = n.input[int(j)], n.input[int(i)]
        return f"node {n.name!r}: inputs {int(i)} and {int(j)} swapped"
    k = int(rng.integers(len(n.input)))
    if how == "extra":
        n.input.append(str(rng.choice(names)))
        return f"node {n.name!r}: an extra input"
    n.input[k] = {"other": str(rng.choice(names)), "unknown": "nowhere", "empty": ""}.get(how, "nowhere")
    return f"node {n.name!r}: input {k} -> {how} {n.input[k]!r}"


def mut_order(m, rng):
    order = rng.permutation(len(m.graph.node))
    nodes = [m.graph.node[int(i)] for i in order]
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del m.graph.node[:]
    m.graph.node.extend(copies)
    return f"nodes reordered {order.tolist()}"


def mut_opset(m, rng):
    v = int(rng.choice([1, 6, 9, 99]))
    m.opset_import[0].version = v
    return f"opset -> {v}"


def mut_bomb(m, rng):
    """A ConstantOfShape / Expand / Tile whose size constants fix, added to the output."""
    big = int(rng.choice([10 ** 8, 10 ** 10, 10 ** 12]))
    out = m.graph.output[0].name
    prod = next(n for n in m.graph.node if out in n.output)
    prod.output[list(prod.output).index(out)] = "pre"
    op = str(rng.choice(["ConstantOfShape", "Expand", "Tile"]))
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, big], np.int64), "bomb_shape"))
    if op == "ConstantOfShape":
        m.graph.node.append(helper.make_node(op, ["bomb_shape"], ["big"]))
    else:
        m.graph.initializer.append(numpy_helper.from_array(np.ones((1, 1), np.float32), "one"))
        m.graph.node.append(helper.make_node(op, ["one", "bomb_shape"], ["big"]))
    m.graph.node.append(helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0))
    m.graph.node.append(helper.make_node("Add", ["pre", "s"], [out]))
    return f"{op} of [1, {big}] added to the output"


STRUCTURAL = {"init_dims": mut_init_dims, "init_dtype": mut_init_dtype, "input": mut_input, "attr": mut_attr,
              "drop_node": mut_drop_node, "dup_node": mut_dup_node, "inputs": mut_inputs, "order": mut_order,
              "opset": mut_opset, "bomb": mut_bomb}


def byte_mutant(data, rng):
    b = bytearray(data)
    how = rng.choice(["flip", "insert", "delete", "splice", "truncate"])
    k = int(rng.integers(1, 6))
    if how == "flip":
        for p in rng.integers(0, len(b), k):
            b[int(p)] ^= 1 << int(rng.integers(8))
    elif how == "insert":
        p = int(rng.integers(len(b)))
        b[p:p] = bytes(rng.integers(0, 256, k, dtype=np.uint8))
    elif how == "delete":
        p = int(rng.integers(len(b) - k))
        del b[p:p + k]
    elif how == "splice":
        p, q = (int(x) for x in rng.integers(0, len(b), 2))
        b[p:p + 8] = b[q:q + 8]
    else:
        b = b[:int(rng.integers(1, len(b)))]
    return bytes(b), f"bytes: {how} {k}"


def _with_external_data(m):
    """``(model bytes, weights bytes)``: every initializer in ``w.bin`` beside the model."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        onnx.save_model(_copy(m), path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="w.bin", size_threshold=0)
        with open(path, "rb") as f, open(os.path.join(d, "w.bin"), "rb") as g:
            return f.read(), g.read()


def external_mutant(data, weights, rng):
    """A mutation of the external-data keys (offset, length, location) or of the weights file."""
    m = onnx.load_model_from_string(data)
    t = rng.choice(list(m.graph.initializer))
    info = {kv.key: kv.value for kv in t.external_data}
    how = str(rng.choice(["length", "offset", "drop_length", "drop_offset", "location", "cut", "grow"]))
    if how == "length":
        info["length"] = str(rng.choice(["0", "1", "-5", "abc", str(10 ** 12), str(int(info["length"]) + 4)]))
    elif how == "offset":
        info["offset"] = str(rng.choice(["-8", "x", str(10 ** 12), str(len(weights)), "3"]))
    elif how in ("drop_length", "drop_offset"):
        info.pop(how[5:], None)
    elif how == "location":
        info["location"] = str(rng.choice(["missing.bin", "m.onnx", "w.bin/", "."]))
    elif how == "cut":
        weights = weights[:int(rng.integers(len(weights)))]
    else:
        weights = weights + bytes(int(rng.integers(1, 64)))
    del t.external_data[:]
    for k, v in info.items():
        t.external_data.add(key=k, value=v)
    return m.SerializeToString(), weights, f"external {t.name!r}: {how} {info.get(how, '')}".strip()


def mutants(family, per_model):
    """``(label, model bytes, {other file: bytes})`` of the seeded mutants of ``family``."""
    out = []
    for mname, build in MODELS.items():
        base = build()
        data = base.SerializeToString()
        if family == "external":
            data, weights = _with_external_data(base)
        for seed in range(per_model):
            rng = np.random.default_rng([zlib.crc32(family.encode()), seed, zlib.crc32(mname.encode())])
            if family == "external":
                b, w, what = external_mutant(data, weights, rng)
                out.append((f"{mname} seed {seed}: {what}", b, {"w.bin": w}))
                continue
            if family == "bytes":
                b, what = byte_mutant(data, rng)
            else:
                m = _copy(base)
                try:
                    what = STRUCTURAL[family](m, rng)
                except (ValueError, IndexError, StopIteration):
                    continue                      # nothing to mutate in this model
                b = m.SerializeToString()
            out.append((f"{mname} seed {seed}: {what}", b, {}))
    return out


# --------------------------------------------------------------- the contract
CAP = 4 << 30            # address space the mutants may add (threads' malloc arenas need some)


class _AddressSpaceCap:
    """Cap the address space at its size now plus ``extra`` bytes (soft limit, restored)."""

    def __init__(self, extra):
        self.extra = extra

    def __enter__(self):
        self.old = None
        if resource is None or not os.path.exists("/proc/self/status"):
            return self
        with open("/proc/self/status") as f:
            vm = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:")), None)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if vm is None:
            return self
        cap = vm + self.extra
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        self.old = (soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            resource.setrlimit(resource.RLIMIT_AS, self.old)


def check_contract(capsys, tmp_path, cases):
    """Run inspect and compress on every mutant; the list of broken promises."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    p = src / "m.onnx"
    broken = []
    with _AddressSpaceCap(CAP):
        for label, data, extra in cases:
            p.write_bytes(data)
            for name, content in extra.items():
                (src / name).write_bytes(content)
            for cmd in (["inspect", p, "--json", out / "i.json"],
                        ["compress", p, "--eps", "0", "-o", out / "o.onnx", "--report", out / "r.json"]):
                rc, _, err = cli(capsys, "--max-memory", "64M", *cmd)
                lines = [ln for ln in err.splitlines() if ln.strip()]
                wrote = sorted(os.listdir(out))
                why = None
                if rc not in (0, 2):
                    why = f"exit {rc}"
                elif rc == 2 and len(lines) != 1:
                    why = f"{len(lines)} stderr lines"
                elif rc == 2 and wrote:
                    why = f"wrote {wrote} on failure"
                elif p.read_bytes() != data or any((src / k).read_bytes() != v for k, v in extra.items()):
                    why = "input changed"
                if why:
                    broken.append(f"{cmd[0]} on {label}: {why}: {err.strip()[:300]!r}")
                for f in wrote:
                    os.unlink(out / f)
    return broken


PER_MODEL = {"bytes": 12, "init_dims": 5, "init_dtype": 4, "input": 4, "attr": 4, "drop_node": 3,
             "dup_node": 3, "inputs": 4, "order": 3, "opset": 3, "bomb": 3, "external": 8}


@pytest.mark.parametrize("family", list(PER_MODEL))
def test_fuzz_contract(capsys, tmp_path, family):
    cases = mutants(family, PER_MODEL[family])
    assert len(cases) >= PER_MODEL[family]
    broken = check_contract(capsys, tmp_path, cases)
    assert not broken, f"{len(broken)} of {2 * len(cases)} runs broke the contract:\n" + "\n".join(broken)


def test_the_unmutated_models_compress(capsys, tmp_path):
    """The baseline: every model passes (exit 0), so a mutant's exit 2 is the mutation's."""
    for name, build in MODELS.items():
        p = tmp_path / f"{name}.onnx"
        p.write_bytes(build().SerializeToString())
        rc, _, err = cli(capsys, "--max-memory", "64M", "compress", p, "--eps", "0", "-o", tmp_path / f"{name}-s.onnx")
        assert rc == 0, (name, err)


def test_bombs_are_refused_by_the_limit(capsys, tmp_path):
    """The bomb family is refused by the memory check itself (not by onnxruntime)."""
    for label, data, _ in mutants("bomb", PER_MODEL["bomb"]):
        p = tmp_path / "b.onnx"
        p.write_bytes(data)
        rc, _, err = cli(capsys, "--max-memory", "64M", "inspect", p)
        assert rc == 2 and "memory limit" in err, (label, err)


@pytest.mark.skipif(resource is None or not os.path.exists("/proc/self/status"), reason="needs Linux rlimits")
def test_the_memory_backstop_bites():
    """The address-space cap the mutants run under turns an 8 GiB allocation
    into a MemoryError (np.empty: never touched, so harmless without the cap)."""
    with _AddressSpaceCap(CAP):
        with pytest.raises(MemoryError):
            np.empty(1 << 30)                     # 8 GiB of float64
