"""The whole job on an ONNX model: import, colour, compress, write, verify, evaluate.

Every model is read by the hypergraph importer (:mod:`fibgraph.importers.onnx.importer`)
and coloured, compressed and written by :mod:`fibgraph.importers.dag_api`.

This is the Python API behind the CLI::

    from fibgraph.importers.api import color_model, compress_model, evaluate
    report, imp, col = color_model("model.onnx", symmetry="fibration", eps=0.1)
    report = compress_model("model.onnx", "small.onnx", eps=0.0, verify=True)
    scores = evaluate("small.onnx", "test.npz")
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx

from fibgraph.errors import InputError
from fibgraph.fileio import write_atomic, write_json_atomic
from fibgraph.engine import DEFAULT_RTOL, make_criterion

from .onnx.feeds import short_error
from .onnx.load import float_tensors, load_onnx

__all__ = ["make_criteria", "criteria_from_table", "read_eps_table", "color_model", "compress_model", "evaluate", "verify_models",
           "atomic_write_bytes", "atomic_write_json", "COMPRESS_SYMMETRIES"]

COMPRESS_SYMMETRIES = ("fibration", "covering", "covering-strict", "automorphism")


def _check_eps(eps, where="--eps"):
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"{where}: eps must be a number, got {eps!r}") from None
    if not math.isfinite(eps) or eps < 0 or eps >= 2:
        raise InputError(f"{where}: eps must be in [0, 2) (0 = exact fibers), got {eps}")
    return eps


def make_criteria(names, eps=0.0, eps_file=None, linkage="average", metric="cosine",
                  rescale=True, rtol=DEFAULT_RTOL):
    """Criterion per layer: ``eps`` for all, overridden per layer by ``eps_file``
    (JSON ``{"<weight name>": eps, ...}``; the key ``"*"`` sets the default).
    ``names``: the model's layer (weight) names, or an object with ``layers``
    (each with a ``name``)."""
    eps = _check_options(eps, linkage, metric)
    if hasattr(names, "layers"):
        names = [ly.name for ly in names.layers]
    table = {} if eps_file is None else read_eps_table(eps_file, list(names))
    return criteria_from_table(table, eps, linkage, metric, rescale, rtol, where=eps_file)


def read_eps_table(path, names):
    """``{layer weight name: eps}`` from a JSON eps file; names must be layers
    of the model (``"*"`` sets the default)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read eps file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(table, dict):
        raise InputError(f"{path}: eps file must be a JSON object {{layer weight name: eps}}")
    unknown = sorted(k for k in table if k != "*" and k not in set(names))
    if unknown:
        raise InputError(f"{path}: layers not in the model: {', '.join(unknown)} "
                         f"(layers: {', '.join(names)})")
    return table


def criteria_from_table(table, eps=0.0, linkage="average", metric="cosine", rescale=True,
                        rtol=DEFAULT_RTOL, where="eps"):
    """``{None: default criterion, name: criterion}`` from ``{name: eps}``
    (``"*"`` sets the default; eps 0 means exact)."""
    crit = {None: make_criterion(_check_eps(eps), linkage, metric, rescale, rtol)}
    for k, v in table.items():
        e = _check_eps(v, f"{where}[{k!r}]")
        crit[None if k == "*" else k] = make_criterion(e, linkage, metric, rescale, rtol)
    return crit


def count_params(model) -> int:
    """Elements of all floating-point initializers and Constant tensors."""
    return int(sum(n for _, n in float_tensors(model)))


def import_any(path, data=None):
    """``(None, DagImport)``: every ONNX model is read by the hypergraph
    importer (branches, residual streams, attention, LSTM/GRU, LayerNorm,
    barriers; a feed-forward chain is the simplest such graph).  ``data`` (an
    .npz with x, or ``(x, y)``) gives it its probe input.  The first element
    is kept for callers that unpack two values."""
    from .onnx.importer import import_dag

    model = load_onnx(path)
    return None, import_dag(model, feeds=probe_feeds(data, model), label=os.fspath(path))


def data_feeds(data, model):
    """Feeds for every input of ``model`` from an .npz: one array per input name,
    or (a model with one input) the array ``x``."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    try:
        with np.load(data) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:
        raise InputError(f"{data}: not a readable .npz file") from None
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


def _dag_eps_table(imp, eps_file):
    if eps_file is None:
        return {}
    from .onnx.groups import weight_uses

    return read_eps_table(eps_file, [u.weight for u, _ in weight_uses(imp)])


def color_model(path, symmetry="fibration", eps=0.0, eps_file=None, linkage="average",
                metric="cosine", rescale=True, rtol=DEFAULT_RTOL, imported=None, data=None):
    """Colour an ONNX model; returns ``(report, DagImport, DagColouring)`` (see
    README and :mod:`fibgraph.importers.dag_api`).  ``data`` (.npz) gives the
    hypergraph importer its probe inputs; ``imported``: a DagImport of the
    model made before."""
    from .dag_api import color_dag_model

    eps = _check_options(eps, linkage, metric)
    dag = imported if imported is not None else import_any(path, data)[1]
    return color_dag_model(path, symmetry, eps, _dag_eps_table(dag, eps_file), linkage, metric, rtol,
                           imp=dag, rescale=rescale)


def _check_options(eps, linkage, metric):
    if linkage not in ("complete", "average"):
        raise InputError(f"--linkage must be complete or average, got {linkage!r}")
    if metric not in ("cosine", "euclidean"):
        raise InputError(f"--metric must be cosine or euclidean, got {metric!r}")
    return _check_eps(eps)


def check_loads(m2):
    """The base must load in onnxruntime before it is written (the checker
    does not run shape inference through every op)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(m2.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:                 # a writer bug, never the user's input
        raise RuntimeError("the written base model does not load in onnxruntime "
                           f"({short_error(e)}); nothing was written") from None


def compress_model(path, out, symmetry="fibration", eps=0.0, eps_file=None, linkage="average",
                   metric="cosine", rescale=True, rtol=DEFAULT_RTOL, verify=False, data=None,
                   seed=0):
    """Compress an ONNX model to its base and write it atomically to ``out``."""
    if symmetry not in COMPRESS_SYMMETRIES:
        raise InputError(f"--symmetry {symmetry}: only in-balanced colourings ({', '.join(COMPRESS_SYMMETRIES)}) "
                         "preserve the function; opfibers do not")
    _check_out_path(path, out)
    from .dag_api import compress_dag_model

    eps = _check_options(eps, linkage, metric)
    _, dag = import_any(path, data)
    return compress_dag_model(path, out, symmetry, eps, _dag_eps_table(dag, eps_file), linkage, metric, rtol,
                              verify=verify, data=data, seed=seed, imp=dag, rescale=rescale)


def _check_out_path(inp, out):
    if out is None:
        raise InputError("an output path is required (-o OUT.onnx)")
    if os.path.exists(out) and os.path.exists(inp) and os.path.samefile(inp, out):
        raise InputError(f"{out}: output path equals the input path; refusing to overwrite the input")
    if os.path.abspath(out) == os.path.abspath(inp):
        raise InputError(f"{out}: output path equals the input path; refusing to overwrite the input")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise InputError(f"{out}: folder {d} does not exist")


def atomic_write_bytes(path, data: bytes):
    write_atomic(path, data)


def atomic_write_json(path, obj):
    write_json_atomic(path, obj)


# ------------------------------------------------------------- running
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
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only
        sess = ort.InferenceSession(data, sess_options=opts, providers=providers)
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


def _run(sess, names, feeds):
    try:
        return sess.run(names, feeds)
    except Exception as e:
        raise InputError(f"onnxruntime could not run the model on these inputs: {short_error(e)}") from None


def load_data(path, need_y=False):
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise InputError(f"{path}: data file needs an array 'x' (and 'y' for eval)")
            x = z["x"]
            y = z["y"] if "y" in z else None
    except InputError:
        raise
    except Exception:
        raise InputError(f"{path}: not a readable .npz file with arrays x, y") from None
    if need_y and y is None:
        raise InputError(f"{path}: data file needs an array 'y' (labels)")
    if x.shape[0] == 0:
        raise InputError(f"{path}: 'x' is empty")
    return x, y


def _inputs_for(sess, data=None, n=64, seed=0):
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
        x = np.random.default_rng(seed).standard_normal(shape)
    dt = {"tensor(float)": np.float32, "tensor(double)": np.float64,
          "tensor(float16)": np.float16}.get(inp.type, np.float32)
    return {inp.name: np.asarray(x).astype(dt)}


def verify_models(a, b, data=None, seed=0, n=64):
    """Run both models on the same inputs; the largest absolute difference of
    every floating output (inputs from :func:`fibgraph.importers.onnx.feeds.make_feeds`:
    floats standard normal, integers in the range they index; or ``data``)."""
    from .onnx.feeds import describe, make_feeds

    sa, sb = session(a), session(b)
    if data is None and isinstance(a, onnx.ModelProto):
        names = {i.name for i in sa.get_inputs()}
        drawn = make_feeds(a, n=n, seed=seed)
        feeds = {k: v for k, v in drawn.items() if k in names}
    else:
        feeds = _inputs_for(sa, data, n, seed)
    ra, rb = _run(sa, None, feeds), _run(sb, None, feeds)
    diffs = []
    for p, q in zip(ra, rb):
        p, q = np.asarray(p), np.asarray(q)
        if p.dtype.kind == "f":
            diffs.append(float(np.max(np.abs(p.astype(np.float64) - q.astype(np.float64)))) if p.size else 0.0)
        elif p.dtype.kind in "iub":
            diffs.append(float(np.mean(p != q)))
    first = next(iter(feeds.values()))
    nb = int(first.shape[0]) if first.ndim else 1
    out = {"max_abs_diff": max(diffs) if diffs else 0.0, "n": nb}
    if data is not None:
        out["inputs"] = "data"
    elif isinstance(a, onnx.ModelProto):
        out["inputs"], out["seed"] = describe(feeds, drawn.specs), seed
    else:
        out["inputs"], out["seed"] = {k: f"normal(0,1), shape {list(v.shape)}" for k, v in feeds.items()}, seed
    return out


def _prob_kind(model, out_name):
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
    kind = _prob_kind(model, outs[pick].name)
    scores = []
    for s in range(0, x.shape[0], batch):
        feeds = _inputs_for(sess, x[s:s + batch])
        scores.append(np.asarray(_run(sess, [outs[pick].name], feeds)[0], dtype=np.float64))
    S = np.concatenate(scores)
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
    return {"accuracy": acc, "loss": loss, "n": int(y.size), "output": outs[pick].name,
            "output_kind": kind, "device": device}
