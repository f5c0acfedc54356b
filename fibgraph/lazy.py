"""Modules imported on first use.

``scipy.sparse`` (with ``scipy.sparse.csgraph`` and the ``scipy.linalg`` it
pulls in) holds about 25 MB of resident memory once imported.  The first
heavy step of an import, the probe run in onnxruntime, holds the model's
weights; with scipy imported lazily that step's peak does not carry scipy's
pages as well: they arrive with the colouring, after the probe's session is
gone.

Example
-------
>>> from fibgraph.lazy import lazy_module
>>> sp = lazy_module("scipy.sparse")     # nothing imported yet
>>> sp.eye(2).nnz                         # imported here
2
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["lazy_module"]


def lazy_module(name):
    """The module ``name``, executed on its first attribute access
    (:class:`importlib.util.LazyLoader`); the module itself where it is
    imported already.  Its parent packages are imported now."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return importlib.import_module(name)       # the ImportError the caller would get
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
