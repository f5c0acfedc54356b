"""Verification of a base against its original (onnxruntime, one session at
a time): the same made-up inputs (or ``--data``) through both, the largest
absolute difference of their outputs.

The original's outputs (:class:`Reference`) can be drawn early, right after
the import (:func:`reference_first`: when they are small), and the base's
compared with them at the end; then the original's session never runs while
the colouring's modules and caches are resident.

Example
-------
>>> from fibgraph.importers.dag_verify import verify_dag      # doctest: +SKIP
>>> verify_dag(imp.model, "base.onnx", imp)["max_abs_diff"]    # doctest: +SKIP
0.0
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fibgraph.errors import InputError
from fibgraph.progress import task

__all__ = ["verify_dag", "verify_reference", "verify_against", "reference_first", "Reference", "verify_batch",
           "heavy", "VERIFY_ACTIVATIONS", "REFERENCE_FIRST_BYTES"]


def _free_batch(model):
    """Names of the graph inputs that share one free batch axis: every input of
    rank > 0 declares its first axis free, and with several inputs by one
    symbolic name (``batch``); else none (the batch stays the probe's)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits and len(vi.type.tensor_type.shape.dim) > 0]
    firsts = [vi.type.tensor_type.shape.dim[0] for vi in inputs]
    if not inputs or any(d.HasField("dim_value") and d.dim_value > 0 for d in firsts):
        return set()
    if len(inputs) > 1 and (len({d.dim_param for d in firsts}) != 1 or not firsts[0].dim_param):
        return set()
    return {vi.name for vi in inputs}


def _feeds_like(imp, seed, data=None, specs=None, batch=None):
    """Inputs shaped like the probe's, drawn anew (:func:`fibgraph.importers.onnx.feeds.make_feeds`):
    floats standard normal, integers in the range they index, masks ones; the
    integer inputs of a probe the user gave keep their values.  With ``batch``,
    inputs whose first axis is declared free and drawn (not given) get that
    batch size.  A :class:`Drawn` whose ``given`` names the inputs kept."""
    from .onnx.feeds import Drawn, input_specs, make_feeds

    specs = input_specs(imp.model) if specs is None else specs
    shapes = {k: np.shape(v) for k, v in imp.feeds.items()}
    if batch is not None and isinstance(imp.feeds, Drawn):
        free = _free_batch(imp.model)
        shapes = {k: ((batch,) + tuple(v[1:]) if k in free and len(v) else v) for k, v in shapes.items()}
    feeds = make_feeds(imp.model, seed=seed, shapes=shapes, specs=specs)
    feeds.given = set()
    if not isinstance(imp.feeds, Drawn):      # the user's probe: keep its non-float inputs
        for k, v in imp.feeds.items():
            v = np.asarray(v)
            if v.dtype.kind != "f" or k not in feeds:
                feeds[k] = v
                feeds.given.add(k)
    if data is not None:
        from .onnx.runtime import data_feeds

        got = data_feeds(data, imp.model)
        feeds.update(got)
        feeds.given |= set(got)
    return feeds


def heavy(model) -> bool:
    """Whether ``model`` (a path or a ModelProto) holds weights of
    :data:`~fibgraph.importers.onnx.external.LEAN_BYTES` or more (then freeing
    them at once matters more than the cost of ``gc.collect``)."""
    from .onnx.external import LEAN_BYTES

    try:
        if isinstance(model, (str, os.PathLike)):
            return os.path.getsize(model) >= LEAN_BYTES
        return sum(len(t.raw_data) for t in model.graph.initializer) >= LEAN_BYTES
    except (OSError, AttributeError):
        return False


def verify_batch(imp, most=64, least=2):
    """The made-up batch for verify: ``most``, or fewer where one sample's
    activations (every tensor of the probe run) are big, so that a batch's
    activations stay within a quarter of the model's weights or
    :data:`VERIFY_ACTIVATIONS` (a 25M-parameter CNN at 32 x 32: a few
    samples, not 64); at least ``least``, so a free batch axis is still
    exercised."""
    inits = {t.name for t in imp.model.graph.initializer}
    act = sum(int(np.prod(s)) for k, s in imp.shapes.items() if k not in inits and s is not None) * 4
    probe_batch = max([int(np.shape(v)[0]) for v in imp.feeds.values() if np.ndim(v)] or [1])
    per_sample = act / max(probe_batch, 1)
    if per_sample <= 0:
        return most
    budget = max(imp.n_params, VERIFY_ACTIVATIONS)        # float32 weights: 4 bytes per parameter
    return int(min(most, max(least, budget // per_sample)))


#: activations a verify batch may always take, whatever the model's size
VERIFY_ACTIVATIONS = 16 << 20


#: original outputs up to this many bytes are drawn before the colouring
#: (:func:`reference_first`), so the original's session runs while little else
#: is resident; bigger ones (a language model's logits) are drawn at the end
REFERENCE_FIRST_BYTES = 64 << 20


@dataclass
class Reference:
    """The original's outputs on verify's inputs: ``fed`` (drawn, feeds) per
    run, ``outs`` the outputs per run; ``data``/``seed``/``specs`` as drawn."""
    fed: list
    outs: list
    data: object
    seed: int
    specs: dict


def verify_reference(a, imp, data=None, seed=0, repeats=3, batch="auto"):
    """:class:`Reference`: model ``a`` (the original: a ModelProto or a path)
    run on ``repeats`` made-up inputs shaped like the probe's, at ``batch``
    samples where the model's batch axis is free (or on ``data``; ``"auto"``:
    :func:`verify_batch`).  Its session is closed before this returns."""
    import gc

    from fibgraph.heap import session_heap, trim

    from .onnx.external import relieve
    from .onnx.feeds import input_specs, short_error
    from .onnx.runtime import lean_session

    runs = 1 if data is not None else repeats
    if batch == "auto":
        batch = verify_batch(imp)
    with task("verifying: the original on made-up inputs", total=runs) as advance, session_heap():
        relieve()                              # mapped pages and freed heap back first
        sa = lean_session(a)                   # weights read in place; chains on weights alone folded once
        names = [i.name for i in sa.get_inputs()]
        specs = input_specs(imp.model)

        def draws(batch):
            out = []
            for r in range(runs):
                drawn = _feeds_like(imp, seed + r, data, specs, batch=batch)
                out.append((drawn, {k: v for k, v in drawn.items() if k in names}))
            return out

        def run_all(sess, fed):
            res = []
            for _, f in fed:
                res.append(sess.run(None, f))
                advance(1)
            return res

        fed = draws(batch)
        try:
            ra = run_all(sa, fed)
        except Exception as e:
            if batch is None or data is not None:
                raise InputError(f"verification run failed: {short_error(e)}") from None
            fed = draws(None)                 # the batch axis is not free after all: the probe's shapes
            try:
                ra = run_all(sa, fed)
            except Exception as e2:
                raise InputError(f"verification run failed: {short_error(e2)}") from None
        del sa
        if heavy(a):                           # a full collection costs time in a big process: only for big models
            gc.collect()
        trim()                                 # the session's weights back to the system
    return Reference(fed=fed, outs=ra, data=data, seed=seed, specs=specs)


def reference_first(imp, data=None, repeats=3):
    """Whether the original's outputs for verify are small enough (at most
    :data:`REFERENCE_FIRST_BYTES`, from the probe's output shapes) to be
    drawn right after the import, before the colouring: the original's
    session then runs while neither scipy's clustering nor the search's
    caches are resident (a 25M-parameter CNN at ``--keep 0.5``: its peak)."""
    if data is not None:
        return False
    probe_batch = max([int(np.shape(v)[0]) for v in imp.feeds.values() if np.ndim(v)] or [1])
    per_sample = sum(int(np.prod(imp.shapes.get(o) or [0])) for o in imp.outputs) / max(probe_batch, 1)
    return per_sample * 4 * verify_batch(imp) * repeats <= REFERENCE_FIRST_BYTES     # float32 outputs


def verify_against(b, ref):
    """Largest absolute output difference of model ``b`` (the base: a
    ModelProto or a path) against a :class:`Reference` on the same inputs;
    ``inputs`` in the result says what was fed to each input, ``rel_diff`` the
    difference over the original's largest absolute output.  A difference
    that is not finite is an error, not a number."""
    from fibgraph.heap import session_heap

    from .onnx.external import relieve
    from .onnx.runtime import lean_session
    from .onnx.feeds import describe, short_error

    runs = len(ref.fed)
    with task("verifying: the base on the same inputs", total=runs) as advance, session_heap():
        relieve()
        try:
            sb = lean_session(b)
        except Exception as e:                 # a writer bug, never the user's input
            raise RuntimeError("the written base model does not load in onnxruntime "
                               f"({short_error(e)}); nothing was written") from None
        diff, scale = 0.0, 0.0
        for (_, feeds), outs in zip(ref.fed, ref.outs):
            try:
                rb = sb.run(None, feeds)
            except Exception as e:
                raise InputError(f"verification run failed: {short_error(e)}") from None
            for p, q in zip(outs, rb):
                if np.shape(p) != np.shape(q):         # a writer bug, never the user's input
                    raise RuntimeError(f"the base's output has shape {list(np.shape(q))}, the original's "
                                       f"{list(np.shape(p))}")
                p, q = np.asarray(p).reshape(-1), np.asarray(q).reshape(-1)
                for k in range(0, p.size, 1 << 20):     # in float64, a slice at a time (a LM's logits are big)
                    pk, qk = p[k:k + (1 << 20)].astype(np.float64), q[k:k + (1 << 20)].astype(np.float64)
                    with np.errstate(invalid="ignore", over="ignore"):
                        d = float(np.max(np.abs(pk - qk)))
                    if not np.isfinite(d):
                        raise InputError(f"verify: output difference is not finite ({d}): the outputs overflow "
                                         "or are NaN on these inputs")
                    diff = max(diff, d)
                    scale = max(scale, float(np.max(np.abs(pk))))
            del rb
            advance(1)
        del sb
    drawn, feeds = ref.fed[-1]
    n = int(next((np.shape(v)[0] for v in feeds.values() if np.ndim(v)), 1))
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    if ref.data is not None:
        return {"max_abs_diff": diff, "max_abs_output": scale, "rel_diff": rel, "inputs": "data", "n": n}
    return {"max_abs_diff": diff, "max_abs_output": scale, "rel_diff": rel,
            "inputs": describe(feeds, ref.specs, drawn.given), "draws": runs, "seed": ref.seed, "n": n}


def verify_dag(a, b, imp, data=None, seed=0, repeats=3, batch="auto"):
    """Largest absolute output difference of models ``a`` and ``b`` (ModelProtos
    or paths) on ``repeats`` made-up inputs shaped like the probe's, at
    ``batch`` samples where the model's batch axis is free (or on ``data``;
    ``"auto"``: :func:`verify_batch`, 64 unless one sample's activations are big):
    :func:`verify_against` of :func:`verify_reference`.  One session at a
    time: ``a``'s outputs are kept, its session closed, then ``b`` runs."""
    return verify_against(b, verify_reference(a, imp, data=data, seed=seed, repeats=repeats, batch=batch))
