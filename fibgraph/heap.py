"""The C heap of this process (glibc; elsewhere these do nothing).

- :func:`trim`: free pages of the heap back to the system (``malloc_trim``).
  numpy's freed temporaries otherwise stay resident, so a loop of colourings
  (the ``--keep`` search) would hold the largest transient of any step.
- :func:`session_heap`: around onnxruntime runs, blocks of 1 MB or more that
  the heap has no room for are mapped on their own (``M_MMAP_THRESHOLD``), so
  a run's freed activations go back at once.

Example
-------
>>> from fibgraph.heap import session_heap, trim
>>> with session_heap():
...     pass                      # onnxruntime runs here
>>> trim()                        # after a big step
"""
from __future__ import annotations

import contextlib

__all__ = ["trim", "session_heap"]


def _libc():
    """glibc through ctypes, or None (another C library: nothing to tune)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt        # noqa: B018 - both must exist
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def trim():
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``;
    elsewhere nothing).  numpy's freed temporaries stay in the process heap
    otherwise, so a loop of colourings (the ``--keep`` search) holds the
    largest transient of any step as resident memory."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


@contextlib.contextmanager
def session_heap():
    """Around onnxruntime runs: a block of 1 MB or more that the heap has no
    free room for is mapped on its own instead of growing the heap, so the
    activations a session frees go back to the system at once instead of
    leaving a fragmented heap at the run's peak (10-25 MB less on a
    25M-parameter CNN); after them, a fixed 32 MB, so numpy's temporaries
    reuse the heap.  glibc's ``M_MMAP_THRESHOLD``; elsewhere nothing."""
    libc = _libc()
    if libc:
        libc.mallopt(-3, 1 << 20)                   # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        if libc:
            libc.mallopt(-3, 32 << 20)


_LIBC = None
