"""fibgraph: fibration symmetries of trained neural networks as graphs."""
__version__ = "0.1.0"
