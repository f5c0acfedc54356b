"""The package list: ``fibgraph`` (with its data folder ``fibgraph/data``) and the
top-level folder ``importers/`` installed as ``fibgraph.importers`` (so no
top-level ``importers`` package lands in site-packages).  Everything else is in
setup.cfg.

Builds write their scratch files (``build/``, ``*.egg-info``) to a temporary
folder, removed when the build ends, so that ``pip wheel .`` and ``pip install .``
leave the source tree as it was."""
import atexit
import os
import shutil
import tempfile
import warnings

from setuptools import find_packages, setup

CORE = find_packages(include=["fibgraph", "fibgraph.*"])
# fibgraph/data holds no Python: a data package (its files are package data)
DATA = ["fibgraph.data"]
IMPORTERS = ["fibgraph." + p for p in find_packages(include=["importers", "importers.*"])]

# ``pip install -e .``: the package_dir mapping (importers/ -> fibgraph.importers)
# needs setuptools' meta path finder, and setuptools says so in a 9-line
# informational notice on every editable install; expected here, so not shown
warnings.filterwarnings("ignore", message="Editable installation")

_scratch = tempfile.mkdtemp(prefix="fibgraph-build-")
atexit.register(shutil.rmtree, _scratch, True)

setup(packages=CORE + DATA + IMPORTERS, package_dir={"fibgraph.importers": "importers"},
      package_data={"fibgraph.data": ["*.onnx", "*.npz"]},
      options={"build": {"build_base": os.path.join(_scratch, "build")},
               "egg_info": {"egg_base": _scratch}})
