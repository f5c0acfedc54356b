"""Test setup: the repository root and this folder on sys.path (so that
``fibgraph`` (with ``fibgraph.importers`` from the installed package map) and
``helpers`` import however pytest is run, from any test folder), and
no FIBGRAPH_DEBUG leaking in (it turns one-line errors into tracebacks)."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.pop("FIBGRAPH_DEBUG", None)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (float sums in a fixed order), restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
