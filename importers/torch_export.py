"""torch -> ONNX -> fibgraph, for convenience.  torch is imported only here
(and in the other torch modules of this package).

``export_torch`` writes a module to ONNX with either exporter (the dynamo
exporter needs onnxscript; external data is kept inline), with the batch axis
dynamic; ``export_model`` does the same in memory (legacy exporter) and
returns the ``ModelProto``; ``import_torch`` exports and imports the model
as a hypergraph (:func:`fibgraph.importers.onnx.importer.import_dag`), probed with the
example input.
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings

import numpy as np

from fibgraph.errors import InputError

__all__ = ["export_torch", "export_model", "import_torch"]


def _torch():
    try:
        import torch
    except ImportError:
        raise InputError("torch is not installed: pip install torch==2.13.0 (CPU build)") from None
    return torch


def _legacy_kw(input_name, output_name, opset):
    kw = dict(input_names=[input_name], output_names=[output_name],
              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    if opset is not None:
        kw["opset_version"] = opset
    return kw


def export_torch(module, example_input, path, dynamo=False, input_name="x", output_name="y",
                 opset=None):
    """Export ``module`` (in eval mode) to ``path``; returns ``path``."""
    torch = _torch()
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            kw = dict(input_names=[input_name], output_names=[output_name])
            if opset is not None:
                kw["opset_version"] = opset
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(module, (example_input,), path, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), **kw)
        else:
            torch.onnx.export(module, (example_input,), path, dynamo=False,
                              **_legacy_kw(input_name, output_name, opset))
    return path


def export_model(module, example_input, input_name="x", output_name="y", opset=17):
    """``module`` as an ONNX ``ModelProto``, exported in memory with the legacy
    exporter (parameters keep their state-dict names, e.g. ``0.weight``),
    input ``input_name`` with a dynamic batch axis.  The module is exported in
    eval mode; its training flag is restored afterwards."""
    import onnx

    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"expected a torch nn.Module, got {type(module).__name__}")
    if not isinstance(example_input, torch.Tensor):
        example_input = torch.as_tensor(np.asarray(example_input))
    was = module.training
    f = io.BytesIO()
    try:
        module.eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example_input,), f, dynamo=False,
                              **_legacy_kw(input_name, output_name, opset))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"torch -> ONNX export failed: {str(e).splitlines()[0][:300]}") from None
    finally:
        module.train(was)
    return onnx.load_from_string(f.getvalue())


def import_torch(module, example_input, dynamo=False, keep=None):
    """Export ``module`` to ONNX and import it as a hypergraph
    (:class:`fibgraph.importers.onnx.importer.DagImport`), probed with the first sample of
    ``example_input``; ``keep`` names a path to keep the file."""
    from .onnx.importer import import_dag
    from .onnx.load import load_onnx

    torch = _torch()
    x = example_input.detach().cpu().numpy() if isinstance(example_input, torch.Tensor) \
        else np.asarray(example_input)

    def load(path):
        m = load_onnx(path)
        inits = {t.name for t in m.graph.initializer}
        name = next(vi.name for vi in m.graph.input if vi.name not in inits)
        label = os.fspath(keep) if keep else f"<{type(module).__name__}>"
        return import_dag(m, feeds={name: x[:1] if x.ndim else x}, label=label)

    if keep:
        return load(export_torch(module, example_input, keep, dynamo))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "model.onnx")
        export_torch(module, example_input, p, dynamo)
        return load(p)
