"""Sweeps on Dask: every (model, symmetry, eps) coloured, compressed and scored.

    from fibgraph.importers.sweep import run_sweep
    df = run_sweep(["run/step_2.onnx", "run/step_10.onnx"],
                   [("fibration", 0.0), ("fibration", 0.1)], workers=4, data="cal.npz")

One Dask task per (model, setting) runs :func:`sweep_task` on a worker: it
reads the model from its path (paths the workers share; no model bytes or
weights go through the scheduler), colours it with
:func:`fibgraph.importers.api.color_model` and, for an in-balanced symmetry with
``data``, scores the base model built in memory (nothing is written) with
:func:`fibgraph.importers.api.evaluate`.  It returns a small dict; a failing task
returns its error instead, so the others finish.

The result is one tidy :class:`pandas.DataFrame` (:data:`COLUMNS`), one row
per (model, setting, layer); a failed (model, setting) is one row with
``error`` filled and no layer.  ``scheduler=None`` starts (and always closes)
a ``distributed.LocalCluster`` of ``workers`` processes with one thread each;
an address such as ``tcp://host:8786`` uses a running cluster instead.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid

from fibgraph.errors import InputError
from fibgraph.limits import max_memory as memory_limit
from fibgraph.sweep_plots import natural_key

__all__ = ["run_sweep", "sweep_task", "make_settings", "parse_eps_list", "check_data", "check_table_path",
           "write_table", "natural_key", "COLUMNS", "SWEEP_SYMMETRIES"]

COLUMNS = ["model", "checkpoint", "symmetry", "eps", "layer", "nodes_before", "nodes_after",
           "params_before", "params_after", "accuracy", "loss", "seconds", "error"]
SWEEP_SYMMETRIES = ("fibration", "opfibration", "opfibration-flavoured", "covering", "covering-strict",
                    "automorphism")
_INT_COLUMNS = ("nodes_before", "nodes_after", "params_before", "params_after")


def parse_eps_list(text):
    """``"0,0.05,0.1"`` -> ``[0.0, 0.05, 0.1]`` (each in [0, 2), duplicates dropped)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(p == "" for p in parts):
        raise InputError(f"--eps {text!r}: expected a comma-separated list of numbers, e.g. 0,0.05,0.1")
    out = []
    for p in parts:
        e = _eps(p, f"--eps {text!r}")
        if e not in out:
            out.append(e)
    return out


def _eps(value, where):
    try:
        e = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(e) or e < 0 or e >= 2:
        raise InputError(f"{where}: every eps must be in [0, 2) (0 = exact fibers), got {value}")
    return e


def make_settings(symmetries, eps_values):
    """Every (symmetry, eps), symmetry-major."""
    return [(s, float(e)) for s in symmetries for e in eps_values]


def _check_settings(settings):
    out = []
    for st in settings:
        sym, eps = (st["symmetry"], st["eps"]) if isinstance(st, dict) else st
        if sym not in SWEEP_SYMMETRIES:
            raise InputError(f"symmetry {sym!r}: expected one of {', '.join(SWEEP_SYMMETRIES)}")
        eps = _eps(eps, f"setting {st!r}")
        if (sym, eps) not in out:
            out.append((sym, eps))
    if not out:
        raise InputError("no settings to run (give at least one symmetry and one eps)")
    return out


def _check_models(models):
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    out, seen = [], set()
    for m in models:
        m = os.fspath(m)
        if os.path.abspath(m) not in seen:
            seen.add(os.path.abspath(m))
            out.append(m)
    if not out:
        raise InputError("no models given")
    return sorted(out, key=natural_key)


def check_data(data):
    """An .npz with x and y (its absolute path), or None; InputError otherwise."""
    if data is None:
        return None
    from .api import load_data

    if not os.path.isfile(data):
        raise InputError(f"{data}: no such file")
    load_data(data, need_y=True)             # x and y, before any task runs
    return os.path.abspath(data)


def _error_text(e):
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    return msg if isinstance(e, InputError) else f"{type(e).__name__}: {msg}".rstrip(": ")


def _base_model(imported, col):
    """The compressed ModelProto of a colouring from ``color_model`` (in memory)."""
    return col.base[0]                        # written by color_dag_model


def sweep_task(path, symmetry, eps, data=None, linkage="complete", metric="cosine", max_memory=None):
    """One (model, setting) on a worker: a small dict, never an exception.

    ``{"params_before", "params_after", "accuracy", "loss", "seconds", "error",
    "layers": [{"layer", "nodes_before", "nodes_after"}, ...]}``; with an
    error, only ``error`` and ``seconds`` are meaningful.  ``max_memory``: the
    caller's memory limit (bytes; :mod:`fibgraph.limits`), which a worker process
    does not inherit."""
    t0 = time.perf_counter()
    try:
        if max_memory is not None:
            from fibgraph.limits import set_max_memory

            set_max_memory(max_memory)
        from .api import COMPRESS_SYMMETRIES, color_model, evaluate

        report, imported, col = color_model(path, symmetry, eps, linkage=linkage, metric=metric, data=data)
        acc = loss = None
        if data is not None and symmetry in COMPRESS_SYMMETRIES:
            scores = evaluate(_base_model(imported, col), data)
            acc, loss = float(scores["accuracy"]), float(scores["loss"])
        layers = [{"layer": ly["weight"], "nodes_before": int(ly["nodes_before"]),
                   "nodes_after": int(ly["nodes_after"])} for ly in report["layers"]]
        return {"params_before": int(report["params_before"]), "params_after": int(report["params_after"]),
                "accuracy": acc, "loss": loss, "layers": layers, "error": None,
                "seconds": time.perf_counter() - t0}
    except Exception as e:                    # reported in the table; the other tasks go on
        return {"error": _error_text(e), "seconds": time.perf_counter() - t0}


def _error_result(msg):
    return {"error": msg, "seconds": 0.0}


@contextlib.contextmanager
def _client(scheduler, workers):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("sweeps need Dask: pip install \"dask[distributed]\"") from None
    if scheduler is None:
        if int(workers) < 1:
            raise InputError(f"--workers must be at least 1, got {workers}")
        with LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                          dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=20)
    except (OSError, TimeoutError, ValueError) as e:
        raise InputError(f"--scheduler {scheduler}: cannot connect ({_error_text(e)})") from None
    with client:
        yield client


def run_sweep(models, settings, scheduler=None, workers=2, data=None, on_done=None,
              linkage="complete", metric="cosine"):
    """Run every (model, setting) on Dask; returns the tidy DataFrame (:data:`COLUMNS`).

    ``models``: paths the workers can read (sorted naturally, duplicates
    dropped).  ``settings``: ``(symmetry, eps)`` pairs or dicts with those
    keys (see :func:`make_settings`).  ``data``: an .npz with x, y: accuracy
    and loss of the base model of every in-balanced setting.  A model path
    that does not exist here is an error row and is not submitted.
    ``on_done(done, total, model, setting, result)`` is called in this
    process as each (model, setting) finishes.  A script that calls this with
    the local cluster needs the usual ``if __name__ == "__main__":`` guard
    (the workers are spawned processes)."""
    import pandas as pd

    if linkage not in ("complete", "average"):
        raise InputError(f"--linkage must be complete or average, got {linkage!r}")
    if metric not in ("cosine", "euclidean"):
        raise InputError(f"--metric must be cosine or euclidean, got {metric!r}")
    models = _check_models(models)
    settings = _check_settings(settings)
    data = check_data(data)
    total = len(models) * len(settings)
    results, done = {}, 0

    def finish(mi, si, res):
        nonlocal done
        results[mi, si] = res
        done += 1
        if on_done is not None:
            on_done(done, total, models[mi], settings[si], res)

    todo = []
    for mi, m in enumerate(models):
        for si in range(len(settings)):
            if not os.path.isfile(m):
                finish(mi, si, _error_result(f"{m}: no such file" if not os.path.exists(m) else f"{m}: not a file"))
            else:
                todo.append((mi, si))
    if todo:
        run = uuid.uuid4().hex[:8]
        with _client(scheduler, workers) as client:
            from distributed import as_completed

            futures = {}
            for mi, si in todo:
                sym, eps = settings[si]
                f = client.submit(sweep_task, os.path.abspath(models[mi]), sym, eps, data, linkage, metric,
                                  memory_limit(), pure=False, key=f"fibgraph-sweep-{run}-{mi}-{si}")
                futures[f] = (mi, si)
            for f in as_completed(list(futures)):
                try:
                    res = f.result()
                except Exception as e:            # the worker died (memory, a crash): still a row
                    res = _error_result(_error_text(e))
                finish(*futures.pop(f), res)
                f.release()
    rows = []
    for mi, m in enumerate(models):
        stem = os.path.splitext(os.path.basename(m))[0]
        for si, (sym, eps) in enumerate(settings):
            r = results[mi, si]
            head = {"model": m, "checkpoint": stem, "symmetry": sym, "eps": eps}
            tail = {"params_before": r.get("params_before"), "params_after": r.get("params_after"),
                    "accuracy": r.get("accuracy"), "loss": r.get("loss"),
                    "seconds": round(float(r["seconds"]), 4), "error": r["error"]}
            if r["error"] is not None:
                rows.append({**head, "layer": None, "nodes_before": None, "nodes_after": None, **tail})
                continue
            for ly in r["layers"]:
                rows.append({**head, **ly, **tail})
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in _INT_COLUMNS:
        df[c] = df[c].astype("Int64")
    for c in ("accuracy", "loss", "seconds", "eps"):
        df[c] = df[c].astype("float64")
    for c in ("model", "checkpoint", "symmetry", "layer", "error"):
        df[c] = df[c].astype("object")
    return df


def check_table_path(path):
    """The table's format from its name: 'csv' or 'parquet' (pyarrow needed)."""
    low = os.fspath(path).lower()
    if low.endswith(".parquet"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow), "
                             "or name a .csv table") from None
        return "parquet"
    if low.endswith(".csv"):
        return "csv"
    raise InputError(f"{path}: the table must end in .csv or .parquet")


def write_table(df, path):
    """Write the table atomically (CSV, or Parquet for a .parquet name)."""
    from fibgraph.fileio import atomic_path, write_atomic

    if check_table_path(path) == "parquet":
        with atomic_path(path, suffix=".parquet") as tmp:
            df.to_parquet(tmp, index=False)
    else:
        write_atomic(path, df.to_csv(index=False).encode())
    return path
