"""``python -m fibgraph``: the command line."""
from fibgraph.cli import entry

if __name__ == "__main__":
    entry()
