"""Checks every command makes before any work: its paths
(:func:`check_io`, built on :func:`fibgraph.fileio.check_paths`) and the
``--rtol`` option (:func:`check_rtol`)."""
from __future__ import annotations

import math
import os

import click

from ..fileio import check_paths, path_items as _pairs

__all__ = ["check_io", "check_rtol"]


def check_io(models=(), reads=(), writes=(), write_dirs=(), optional_models=()):
    """:func:`~fibgraph.fileio.check_paths` for a command.  ``models``: ONNX
    models (or graph files) read, each a regular file; the files their
    external data lives in are inputs too, so that no output replaces them.
    ``optional_models``: models that may be missing (sweep).  Every argument
    takes paths or ``(what, path)`` pairs (``what``: the option, as in
    ``"--data"``); None entries are skipped."""
    models = _pairs(models, "model")
    optional = _pairs(optional_models, "model")
    reads = _pairs(reads, "input")
    writes, dirs = _pairs(writes, "output"), _pairs(write_dirs, "output folder")
    # the model files first: a missing or non-regular model is the first thing said
    check_paths(reads=models, optional_reads=optional)
    ext = []
    if writes or dirs:
        from fibgraph.importers.onnx.validate import external_data_files

        for what, m in models + optional:
            if os.path.isfile(m):
                ext += [(f"external data of {what}", p) for p in external_data_files(m)]
    check_paths(reads=models + reads, optional_reads=optional + ext, writes=writes, write_dirs=dirs)


def check_rtol(ctx, param, value):
    """click callback: ``--rtol`` must be a finite number >= 0."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"must be a finite number >= 0, got {value}")
    return value
