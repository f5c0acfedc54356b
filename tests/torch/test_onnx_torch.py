"""fibgraph.importers.onnx.to_torch.OnnxModule: an ONNX graph as a differentiable torch module.

Every check compares with onnxruntime: exported torch models (both exporters),
their compressed bases (the writer's extra Mul / Where / Log / Gather nodes),
the bundled digits MLP, a small CNN, and single ops against their ONNX
semantics (attributes, defaults, opset 13 vs 18 / 23 axes as inputs).  For
whole models: two batch sizes, the written-back model after changing every
parameter, and nonzero gradients for every parameter.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from fibgraph.errors import InputError  # noqa: E402
from fibgraph.importers.onnx.to_torch import SUPPORTED_OPS, OnnxModule  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RTOL = 1e-5


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _close(got, ref, what=""):
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    if ref.dtype.kind in "biu":
        np.testing.assert_array_equal(got, ref, err_msg=what)
        return
    scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-3)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def _feeds(model, batch, seed=0):
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


def check_model(model, batches=(3, 5)):
    """OnnxModule == onnxruntime at two batch sizes; backward gives nonzero grads
    for every parameter; after changing every parameter, to_onnx() passes the
    checker and onnxruntime on it == the module."""
    mod = OnnxModule(model)
    sess = _session(model)
    for b in batches:
        f = _feeds(model, b, seed=b)
        refs = sess.run(None, f)
        gots = _as_tuple(mod(*[torch.from_numpy(v) for v in f.values()]))
        for k, (g, r) in enumerate(zip(gots, refs)):
            _close(g, r, f"output {k} at batch {b}")
    # gradients
    f = _feeds(model, 4, seed=1)
    out = _as_tuple(mod(*[torch.from_numpy(v) for v in f.values()]))[0]
    (out * torch.randn_like(out)).sum().backward()
    names = [k for k, _ in mod.named_parameters()]
    assert names, "no parameters"
    for k, p in mod.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"zero gradient for {k} ({mod.onnx_names[k]})"
    # write back changed values
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mod.parameters():
            p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))
    m2 = mod.to_onnx()
    onnx.checker.check_model(m2, full_check=True)
    assert [n.op_type for n in m2.graph.node] == [n.op_type for n in model.graph.node]
    f = _feeds(model, batches[-1], seed=7)
    refs = _session(m2).run(None, f)
    gots = _as_tuple(mod(*[torch.from_numpy(v) for v in f.values()]))
    for k, (gg, r) in enumerate(zip(gots, refs)):
        _close(gg, r, f"written-back output {k}")
    changed = any(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
                  for a, b in zip(model.graph.initializer, m2.graph.initializer))
    assert changed
    return mod


# ----------------------------------------------------------------- whole models
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.avg_pool2d(torch.relu(self.c2(x)), 2, stride=1, padding=1, count_include_pad=False)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    """name -> path: exported torch models and their compressed bases (eps 0, 0.3)."""
    import planted_nets as pn

    from fibgraph.importers.api import compress_model

    d = tmp_path_factory.mktemp("onnx_torch")
    paths = {}
    torch.manual_seed(0)
    for name, (m, info) in {"lstm": pn.planted_lstm(), "gru": pn.planted_gru(),
                            "gru_bi": pn.planted_gru(bidirectional=True),
                            "transformer": pn.planted_transformer(),
                            "residual": pn.planted_residual_mlp()}.items():
        for kind, p in pn.export_both(m, pn.example_input(info), str(d), name=name).items():
            paths[f"{name}_{kind}"] = p
    import sys
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import seq_models as sm

    paths["LSTMNet"] = sm.export(sm.LSTMNet(hidden=8), str(d / "lstmnet.onnx"))
    paths["TfNet"] = sm.export(sm.TfNet(d=8, ff=16, layers=1), str(d / "tfnet.onnx"))
    for kind, p in pn.export_both(SmallCNN().eval(), torch.randn(2, 1, 12, 12), str(d), name="cnn").items():
        paths[f"cnn_{kind}"] = p
    for name in list(paths):
        for eps in (0.0, 0.3):
            out = str(d / f"{name}_base{eps}.onnx")
            compress_model(paths[name], out, eps=eps)
            paths[f"{name}_base{eps}"] = out
    return paths


BASE_NAMES = ["lstm_legacy", "lstm_dynamo", "gru_legacy", "gru_dynamo", "gru_bi_legacy", "gru_bi_dynamo",
              "transformer_legacy", "transformer_dynamo", "residual_legacy", "residual_dynamo",
              "LSTMNet", "TfNet", "cnn_legacy", "cnn_dynamo"]
MODEL_NAMES = BASE_NAMES + [f"{n}_base{e}" for n in BASE_NAMES for e in (0.0, 0.3)]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_matches_onnxruntime(model_paths, name):
    model = onnx.load(model_paths[name])
    mod = check_model(model)
    if "_base" in name and name.split("_base")[0] in ("lstm_legacy", "gru_dynamo", "transformer_legacy",
                                                      "residual_dynamo"):
        full = OnnxModule(onnx.load(model_paths[name.split("_base")[0]]))
        assert mod.n_params() < full.n_params(), "the planted base should be smaller"


def test_planted_torch_equals_module(model_paths):
    """The module of an export computes the torch model's own function."""
    import planted_nets as pn

    m, info = pn.planted_gru(bidirectional=True)
    mod = OnnxModule(onnx.load(model_paths["gru_bi_dynamo"]))
    x = pn.example_input(info, batch=6, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(mod(x).numpy(), m(x).numpy(), rtol=1e-5, atol=1e-6)


def test_digits_mlp():
    model = onnx.load(os.path.join(ROOT, "fibgraph", "data", "digits_mlp.onnx"))
    mod = check_model(model)
    n_init = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert mod.n_params() == n_init == sum(p.numel() for p in mod.parameters())
    data = np.load(os.path.join(ROOT, "fibgraph", "data", "digits_test.npz"))
    x = torch.from_numpy(np.asarray(data["x"][:50], dtype=np.float32))
    ref = _session(model).run(None, {"x": x.numpy()})[0]
    _close(OnnxModule(model)(x=x), ref, "keyword input")


def test_retrain_step_and_export(model_paths):
    """A few Adam steps on a compressed transformer base lower the loss; the
    exported model computes what the trained module computes."""
    model = onnx.load(model_paths["transformer_dynamo_base0.0"])
    mod = OnnxModule(model)
    x = torch.randn(16, 5, 7, generator=torch.Generator().manual_seed(0))
    target = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(mod.parameters(), 1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = ((mod(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    m2 = mod.to_onnx()
    onnx.checker.check_model(m2, full_check=True)
    ref = _session(m2).run(None, {"x": x.numpy()})[0]
    _close(mod(x), ref, "trained")


# ----------------------------------------------------------------- single ops
class I:
    """An initializer input (otherwise inputs are graph inputs)."""

    def __init__(self, a):
        self.a = np.asarray(a)


def _r(*shape, seed=0, pos=False):
    a = np.random.default_rng(seed + 17 * len(shape)).standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.1 if pos else a


def _i64(*v):
    return I(np.array(v, dtype=np.int64))


def run_op(op, inputs, attrs=None, opset=13, n_out=1, extra_nodes=()):
    """A one-node model (plus ``extra_nodes``): OnnxModule == onnxruntime on every output."""
    names, graph_inputs, inits, feeds = [], [], [], {}
    for k, a in enumerate(inputs):
        if a is None:
            names.append("")
            continue
        nm = f"in{k}"
        names.append(nm)
        if isinstance(a, I):
            inits.append(numpy_helper.from_array(a.a, nm))
        else:
            a = np.asarray(a)
            feeds[nm] = a
            graph_inputs.append(helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(a.dtype),
                                                              list(a.shape)))
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, **(attrs or {}))
    g = helper.make_graph(list(extra_nodes) + [node], "g", graph_inputs,
                          [onnx.ValueInfoProto(name=o) for o in outs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    refs = _session(model).run(None, feeds)
    mod = OnnxModule(model)
    gots = _as_tuple(mod(*[torch.from_numpy(v) for v in feeds.values()]))
    assert len(gots) == len(refs)
    for k, (gt, rf) in enumerate(zip(gots, refs)):
        _close(gt, rf, f"{op} output {k}")
    return mod


X = _r(2, 3, 4)
CASES = {
    "gemm": ("Gemm", [_r(3, 4), I(_r(5, 4, seed=1)), I(_r(5, seed=2))], dict(transB=1, alpha=0.7, beta=1.3)),
    "gemm_transA_noC": ("Gemm", [_r(4, 3), _r(4, 5, seed=1)], dict(transA=1)),
    "gemm_C_row": ("Gemm", [_r(3, 4), _r(4, 5, seed=1), _r(1, 5, seed=2)], {}),
    "matmul_3d2d": ("MatMul", [X, _r(4, 5, seed=1)], {}),
    "matmul_1d": ("MatMul", [_r(4), _r(2, 4, 3, seed=1)], {}),
    "add_bcast": ("Add", [X, _r(3, 1, seed=1)], {}),
    "sub": ("Sub", [X, _r(4, seed=1)], {}),
    "mul": ("Mul", [X, _r(1, 3, 1, seed=1)], {}),
    "div": ("Div", [X, _r(4, seed=1, pos=True)], {}),
    "div_int": ("Div", [np.array([7, -7, 9], dtype=np.int64), np.array([2, 2, -4], dtype=np.int64)], {}),
    "mod_int": ("Mod", [np.array([7, -7, 9], dtype=np.int64), np.array([3, 3, -4], dtype=np.int64)], {}),
    "fmod": ("Mod", [X, _r(4, seed=1, pos=True)], dict(fmod=1)),
    "pow": ("Pow", [_r(2, 3, pos=True), _r(3, seed=1)], {}),
    "pow_int_exp": ("Pow", [X, np.array(2, dtype=np.int64)], {}),
    "sqrt": ("Sqrt", [_r(3, 4, pos=True)], {}),
    "exp": ("Exp", [X], {}), "log": ("Log", [_r(3, 4, pos=True)], {}), "neg": ("Neg", [X], {}),
    "abs": ("Abs", [X], {}), "reciprocal": ("Reciprocal", [_r(3, 4, pos=True)], {}),
    "relu": ("Relu", [X], {}), "leaky": ("LeakyRelu", [X], dict(alpha=0.2)), "leaky_default": ("LeakyRelu", [X], {}),
    "sigmoid": ("Sigmoid", [X], {}), "tanh": ("Tanh", [X], {}), "erf": ("Erf", [X], {}),
    "hardsigmoid": ("HardSigmoid", [3 * X], dict(alpha=0.3, beta=0.4)), "hardsigmoid_default": ("HardSigmoid", [3 * X], {}),
    "softplus": ("Softplus", [X], {}), "softsign": ("Softsign", [X], {}), "elu": ("Elu", [X], dict(alpha=0.5)),
    "selu": ("Selu", [X], {}), "celu": ("Celu", [X], dict(alpha=2.0)), "thresholded": ("ThresholdedRelu", [X], dict(alpha=0.3)),
    "prelu": ("PRelu", [X, I(_r(4, seed=3))], {}),
    "floor": ("Floor", [3 * X], {}), "ceil": ("Ceil", [3 * X], {}), "sign": ("Sign", [X], {}),
    "sin": ("Sin", [X], {}), "cos": ("Cos", [X], {}),
    "max": ("Max", [X, _r(4, seed=1), _r(3, 1, seed=2)], {}), "min": ("Min", [X, _r(4, seed=1)], {}),
    "sum": ("Sum", [X, _r(4, seed=1), _r(3, 1, seed=2)], {}), "mean": ("Mean", [X, _r(4, seed=1)], {}),
    "softmax13": ("Softmax", [X], dict(axis=1)), "softmax_default": ("Softmax", [X], {}),
    "logsoftmax13": ("LogSoftmax", [X], dict(axis=-2)),
    "identity": ("Identity", [X], {}), "dropout": ("Dropout", [X], {}),
    "cast_int": ("Cast", [3 * X], dict(to=TensorProto.INT64)),
    "cast_float": ("Cast", [np.array([1, -2, 3], dtype=np.int64)], dict(to=TensorProto.FLOAT)),
    "cast_bool": ("Cast", [np.array([0.0, 2.0, -1.0], dtype=np.float32)], dict(to=TensorProto.BOOL)),
    "reshape": ("Reshape", [X, _i64(0, -1, 2)], {}),
    "transpose": ("Transpose", [X], dict(perm=[2, 0, 1])), "transpose_default": ("Transpose", [X], {}),
    "flatten": ("Flatten", [X], {}), "flatten0": ("Flatten", [X], dict(axis=0)),
    "flatten_neg": ("Flatten", [X], dict(axis=-1)),
    "squeeze13": ("Squeeze", [_r(2, 1, 3, 1), _i64(-1)], {}), "squeeze_all": ("Squeeze", [_r(2, 1, 3, 1)], {}),
    "unsqueeze13": ("Unsqueeze", [X, _i64(0, -1)], {}),
    "concat": ("Concat", [X, _r(2, 3, 2, seed=1)], dict(axis=-1)),
    "expand": ("Expand", [_r(3, 1), _i64(2, 1, 4)], {}),
    "tile": ("Tile", [X, _i64(1, 2, 3)], {}),
    "gather_neg": ("Gather", [X, _i64(-1, 0, 2)], dict(axis=1)),
    "gather_scalar": ("Gather", [X, I(np.array(1, dtype=np.int64))], dict(axis=2)),
    "gather_2d_idx": ("Gather", [X, I(np.array([[0, 1], [1, 1]], dtype=np.int64))], {}),
    "gather_elements": ("GatherElements", [X, I(np.array([[[0, 1, 2, 3]] * 3] * 2, dtype=np.int64) % 3)],
                        dict(axis=1)),
    "slice": ("Slice", [_r(5, 6), _i64(1, -4), _i64(100, -1)], {}),
    "slice_axes_steps": ("Slice", [_r(5, 6), _i64(-1, 0), _i64(-100, 6), _i64(0, 1), _i64(-2, 2)], {}),
    "slice_neg_step_clamp": ("Slice", [_r(5, 6), _i64(100), _i64(1), _i64(-1), _i64(-1)], {}),
    "shape": ("Shape", [X], {}),
    "size": ("Size", [X], {}),
    "constantofshape": ("ConstantOfShape", [_i64(2, 3)], dict(value=numpy_helper.from_array(np.array([1.5], np.float32)))),
    "constantofshape_int": ("ConstantOfShape", [_i64(4)], dict(value=numpy_helper.from_array(np.array([7], np.int64)))),
    "constantofshape_default": ("ConstantOfShape", [_i64(2)], {}),
    "range_int": ("Range", [I(np.array(1, np.int64)), I(np.array(10, np.int64)), I(np.array(3, np.int64))], {}),
    "range_float": ("Range", [I(np.array(0.5, np.float32)), I(np.array(-2.0, np.float32)),
                              I(np.array(-0.75, np.float32))], {}),
    "where": ("Where", [X > 0, X, _r(4, seed=1)], {}),
    "equal": ("Equal", [np.array([1, 2, 3]), np.array([1, 0, 3])], {}),
    "less": ("Less", [X, _r(4, seed=1)], {}), "greater": ("Greater", [X, _r(4, seed=1)], {}),
    "not": ("Not", [X > 0], {}), "and": ("And", [X > 0, X < 0.5], {}), "or": ("Or", [X > 0, X < -0.5], {}),
    "reducemean13": ("ReduceMean", [X], dict(axes=[1], keepdims=0)),
    "reducemean13_all": ("ReduceMean", [X], {}),
    "reducesum13_input": ("ReduceSum", [X, _i64(0, -1)], dict(keepdims=1)),
    "reducesum13_noaxes": ("ReduceSum", [X], dict(keepdims=0)),
    "reducesum13_noop": ("ReduceSum", [X], dict(noop_with_empty_axes=1)),
    "reducemax13": ("ReduceMax", [X], dict(axes=[0, 2])),
    "reducemin13": ("ReduceMin", [X], dict(axes=[-1], keepdims=0)),
    "reduceprod13": ("ReduceProd", [X], dict(axes=[0, 1])),
    "reducel2": ("ReduceL2", [X], dict(axes=[1])), "reducel1": ("ReduceL1", [X], dict(axes=[1])),
    "reducesumsquare": ("ReduceSumSquare", [X], dict(axes=[2])),
    "reducelogsumexp": ("ReduceLogSumExp", [X], dict(axes=[2], keepdims=0)),
    "argmax": ("ArgMax", [X], dict(axis=1)),
    "argmin_last": ("ArgMin", [np.array([[1, 0, 0], [2, 2, 1]], np.float32)], dict(axis=1, select_last_index=1,
                                                                                  keepdims=0)),
    "batchnorm": ("BatchNormalization", [_r(2, 3, 4, 4), I(_r(3, seed=1)), I(_r(3, seed=2)), I(_r(3, seed=3)),
                                         I(_r(3, seed=4, pos=True))], dict(epsilon=1e-3)),
    "einsum": ("Einsum", [_r(2, 3, 4), _r(2, 4, 5, seed=1)], dict(equation="bij,bjk->bik")),
    "einsum_ellipsis": ("Einsum", [_r(2, 3, 4), _r(4, 5, seed=1)], dict(equation="...ij, jk -> ...ik")),
    "einsum_trace": ("Einsum", [_r(3, 3)], dict(equation="ii")),
    "pad_constant": ("Pad", [X, _i64(0, 1, 2, 0, 0, 1), I(np.array(0.5, np.float32))], {}),
    "pad_reflect": ("Pad", [X, _i64(0, 0, 1, 0, 0, 2)], dict(mode="reflect")),
    "pad_edge": ("Pad", [X, _i64(0, 1, 2, 0, 2, 1)], dict(mode="edge")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op(case):
    op, inputs, attrs = CASES[case]
    run_op(op, inputs, attrs)


OPSET_CASES = {   # (op, inputs, attrs, opset, n_out)
    "softmax11_coerce": ("Softmax", [X], dict(axis=1), 11, 1),
    "trilu_upper": ("Trilu", [_r(2, 4, 5)], {}, 14, 1),
    "trilu_lower_k": ("Trilu", [_r(2, 4, 5), I(np.array(-1, np.int64))], dict(upper=0), 14, 1),
    "trilu_upper_k": ("Trilu", [_r(4, 5), I(np.array(2, np.int64))], dict(upper=1), 14, 1),
    "softmax11_default": ("Softmax", [X], {}, 11, 1),
    "logsoftmax11": ("LogSoftmax", [X], dict(axis=-1), 11, 1),
    "clip13_inputs": ("Clip", [X, I(np.array(-0.3, np.float32)), I(np.array(0.5, np.float32))], {}, 13, 1),
    "clip13_max_only": ("Clip", [X, None, I(np.array(0.2, np.float32))], {}, 13, 1),
    "clip6_attrs": ("Clip", [X], dict(min=-0.4, max=0.1), 6, 1),
    "squeeze11_attr": ("Squeeze", [_r(2, 1, 3, 1)], dict(axes=[1]), 11, 1),
    "unsqueeze11_attr": ("Unsqueeze", [X], dict(axes=[-1, 1]), 11, 1),
    "unsqueeze23": ("Unsqueeze", [X, _i64(3, 0)], {}, 23, 1),
    "split11_attr": ("Split", [_r(2, 7)], dict(axis=1, split=[3, 4]), 11, 2),
    "split13_input": ("Split", [_r(2, 7), _i64(2, 5)], dict(axis=-1), 13, 2),
    "split13_equal": ("Split", [_r(6, 2)], {}, 13, 3),
    "split18_num_outputs": ("Split", [_r(2, 7)], dict(axis=1, num_outputs=3), 18, 3),
    "slice9_attrs": ("Slice", [_r(5, 6)], dict(starts=[1, -3], ends=[4, 100], axes=[0, 1]), 9, 1),
    "reducemean18_input": ("ReduceMean", [X, _i64(1)], dict(keepdims=0), 18, 1),
    "reducemax18_input": ("ReduceMax", [X, _i64(-1, 0)], {}, 18, 1),
    "reducemean18_noaxes": ("ReduceMean", [X], {}, 18, 1),
    "reducemean18_noop": ("ReduceMean", [X], dict(noop_with_empty_axes=1), 18, 1),
    "reducesum23": ("ReduceSum", [X, _i64(2)], dict(keepdims=0), 23, 1),
    "shape15_start_end": ("Shape", [X], dict(start=1, end=-1), 15, 1),
    "shape15_neg_start": ("Shape", [X], dict(start=-2), 15, 1),
    "gelu20": ("Gelu", [X], {}, 20, 1),
    "gelu20_tanh": ("Gelu", [X], dict(approximate="tanh"), 20, 1),
    "mish18": ("Mish", [X], {}, 18, 1),
    "hardswish14": ("HardSwish", [3 * X], {}, 14, 1),
    "reshape14_allowzero": ("Reshape", [X, _i64(4, 6)], dict(allowzero=1), 14, 1),
    "reshape14_zero_copies": ("Reshape", [X, _i64(0, 0, -1)], {}, 14, 1),
    "layernorm": ("LayerNormalization", [X, I(_r(4, seed=1)), I(_r(4, seed=2))], {}, 17, 1),
    "layernorm_axis1_nobias": ("LayerNormalization", [X, I(_r(3, 4, seed=1))], dict(axis=1, epsilon=1e-3), 17, 1),
    "layernorm_bcast_scale": ("LayerNormalization", [X, I(_r(1, 4, seed=1)), I(_r(4, seed=2))], dict(axis=-2), 17, 1),
    "layernorm_stats": ("LayerNormalization", [X, I(_r(4, seed=1)), I(_r(4, seed=2))], {}, 17, 3),
    "dropout_mask": ("Dropout", [X], {}, 13, 2),
    "pad18_axes": ("Pad", [X, _i64(1, 2, 0, 1), I(np.array(-1.0, np.float32)), _i64(0, -1)], {}, 18, 1),
    "pad2_attrs": ("Pad", [X], dict(pads=[0, 1, 0, 0, 1, 0], value=2.0), 2, 1),
}


@pytest.mark.parametrize("case", sorted(OPSET_CASES))
def test_op_opset(case):
    op, inputs, attrs, opset, n_out = OPSET_CASES[case]
    run_op(op, inputs, attrs, opset=opset, n_out=n_out)


IMG = _r(2, 4, 7, 6)
SIG = _r(2, 4, 9)
CONV_CASES = {
    "conv2d": ("Conv", [IMG, I(_r(6, 4, 3, 3, seed=1)), I(_r(6, seed=2))], dict(pads=[1, 1, 1, 1])),
    "conv2d_group_stride_dil": ("Conv", [IMG, I(_r(6, 2, 3, 2, seed=1))],
                                dict(group=2, strides=[2, 1], dilations=[1, 2])),
    "conv2d_asym_pads": ("Conv", [IMG, I(_r(3, 4, 3, 3, seed=1)), I(_r(3, seed=2))], dict(pads=[0, 1, 2, 0])),
    "conv2d_same_upper": ("Conv", [IMG, I(_r(3, 4, 4, 3, seed=1))], dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "conv2d_same_lower": ("Conv", [IMG, I(_r(3, 4, 4, 2, seed=1))], dict(auto_pad="SAME_LOWER", strides=[1, 2])),
    "conv2d_valid": ("Conv", [IMG, I(_r(3, 4, 3, 3, seed=1))], dict(auto_pad="VALID", kernel_shape=[3, 3])),
    "conv1d": ("Conv", [SIG, I(_r(5, 4, 3, seed=1)), I(_r(5, seed=2))], dict(pads=[2, 1], strides=[2])),
    "conv1d_depthwise_same": ("Conv", [SIG, I(_r(4, 1, 4, seed=1))], dict(group=4, auto_pad="SAME_UPPER")),
    "convtranspose2d": ("ConvTranspose", [IMG, I(_r(4, 3, 3, 3, seed=1)), I(_r(3, seed=2))],
                        dict(strides=[2, 2], pads=[1, 0, 1, 1], output_padding=[1, 0])),
    "convtranspose2d_group": ("ConvTranspose", [IMG, I(_r(4, 2, 2, 3, seed=1))], dict(group=2, dilations=[2, 1])),
    "convtranspose2d_output_shape": ("ConvTranspose", [IMG, I(_r(4, 3, 3, 3, seed=1))],
                                     dict(strides=[2, 2], output_shape=[15, 12])),
    "convtranspose2d_same_upper": ("ConvTranspose", [IMG, I(_r(4, 3, 3, 3, seed=1))],
                                   dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    "convtranspose2d_same_lower": ("ConvTranspose", [IMG, I(_r(4, 3, 4, 3, seed=1))],
                                   dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    "convtranspose2d_valid": ("ConvTranspose", [IMG, I(_r(4, 3, 4, 3, seed=1))], dict(strides=[2, 1], auto_pad="VALID")),
    "convtranspose1d": ("ConvTranspose", [SIG, I(_r(4, 2, 3, seed=1)), I(_r(2, seed=2))], dict(strides=[3])),
    "maxpool2d": ("MaxPool", [IMG], dict(kernel_shape=[2, 2], strides=[2, 2])),
    "maxpool2d_pads": ("MaxPool", [IMG], dict(kernel_shape=[3, 3], pads=[1, 0, 1, 2], strides=[2, 1])),
    "maxpool2d_ceil": ("MaxPool", [IMG], dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    "maxpool2d_ceil_pads": ("MaxPool", [IMG], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "maxpool2d_same": ("MaxPool", [IMG], dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    "avgpool2d_ceil_pads": ("AveragePool", [IMG], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                                       ceil_mode=1)),
    "avgpool2d_same_lower_incl": ("AveragePool", [IMG], dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER",
                                                             count_include_pad=1)),
    "maxpool1d_dil": ("MaxPool", [SIG], dict(kernel_shape=[2], dilations=[2])),
    "avgpool2d": ("AveragePool", [IMG], dict(kernel_shape=[2, 3], strides=[1, 2])),
    "avgpool2d_pads_excl": ("AveragePool", [IMG], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "avgpool2d_pads_incl": ("AveragePool", [IMG], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)),
    "avgpool2d_asym_excl": ("AveragePool", [IMG], dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0])),
    "avgpool2d_asym_incl": ("AveragePool", [IMG], dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0], count_include_pad=1)),
    "avgpool1d_same": ("AveragePool", [SIG], dict(kernel_shape=[4], auto_pad="SAME_UPPER", strides=[2])),
    "globalavgpool": ("GlobalAveragePool", [IMG], {}),
    "globalmaxpool": ("GlobalMaxPool", [SIG], {}),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_pool(case):
    op, inputs, attrs = CONV_CASES[case]
    run_op(op, inputs, attrs, opset=17)


# ----------------------------------------------------------------- recurrent ops
def _rnn_inputs(kind, T=4, B=3, I_=5, H=3, dirs=1, layout=0, h0=False, c0=False, peep=False, lens=None, bias=True,
                seed=0):
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    x = _r(B, T, I_, seed=seed) if layout else _r(T, B, I_, seed=seed)
    ins = [x, I(0.5 * _r(dirs, G * H, I_, seed=seed + 1)), I(0.5 * _r(dirs, G * H, H, seed=seed + 2)),
           I(_r(dirs, 2 * G * H, seed=seed + 3)) if bias else None,
           I(np.array(lens, np.int32)) if lens is not None else None]
    st = (lambda s: _r(B, dirs, H, seed=s)) if layout else (lambda s: _r(dirs, B, H, seed=s))
    ins.append(st(seed + 4) if h0 else None)
    if kind == "LSTM":
        ins.append(st(seed + 5) if c0 else None)
        ins.append(I(_r(dirs, 3 * H, seed=seed + 6)) if peep else None)
    while ins and ins[-1] is None:
        ins.pop()
    return ins


RNN_CASES = {
    "lstm_fwd": ("LSTM", {}, {}),
    "lstm_reverse_h0c0": ("LSTM", dict(h0=True, c0=True), dict(direction="reverse")),
    "lstm_bi_peep": ("LSTM", dict(dirs=2, h0=True, c0=True, peep=True), dict(direction="bidirectional")),
    "lstm_bi_nobias": ("LSTM", dict(dirs=2, bias=False), dict(direction="bidirectional")),
    "lstm_seq_lens_bi": ("LSTM", dict(dirs=2, lens=[4, 2, 1], h0=True), dict(direction="bidirectional")),
    "lstm_input_forget": ("LSTM", dict(h0=True, c0=True), dict(input_forget=1)),
    "gru_bi_clip_acts": ("GRU", dict(dirs=2), dict(direction="bidirectional", clip=0.7,
                                                   activations=["LeakyRelu", "Tanh", "Sigmoid", "ScaledTanh"],
                                                   activation_alpha=[0.1, 0.8], activation_beta=[1.2])),
    "lstm_clip_acts": ("LSTM", dict(), dict(clip=0.5, activations=["HardSigmoid", "Tanh", "Relu"],
                                            activation_alpha=[0.3], activation_beta=[0.4])),
    "gru_fwd": ("GRU", {}, {}),
    "gru_lbr": ("GRU", dict(h0=True), dict(linear_before_reset=1)),
    "gru_bi_h0": ("GRU", dict(dirs=2, h0=True), dict(direction="bidirectional")),
    "gru_bi_lbr": ("GRU", dict(dirs=2), dict(direction="bidirectional", linear_before_reset=1)),
    "gru_reverse_seq_lens": ("GRU", dict(lens=[3, 4, 1]), dict(direction="reverse")),
    "rnn_bi": ("RNN", dict(dirs=2, h0=True), dict(direction="bidirectional")),
}


@pytest.mark.parametrize("case", sorted(RNN_CASES))
def test_recurrent(case):
    kind, ikw, attrs = RNN_CASES[case]
    n_out = 3 if kind == "LSTM" else 2
    mod = run_op(kind, _rnn_inputs(kind, **ikw), dict(hidden_size=3, **attrs), n_out=n_out)
    assert {"in1", "in2"} <= set(mod.onnx_names.values())
    assert mod.parameter("in1").requires_grad


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_layout1(kind):
    """layout=1 (batch first; onnxruntime refuses it) == layout 0 (checked
    against onnxruntime) with the inputs and outputs transposed."""
    ins = _rnn_inputs(kind, dirs=2, h0=True, c0=True, peep=kind == "LSTM")
    n_out = 3 if kind == "LSTM" else 2
    attrs = dict(hidden_size=3, direction="bidirectional")
    ref = run_op(kind, ins, attrs, n_out=n_out)
    inits = [numpy_helper.from_array(a.a, f"in{k}") for k, a in enumerate(ins) if isinstance(a, I)]
    names = ["" if a is None else f"in{k}" for k, a in enumerate(ins)]
    feeds = [a for a in ins if a is not None and not isinstance(a, I)]
    node = helper.make_node(kind, names, [f"out{k}" for k in range(n_out)], layout=1, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(nm, TensorProto.FLOAT, None)
                                        for nm, a in zip(names, ins) if a is not None and not isinstance(a, I)],
                          [onnx.ValueInfoProto(name=f"out{k}") for k in range(n_out)], inits)
    mod = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]))
    x0 = [torch.from_numpy(a) for a in feeds]
    x1 = [t.transpose(0, 1) for t in x0]
    y0, y1 = ref(*x0), mod(*x1)
    _close(y1[0], y0[0].permute(2, 0, 1, 3).detach().numpy(), "Y")
    for k in range(1, n_out):
        _close(y1[k], y0[k].transpose(0, 1).detach().numpy(), f"state {k}")


# ----------------------------------------------------------------- attention (opset 23)
def _attn(B=2, qh=4, kvh=4, Sq=3, Skv=5, hd=4, three_d=False, seed=0):
    if three_d:
        return [_r(B, Sq, qh * hd, seed=seed), _r(B, Skv, kvh * hd, seed=seed + 1), _r(B, Skv, kvh * hd, seed=seed + 2)]
    return [_r(B, qh, Sq, hd, seed=seed), _r(B, kvh, Skv, hd, seed=seed + 1), _r(B, kvh, Skv, hd, seed=seed + 2)]


ATTN_CASES = {
    "attn4d": (_attn(), {}),
    "attn4d_scale_causal": (_attn(Sq=5), dict(is_causal=1, scale=0.3)),
    "attn3d_gqa": (_attn(qh=4, kvh=2, three_d=True), dict(q_num_heads=4, kv_num_heads=2)),
    "attn_bool_mask": (_attn() + [np.random.default_rng(0).random((3, 5)) > 0.3], {}),
    "attn_float_mask": (_attn() + [_r(2, 1, 3, 5, seed=9)], {}),
    "attn_softcap": (_attn(), dict(softcap=2.0)),
    "attn_cross_causal": (_attn(Sq=3, Skv=5), dict(is_causal=1)),
    "attn_3d_vdim": ([_r(2, 3, 8), _r(2, 5, 8, seed=1), _r(2, 5, 12, seed=2)], dict(q_num_heads=2, kv_num_heads=2)),
}
ATTN_OUT_CASES = {   # four outputs: Y, present_key, present_value, qk_matmul_output
    "attn_past_causal": ([_r(2, 4, 2, 4), _r(2, 4, 2, 4, seed=1), _r(2, 4, 2, 4, seed=2), None, _r(2, 4, 3, 4, seed=3),
                          _r(2, 4, 3, 4, seed=4)], dict(is_causal=1)),
    "attn_past_mask": ([_r(2, 2, 2, 4), _r(2, 2, 2, 4, seed=1), _r(2, 2, 2, 4, seed=2), _r(2, 5, seed=5),
                        _r(2, 2, 3, 4, seed=3), _r(2, 2, 3, 4, seed=4)], dict()),
}
for _mode in range(4):
    ATTN_OUT_CASES[f"attn_mode{_mode}_softcap_mask"] = (_attn() + [_r(3, 5, seed=4)],
                                                         dict(qk_matmul_output_mode=_mode, softcap=3.0))
    ATTN_OUT_CASES[f"attn_mode{_mode}_mask"] = (_attn() + [_r(3, 5, seed=4)], dict(qk_matmul_output_mode=_mode))


@pytest.mark.parametrize("case", sorted(ATTN_OUT_CASES))
def test_attention_outputs(case):
    inputs, attrs = ATTN_OUT_CASES[case]
    run_op("Attention", inputs, attrs, opset=23, n_out=4)


@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_attention(case):
    inputs, attrs = ATTN_CASES[case]
    if case == "attn_bool_mask":
        inputs[3][:, 0] = True          # no fully masked row
    run_op("Attention", inputs, attrs, opset=23)


# ----------------------------------------------------------------- parameters, export, errors
def _mixed_model():
    """Initializers of several dtypes, a Constant node tensor, an int shape constant."""
    w = numpy_helper.from_array(_r(4, 3), "layer.0/weight:0")
    w2 = numpy_helper.from_array(_r(4, 3).astype(np.float16), "0bad name")
    b = numpy_helper.from_array(_r(3).astype(np.float64), "bias")
    s = numpy_helper.from_array(np.array(2.0, np.float32), "scalar")
    shp = numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")
    nodes = [
        helper.make_node("Constant", [], ["cvec"], value=numpy_helper.from_array(_r(3, seed=5), "cv")),
        helper.make_node("Constant", [], ["cone"], value=numpy_helper.from_array(np.array([0.5], np.float32), "c1")),
        helper.make_node("Constant", [], ["cfl"], value_floats=[0.1, 0.2, 0.3]),
        helper.make_node("MatMul", ["x", "layer.0/weight:0"], ["h"]),
        helper.make_node("Cast", ["0bad name"], ["w2f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w2f"], ["h2"]),
        helper.make_node("Cast", ["bias"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["h", "bf"], ["h3"]),
        helper.make_node("Mul", ["h3", "scalar"], ["h4"]),
        helper.make_node("Add", ["h4", "cvec"], ["h5"]),
        helper.make_node("Mul", ["h5", "cone"], ["h6"]),
        helper.make_node("Add", ["h6", "cfl"], ["h7"]),
        helper.make_node("Add", ["h7", "h2"], ["h8"]),
        helper.make_node("Reshape", ["h8", "shape"], ["y"]),
    ]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w, w2, b, s, shp])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_parameters_buffers_and_names():
    m = _mixed_model()
    mod = check_model(m)
    params = dict(mod.named_parameters())
    by_onnx = {mod.onnx_names[k]: p for k, p in params.items()}
    assert set(by_onnx) == {"layer.0/weight:0", "0bad name", "bias", "cvec", "cfl"}
    assert all(k.isidentifier() for k in params)
    assert by_onnx["layer.0/weight:0"].shape == (4, 3) and by_onnx["0bad name"].dtype == torch.float16
    assert by_onnx["bias"].dtype == torch.float64
    bufs = {mod.onnx_names[k] for k, _ in mod.named_buffers()}
    assert bufs == {"scalar", "shape", "cone"}
    assert mod.n_params() == 12 + 12 + 3 + 3 + 3
    # dtypes preserved by the write-back, and the values are the parameters'
    with torch.no_grad():
        mod.parameter("0bad name").fill_(0.25)
        mod.parameter("cvec").fill_(-1.0)
        mod.parameter("cfl").copy_(torch.tensor([1.0, 2.0, 3.0]))
    m2 = mod.to_onnx()
    inits = {t.name: t for t in m2.graph.initializer}
    assert inits["0bad name"].data_type == TensorProto.FLOAT16 and inits["bias"].data_type == TensorProto.DOUBLE
    assert np.all(numpy_helper.to_array(inits["0bad name"]) == 0.25)
    assert np.all(numpy_helper.to_array(m2.graph.node[0].attribute[0].t) == -1.0)
    assert list(m2.graph.node[2].attribute[0].floats) == [1.0, 2.0, 3.0]
    assert numpy_helper.to_array(inits["scalar"]) == 2.0
    # the input model is not modified
    assert not np.all(numpy_helper.to_array(m.graph.initializer[1]) == 0.25)
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    _close(mod(torch.from_numpy(x)), _session(m2).run(None, {"x": x})[0], "mixed write-back")


def test_freeze():
    m = _mixed_model()
    full = OnnxModule(m)
    mod = OnnxModule(m, freeze=["cvec", "bias"])
    assert mod.n_params() == full.n_params() - 6
    assert not mod.parameter("cvec").requires_grad and mod.parameter("layer.0/weight:0").requires_grad
    mod2 = OnnxModule(m, freeze=lambda name: name.startswith("layer"))
    assert mod2.n_params() == full.n_params() - 12
    x = torch.randn(3, 4)
    mod(x).sum().backward()
    assert mod.parameter("cvec").grad is None and mod.parameter("cfl").grad is not None
    with torch.no_grad():
        mod.parameter("cvec").fill_(3.0)      # frozen for training, still exported
    m2 = mod.to_onnx()
    assert np.all(numpy_helper.to_array(m2.graph.node[0].attribute[0].t) == 3.0)


def test_keyword_and_bad_inputs():
    m = _mixed_model()
    mod = OnnxModule(m)
    x = torch.randn(2, 4)
    _close(mod(x=x), _session(m).run(None, {"x": x.numpy()})[0], "keyword")
    with pytest.raises(InputError, match="no graph input"):
        mod(z=x)
    with pytest.raises(InputError, match="missing"):
        mod()


def test_unsupported_op_raises_at_construction():
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"]),
             helper.make_node("Relu", ["scores"], ["r"])]
    g = helper.make_graph(nodes, "nms", [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
                                         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
                          [helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(InputError, match="onnx -> torch: op NonMaxSuppression is not supported"):
        OnnxModule(m)
    assert "NonMaxSuppression" not in SUPPORTED_OPS
    # an attribute value outside what is implemented is refused at construction too
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=2, activations=["Sigmoid", "Foo", "Tanh"])
    g = helper.make_graph([lstm], "l", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(_r(1, 8, 3), "W"), numpy_helper.from_array(_r(1, 8, 2), "R")])
    with pytest.raises(InputError, match="op LSTM is not supported.*Foo"):
        OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    # ops of another domain
    n = helper.make_node("FusedMatMul", ["a", "a"], ["b"], domain="com.microsoft")
    g = helper.make_graph([n], "ms", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 2])])
    with pytest.raises(InputError, match="com.microsoft.FusedMatMul"):
        OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13),
                                                       helper.make_opsetid("com.microsoft", 1)]))


def test_required_ops_are_supported():
    required = """Gemm MatMul Add Sub Mul Div Pow Sqrt Exp Log Neg Abs Reciprocal Relu LeakyRelu Sigmoid Tanh
    Softmax LogSoftmax Erf Gelu HardSigmoid Clip Identity Dropout Cast Reshape Transpose Flatten Squeeze
    Unsqueeze Concat Split Slice Gather Expand Tile Shape Size ConstantOfShape Constant Range Where Equal Less
    Greater Not And Or ReduceMean ReduceSum ReduceMax LayerNormalization BatchNormalization Conv ConvTranspose
    MaxPool AveragePool GlobalAveragePool Einsum Attention LSTM GRU""".split()
    assert set(required) <= SUPPORTED_OPS
