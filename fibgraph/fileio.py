"""Atomic output files: written to a temporary file in the target folder and
moved into place with ``os.replace``, so a failed run never leaves a partial
or overwritten file.  The result gets the usual mode (0666 less the umask)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

from .errors import InputError

__all__ = ["read_input", "atomic_path", "write_atomic", "write_json_atomic", "check_output_path"]


def read_input(path) -> bytes:
    """The bytes of an input file, or :class:`InputError` with one clear line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None


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


def check_output_path(out, inputs, what="output"):
    """Refuse, before any work, an output that would overwrite an input, is a
    folder, or lies in a folder that does not exist."""
    if out is None:
        return
    out = os.fspath(out)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for inp in inputs:
        same = os.path.abspath(out) == os.path.abspath(inp) or (
            os.path.exists(out) and os.path.exists(inp) and os.path.samefile(out, inp))
        if same:
            raise InputError(f"{out}: {what} path equals the input path; refusing to overwrite the input")
    if os.path.isdir(out):
        raise InputError(f"{out}: {what} path is a folder")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise InputError(f"{out}: folder {d} does not exist")
