"""Bad input, one row per family (issue 16): paths that would overwrite an
input, outputs that cannot be written, streams instead of files, models that
break the structure rules, options that make no sense.

Every row runs the CLI (``fibgraph.cli.main`` in-process, stderr captured at
the file-descriptor level so that onnxruntime's C++ log would be seen too)
in a folder holding a good model, data, an eps file and a graph, and
asserts the contract: exit 2, exactly one non-empty line on stderr, no
traceback, no file created or changed anywhere in the folder (every input
hashed before and after; hidden temporaries count), and nothing left at the
output paths outside it.  Reading a FIFO would block for ever: those rows run
under an alarm, and one runs the real CLI in a subprocess with a timeout.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import ROOT, mlp_onnx

RNG = np.random.default_rng(16)
W1, B1 = RNG.normal(0, 1, (5, 4)), RNG.normal(0, 0.5, 5)
W1[3], B1[3] = W1[1], B1[1]                     # one fiber: compression changes something
W2, B2 = RNG.normal(0, 1, (3, 5)), RNG.normal(0, 0.5, 3)
GOOD = mlp_onnx([W1, W2], [B1, B2])


# ------------------------------------------------------------------ builders
def _mutated(f):
    m = copy.deepcopy(GOOD)
    f(m)
    return m


def _init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def _write(path, m):
    with open(path, "wb") as fh:
        fh.write(m.SerializeToString() if isinstance(m, onnx.ModelProto) else m)
    return str(path)


def _set_attr(m, node, name, value):
    n = m.graph.node[node]
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute(name, value))


def _reorder(m):
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes[::-1])


def _dims(m, name, dims):
    t = _init(m, name)
    del t.dims[:]
    t.dims.extend(dims)


def _segment(m):
    t = _init(m, "W1")
    t.segment.begin, t.segment.end = 0, 1


def _scaled(m):
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * 1e38).astype(np.float32), t.name))


STRUCTURE = {                  # name: (mutation, words the error line must hold)
    "initializer dims disagree with the data": (lambda m: _dims(m, "W1", [4, 6]), ["W1", "bytes"]),
    "Gemm attribute of the wrong type": (lambda m: _set_attr(m, 0, "transB", 1.5), ["transB", "INT"]),
    "Gemm attribute a string": (lambda m: _set_attr(m, 2, "alpha", "big"), ["alpha", "FLOAT"]),
    "negative dims": (lambda m: _dims(m, "b1", [-5]), ["b1", "negative"]),
    "undefined dtype": (lambda m: setattr(_init(m, "W1"), "data_type", TensorProto.UNDEFINED), ["W1", "UNDEFINED"]),
    "string dtype": (lambda m: setattr(_init(m, "W2"), "data_type", TensorProto.STRING), ["W2", "string"]),
    "unknown dtype": (lambda m: setattr(_init(m, "b2"), "data_type", 77), ["b2", "unknown"]),
    "segment field": (_segment, ["W1", "segment"]),
    "duplicate node names": (lambda m: setattr(m.graph.node[2], "name", "gemm1"), ["gemm1", "two nodes"]),
    "opset 1": (lambda m: setattr(m.opset_import[0], "version", 1), ["opset 1"]),
    "opset 99": (lambda m: setattr(m.opset_import[0], "version", 99), ["opset 99"]),
    "nodes out of topological order": (_reorder, ["topological"]),
}


# ------------------------------------------------------------------ the folder
@pytest.fixture
def work(tmp_path):
    """A folder with the good inputs (and an existing output, which must survive)."""
    d = tmp_path / "w"
    d.mkdir()
    _write(d / "m.onnx", GOOD)
    _write(d / "m2.onnx", GOOD)
    np.savez(d / "d.npz", x=RNG.normal(size=(6, 4)).astype(np.float32), y=np.array([0, 1, 2, 0, 1, 2]))
    (d / "eps.json").write_text('{"W1": 0.0}')
    (d / "g.edgelist").write_text("0 1\n0 2\n1 3\n2 3\n")
    (d / "out").mkdir()
    (d / "out" / "old.onnx").write_bytes(b"an earlier output, kept")
    os.mkdir(d / "ext")
    m = copy.deepcopy(GOOD)
    onnx.save_model(m, str(d / "ext" / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return d


def _tree(d):
    """{relative path: sha256 of the bytes, or the kind of a non-file}."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
            else:
                out[os.path.relpath(p, d)] = stat.S_IFMT(st.st_mode)
    return out


class _Hang(BaseException):          # not swallowed by an "except Exception"
    pass


def _alarm(signum, frame):
    raise _Hang("the command blocked (reading a FIFO?)")


def _to_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run(capfd, args, seconds=60):
    from fibgraph.cli import main

    capfd.readouterr()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        with warnings.catch_warnings():
            # as in a plain Python process (pytest records warnings instead):
            # every warning not held back by fibgraph would reach stderr
            warnings.simplefilter("always")
            warnings.showwarning = _to_stderr
            rc = main([str(a) for a in args])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out = capfd.readouterr()
    return rc, out.out, out.err


def _assert_contract(rc, err, needles=()):
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected ONE line on stderr, got {len(lines)}: {err!r}"
    assert "Traceback" not in err and "internal error" not in err
    for n in needles:
        assert n.lower() in err.lower(), f"{n!r} not in {err!r}"


# ------------------------------------------------------------------ rows
# Each row: a function (d, monkeypatch) -> (argv, needles, paths outside d that must not appear).
ROWS = {}


def row(name):
    def deco(f):
        ROWS[name] = f
        return f
    return deco


# Item 1: no output replaces an input, or another output.
@row("eval --json is the --data file")
def _(d, mp):
    return ["eval", d / "m.onnx", "--data", d / "d.npz", "--json", d / "d.npz"], ["--json", "input"], []


@row("compress -o is the --data file")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", d / "d.npz", "--data", d / "d.npz"], ["-o", "input"], []


@row("tune -o is the --data file")
def _(d, mp):
    return ["tune", d / "m.onnx", "--data", d / "d.npz", "-o", d / "d.npz", "--no-progress"], ["input"], []


@row("compress -o is the --eps-file")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", d / "eps.json", "--eps-file", d / "eps.json"], ["eps-file"], []


@row("compress --report is -o")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", d / "out/a.onnx", "--report", d / "out/a.onnx"], ["same file"], []


@row("compress -o is the model through ..")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", d / "out/../m.onnx"], ["input"], []


@row("compress -o is a symlink to the data")
def _(d, mp):
    os.symlink(d / "d.npz", d / "out" / "link.npz")
    return ["compress", d / "m.onnx", "-o", d / "out/link.npz", "--data", d / "d.npz"], ["input"], []


@row("compress -o is a hard link to the eps file")
def _(d, mp):
    os.link(d / "eps.json", d / "out" / "hard.json")
    return ["compress", d / "m.onnx", "-o", d / "out/hard.json", "--eps-file", d / "eps.json"], ["input"], []


@row("compress -o is the model's external data file")
def _(d, mp):
    return ["compress", d / "ext/model.onnx", "-o", d / "ext/weights.bin"], ["external data"], []


@row("color --graphml is the model")
def _(d, mp):
    return ["color", d / "m.onnx", "--graphml", d / "m.onnx"], ["input"], []


@row("color --json is the graph file")
def _(d, mp):
    return ["color", d / "g.edgelist", "--json", d / "g.edgelist"], ["input"], []


@row("compare --json is model B")
def _(d, mp):
    return ["compare", d / "m.onnx", d / "m2.onnx", "--json", d / "m2.onnx"], ["input"], []


@row("retune -o is the --val data")
def _(d, mp):
    return ["retune", d / "m.onnx", "--train", d / "d.npz", "--val", d / "d.npz", "-o", d / "d.npz"], ["input"], []


@row("sweep table is the --data file")
def _(d, mp):
    return ["sweep", d / "m.onnx", "--eps", "0", "--data", d / "d.npz", "-o", d / "d.npz"], ["input"], []


@row("compare-methods -o is an --eps-file")
def _(d, mp):
    return ["compare-methods", d / "m.onnx", "--data", d / "d.npz", "--eps-file", d / "out/e.svg", "-o",
            d / "out/e.svg"], ["input"], []


@row("demo --out-dir in /proc")
def _(d, mp):
    return ["demo", "--out-dir", "/proc/fibgraph-demo"], ["cannot write"], ["/proc/fibgraph-demo"]


# Item 1: outputs that cannot be written.
@row("empty output path")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", ""], ["empty"], []


@row("output path ends in /")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", str(d / "newdir") + "/"], ["folder"], []


@row("output name too long")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", d / "out" / ("x" * 300 + ".onnx")], ["too long"], []


@row("output in /proc")
def _(d, mp):
    return ["inspect", d / "m.onnx", "--json", "/proc/fibgraph-test.json"], ["cannot write"], \
        ["/proc/fibgraph-test.json"]


@row("--report into a read-only folder")
def _(d, mp):
    ro = d / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):        # root ignores the mode: the folder refuses all the same
        if dir is not None and os.path.realpath(dir) == os.path.realpath(ro):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*a, dir=dir, **k)

    mp.setattr(tempfile, "mkstemp", mkstemp)
    return ["compress", d / "m.onnx", "-o", d / "out/new.onnx", "--report", ro / "r.json"], \
        ["r.json", "cannot write"], []


@row("disk full while writing the second output (the first is taken back)")
def _(d, mp):
    # the model is streamed through file objects; the report (the second
    # output) through os.write: the disk fills up there
    real = os.write

    def write(fd, data):
        if fd > 2 and bytes(memoryview(data)[:1]) == b"{":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    mp.setattr(os, "write", write)
    return ["compress", d / "m.onnx", "-o", d / "out/new.onnx", "--report", d / "out/r.json"], \
        ["r.json", "no space left"], []


@row("disk full replacing an existing output (the old one is restored)")
def _(d, mp):
    real = os.write

    def write(fd, data):           # the report, written after the model, meets a full disk
        if fd > 2 and bytes(memoryview(data)[:1]) == b"{":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    mp.setattr(os, "write", write)
    return ["compress", d / "m.onnx", "-o", d / "out/old.onnx", "--report", d / "out/r.json"], \
        ["no space left"], []


@row("folder made read-only after the checks (the first output is taken back)")
def _(d, mp):
    import fibgraph.fileio as fio

    mp.setattr(fio, "_probe_folder", lambda folder, path, what: None)
    (d / "gone").mkdir()
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(d / "gone"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*a, dir=dir, **k)

    mp.setattr(tempfile, "mkstemp", mkstemp)
    return ["compress", d / "m.onnx", "-o", d / "out/new.onnx", "--report", d / "gone/r.json"], \
        ["read-only"], []


# Item 2: regular files only.
def _fifo(d, name):
    p = d / name
    os.mkfifo(p)
    return p


@row("FIFO as the model")
def _(d, mp):
    return ["inspect", _fifo(d, "pipe.onnx")], ["FIFO"], []


@row("FIFO as --data")
def _(d, mp):
    return ["eval", d / "m.onnx", "--data", _fifo(d, "pipe.npz")], ["FIFO"], []


@row("FIFO as --eps-file")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", d / "out/new.onnx", "--eps-file", _fifo(d, "pipe.json")], ["FIFO"], []


@row("FIFO as --train")
def _(d, mp):
    return ["retune", d / "m.onnx", "--train", _fifo(d, "t.npz"), "--val", d / "d.npz", "-o",
            d / "out/new.onnx"], ["FIFO"], []


@row("FIFO as --val")
def _(d, mp):
    return ["retune", d / "m.onnx", "--train", d / "d.npz", "--val", _fifo(d, "v.npz"), "-o",
            d / "out/new.onnx"], ["FIFO"], []


@row("FIFO as the graph file")
def _(d, mp):
    return ["hierarchy", _fifo(d, "pipe.edgelist")], ["FIFO"], []


@row("device as --eps-file")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", d / "out/new.onnx", "--eps-file", "/dev/zero"], ["device"], []


@row("folder as --data")
def _(d, mp):
    return ["eval", d / "m.onnx", "--data", d / "out"], ["folder"], []


@row("folder as the model")
def _(d, mp):
    return ["compress", d / "out", "-o", d / "new.onnx"], ["folder"], []


# Item 4: structural bad models (checked at load, before any probe run or write).
def _structure_row(name, mutation, needles, command):
    def f(d, mp):
        p = _write(d / "bad.onnx", _mutated(mutation))
        if command == "compress":
            return ["compress", p, "-o", d / "out/new.onnx", "--report", d / "out/r.json", "--verify"], needles, []
        return ["inspect", p, "--json", d / "out/i.json"], needles, []
    ROWS[f"{name} ({command})"] = f


for _name, (_mut, _needles) in STRUCTURE.items():
    _structure_row(_name, _mut, _needles, "compress")
for _name in ("nodes out of topological order", "duplicate node names", "Gemm attribute of the wrong type"):
    _structure_row(_name, *STRUCTURE[_name], "inspect")


@row("NUL byte in an external-data location")
def _(d, mp):
    m = onnx.load(str(d / "ext/model.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "weights\x00.bin"
    return ["compress", _write(d / "ext/nul.onnx", m), "-o", d / "out/new.onnx"], ["NUL"], []


@row("tensor name not UTF-8")
def _(d, mp):
    raw = GOOD.SerializeToString()
    key = b"B\x02W2"                       # TensorProto.name (field 8) of W2
    assert raw.count(key) == 1
    return ["compress", _write(d / "bad.onnx", raw.replace(key, b"B\x02\xff\xfe")), "-o", d / "out/new.onnx"], \
        ["UTF-8"], []


@row("newline in the model's file name")
def _(d, mp):
    p = d / "bad\nname.onnx"
    p.write_bytes(b"not a model")
    return ["compress", p, "-o", d / "out/new.onnx"], ["bad\\nname.onnx"], []


@row("weights scaled to 1e38: verify difference not finite")
def _(d, mp):
    p = _write(d / "big.onnx", _mutated(_scaled))
    return ["compress", p, "-o", d / "out/new.onnx", "--report", d / "out/r.json", "--verify", "--data",
            d / "d.npz"], ["not finite"], []


@row("--rtol nan")
def _(d, mp):
    return ["compress", d / "m.onnx", "-o", d / "out/new.onnx", "--rtol", "nan"], ["--rtol"], []


@row("--rtol -1")
def _(d, mp):
    return ["color", d / "m.onnx", "--json", d / "out/c.json", "--rtol", "-1"], ["--rtol"], []


@row("warnings before the error are held back")
def _(d, mp):
    import fibgraph.importers.api as api
    from fibgraph.errors import InputError

    def noisy(*a, **k):
        warnings.warn("an onnx-style user warning", UserWarning)
        np.float32(3e38) * np.float32(10)             # numpy RuntimeWarning: overflow
        raise InputError("the error after the warnings")

    mp.setattr(api, "compress_model", noisy)
    return ["compress", d / "m.onnx", "-o", d / "out/new.onnx"], ["after the warnings"], []


@row("onnxruntime run failure: its C++ log stays quiet")
def _(d, mp):
    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.array([5, 3], np.int64), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return ["eval", _write(d / "reshape.onnx", m), "--data", d / "d.npz", "--json", d / "out/e.json"], \
        ["onnxruntime"], []


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(capfd, monkeypatch, work, name):
    args, needles, outside = ROWS[name](work, monkeypatch)
    before = _tree(work)
    rc, _, err = _run(capfd, args)
    monkeypatch.undo()
    _assert_contract(rc, err, needles)
    assert _tree(work) == before, "files created, changed or removed"
    for p in outside:
        assert not os.path.exists(p)


# The same commands with fresh output paths succeed: the rows above fail for
# the reason they name, not for another.
@pytest.mark.parametrize("args", [
    ["eval", "{d}/m.onnx", "--data", "{d}/d.npz", "--json", "{d}/out/e.json"],
    ["compress", "{d}/m.onnx", "-o", "{d}/out/s.onnx", "--data", "{d}/d.npz", "--report", "{d}/out/r.json"],
    ["compress", "{d}/m.onnx", "-o", "{d}/out/s.onnx", "--eps-file", "{d}/eps.json"],
    ["compress", "{d}/ext/model.onnx", "-o", "{d}/ext/small.onnx"],
    ["tune", "{d}/m.onnx", "--data", "{d}/d.npz", "-o", "{d}/out/t.json", "--no-progress", "--steps", "2"],
])
def test_controls_succeed(capfd, work, args):
    rc, _, err = _run(capfd, [a.format(d=work) for a in args])
    assert rc == 0, err
    assert "error" not in err


def test_failure_after_two_outputs_takes_both_back(capfd, monkeypatch, work):
    """A failure after two outputs were moved into place takes both back:
    the new one removed, the replaced one restored byte for byte."""
    import fibgraph.importers.api as api

    (work / "out" / "r.json").write_text('{"old": true}')
    before = _tree(work)
    real = api.atomic_write_json

    def then_fail(path, obj):
        real(path, obj)
        raise MemoryError

    monkeypatch.setattr(api, "atomic_write_json", then_fail)
    rc, _, err = _run(capfd, ["compress", work / "m.onnx", "-o", work / "out/new.onnx", "--report",
                              work / "out/r.json"])
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert _tree(work) == before


def test_fifo_data_real_cli_does_not_hang(work):
    """The real CLI in a subprocess: a FIFO as --data is refused at once."""
    os.mkfifo(work / "pipe.npz")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FIBGRAPH_DEBUG", None)
    before = _tree(work)
    p = subprocess.run([sys.executable, "-m", "fibgraph", "compress", str(work / "m.onnx"), "-o",
                        str(work / "out/new.onnx"), "--verify", "--data", str(work / "pipe.npz")],
                       capture_output=True, text=True, env=env, timeout=60)
    _assert_contract(p.returncode, p.stderr, ["FIFO"])
    assert _tree(work) == before


def test_warnings_on_success_are_one_line_each(capfd, monkeypatch, work):
    """Held-back warnings of a run that succeeds are shown after it, one line each."""
    import fibgraph.importers.api as api

    real = api.compress_model

    def noisy(*a, **k):
        warnings.warn("first\nsecond", UserWarning)
        return real(*a, **k)

    monkeypatch.setattr(api, "compress_model", noisy)
    rc, _, err = _run(capfd, ["compress", work / "m.onnx", "-o", work / "out/new.onnx"])
    assert rc == 0, err
    assert err.strip().splitlines() == ["fibgraph: warning: UserWarning: first\\nsecond"]


def test_check_paths_unit(tmp_path):
    """The one helper: realpath and samefile comparisons, outputs against each other."""
    from fibgraph.errors import InputError
    from fibgraph.fileio import check_paths

    a = tmp_path / "a.npz"
    a.write_bytes(b"x")
    os.symlink(a, tmp_path / "l.npz")
    check_paths(reads=[a], writes=[tmp_path / "b.json", tmp_path / "c.json"])
    for writes in ([tmp_path / "l.npz"], [tmp_path / "sub" / ".." / "a.npz"],
                   [tmp_path / "b.json", tmp_path / "." / "b.json"]):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(InputError):
            check_paths(reads=[a], writes=writes)
    with pytest.raises(InputError, match="FIFO"):
        os.mkfifo(tmp_path / "f")
        check_paths(reads=[tmp_path / "f"])
    assert json.loads(json.dumps(sorted(os.listdir(tmp_path)))) == ["a.npz", "f", "l.npz", "sub"]


def test_rollback_restores_a_replaced_symlink(tmp_path):
    """An output that was a link (to a file no command reads) comes back as that link."""
    from fibgraph.fileio import output_transaction, write_atomic

    target = tmp_path / "elsewhere.txt"
    target.write_text("kept")
    link = tmp_path / "out.json"
    os.symlink(target, link)
    with pytest.raises(RuntimeError):
        with output_transaction():
            write_atomic(link, b"new")
            assert not os.path.islink(link) and link.read_bytes() == b"new"
            raise RuntimeError("fail after the write")
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert target.read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["elsewhere.txt", "out.json"]
