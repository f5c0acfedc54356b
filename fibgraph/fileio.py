"""Atomic output files: written to a temporary file in the target folder and
moved into place with ``os.replace``, so a failed run never leaves a partial
or overwritten file.  The result gets the usual mode (0666 less the umask)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

__all__ = ["atomic_path", "write_atomic", "write_json_atomic"]


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".fibgraph-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json_atomic(path, obj):
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())
