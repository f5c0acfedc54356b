"""A base's new weights spilled to a data file while the base is written.

The writer makes every shrunk weight as a numpy array.  Held inside the
ModelProto, they add up to the base's whole size in memory before a byte is
written (a 41 MB base of an 82 MB MLP: 41 MB on top of everything else at the
end of the write), and serialising a tensor copies it twice more.  A
:class:`Spill` appends each new weight to one temporary file in the output's
folder instead and returns a lean tensor for it (absolute external location,
:mod:`fibgraph.importers.onnx.external`), so the base is read and written like
the original's weights: mapped, a page at a time, handed back.  The file is
removed when the spill is closed, once the base has been saved.

Example
-------
>>> import tempfile
>>> import numpy as np
>>> from fibgraph.importers.onnx.external import tensor_array
>>> from fibgraph.importers.onnx.spill import Spill
>>> with tempfile.TemporaryDirectory() as d, Spill(d) as spill:
...     t = spill.tensor(np.arange(1024, dtype=np.float32), "w")
...     float(tensor_array(t)[-1]), t.data_location == 1
(1023.0, True)
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import external

__all__ = ["Spill"]


class Spill:
    """A temporary data file in ``folder`` that new weights are appended to
    (:meth:`tensor`) at :data:`~fibgraph.importers.onnx.external.ALIGN`-ed
    offsets; :meth:`close` (or leaving a ``with`` block) forgets its maps and
    removes it."""

    def __init__(self, folder):
        fd, self.path = tempfile.mkstemp(prefix=".fibgraph-", suffix=".weights", dir=folder)
        self.path = os.path.abspath(self.path)
        self._fo = os.fdopen(fd, "wb")
        self.bytes = 0

    def tensor(self, arr, name) -> onnx.TensorProto:
        """A TensorProto named ``name`` holding ``arr``: lean (its bytes in the
        spill file) when it is a numeric array of
        :data:`~fibgraph.importers.onnx.external.EXTERNAL_MIN_BYTES` or more,
        else embedded as usual."""
        arr = np.asarray(arr)
        if self._fo.closed or arr.nbytes < external.EXTERNAL_MIN_BYTES or arr.dtype.kind not in "fiub":
            return numpy_helper.from_array(arr, name)
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        pos = self._fo.tell()
        pad = (-pos) % external.ALIGN
        self._fo.write(b"\0" * pad)
        self._fo.write(arr.data.cast("B"))
        self._fo.flush()                       # readable through a map at once
        self.bytes += arr.nbytes
        t = onnx.TensorProto(name=name, dims=arr.shape, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.path), ("offset", str(pos + pad)), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        return t

    def close(self):
        """Forget the file's maps and remove it (again: nothing)."""
        if not self._fo.closed:
            self._fo.close()
        external.forget(self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
