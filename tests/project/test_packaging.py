"""Issue 17 item 7: the package builds without setuptools warnings, leaves the
source tree clean, and its README works on the package index (absolute URLs)."""
import configparser
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _project_url():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return cfg["metadata"]["url"].rstrip("/")


def test_readme_images_and_links_are_absolute_and_point_at_files_of_the_repository():
    url = _project_url()
    owner_repo = url.split("github.com/", 1)[1]
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "the README has images and links"
    relative = [t for t in targets if not re.match(r"https?://", t) and not t.startswith("#")]
    assert not relative, f"relative paths do not work on the package index: {relative}"
    prefixes = (f"{url}/blob/main/", f"https://raw.githubusercontent.com/{owner_repo}/main/")
    ours = [t for t in targets if t.startswith(prefixes)]
    assert len(ours) >= 3
    for t in ours:
        path = next(t[len(p):] for p in prefixes if t.startswith(p))
        assert os.path.isfile(os.path.join(ROOT, path)), f"{t}: no {path} in the repository"


@pytest.mark.slow      # a real build (pip, setuptools): about 5 s of CPU
def test_wheel_builds_without_warnings_and_leaves_the_tree_clean(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for f in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "importers")   # fibgraph/importers: a dev symlink
    for d in ("fibgraph", "importers"):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore if d == "fibgraph" else
                        shutil.ignore_patterns("__pycache__", "*.pyc"), symlinks=True)
    before = sorted(os.listdir(src))
    out = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                        "-w", str(out), "-v"], cwd=src, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "Warning" not in log and "!!" not in log, [ln for ln in log.splitlines() if "arning" in ln]
    assert sorted(os.listdir(src)) == before                     # no build/, no *.egg-info
    wheels = os.listdir(out)
    assert len(wheels) == 1
    import zipfile

    names = zipfile.ZipFile(out / wheels[0]).namelist()
    assert "fibgraph/data/digits_mlp.onnx" in names and "fibgraph/importers/api.py" in names
    assert "fibgraph/progress.py" in names and not any(n.startswith("importers/") for n in names)
