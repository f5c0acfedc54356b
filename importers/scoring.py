"""Scores of a classifier with any inputs: :func:`feeds_eval` turns ``(x, y)``
into what the model reads (one float input: as is; one integer input: x cast;
several inputs: the .npz's arrays per input name) and :func:`evaluate_any`
gives accuracy and mean cross-entropy (onnxruntime).  Used by
``compare-methods`` (:mod:`fibgraph.importers.compare_dag`) and ``--keep``
(:mod:`fibgraph.importers.keep`)."""
from __future__ import annotations

import numpy as np

from fibgraph.errors import InputError

__all__ = ["feeds_eval", "evaluate_any"]


def feeds_eval(model, data, xy):
    """Evaluation data: ``(x, y)`` for a model with one floating-point input;
    ``(feeds, y)`` for several inputs (the npz's arrays per input name,
    ``data_feeds``) or an integer input (token ids: x cast to its type)."""
    import onnx

    from .onnx.runtime import data_feeds

    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    dtypes = [onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in inputs]
    if len(inputs) == 1 and dtypes[0].kind == "f":
        return xy
    if len(inputs) == 1:
        return {inputs[0].name: np.asarray(xy[0]).astype(dtypes[0])}, xy[1]
    if isinstance(data, tuple):
        raise InputError(f"the model has {len(inputs)} inputs: give an .npz with one array per input name")
    return data_feeds(data, model), xy[1]


def evaluate_any(model, data):
    """:func:`fibgraph.importers.api.evaluate` for ``(x, y)``; for ``(feeds, y)`` (a model
    with several inputs) the same scores with every input fed."""
    from .onnx.runtime import evaluate, prob_kind, run, session

    if not isinstance(data[0], dict):
        return evaluate(model, data)
    feeds, y = data
    sess = session(model)
    outs = sess.get_outputs()
    pick = next((o.name for o in outs if o.type in ("tensor(float)", "tensor(double)") and len(o.shape) == 2),
                None)
    if pick is None:
        raise InputError("the model has no (batch, classes) float output to evaluate")
    n = int(next(iter(feeds.values())).shape[0])
    S = np.concatenate([np.asarray(run(sess, [pick], {k: v[s:s + 1024] for k, v in feeds.items()})[0],
                                   dtype=np.float64) for s in range(0, n, 1024)])
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if y.size != S.shape[0] or y.min() < 0 or y.max() >= S.shape[1]:
        raise InputError("labels 'y' do not match the model's outputs")
    kind = prob_kind(model, pick)
    if kind in ("probs", "sigmoid"):
        S = np.log(np.clip(S, 1e-12, None))
    if kind == "probs":
        logp = S
    else:
        mx = S.max(axis=1, keepdims=True)
        logp = S - mx - np.log(np.exp(S - mx).sum(axis=1, keepdims=True))
    return {"accuracy": float(np.mean(S.argmax(axis=1) == y)),
            "loss": float(-np.mean(logp[np.arange(y.size), y])), "n": int(y.size)}
