"""``python -m fibgraph.cli``."""
from .main import entry

entry()
