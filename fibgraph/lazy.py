"""Modules imported on first use.

``scipy.sparse`` (with ``scipy.sparse.csgraph`` and the ``scipy.linalg`` it
pulls in) holds about 25 MB of resident memory once imported.  The first
heavy step of an import, the probe run in onnxruntime, holds the model's
weights; with scipy imported lazily that step's peak does not carry scipy's
pages as well: they arrive with the colouring, after the probe's session is
gone.

:func:`lazy_module` returns a stand-in whose first attribute access imports
the module (``importlib.import_module``, under the import system's own
lock, so threads may race for it) and forwards to it; ``sys.modules`` is
not touched, so other code importing the module gets the real one.

Example
-------
>>> from fibgraph.lazy import lazy_module
>>> sp = lazy_module("scipy.sparse")     # nothing imported yet
>>> sp.eye(2).nnz                         # imported here
2
"""
from __future__ import annotations

import importlib
import types

__all__ = ["lazy_module"]


class _Lazy(types.ModuleType):
    """A module's stand-in: attributes are read from the module, imported on first use."""

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)         # copy/pickle/doctest probes: not a reason to import
        return getattr(importlib.import_module(self.__name__), attr)

    def __repr__(self):
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name):
    """A stand-in for the module ``name`` that imports it on first attribute
    access; the module itself when it is imported already."""
    import sys

    return sys.modules.get(name) or _Lazy(name)
