"""The ONNX path must work without importing torch (issue 2, item 1)."""
import subprocess
import sys

from helpers import ROOT  # noqa: F401  (conftest puts the repo on sys.path)


def test_onnx_path_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from fibgraph.cli import main\n"
        "from fibgraph.cli.demo import bundled_model, bundled_data\n"
        f"rc = main(['compress', bundled_model(), '-o', r'{tmp_path / 'b.onnx'}', '--eps', '0.1', '--verify'])\n"
        f"rc2 = main(['eval', r'{tmp_path / 'b.onnx'}', '--data', bundled_data()])\n"
        "assert rc == 0 and rc2 == 0, (rc, rc2)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")
