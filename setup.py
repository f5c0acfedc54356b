"""The package list: ``fibgraph`` and the top-level folder ``importers/`` installed
as ``fibgraph.importers`` (so no top-level ``importers`` package lands in
site-packages).  Everything else is in setup.cfg."""
from setuptools import find_packages, setup

CORE = find_packages(include=["fibgraph", "fibgraph.*"])
IMPORTERS = ["fibgraph." + p for p in find_packages(include=["importers", "importers.*"])]

setup(packages=CORE + IMPORTERS, package_dir={"fibgraph.importers": "importers"})
