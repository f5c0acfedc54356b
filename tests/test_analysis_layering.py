"""The analysis modules are format-free and off the feed-forward chain model (issue 11):
fibgraph's compare / tracking / activity / theorems / symmetry metrics import nothing
from importers, onnx, onnxruntime or torch (not even lazily), and none of the analysis
modules or their tests import the chain model (fibgraph.network, importers.torch_net,
importers.onnx_in)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from helpers import ROOT

CORE = ["fibgraph/compare.py", "fibgraph/tracking.py", "fibgraph/activity.py", "fibgraph/theorems.py",
        "fibgraph/symmetry_metrics.py", "fibgraph/layerview.py"]
GLUE = ["fibgraph/cli/analysis.py", "importers/dag_units.py", "importers/torch_analysis.py"]
TESTS = ["tests/test_compare.py", "tests/test_tracking.py", "tests/test_theorems.py",
         "tests/test_symmetry_metrics.py", "tests/test_symmetry_dag.py", "tests/test_analysis_layering.py"]
CHAIN = {"fibgraph.network", "importers.torch_net", "importers.onnx_in"}


def _imports(path):
    """Every module an import statement of ``path`` names (relative imports resolved;
    ``from fibgraph import network`` names ``fibgraph.network`` too)."""
    pkg = os.path.dirname(path).replace(os.sep, ".")
    out = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_core_analysis_modules_import_no_format():
    for path in CORE:
        bad = sorted(m for m in _imports(path)
                     if m.split(".")[0] in ("importers", "onnx", "onnxruntime", "torch"))
        assert not bad, f"{path} imports {bad}"


def test_analysis_modules_and_tests_are_off_the_chain_model():
    for path in CORE + GLUE + TESTS:
        bad = sorted(m for m in _imports(path) if any(m == c or m.startswith(c + ".") for c in CHAIN))
        assert not bad, f"{path} imports {bad}"


def test_core_analysis_imports_load_no_format_package():
    code = ("import sys\n"
            "import fibgraph.compare, fibgraph.tracking, fibgraph.activity, fibgraph.theorems\n"
            "import fibgraph.symmetry_metrics, fibgraph.layerview\n"
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'importers') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
