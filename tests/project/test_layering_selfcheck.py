"""The layering checkers of ``tests/test_layering.py`` on synthetic source trees.

``test_layering.py`` is xfail until the issue-11 refactor lands; these tests
are not: they make sure each rule catches what it should (and nothing else),
so that the day the xfail goes, a green run means a clean tree.
"""
import textwrap

from test_layering import (CLI_LAYER, forbidden_core_imports, import_cycles, import_graph, imports_of, is_core,
                           load_tree, long_modules, module_name, private_imports)


def src(text):
    return textwrap.dedent(text).lstrip("\n")


# ------------------------------------------------------------ resolution
def test_module_names_and_relative_imports_resolve():
    assert module_name("fibgraph/refine.py") == "fibgraph.refine"
    assert module_name("fibgraph/__init__.py") == "fibgraph"
    assert module_name("fibgraph/sub/__init__.py") == "fibgraph.sub"
    imps = imports_of("fibgraph/sub/mod.py", src("""
        from . import sibling
        from .. import graph
        from ..refine import refine
        from ... import beyond_the_top
        """))
    assert [(i.module, i.names) for i in imps] == [
        ("fibgraph.sub", ("sibling",)), ("fibgraph", ("graph",)), ("fibgraph.refine", ("refine",))]
    init = imports_of("fibgraph/sub/__init__.py", "from .mod import f\nfrom .. import graph\n")
    assert [i.module for i in init] == ["fibgraph.sub.mod", "fibgraph"]


def test_lazy_and_dynamic_imports_are_seen():
    imps = imports_of("fibgraph/a.py", src("""
        import numpy as np

        class K:
            import json

        def f():
            import torch.nn as nn
            import importlib
            return importlib.import_module("onnx"), __import__("onnxruntime"), importlib.import_module(".x", "p")
        """))
    got = {(i.module, i.lazy, i.dynamic) for i in imps}
    assert got == {("numpy", False, False), ("json", False, False), ("torch.nn", True, False),
                   ("importlib", True, False), ("onnx", True, True), ("onnxruntime", True, True)}


# ------------------------------------------------------------ rule 1: the core
def test_core_and_cli_layer():
    for rel in ("fibgraph/graph.py", "fibgraph/__init__.py", "fibgraph/sub/x.py", "fibgraph/activity.py",
                "fibgraph/cli.py", "fibgraph/sub/cli_x.py"):          # only the cli/ package is the CLI layer
        assert is_core(rel), rel
    for rel in ("fibgraph/__main__.py", "fibgraph/cli/commands.py", "fibgraph/cli/__init__.py",
                "importers/api.py", "tests/test_x.py"):
        assert not is_core(rel), rel
    assert "fibgraph/__main__.py" in CLI_LAYER


def test_forbidden_imports_in_core_are_found():
    tree = {
        "fibgraph/a.py": src("""
            import numpy
            import onnxruntime_extensions      # not onnxruntime: a different package
            from fibgraph import importers_helpers
            def f():
                import torch.nn
            """),
        "fibgraph/b.py": "from onnx import numpy_helper\n",
        "fibgraph/c.py": "import importlib\nM = importlib.import_module('transformers')\n",
        "fibgraph/d.py": "from fibgraph.importers.torch_net import network_from_torch\n",
        "fibgraph/e.py": "from . import importers\n",          # fibgraph.importers
        "fibgraph/f.py": "import onnxscript.values\n",
        "fibgraph/cli/x.py": "import torch\nimport onnx\nfrom fibgraph.importers.api import compress_model\n",
        "fibgraph/__main__.py": "import onnx\n",
        "importers/g.py": "import torch\nimport onnx\n",
    }
    bad = forbidden_core_imports(tree)
    where = sorted(b.split(":")[0] + ":" + b.split(":")[1] for b in bad)
    assert where == ["fibgraph/a.py:5", "fibgraph/b.py:1", "fibgraph/c.py:2", "fibgraph/d.py:1",
                     "fibgraph/e.py:1", "fibgraph/f.py:1"], bad
    assert any("lazy import torch.nn" in b for b in bad)
    assert any("dynamic import transformers" in b for b in bad)
    assert any("[fibgraph.importers]" in b for b in bad)


# ------------------------------------------------------------ rule 2: cycles
def test_a_three_module_cycle_through_a_lazy_relative_import_is_found():
    tree = {
        "fibgraph/__init__.py": "",
        "fibgraph/a.py": "from .b import g\n",
        "fibgraph/b.py": "def g():\n    from fibgraph.c import h\n    return h\n",
        "fibgraph/c.py": "from fibgraph import a\n",            # a submodule: edge c -> a
        "fibgraph/d.py": "from fibgraph.a import x\n",          # reads the cycle, not in it
    }
    bad = import_cycles(tree)
    assert len(bad) == 1, bad
    assert bad[0].startswith("{fibgraph.a, fibgraph.b, fibgraph.c}"), bad
    for line in ("fibgraph/a.py:1", "fibgraph/b.py:2: lazy", "fibgraph/c.py:1"):
        assert line in bad[0], bad


def test_two_separate_cycles_are_both_reported_and_a_dag_is_clean():
    tree = {
        "importers/__init__.py": "",
        "importers/p.py": "import fibgraph.importers.q\n",
        "importers/q.py": "from fibgraph.importers.p import f\n",
        "fibgraph/x.py": "from fibgraph import y\n",
        "fibgraph/y.py": "from .x import z\n",
        "fibgraph/z.py": "import fibgraph.x\n",
    }
    bad = import_cycles(tree)
    assert len(bad) == 2 and bad[0].startswith("{fibgraph.importers.p, fibgraph.importers.q}") and \
        bad[1].startswith("{fibgraph.x, fibgraph.y}"), bad
    dag = {"fibgraph/a.py": "import fibgraph.b\n", "fibgraph/b.py": "from . import c\n", "fibgraph/c.py": "import os\n"}
    assert import_cycles(dag) == []
    assert set(import_graph(dag).edges) == {("fibgraph.a", "fibgraph.b"), ("fibgraph.b", "fibgraph.c")}


def test_package_init_edges():
    # the package imports its submodule, the submodule imports another by full
    # name: no edge to the package (its __init__ already ran), so no cycle
    tree = {"fibgraph/__init__.py": "from .refine import refine\n",
            "fibgraph/refine.py": "import fibgraph.graph\n", "fibgraph/graph.py": ""}
    assert import_cycles(tree) == []
    # but a name taken from the package itself is an edge to __init__: a real cycle
    tree["fibgraph/graph.py"] = "from fibgraph import refine_helper\n"
    assert len(import_cycles(tree)) == 1


# ------------------------------------------------------------ rule 3: private names
def test_private_names_from_other_modules_are_found():
    tree = {
        "fibgraph/a.py": src("""
            from __future__ import annotations
            from fibgraph import __version__
            from fibgraph.refine import _mix, refine
            from . import _impl
            def f():
                from fibgraph.importers.api import _check_eps as ce
            """),
        "fibgraph/b.py": "from fibgraph.b import _self\nfrom scipy.sparse import _sputils\n",
    }
    bad = private_imports(tree)
    assert [b.split("  ")[-1] for b in bad] == ["[_mix]", "[_impl]", "[_check_eps]", "[_sputils]"], bad
    assert bad[2].startswith("fibgraph/a.py:6: lazy from fibgraph.importers.api import _check_eps")


# ------------------------------------------------------------ rule 4: length
def test_long_modules():
    tree = {"fibgraph/ok.py": "x = 1\n" * 500, "fibgraph/long.py": "x = 1\n" * 501,
            "importers/longer.py": "x = 1\n" * 900}
    assert long_modules(tree) == ["importers/longer.py: 900 lines", "fibgraph/long.py: 501 lines"]
    assert long_modules(tree, limit=1000) == []


def test_the_real_tree_is_read():
    tree = load_tree()
    assert "fibgraph/engine/schedule.py" in tree and "importers/api.py" in tree and "fibgraph/__main__.py" in tree
    assert not any(rel.startswith(("tests/", "examples/")) for rel in tree)
    # it parses, and the CLI's lazy import of the importers (inside a command) is seen
    assert any(i.module.endswith("fibgraph.importers.inspect") and i.lazy
               for i in imports_of("fibgraph/cli/main.py", tree["fibgraph/cli/main.py"]))
