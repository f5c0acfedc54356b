"""Input and output files: the checks every command makes before any work,
and atomic, all-or-none outputs.

* :func:`check_paths`: every path a command reads must be a regular file
  (never a FIFO, a device or a folder, which could hang or never end); every
  path it writes must be writable, and no output may name an input or
  another output, compared after resolving links and ``..``
  (:func:`os.path.realpath`, and :func:`os.path.samefile` when both exist).
* :func:`atomic_path` / :func:`write_atomic`: an output is written to a
  temporary file in its folder and moved into place with ``os.replace``;
  the result gets the usual mode (0666 less the umask).  An ``OSError``
  (a full disk, a folder made read-only meanwhile) is an
  :class:`~fibgraph.errors.InputError` naming the path.
* :func:`output_transaction`: the CLI runs every command inside one; an
  output moved into place is recorded (with a hard-link backup of the file it
  replaced), and when the command fails afterwards every recorded output is
  removed or restored, and folders it created are removed again: all
  outputs or none.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile

from .errors import InputError

__all__ = ["read_input", "check_regular", "check_paths", "path_items", "show", "atomic_path", "write_atomic",
           "write_json_atomic", "check_output_path", "make_output_dir", "output_transaction", "install"]


def show(path) -> str:
    """``path`` as it goes into a one-line message: as is when printable, else
    Python's ``repr`` (a newline in a file name cannot break the line)."""
    s = os.fspath(path)
    if isinstance(s, bytes):
        return repr(s)
    return s if s.isprintable() else repr(s)


def check_regular(path, what="input") -> str:
    """``path`` if it names a regular file (links followed); otherwise
    :class:`InputError`.  Uses ``os.stat`` only: a FIFO or a device is never
    opened (opening a FIFO blocks until a writer comes)."""
    path = os.fspath(path)
    if path == "":
        raise InputError(f"{what}: empty path")
    if "\x00" in path:
        raise InputError(f"{show(path)}: {what} path contains a NUL byte")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{show(path)}: no such file") from None
    except OSError as e:
        raise InputError(f"{show(path)}: cannot read {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{show(path)}: {what} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise InputError(f"{show(path)}: {what} is {kind}; only regular files are read")
    return path


def read_input(path) -> bytes:
    """The bytes of an input file (a regular file only), or :class:`InputError` with one clear line."""
    path = check_regular(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{show(path)}: cannot read ({e.strerror or e})") from None


# ------------------------------------------------------------------ checks
def path_items(paths, default):
    """(what, path) pairs from paths or (what, path) tuples; None entries dropped."""
    out = []
    for p in paths or ():
        what, p = p if isinstance(p, tuple) else (default, p)
        if p is not None:
            out.append((what, os.fspath(p)))
    return out


def _name_max(folder):
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _path_max(folder):
    try:
        return os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 4096


def _probe_folder(folder, path, what):
    """Create and remove a temporary file in ``folder``: the one sure test that
    an output can be written there (read-only folders and mounts, /proc)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fibgraph-probe-")
    except OSError as e:
        raise InputError(f"{show(path)}: cannot write {what} in folder {show(folder)} "
                         f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def _check_write(what, path, folder=False, pending=()):
    """One output path (a file, or a folder to create files in); ``pending``:
    output folders not made yet (checked by themselves)."""
    if path == "":
        raise InputError(f"{what}: empty output path")
    if "\x00" in path:
        raise InputError(f"{show(path)}: {what} path contains a NUL byte")
    if not folder and (path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep))):
        raise InputError(f"{show(path)}: {what} must name a file, not a folder (it ends in '{path[-1]}')")
    full = os.path.abspath(path)
    parent = os.path.dirname(full.rstrip(os.sep)) or os.sep
    # the nearest folder that exists (a folder output may create the ones below it)
    anchor = parent
    while folder and not os.path.isdir(anchor) and os.path.dirname(anchor) != anchor:
        anchor = os.path.dirname(anchor)
    nmax, pmax = _name_max(anchor if os.path.isdir(anchor) else os.sep), _path_max(os.sep)
    if len(os.fsencode(full)) >= pmax or any(len(os.fsencode(c)) > nmax for c in full.split(os.sep)):
        raise InputError(f"{show(path)}: {what} path is too long (at most {nmax} bytes a name, "
                         f"{pmax - 1} in all)")
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"{show(path)}: {what} must be a folder, not a file")
        if not os.path.isdir(anchor):
            raise InputError(f"{show(path)}: folder {show(anchor)} does not exist")
        _probe_folder(path if os.path.isdir(path) else anchor, path, what)
        return
    if os.path.isdir(path):
        raise InputError(f"{show(path)}: {what} path is a folder")
    if os.path.lexists(path) and not os.path.islink(path):
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{show(path)}: {what} exists and is not a regular file; refusing to replace it")
    if parent in pending and not os.path.isdir(parent):
        return
    if not os.path.isdir(parent):
        raise InputError(f"{show(path)}: folder {show(parent)} does not exist")
    _probe_folder(parent, path, what)


def _same(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_paths(reads=(), writes=(), write_dirs=(), optional_reads=()):
    """Refuse, before any work, a command's paths that cannot work.

    ``reads``: input paths (or ``(what, path)`` pairs; None skipped); each must
    be a regular file.  ``optional_reads``: inputs that may be missing (a
    sweep's models fail one by one), but when present must be regular files.
    ``writes``: output files; each must be writable (not empty, not ending in
    '/', not too long, in an existing folder where a file can be created, not
    a folder, not an existing non-regular file).  ``write_dirs``: output
    folders (created if missing).  No output may be the same file as an input
    or as another output (after resolving links and ``..``).  The inputs are
    remembered by the active :func:`output_transaction`, so that no output
    written later (into an output folder, say) can replace one of them.
    """
    reads = path_items(reads, "input")
    optional = path_items(optional_reads, "input")
    writes = path_items(writes, "output")
    dirs = path_items(write_dirs, "output folder")
    for what, p in reads:
        check_regular(p, what)
    for what, p in optional:
        if os.path.lexists(p):
            check_regular(p, what)
    inputs = reads + [(w, p) for w, p in optional if os.path.exists(p)]
    pending = {os.path.abspath(d).rstrip(os.sep) or os.sep for _, d in dirs}
    for i, (what, p) in enumerate(writes):
        _check_write(what, p, pending=pending)
        for rwhat, r in inputs:
            if _same(p, r):
                raise InputError(f"{show(p)}: {what} path equals the input path ({rwhat} {show(r)}, "
                                 "the same file); refusing to overwrite the input")
        for what2, q in writes[:i]:
            if _same(p, q):
                raise InputError(f"{show(p)}: {what} and {what2} name the same file")
    for what, d in dirs:
        _check_write(what, d, folder=True)
        for rwhat, r in inputs:
            if _same(d, r):
                raise InputError(f"{show(d)}: {what} is the {rwhat} {show(r)}")
    for t in _ACTIVE:
        t.protect(p for _, p in inputs)


def check_output_path(out, inputs, what="output"):
    """One output against some inputs (see :func:`check_paths`)."""
    if out is None:
        return
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    check_paths(optional_reads=list(inputs), writes=[(what, out)])


# ------------------------------------------------------- all-or-none outputs
_ACTIVE: list = []


class _Outputs:
    """Outputs of one command: moved into place as they come, undone on failure."""

    def __init__(self):
        self.done = []          # (path, backup of the file it replaced or None)
        self.dirs = []          # folders created, outermost first
        self.inputs = set()     # real paths of the command's inputs

    def protect(self, paths):
        self.inputs.update(os.path.realpath(p) for p in paths)

    def install(self, tmp, path):
        if os.path.realpath(path) in self.inputs:
            raise InputError(f"{show(path)}: an output would replace an input; refused")
        backup = None
        if os.path.lexists(path) and not os.path.isdir(path):
            backup = _fresh_name(path, ".bak")     # the file (or link) replaced, kept until commit
            try:
                os.link(path, backup, follow_symlinks=False)
            except OSError:
                if os.path.islink(path):
                    os.symlink(os.readlink(path), backup)
                else:
                    shutil.copy2(path, backup)
        try:
            os.replace(tmp, path)
        except BaseException:
            if backup:
                os.unlink(backup)
            raise
        self.done.append((path, backup))

    def commit(self):
        for _, backup in self.done:
            if backup:
                with contextlib.suppress(OSError):
                    os.unlink(backup)
        self.done = []
        self.dirs = []

    def rollback(self):
        for path, backup in reversed(self.done):
            with contextlib.suppress(OSError):
                if backup:
                    os.replace(backup, path)
                else:
                    os.unlink(path)
        for d in reversed(self.dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d)               # only when empty: nothing of the user's is removed
        self.done = []
        self.dirs = []


def _fresh_name(path, suffix):
    fd, name = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".fibgraph-", suffix=suffix)
    os.close(fd)
    os.unlink(name)
    return name


@contextlib.contextmanager
def output_transaction():
    """Run a command's writes all or none (see the module doc).  Nested use
    joins nothing: each transaction undoes its own outputs."""
    t = _Outputs()
    _ACTIVE.append(t)
    try:
        yield t
    except SystemExit as e:
        # exit 1 is a result (``hierarchy`` found a violation; its report is kept)
        (t.commit if e.code in (0, None, 1) else t.rollback)()
        raise
    except BaseException:
        t.rollback()
        raise
    else:
        t.commit()
    finally:
        _ACTIVE.remove(t)


def make_output_dir(path):
    """``os.makedirs(path, exist_ok=True)``; the folders created are removed
    again (when empty) if the command fails."""
    path = os.path.abspath(os.fspath(path))
    missing = []
    p = path
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        missing.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"{show(path)}: cannot create the folder ({e.strerror or e})") from None
    if _ACTIVE:
        _ACTIVE[-1].dirs.extend(reversed(missing))
    return path


def install(tmp, path):
    """Move the finished file ``tmp`` to ``path`` as one of the command's
    outputs: inside :func:`output_transaction` the file it replaces is kept
    until the command succeeds and put back if it fails."""
    if _ACTIVE:
        _ACTIVE[-1].install(tmp, path)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside ``path``; on success it replaces ``path``.
    An ``OSError`` on the way is an :class:`InputError` ("cannot write")."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path)) or "."
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".fibgraph-", suffix=suffix)
    except OSError as e:
        raise InputError(f"{show(path)}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        install(tmp, path)
    except OSError as e:
        raise InputError(f"{show(path)}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


def write_atomic(path, data: bytes):
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)


def write_json_atomic(path, obj):
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())
