"""torch -> ONNX -> fibgraph, for convenience.  torch is imported only here.

``export_torch`` writes a module to ONNX with either exporter (the dynamo
exporter needs onnxscript; external data is kept inline), with the batch axis
dynamic; ``import_torch`` exports to a temporary file and imports it.
"""
from __future__ import annotations

import os
import tempfile
import warnings

from fibgraph.errors import InputError

from .onnx_in import import_onnx

__all__ = ["export_torch", "import_torch"]


def export_torch(module, example_input, path, dynamo=False, input_name="x", output_name="y",
                 opset=None):
    """Export ``module`` (in eval mode) to ``path``; returns ``path``."""
    try:
        import torch
    except ImportError:
        raise InputError("torch is not installed: pip install torch==2.13.0 (CPU build)") from None
    module = module.eval()
    kw = dict(input_names=[input_name], output_names=[output_name])
    if opset is not None:
        kw["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(module, (example_input,), path, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), **kw)
        else:
            torch.onnx.export(module, (example_input,), path, dynamo=False,
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, **kw)
    return path


def import_torch(module, example_input, dynamo=False, keep=None):
    """Export ``module`` to ONNX and import it; ``keep`` names a path to keep the file."""
    if keep:
        return import_onnx(export_torch(module, example_input, keep, dynamo))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "model.onnx")
        export_torch(module, example_input, p, dynamo)
        return import_onnx(p)
