"""Running ONNX models in onnxruntime: sessions, feeds from .npz data, the
probe's feeds, verification of a base against its original, accuracy and
loss of a classifier, and the parameter count every report uses."""
from __future__ import annotations

import os

import numpy as np
import onnx

from fibgraph.errors import InputError
from fibgraph.limits import check_elements, npz_headers, read_npz
from fibgraph.fileio import check_regular

from .feeds import short_error
from .load import float_tensors, load_onnx

__all__ = ["count_params", "data_feeds", "probe_feeds", "check_loads", "lean_options", "lean_session", "session", "run", "load_data",
           "inputs_for", "verify_models", "prob_kind", "evaluate"]


def count_params(model) -> int:
    """Elements of all floating-point initializers and Constant tensors."""
    return int(sum(n for _, n in float_tensors(model)))


def data_feeds(data, model):
    """Feeds for every input of ``model`` from an .npz: one array per input name,
    or (a model with one input) the array ``x``."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    check_regular(data, "data file")
    heads = npz_headers(data)               # sizes checked before anything is loaded
    names = {vi.name for vi in inputs} if all(vi.name in heads for vi in inputs) else {"x"}
    arrays = read_npz(data, names)
    for k, v in arrays.items():
        _check_values(data, k, v)
    if all(vi.name in arrays for vi in inputs):
        pick = {vi.name: arrays[vi.name] for vi in inputs}
    elif len(inputs) == 1 and "x" in arrays:
        pick = {inputs[0].name: arrays["x"]}
    else:
        raise InputError(f"{data}: needs an array per model input ({', '.join(vi.name for vi in inputs)}), "
                         "or x for a model with one input")
    for vi in inputs:
        v = np.asarray(pick[vi.name])
        if v.ndim > 0 and v.shape[0] == 0:
            name = vi.name if vi.name in arrays else "x"
            raise InputError(f"{data}: {name!r} is empty")
    return {vi.name: np.asarray(pick[vi.name]).astype(
        onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)) for vi in inputs}


def probe_feeds(data, model):
    """The hypergraph importer's probe from ``data``: for a model with one
    input whose batch axis is free, its first sample (batch 1); for several
    inputs the arrays of the npz as they are; None without data."""
    if data is None:
        return None
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if isinstance(data, tuple):
        if len(inputs) != 1:
            return None
        vi = inputs[0]
        feeds = {vi.name: np.asarray(data[0]).astype(
            onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))}
    else:
        feeds = data_feeds(data, model)
    if len(inputs) != 1:
        return feeds
    vi = inputs[0]
    v = feeds[vi.name]
    dims = vi.type.tensor_type.shape.dim
    fixed = len(dims) > 0 and dims[0].HasField("dim_value") and dims[0].dim_value > 0
    return feeds if fixed or v.ndim == 0 else {vi.name: v[:1]}


def lean_options():
    """onnxruntime session options that hold the weights once and the
    activations no longer than they live: no packed or re-laid-out (NCHWc)
    second copy of a weight (prepacking off, graph optimisations off: the
    graph runs as written), no memory arena and no memory pattern (an
    activation is freed when it dies, not pooled at the run's peak; on a
    25M-parameter CNN the three save about 20 MB of a verify run), errors
    only as exceptions.  Every session over a model's weights uses them
    (probe, load check, verify, repair); a timed run (``eval``) does not."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


class _Fed:
    """A session with some inputs always fed: the folded weights of :func:`lean_session`."""

    def __init__(self, sess, extra):
        self._sess, self._extra = sess, extra

    def get_inputs(self):
        return [i for i in self._sess.get_inputs() if i.name not in self._extra]

    def get_outputs(self):
        return self._sess.get_outputs()

    def run(self, names, feeds, *args):
        return self._sess.run(names, {**feeds, **self._extra}, *args)


def lean_session(model):
    """A session over ``model`` (a path or a ModelProto) with :func:`lean_options`
    whose nodes on weights alone that fold (:mod:`.fold`: a dynamo export's
    gate reordering, a transposed token table) are made once here and fed:
    run as written, every run would copy those weights again, and
    onnxruntime's own constant folding keeps a copy of its own."""
    from . import external
    from .fold import cut, fold_constants

    m = model
    if not isinstance(m, onnx.ModelProto):
        path = os.path.abspath(os.fspath(model))
        m = external.open_lean(path, least=external.LEAN_FILE_BYTES) or onnx.load(path, load_external_data=False)
        m = external.absolutize(m, os.path.dirname(path))
    folded = fold_constants(m)
    if not folded:       # a written file goes to onnxruntime by its path, as external.session hands it over
        return external.session(model, lean_options())
    m, fed = cut(m, folded)
    return _Fed(external.session(m, lean_options()), fed)


def check_loads(m2):
    """The base must load in onnxruntime before it is written (the checker
    does not run shape inference through every op); ``m2``: a ModelProto or
    the path of the file written (a session over the file: its weights are
    mapped, not copied, and not re-laid-out: :func:`lean_options`)."""
    from .external import session as ext_session

    try:
        ext_session(m2, lean_options())
    except Exception as e:                 # a writer bug, never the user's input
        raise RuntimeError("the written base model does not load in onnxruntime "
                           f"({short_error(e)}); nothing was written") from None


_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
       onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
       onnx.TensorProto.INT32: np.int32}


def session(model, device="cpu"):
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError("--device cuda: onnxruntime has no CUDA provider on this machine "
                             "(install onnxruntime-gpu on a machine with a GPU)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    from .external import session as ext_session

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # none: errors come back as exceptions, one line each
        sess = ext_session(model, opts, providers)
    except Exception as e:
        raise InputError(f"onnxruntime cannot load the model: {short_error(e)}") from None
    if isinstance(model, onnx.ModelProto):
        # old IR versions list initializers among the inputs: feed only the real one
        inits = {t.name for t in model.graph.initializer}
        real = [i for i in sess.get_inputs() if i.name not in inits]
    else:
        real = sess.get_inputs()[:1]
    sess.fibgraph_input = real[0] if real else sess.get_inputs()[0]
    return sess


def run(sess, names, feeds):
    try:
        return sess.run(names, feeds)
    except Exception as e:
        raise InputError(f"onnxruntime could not run the model on these inputs: {short_error(e)}") from None


def _check_values(path, name, v, labels=False):
    """Numbers a model can read: real (bool, integer or float), no strings,
    no complex numbers; labels are whole numbers."""
    if v.dtype.kind not in "biuf":
        kind = {"c": "complex numbers", "U": "strings", "S": "bytes", "M": "dates", "m": "time spans"}.get(
            v.dtype.kind, f"{v.dtype} values")
        raise InputError(f"{path}: {name!r} holds {kind}, not real numbers")
    if labels and v.dtype.kind == "f":
        bad = ~np.isfinite(v) | (v != np.round(v))
        if bad.any():
            k = int(np.argmax(bad.reshape(-1)))
            raise InputError(f"{path}: labels {name!r} must be whole numbers (class indices), "
                             f"got {float(v.reshape(-1)[k])!r} at position {k}")


def load_data(path, need_y=False):
    """``(x, y)`` from an .npz (``y`` None when the file has none; required
    with ``need_y``):
    headers checked against the memory limit first, ``x`` real numbers with a
    batch axis, ``y`` whole numbers, one per sample."""
    check_regular(path, "data file")
    heads = npz_headers(path)
    if "x" not in heads:
        raise InputError(f"{path}: data file needs an array 'x' (and 'y' for eval)")
    if need_y and "y" not in heads:
        raise InputError(f"{path}: data file needs an array 'y' (labels)")
    arrays = read_npz(path, {"x", "y"} if "y" in heads else {"x"})
    x, y = arrays["x"], arrays.get("y")
    _check_values(path, "x", x)
    if x.ndim == 0:
        raise InputError(f"{path}: 'x' is a single number (0-d); it needs a batch axis")
    if x.shape[0] == 0:
        raise InputError(f"{path}: 'x' is empty")
    if y is not None:
        _check_values(path, "y", y, labels=True)
        if y.ndim == 0:
            raise InputError(f"{path}: 'y' is a single number (0-d); it needs one label per sample")
    return x, y


def inputs_for(sess, data=None, n=64, seed=0):
    inp = getattr(sess, "fibgraph_input", None) or sess.get_inputs()[0]
    if data is not None:
        x = data if isinstance(data, np.ndarray) else load_data(data)[0]
        want = inp.shape
        fixed = [d if isinstance(d, int) else None for d in want]
        if x.ndim != len(want) or any(f is not None and f != s for f, s in zip(fixed[1:], x.shape[1:])):
            src = "data" if isinstance(data, np.ndarray) else str(data)
            raise InputError(f"{src}: x has shape {list(x.shape)}, the model's input {inp.name!r} "
                             f"expects {['?' if f is None else f for f in fixed]}")
    else:
        batch = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else n
        shape = [batch] + [d if isinstance(d, int) else None for d in inp.shape[1:]]
        if any(d is None for d in shape):
            raise InputError(f"input {inp.name!r} has unknown non-batch dimensions {inp.shape}; pass --data")
        check_elements(f"graph input {inp.name!r}", shape, 8, "float64")
        x = np.random.default_rng(seed).standard_normal(shape)
    dt = {"tensor(float)": np.float32, "tensor(double)": np.float64,
          "tensor(float16)": np.float16}.get(inp.type, np.float32)
    return {inp.name: np.asarray(x).astype(dt)}


def verify_models(a, b, data=None, seed=0, n=64):
    """Run both models on the same inputs; the largest absolute difference of
    every floating output (inputs from :func:`fibgraph.importers.onnx.feeds.make_feeds`:
    floats standard normal, integers in the range they index; or ``data``)."""
    from .feeds import describe, make_feeds

    sa, sb = session(a), session(b)
    if data is None and isinstance(a, onnx.ModelProto):
        names = {i.name for i in sa.get_inputs()}
        drawn = make_feeds(a, n=n, seed=seed)
        feeds = {k: v for k, v in drawn.items() if k in names}
    else:
        feeds = inputs_for(sa, data, n, seed)
    ra, rb = run(sa, None, feeds), run(sb, None, feeds)
    diffs = []
    for p, q in zip(ra, rb):
        p, q = np.asarray(p), np.asarray(q)
        if p.dtype.kind == "f":
            with np.errstate(invalid="ignore", over="ignore"):
                diffs.append(float(np.max(np.abs(p.astype(np.float64) - q.astype(np.float64)))) if p.size else 0.0)
        elif p.dtype.kind in "iub":
            diffs.append(float(np.mean(p != q)))
    first = next(iter(feeds.values()))
    nb = int(first.shape[0]) if first.ndim else 1
    out = {"max_abs_diff": max(diffs) if diffs else 0.0, "n": nb}
    if not np.isfinite(diffs).all():
        raise InputError(f"verify: output difference is not finite ({max(diffs)}): the outputs overflow "
                         "or are NaN on these inputs")
    if data is not None:
        out["inputs"] = "data"
    elif isinstance(a, onnx.ModelProto):
        out["inputs"], out["seed"] = describe(feeds, drawn.specs), seed
    else:
        out["inputs"], out["seed"] = {k: f"normal(0,1), shape {list(v.shape)}" for k, v in feeds.items()}, seed
    return out


def prob_kind(model, out_name):
    prod = {o: n for n in model.graph.node for o in n.output}
    node = prod.get(out_name)
    while node is not None and node.op_type in ("Identity", "Cast", "Reshape", "Flatten"):
        node = prod.get(node.input[0])
    if node is None:
        return "logits"
    return {"Softmax": "probs", "LogSoftmax": "logprobs", "Sigmoid": "sigmoid"}.get(node.op_type, "logits")


def evaluate(model_path, data, device="cpu", batch=1024):
    """Accuracy and mean cross-entropy of a classifier on ``data`` (npz x, y)."""
    model = load_onnx(model_path) if not isinstance(model_path, onnx.ModelProto) else model_path
    x, y = load_data(data, need_y=True) if not isinstance(data, tuple) else data
    sess = session(model, device)
    outs = sess.get_outputs()
    pick = None
    for k, o in enumerate(outs):
        if o.type in ("tensor(float)", "tensor(double)") and len(o.shape) == 2:
            pick = k
            break
    if pick is None:
        raise InputError("the model has no (batch, classes) float output to evaluate")
    kind = prob_kind(model, outs[pick].name)
    scores = []
    from fibgraph.progress import task

    with task(f"evaluating on {x.shape[0]} samples", total=-(-x.shape[0] // batch)) as advance:
        for s in range(0, x.shape[0], batch):
            feeds = inputs_for(sess, x[s:s + batch])
            scores.append(np.asarray(run(sess, [outs[pick].name], feeds)[0], dtype=np.float64))
            advance(1)
    out = classifier_scores(np.concatenate(scores), y, kind)
    out.update({"output": outs[pick].name, "output_kind": kind, "device": device})
    return out


def classifier_scores(S, y, kind="logits"):
    """``{"accuracy", "loss", "n"}`` of (batch, classes) outputs ``S`` of the
    given kind (logits, probs, logprobs, sigmoid) for labels ``y``."""
    S = np.asarray(S, dtype=np.float64)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if y.size != S.shape[0] or y.min() < 0 or y.max() >= S.shape[1]:
        raise InputError("labels 'y' do not match the model's outputs")
    if kind == "probs":
        logp = np.log(np.clip(S, 1e-12, None))
    elif kind == "logprobs":
        logp = S
    else:
        if kind == "sigmoid":
            S = np.log(np.clip(S, 1e-12, None))
        m = S.max(axis=1, keepdims=True)
        logp = S - m - np.log(np.exp(S - m).sum(axis=1, keepdims=True))
    acc = float(np.mean(S.argmax(axis=1) == y))
    loss = float(-np.mean(logp[np.arange(y.size), y]))
    return {"accuracy": acc, "loss": loss, "n": int(y.size)}
