"""Runs of the model to learn its shapes: every intermediate tensor's value on
sample inputs (batch 1), for the hypergraph importer's layouts, a chunk of
the tensors per run (:data:`PROBE_CHUNK_BYTES`)."""
from __future__ import annotations

import numpy as np

from fibgraph.errors import InputError
from fibgraph.heap import session_heap

from . import external
from .fold import cut, fold_constants
from .feeds import describe, input_specs, make_feeds, short_error
from .limits import check_model
from .runtime import lean_options

__all__ = ["probe_model", "sample_feeds"]


# ------------------------------------------------------------------ probing
def sample_feeds(model, seed=0, sizes=None, specs=None):
    """Inputs for one probe run (:func:`fibgraph.importers.onnx.feeds.make_feeds`): batch 1,
    floats standard normal, integers in the range they index (token ids below
    the embedding's rows, masks ones); other unknown dims a sequence of 8 for
    integer inputs and 32 for floats, or all ``sizes`` (tried in turn by
    :func:`probe_model`)."""
    return make_feeds(model, n=1, seed=seed, size=sizes, specs=specs)


#: the most bytes of values one probe run returns (about: each chunk's size is
#: estimated from the last's).  onnxruntime keeps every graph output of a
#: run until the run ends, so each chunk of the tensors (in graph order) is a
#: session of its own that exposes that chunk alone, and computes only the
#: nodes it needs: a ViT-base's 500 MB of activations are never held at once
PROBE_CHUNK_BYTES = 64 << 20
#: tensors exposed by the first chunk (its sizes size the next one)
FIRST_CHUNK = 64
#: a probe value this big or bigger goes to a mapped temporary file
PROBE_SPILL_BYTES = 256 << 10


def _node_outputs(graph):
    return list(dict.fromkeys(o for n in graph.node for o in n.output if o))


def _run_in_chunks(m, so, names, feeds):
    """The values of ``names`` (in graph order) from sessions over ``m``, each
    exposing one chunk of them; a value of :data:`PROBE_SPILL_BYTES` or more goes
    to a mapped temporary file (:func:`fold.to_file`): the builder reads the
    shapes and dtypes of big activations, rarely their values."""
    import onnx

    from .fold import to_file

    vals, i, step = {}, 0, FIRST_CHUNK
    while i < len(names):
        chunk = names[i:i + step]
        del m.graph.output[:]
        m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in chunk)
        try:
            sess = external.session(m, so)          # a big model's weights read in place, not serialised
        except Exception as e:
            raise InputError(f"onnxruntime cannot load the model: {short_error(e)}") from None
        got = 0
        for n, v in zip(chunk, sess.run(chunk, feeds)):
            got += v.nbytes
            vals[n] = to_file(v) if v.nbytes >= PROBE_SPILL_BYTES and v.ndim else v
        del sess
        i += len(chunk)
        step = max(1, int(PROBE_CHUNK_BYTES * len(chunk) / max(got, 1)))
    return vals


def probe_model(model, feeds=None):
    """Run ``model`` with every intermediate tensor exposed, a chunk of them per
    session (:func:`_run_in_chunks`); returns ``(feeds, values)`` with the
    value of every computed tensor.  What is
    computed from weights alone and folds (:mod:`.fold`: a weight sliced,
    reordered, transposed, cast) is made with numpy, views of the weights
    where it can, and fed to the run: onnxruntime would make (and return) a
    copy per step."""
    check_model(model)                     # no run before the sizes it implies are checked
    folded = fold_constants(model)
    m, extra = cut(model, folded)        # a mapped weight fed: read in place
    so = lean_options()                  # every node's value as written; a size that does not fit fails quietly
    names = _node_outputs(m.graph)
    with session_heap():          # the run's activations go back as they are freed
        if feeds is not None:
            tries = [feeds]
        else:                      # the defaults, then every unknown dim at one size
            specs = input_specs(model)
            tries, seen = [], set()
            for s in (None, 32, 64, 128, 320, 16, 8, 4, 2, 1):
                f = sample_feeds(model, sizes=s, specs=specs)
                key = tuple(v.shape for v in f.values())
                if key not in seen:
                    seen.add(key)
                    tries.append(f)
        err = None
        for f in tries:
            try:
                vals = _run_in_chunks(m, so, names, {**f, **extra})
                vals.update(f)
                vals.update(folded)
                return f, vals
            except InputError:
                raise
            except Exception as e:  # the size did not fit the model; try the next
                err = e if err is None else err
    why = short_error(err)
    if feeds is not None:
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
        raise InputError(f"the model does not run on the given data ({shapes}): {why}") from None
    fed = "; ".join(f"{k}: {v}" for k, v in describe(tries[0]).items())
    raise InputError(f"cannot run the model once to learn its shapes on made-up inputs ({fed}; "
                     f"other sizes for the unknown dims failed too): {why}; "
                     "give sample inputs with --data (an .npz with one array per input name)") from None
