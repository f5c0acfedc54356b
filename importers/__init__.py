"""Importers and writers: ONNX in (as a weighted hypergraph), ONNX out (the
base model), torch -> ONNX convenience.

Data flows one way: importer -> graph -> symmetry -> base -> writer.
"""
from .dag_api import color_dag_model, colour_dag, compress_dag_model
from .onnx.importer import import_dag
from .onnx.write import write_dag_base
from .onnx.load import load_onnx

__all__ = ["import_dag", "load_onnx", "colour_dag", "write_dag_base", "color_dag_model", "compress_dag_model"]


def __getattr__(name):
    """``fibgraph.importers.compress_module`` (torch in, torch out), imported on first use."""
    if name in ("compress_module", "ModuleCompression"):
        from . import torch_base

        return getattr(torch_base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
