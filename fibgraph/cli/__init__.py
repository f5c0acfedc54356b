"""The command line, the only layer that imports the importers: ``fibgraph COMMAND``.

:mod:`.main` holds the click group and the one-line error contract; commands
on models live in :mod:`.main`, :mod:`.compress` (tune, compare-methods,
retune) and :mod:`.analysis` (compare, symmetry-metrics); :mod:`.graphs`
colours plain graph files and :mod:`.demo` runs the whole job on the bundled
digits model.
"""
from .main import cli, entry, main

__all__ = ["cli", "entry", "main"]
