"""The memory limit: what one input may make fibgraph allocate.

Every size an input implies (a declared tensor, a graph input's shape, an
``.npz`` array's header, an eps file) is checked against one limit *before*
anything is allocated or run; over it -> :class:`~fibgraph.errors.InputError`
(one line, exit 2) naming the thing and its size.

The limit is, in order: the value set by :func:`set_max_memory` (the CLI's
``--max-memory``), the environment variable ``FIBGRAPH_MAX_MEMORY``, or a quarter
of the machine's physical memory (:func:`default_max_memory`).  Sizes are written ``8G``, ``500M``, ``64K``,
``1.5T`` (binary units; a trailing ``B`` or ``iB`` is allowed) or plain bytes.

Also here: :func:`npz_headers`, the shapes and dtypes of an ``.npz`` read from
its members' ``.npy`` headers (nothing loaded), and :func:`read_npz`, which
checks them before loading.
"""
from __future__ import annotations

import math
import os
import re
import zipfile

import numpy as np

from .errors import InputError

__all__ = ["ENV", "EPS_FILE_MAX", "LINKAGE_ENV", "parse_size", "format_size", "default_max_memory", "max_memory",
           "set_max_memory", "linkage_rows_env", "check_bytes", "check_elements", "npz_headers", "read_npz"]

ENV = "FIBGRAPH_MAX_MEMORY"
EPS_FILE_MAX = 10 << 20                  # an eps file is a small JSON object
#: the most rows one eps-component is linked exactly (fibgraph.engine.cluster.exact_linkage_rows)
LINKAGE_ENV = "FIBGRAPH_EXACT_LINKAGE_ROWS"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)
_limit = None                             # set by set_max_memory (the CLI option)


def parse_size(text, where="--max-memory") -> int:
    """Bytes from ``8G``, ``500M``, ``1.5T``, ``64KiB``, ``123456`` (binary units)."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        n = int(text)
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise InputError(f"{where}: {str(text)[:40]!r} is not a size (write e.g. 8G, 500M, 64K or bytes)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise InputError(f"{where}: the size must be positive, got {text!r}")
    return n


def format_size(n) -> str:
    """``12.0 GiB``-style text of a byte count."""
    n = int(n)
    for unit, k in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                    ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} bytes"


def default_max_memory() -> int:
    """A quarter of the machine's physical memory (4 GiB where it cannot be
    read): one tensor is held more than once (the probe keeps every
    intermediate value, onnxruntime's buffer and its numpy copy), so a tensor
    of a quarter already needs about half of the machine."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def set_max_memory(size=None):
    """Set the limit (bytes or a size text); None goes back to the environment or the default."""
    global _limit
    _limit = None if size is None else parse_size(size)


def linkage_rows_env():
    """The rows ``FIBGRAPH_EXACT_LINKAGE_ROWS`` sets (an int >= 2), or None when it
    is unset; anything else is an :class:`~fibgraph.errors.InputError`.  Read
    here, not in the engine, so the CLI checks it at start without importing
    the engine."""
    text = os.environ.get(LINKAGE_ENV)
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        raise InputError(f"{LINKAGE_ENV}: a number of rows, got {text!r}") from None
    if n < 2:
        raise InputError(f"{LINKAGE_ENV}: at least 2 rows, got {n}")
    return n


def max_memory() -> int:
    """The limit in bytes now (see the module doc)."""
    if _limit is not None:
        return _limit
    env = os.environ.get(ENV)
    if env:
        return parse_size(env, where=ENV)
    return default_max_memory()


def check_bytes(what, nbytes, detail=""):
    """Refuse ``what`` when it needs more than the limit: ``"initializer 'w':
    declares 3.6 TiB (1e12 float32 elements), over the 11.7 GiB limit; ..."``."""
    limit = max_memory()
    if nbytes > limit:
        raise InputError(f"{what}: declares {format_size(nbytes)}{f' ({detail})' if detail else ''}, "
                         f"over the {format_size(limit)} memory limit; raise it with --max-memory "
                         f"(or {ENV})")
    return nbytes


def check_elements(what, shape, itemsize, dtype_name=None):
    """:func:`check_bytes` for an array of ``shape`` (Python ints: no overflow)."""
    count = math.prod(int(d) for d in shape)
    kind = f" {dtype_name}" if dtype_name else ""
    num = str(count) if count < 10 ** 6 else f"{count:.3g}".replace("e+", "e")
    return check_bytes(what, count * int(itemsize), f"{num}{kind} elements, shape {list(shape)}"
                       if len(shape) <= 8 else f"{num}{kind} elements")


# ------------------------------------------------------------------ .npz
def _npy_header(f):
    from numpy.lib import format as npf

    version = npf.read_magic(f)
    if version == (1, 0):
        return npf.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return npf.read_array_header_2_0(f)
    raise ValueError(f"unknown .npy version {version}")


def npz_headers(path) -> dict:
    """``{array name: (shape, dtype)}`` of an ``.npz``, read from each member's
    ``.npy`` header only; :class:`InputError` for a file that is not one, an
    object (pickled) array, or an array over the memory limit."""
    path = os.fspath(path)
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with z.open(info) as f:
                    shape, _, dtype = _npy_header(f)
                out[name] = (tuple(int(d) for d in shape), np.dtype(dtype))
    except InputError:
        raise
    except Exception:
        raise InputError(f"{path}: not a readable .npz file") from None
    for name, (shape, dtype) in out.items():
        if dtype.hasobject:
            raise InputError(f"{path}: array {name!r} holds Python objects (pickled); refused")
        check_elements(f"{path}: array {name!r}", shape, dtype.itemsize, dtype.name)
    return out


def read_npz(path, names=None) -> dict:
    """The arrays of an ``.npz`` (only ``names`` when given), after
    :func:`npz_headers` checked their sizes; never unpickles."""
    path = os.fspath(path)
    heads = npz_headers(path)
    want = [k for k in heads if names is None or k in names]
    check_bytes(f"{path}: arrays {', '.join(want)}",
                sum(math.prod(heads[k][0]) * heads[k][1].itemsize for k in want))
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in want}
    except Exception:
        raise InputError(f"{path}: not a readable .npz file") from None
