"""ONNX -> torch: an ONNX graph as a differentiable torch module (:class:`OnnxModule`),
one torch implementation per ONNX op type registered in :mod:`.registry`."""
from .module import SUPPORTED_OPS, OnnxModule

__all__ = ["OnnxModule", "SUPPORTED_OPS"]
