"""Resident pages of memory-mapped weights.

A big model's weights are read-only views of its mapped file.  The pages a
computation reads stay resident, and are counted in the process's memory,
until they are handed back; the file keeps the data, so a page handed back is
read again (from the page cache) when it is touched.  A loop that reads a
large mapped matrix a chunk at a time hands each chunk back after it, so a
token table of 47 MB costs one chunk of memory, not 47 MB.

- :func:`drop_pages`: hand back the whole pages of a span of a read-only map.
- :func:`drop_mapped`: the same for the memory under a numpy view, when that
  view lies in a read-only map (anything else: nothing happens).
- :func:`read`: a copy of a view in a dtype, its pages handed back after.
- :func:`blocks`: an array as views that each fill a range of its memory
  (along its slowest axis), to be read and handed back one at a time.

Example
-------
>>> import mmap, tempfile
>>> import numpy as np
>>> from fibgraph.pages import drop_mapped
>>> with tempfile.TemporaryFile() as f:
...     _ = f.write(np.arange(4096, dtype=np.float32).tobytes())
...     f.flush()
...     mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
...     X = np.frombuffer(mm, dtype=np.float32).reshape(64, 64)
...     total = float(X[:32].sum())
...     drop_mapped(X[:32])          # the rows read go back; X still reads them
...     float(X[:32].sum()) == total
True
"""
from __future__ import annotations

import mmap

import numpy as np

__all__ = ["drop_pages", "drop_mapped", "mapped_in", "read", "blocks"]


def drop_pages(mm, start=0, length=None):
    """Hand back the resident pages of the read-only map ``mm`` (``MADV_DONTNEED``;
    they are read again from the file when touched): all of them, or the whole
    pages inside ``[start, start + length)``.  Where ``madvise`` is missing, nothing."""
    try:
        if length is None:
            mm.madvise(mmap.MADV_DONTNEED)
            return
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (start + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (AttributeError, OSError, ValueError):
        pass


def mapped_in(a):
    """``(mm, start, length)``: the read-only map under the numpy array ``a``
    and the bytes ``a`` spans in it, or None (memory of its own, a writable
    map, where dropping pages would lose data)."""
    owner = a
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    if not isinstance(owner, mmap.mmap) or a.size == 0 or owner.closed:
        return None
    if not memoryview(owner).readonly:
        return None
    origin = np.frombuffer(owner, dtype=np.uint8, count=1).ctypes.data
    lo = hi = a.ctypes.data
    for n, s in zip(a.shape, a.strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return owner, lo - origin, hi + a.itemsize - lo


def drop_mapped(a, spread=2.0):
    """Hand back the whole pages under ``a`` where ``a`` is a view of a
    read-only map (:func:`mapped_in`) whose bytes fill its span (at most
    ``spread`` times its size: a block of rows, or of a transposed weight's
    columns); else nothing.  A column chunk of a row-major weight spans the
    whole weight: dropping it would drop what the next chunk reads."""
    where = mapped_in(a)
    if where is not None and where[2] <= spread * a.nbytes:
        drop_pages(*where)


def read(view, dtype=np.float64, order="K"):
    """``np.asarray(view, dtype, order)`` (a copy for another dtype), then the
    pages under ``view`` handed back (:func:`drop_mapped`): one chunk of a
    loop over a mapped weight."""
    out = np.asarray(view, dtype=dtype, order=order)
    drop_mapped(view)
    return out


def blocks(a, entries=1 << 19):
    """Views of ``a`` of about ``entries`` elements each, cut along its axis
    of largest stride, so that each lies in one range of memory (a transposed
    weight is cut along its columns: rows of the stored matrix)."""
    if a.ndim == 0 or a.size == 0:
        yield a
        return
    axis = int(np.argmax(np.abs(a.strides)))
    step = max(1, entries // max(a.size // max(a.shape[axis], 1), 1))
    for s in range(0, a.shape[axis], step):
        yield a[(slice(None),) * axis + (slice(s, s + step),)]
