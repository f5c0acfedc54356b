"""Importers and writers: ONNX in, ONNX out, torch -> ONNX convenience.

Data flows one way: importer -> graph -> symmetry -> base -> writer.
"""
from .onnx_in import SUPPORTED_OPS, import_onnx, load_onnx
from .onnx_out import write_base_onnx

__all__ = ["SUPPORTED_OPS", "import_onnx", "load_onnx", "write_base_onnx"]
