"""Test setup: the repository root and this folder on sys.path (so that
``fibgraph`` (with ``fibgraph.importers`` from the installed package map) and
``helpers`` import however pytest is run, from any test folder), and
no FIBGRAPH_DEBUG leaking in (it turns one-line errors into tracebacks)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.pop("FIBGRAPH_DEBUG", None)
