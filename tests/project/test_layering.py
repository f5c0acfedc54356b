"""Layering rules of the source tree (``fibgraph/`` and ``importers/``), from the AST.

1. The format-free core (every module of ``fibgraph/`` outside ``CLI_LAYER``)
   imports none of ``FORBIDDEN_IN_CORE`` (onnx, onnxruntime, torch, onnxscript,
   transformers, the ``importers`` package), not even lazily inside a function
   (``importlib.import_module("torch")`` with a constant name counts too).
2. No import cycles among the modules.  Every import counts, lazy ones included
   (a lazy import is still a dependency); ``import a.b`` is an edge to ``a.b``
   only, not to ``a/__init__``; ``from a import b`` is an edge to ``a.b`` if that
   is a module, else to ``a``.
3. No module imports a private name (``from x import _name``; dunders such as
   ``__version__`` are not private) from another module.
4. No module is longer than ``MAX_LINES`` lines.

Each rule is one test whose message lists every offender.  The checkers are
plain functions of a ``{relative path: source}`` dict, so they are tested on
synthetic trees in ``tests/test_layering_selfcheck.py`` (not xfail).
"""
from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]

#: the packages whose modules are checked (folders under the repository root)
PACKAGES = ("fibgraph", "importers")

#: the CLI layer of ``fibgraph/``: these modules may import any format; every
#: other module of ``fibgraph/`` is the format-free core.  Patterns are matched
#: with ``fnmatch`` against the path relative to the repository root (``*``
#: also matches ``/``, so ``fibgraph/cli*.py`` covers ``fibgraph/cli/...``).
CLI_LAYER = (
    "fibgraph/__main__.py",      # python -m fibgraph
    "fibgraph/cli/*",            # the command line: the only layer that imports the importers
)

#: modules the core must not import (a name or any submodule of it)
FORBIDDEN_IN_CORE = ("onnx", "onnxruntime", "torch", "onnxscript", "transformers",
                     "importers", "fibgraph.importers")

MAX_LINES = 500


# ------------------------------------------------------------------ the tree
def load_tree(root: Path = ROOT, packages=PACKAGES) -> dict:
    """``{posix path relative to root: source}`` of every ``.py`` file of the packages."""
    tree = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            tree[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
    return tree


def module_name(relpath: str) -> str:
    """``fibgraph/graph.py`` -> ``fibgraph.graph``; ``a/b/__init__.py`` -> ``a.b``;
    the folder ``importers/`` is installed as ``fibgraph.importers``."""
    parts = relpath[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts and parts[0] == "importers":
        parts = ["fibgraph"] + parts
    return ".".join(parts)


def is_package(relpath: str) -> bool:
    return relpath.endswith("/__init__.py")


def is_cli(relpath: str, cli_layer=CLI_LAYER) -> bool:
    return any(fnmatch.fnmatchcase(relpath, pat) for pat in cli_layer)


def is_core(relpath: str, cli_layer=CLI_LAYER) -> bool:
    return relpath.startswith("fibgraph/") and not is_cli(relpath, cli_layer)


@dataclass(frozen=True)
class Import:
    line: int
    module: str          # the absolute module named by the statement
    names: tuple         # ``from module import names`` (empty for ``import module``)
    lazy: bool           # inside a function body
    dynamic: bool = False  # importlib.import_module / __import__ with a constant name


def _resolve(relpath: str, level: int, module: str | None) -> str | None:
    """The absolute module of a (possibly relative) ``from`` import in ``relpath``
    (None: a relative import beyond the top-level package, an ImportError at run time)."""
    if level == 0:
        return module or ""
    pkg = module_name(relpath).split(".")
    if not is_package(relpath):
        pkg = pkg[:-1]                      # a module's package
    if level - 1 >= len(pkg):
        return None
    base = pkg[:len(pkg) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _dynamic_target(node: ast.Call) -> str | None:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    a = node.args[0]
    if isinstance(a, ast.Constant) and isinstance(a.value, str) and not a.value.startswith("."):
        return a.value
    return None


def imports_of(relpath: str, source: str) -> list:
    """Every import statement of a module (module level, functions, classes,
    ``if``/``try`` blocks alike), relative imports resolved."""
    out = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Import(child.lineno, a.name, (), lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                mod = _resolve(relpath, child.level, child.module)
                if mod is not None:
                    out.append(Import(child.lineno, mod, tuple(a.name for a in child.names), lazy))
            elif isinstance(child, ast.Call):
                target = _dynamic_target(child)
                if target:
                    out.append(Import(child.lineno, target, (), lazy, dynamic=True))
            visit(child, inner)

    visit(ast.parse(source, filename=relpath), False)
    return out


def _join(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _where(relpath, imp: Import) -> str:
    how = "dynamic " if imp.dynamic else "lazy " if imp.lazy else ""
    what = f"from {imp.module} import {', '.join(imp.names)}" if imp.names else f"import {imp.module}"
    return f"{relpath}:{imp.line}: {how}{what}"


# ------------------------------------------------------------------- rules
def forbidden_core_imports(tree: dict, forbidden=FORBIDDEN_IN_CORE, cli_layer=CLI_LAYER) -> list:
    """Lines ``path:line: import ...`` where a core module imports a forbidden module."""
    bad = []
    for rel, src in tree.items():
        if not is_core(rel, cli_layer):
            continue
        for imp in imports_of(rel, src):
            targets = [imp.module] + [_join(imp.module, n) for n in imp.names if n != "*"]
            hit = sorted({f for f in forbidden for t in targets if t and _within(t, f)})
            if hit:
                bad.append(f"{_where(rel, imp)}  [{', '.join(hit)}]")
    return bad


def import_graph(tree: dict) -> nx.DiGraph:
    """Module import graph among the modules of ``tree``; edges carry the import lines."""
    modules = {module_name(rel): rel for rel in tree}
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for rel, src in tree.items():
        me = module_name(rel)
        for imp in imports_of(rel, src):
            targets = set()
            if imp.names:
                for n in imp.names:
                    sub = _join(imp.module, n)
                    if sub in modules:
                        targets.add(sub)             # from pkg import submodule
                    elif imp.module in modules:
                        targets.add(imp.module)      # from module import name
            elif imp.module in modules:
                targets.add(imp.module)
            for t in targets:
                if t == me:
                    continue                         # `from . import x` inside x's own package init, etc.
                if g.has_edge(me, t):
                    g.edges[me, t]["lines"].append(_where(rel, imp))
                else:
                    g.add_edge(me, t, lines=[_where(rel, imp)])
    return g


def import_cycles(tree: dict) -> list:
    """One entry per strongly connected group of modules that import each other:
    its members, one cycle through them, and the import lines of that cycle."""
    g = import_graph(tree)
    bad = []
    for comp in sorted((sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)):
        cycle = nx.find_cycle(g.subgraph(comp), source=comp[0])
        path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        lines = "; ".join(g.edges[u, v]["lines"][0] for u, v in cycle)
        bad.append(f"{{{', '.join(comp)}}}: {path}  ({lines})")
    return bad


def private_imports(tree: dict) -> list:
    """Lines where a module imports a private name (``_x``, not a dunder) from another module."""
    bad = []
    for rel, src in tree.items():
        me = module_name(rel)
        for imp in imports_of(rel, src):
            private = [n for n in imp.names
                       if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
            if private and imp.module != me:
                bad.append(f"{_where(rel, imp)}  [{', '.join(private)}]")
    return bad


def long_modules(tree: dict, limit=MAX_LINES) -> list:
    """``path: N lines`` for every module longer than ``limit`` lines, longest first."""
    sizes = {rel: len(src.splitlines()) for rel, src in tree.items()}
    return [f"{rel}: {n} lines" for rel, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])) if n > limit]


# ------------------------------------------------------------------- tests
def _message(title, offenders):
    return f"{title} ({len(offenders)}):\n  " + "\n  ".join(offenders)


class _Tree(dict):
    def __repr__(self):                      # keep failure reports short
        return f"<{len(self)} modules of {', '.join(PACKAGES)}>"


@pytest.fixture(scope="module")
def tree():
    t = _Tree(load_tree())
    assert any(rel.startswith("fibgraph/") for rel in t) and any(rel.startswith("importers/") for rel in t)
    return t


def test_core_imports_no_format_library(tree):
    bad = forbidden_core_imports(tree)
    assert not bad, _message("format-free core (fibgraph/ minus the CLI layer) imports a format library "
                             "or importers", bad)


def test_no_import_cycles(tree):
    bad = import_cycles(tree)
    assert not bad, _message("import cycles (strongly connected modules, lazy imports included)", bad)


def test_no_private_imports(tree):
    bad = private_imports(tree)
    assert not bad, _message("private names imported from another module", bad)


def test_modules_at_most_500_lines(tree):
    bad = long_modules(tree)
    assert not bad, _message(f"modules over {MAX_LINES} lines", bad)
