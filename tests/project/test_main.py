"""``python -m fibgraph`` runs the command-line interface (fibgraph/__main__.py)."""
import os
import subprocess
import sys

from helpers import ROOT  # noqa: F401  (conftest puts the repo on sys.path)

from fibgraph.cli import cli


def run_module(args, tmp_path):
    """``python -m fibgraph ARGS`` from a foreign folder, this checkout first on the path.

    First checks that ``fibgraph.__main__`` resolves to THIS checkout's file: an
    editable install of another checkout can otherwise supply a ``__main__`` this
    one lacks (its import finder is consulted when the path finder finds none)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    env.pop("FIBGRAPH_DEBUG", None)
    where = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                            "s = u.find_spec('fibgraph.__main__'); print(s.origin if s else None)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    expected = os.path.join(ROOT, "fibgraph", "__main__.py")
    assert where.stdout.strip() == expected, (where.stdout, where.stderr)
    return subprocess.run([sys.executable, "-m", "fibgraph", *args], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path, env=env)


def test_python_m_fibgraph_help_lists_the_commands(tmp_path):
    r = run_module(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: fibgraph "), r.stdout[:200]
    assert "Commands:" in r.stdout
    listed = {line.split()[0] for line in r.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert set(cli.commands) <= listed, sorted(set(cli.commands) - listed)
    assert {"color", "compress", "hierarchy", "tune", "retune", "eval"} <= listed


def test_python_m_fibgraph_goes_through_the_entry_point(tmp_path):
    # entry() turns a usage error into one line on stderr and exit status 2
    r = run_module(["no-such-command"], tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("fibgraph: usage error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
