"""Vectorised 64-bit hashing of colour tuples, shared by the engine, the orbit
search and the writer's grouping: splitmix64's finaliser on uint64 arrays.

Example::

    >>> import numpy as np
    >>> a = mix(np.array([1, 2, 3], dtype=np.uint64))
    >>> bool(a[0] != a[1]) and a.dtype == np.uint64
    True
"""
from __future__ import annotations

import numpy as np

__all__ = ["M1", "M2", "GOLD", "mix"]

M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
GOLD = np.uint64(0x9E3779B97F4A7C15)


def mix(x):
    """splitmix64 finaliser, vectorised on uint64 arrays (wraps modulo 2**64)."""
    x = np.asarray(x, dtype=np.uint64) + GOLD
    x = (x ^ (x >> np.uint64(30))) * M1
    x = (x ^ (x >> np.uint64(27))) * M2
    return x ^ (x >> np.uint64(31))
