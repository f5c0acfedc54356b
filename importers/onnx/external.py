"""Big models in bounded memory: weights read in place, sessions over files,
the written model streamed.

A model whose weights reach :data:`LEAN_BYTES` is opened *lean*
(:func:`open_lean`): its protobuf is scanned on a memory map, and the
``raw_data`` of every large initializer is left in the file, the in-memory
model holding an external-data reference to it (location: the file's
absolute path, offset, length).  A model saved with external data keeps its
references, made absolute.  :func:`tensor_array` reads such a tensor as a
read-only view of the memory-mapped file (no copy; the pages count as
resident only once touched and :func:`release` hands them back), and
:func:`session` opens onnxruntime on the model with its external files
resolved from their folder, so the weights are never serialised into one
protobuf.  :func:`save_model` writes a model tensor by tensor: embedded
(one protobuf, assembled on disk) or, with ``external`` or automatically
above :data:`EXTERNAL_DATA_BYTES`, with its large tensors in one data file
beside it (relative location, offsets aligned to :data:`ALIGN` so that
onnxruntime maps them rather than reading them).
"""
from __future__ import annotations

import mmap
import os
import weakref

import numpy as np
import onnx
from onnx import numpy_helper

from fibgraph.errors import InputError
from fibgraph.heap import trim
from fibgraph.pages import drop_pages

__all__ = ["LEAN_BYTES", "EXTERNAL_DATA_BYTES", "EXTERNAL_MIN_BYTES", "ALIGN", "open_lean", "absolutize",
           "tensor_array", "is_lean", "external_files", "session", "release", "forget", "relieve", "drop_pages", "save_model", "data_bytes",
           "check"]

#: models with at least this many bytes of weights are opened lean (a 31 MB
#: LSTM read whole, its bytes and the parsed protobuf, peaked at 301 MiB with
#: --keep and --verify; lean, 186 MiB; it was 64 MB until the eighth session)
LEAN_BYTES = 4 << 20
#: model files with at least this many bytes of weights are handed lean to an
#: onnxruntime session (:func:`session`: it maps the weights instead of parsing the
#: whole protobuf and copying every weight out of it; a 46 MB base took 90 MB at
#: once and kept 50) and to the checker (:func:`check`)
LEAN_FILE_BYTES = 4 << 20
#: a written model whose tensors exceed this is written with external data (a
#: protobuf cannot exceed 2 GiB)
EXTERNAL_DATA_BYTES = (2 << 30) - (64 << 20)
#: tensors below this stay inside the protobuf (lean reading and external writing alike)
EXTERNAL_MIN_BYTES = 1024
#: offsets of the external tensors written (onnxruntime maps page-aligned ones)
ALIGN = 4096

_MAPS = {}          # (absolute path, inode, size, mtime) -> mmap (read-only), shared by every view
_ADOPTED = weakref.WeakSet()     # other read-only maps of weights (folded values' temporary files)


# ------------------------------------------------------------ wire format
def _varint(buf, i):
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, i
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _enc(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start, end):
    """(field number, wire type, tag start, value start, value end) of a message's fields."""
    i = start
    while i < end:
        t0 = i
        tag, i = _varint(buf, i)
        f, wt = tag >> 3, tag & 7
        if wt == 0:
            _, j = _varint(buf, i)
        elif wt == 1:
            j = i + 8
        elif wt == 5:
            j = i + 4
        elif wt == 2:
            n, i = _varint(buf, i)
            j = i + n
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if j > end:
            raise ValueError("field runs past its message")
        yield f, wt, t0, i, j
        i = j


def _ld(field, payload):
    return _enc(field << 3 | 2) + _enc(len(payload)) + payload


def _external_fields(location, offset, length):
    entries = b"".join(_ld(13, _ld(1, k.encode()) + _ld(2, v.encode()))
                       for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))))
    return entries + _enc(14 << 3) + _enc(1)          # data_location = EXTERNAL


def _lean_tensor(buf, start, end, location):
    """A TensorProto's bytes with a large raw_data replaced by a reference into the file."""
    raw = [(a, b) for f, wt, _, a, b in _fields(buf, start, end) if f == 9 and wt == 2]
    if len(raw) != 1 or raw[0][1] - raw[0][0] < EXTERNAL_MIN_BYTES:
        return None, 0
    a, b = raw[0]
    out = bytearray()
    for f, wt, t0, _, j in _fields(buf, start, end):
        if f != 9:
            out += buf[t0:j]
    return bytes(out) + _external_fields(location, a, b - a), b - a


def open_lean(path, least=None):
    """The model at ``path`` with its large embedded initializers left in the
    file (external references to the file itself, relative to its folder:
    :func:`absolutize` them once checked), or None when its weights are fewer
    than ``least`` bytes (:data:`LEAN_BYTES`).  Raises ValueError on a
    malformed protobuf."""
    least = LEAN_BYTES if least is None else least
    path = os.path.abspath(path)
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size < least:
        return None
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        out, moved = bytearray(), 0
        for f, wt, t0, a, b in _fields(mm, 0, size):
            if f != 7 or wt != 2:
                out += mm[t0:b]
                continue
            g = bytearray()
            for gf, gwt, g0, ga, gb in _fields(mm, a, b):
                lean = None
                if gf == 5 and gwt == 2:
                    lean, n = _lean_tensor(mm, ga, gb, name)
                    moved += n
                g += mm[g0:gb] if lean is None else _ld(5, lean)
            out += _ld(7, bytes(g))
    finally:
        mm.close()
    if moved < least:
        return None
    return onnx.load_model_from_string(bytes(out))


def all_tensors(graph):
    """Every TensorProto of ``graph``: initializers and tensor attributes, in subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from all_tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from all_tensors(sub)


def _ext(t):
    return {kv.key: kv.value for kv in t.external_data}


def absolutize(model, base):
    """Make the external locations of ``model`` (relative to folder ``base``) absolute: the model is lean."""
    for t in all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location":
                    kv.value = os.path.realpath(os.path.join(base, kv.value))
    return model


def data_bytes(model):
    """Bytes of tensor data the model holds or references."""
    n = 0
    for t in all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            e = _ext(t)
            n += int(e.get("length", 0)) or _nbytes(t)
        else:
            n += _nbytes(t)
    return n


def _nbytes(t):
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        item = 1
    return int(np.prod(t.dims, dtype=np.int64)) * item if len(t.dims) else item


def external_files(model):
    """The absolute paths of a lean model's external data files."""
    return {_ext(t)["location"] for t in all_tensors(model.graph)
            if t.data_location == onnx.TensorProto.EXTERNAL and os.path.isabs(_ext(t).get("location", ""))}


def is_lean(model):
    return any(t.data_location == onnx.TensorProto.EXTERNAL and os.path.isabs(_ext(t).get("location", ""))
               for t in model.graph.initializer)


def _map(path):
    """A read-only map of ``path``, shared while the file is the same (a file
    replaced at that path gets a new map: the key holds its inode, size and time)."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    mm = _MAPS.get(key)
    if mm is None or mm.closed:
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        _MAPS[key] = mm
    return mm


def _span(t):
    """(map, offset, length) of a lean tensor's bytes in its file."""
    e = _ext(t)
    loc = e.get("location", "")
    if not os.path.isabs(loc):
        raise ValueError(f"tensor {t.name!r}: external data {loc!r} not resolved (load the model with load_onnx)")
    try:
        mm = _map(loc)
    except (OSError, ValueError) as err:
        raise InputError(f"tensor {t.name!r}: cannot read its external data {os.path.basename(loc)} ({err})") \
            from None
    offset = int(e.get("offset", 0))
    length = int(e["length"]) if "length" in e else len(mm) - offset
    if offset < 0 or length < 0 or offset + length > len(mm):
        raise InputError(f"tensor {t.name!r}: its external data ({length} bytes at {offset}) runs past the end of "
                         f"{os.path.basename(loc)} ({len(mm)} bytes)")
    return mm, offset, length


def tensor_array(t) -> np.ndarray:
    """The value of a TensorProto; a lean (absolute external) one as a
    read-only view of its memory-mapped file, without a copy (a type numpy
    cannot view, bfloat16, float8 or 4-bit, is decoded by onnx: a copy)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    mm, offset, length = _span(t)
    count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:
        dtype = None
    if dtype is not None and dtype.kind in "fiub" and dtype.itemsize in (1, 2, 4, 8) and \
            t.data_type not in (onnx.TensorProto.BFLOAT16,) and length == count * dtype.itemsize:
        return np.frombuffer(mm, dtype=dtype.newbyteorder("<"), count=count, offset=offset).reshape(tuple(t.dims))
    tp = onnx.TensorProto()
    tp.CopyFrom(t)
    tp.ClearField("external_data")
    tp.ClearField("data_location")
    tp.raw_data = mm[offset:offset + length]
    try:
        return numpy_helper.to_array(tp)
    except Exception as err:
        raise InputError(f"tensor {t.name!r}: its external data ({length} bytes) does not hold "
                         f"{list(t.dims)} of its type ({err})") from None


def release():
    """Hand the resident pages of every mapped weight file back (they are read
    again when touched), the folded weights' temporary files included (:func:`adopt`)."""
    for mm in [*_MAPS.values(), *_ADOPTED]:
        if not mm.closed:
            drop_pages(mm)


def adopt(mm):
    """Have :func:`release` hand back the pages of the read-only map ``mm`` too
    (held weakly: it closes with its last view)."""
    _ADOPTED.add(mm)


def forget(path):
    """Close and forget every map of ``path`` (a file about to be removed); a
    map a live view still reads stays open until that view goes."""
    path = os.path.abspath(path)
    for key in [k for k in _MAPS if k[0] == path]:
        mm = _MAPS.pop(key)
        try:
            mm.close()
        except BufferError:
            pass


def relieve():
    """:func:`release` and :func:`fibgraph.heap.trim`: what the engine calls after each
    refined level (the graph's ``relieve`` hook), so a level's mapped pages
    and freed temporaries are not carried into the next."""
    release()
    trim()


def check(path):
    """The ONNX checker on the file at ``path``; a big embedded one on its
    protobuf without the weights' bytes (:func:`open_lean`), not parsed whole."""
    import tempfile

    lean = open_lean(path, least=LEAN_FILE_BYTES)
    if lean is None:
        onnx.checker.check_model(os.fspath(path))
        return
    # the protobuf without the weights, beside the file whose bytes it references
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".fibgraph-check-",
                               suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(lean.SerializeToString())
        onnx.checker.check_model(tmp)
    finally:
        os.unlink(tmp)


# ------------------------------------------------------------ sessions
def session(model, options=None, providers=("CPUExecutionProvider",)):
    """An onnxruntime session over ``model`` (a path, or a ModelProto; a lean
    one is handed over with its external locations relative to their folder,
    which the session reads or maps itself: the weights are never serialised)."""
    import onnxruntime as ort

    so = options or ort.SessionOptions()
    if not isinstance(model, onnx.ModelProto):
        model = os.fspath(model)
        lean = open_lean(model, least=LEAN_FILE_BYTES) if isinstance(model, str) and os.path.isfile(model) \
            else None
        if lean is None:          # small, or external already: onnxruntime maps page-aligned external data
            return ort.InferenceSession(model, so, providers=list(providers))
        model = absolutize(lean, os.path.dirname(os.path.abspath(model)))   # not the whole protobuf, then its tensors
    if not is_lean(model):
        return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))
    folders = {os.path.dirname(_ext(t)["location"]) for t in all_tensors(model.graph)
               if t.data_location == onnx.TensorProto.EXTERNAL}
    if len(folders) != 1:
        raise ValueError("a lean model's external data lies in several folders")
    folder = folders.pop()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in all_tensors(m.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location":
                    kv.value = os.path.basename(kv.value)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    return ort.InferenceSession(m.SerializeToString(), so, providers=list(providers))


# ------------------------------------------------------------ writing
_FIXED = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
          onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
          onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
          onnx.TensorProto.BOOL}


def _raw(t):
    """The little-endian bytes of a numeric tensor's data (a view for a lean tensor)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        mm, offset, length = _span(t)
        return memoryview(mm)[offset:offset + length]
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def _embedded(t):
    """``t`` with its data inside (a small lean tensor is read from its file)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return t
    return numpy_helper.from_array(np.array(tensor_array(t)), t.name)


def _header(t):
    """The tensor without its data (name, dims, type, ...)."""
    h = onnx.TensorProto()
    h.CopyFrom(t)
    for fld in ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                "uint64_data", "external_data", "data_location"):
        h.ClearField(fld)
    return h


def _copy_without(msg, skip, out):
    for fd, v in msg.ListFields():
        if fd.name == skip:
            continue
        if (fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED):
            getattr(out, fd.name).extend(v)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(v)
        else:
            setattr(out, fd.name, v)
    return out


def save_model(model, path, external=None, data_name=None, data_file=None):
    """Write ``model`` to ``path`` without assembling it in memory: embedded
    (one protobuf, its tensors written one by one) or, with ``external`` (None:
    automatically when its tensors exceed :data:`EXTERNAL_DATA_BYTES`), its
    numeric tensors of :data:`EXTERNAL_MIN_BYTES` or more in ``data_name``
    (default ``<file name>.data``) in the same folder, at :data:`ALIGN`-ed
    offsets; ``data_file``: write the data there instead (a temporary name the
    caller moves to ``data_name`` beside the model).  Returns the data file's
    path or None."""
    path = os.fspath(path)
    if external is None:
        external = data_bytes(model) > EXTERNAL_DATA_BYTES
    skel = _copy_without(model, "graph", onnx.ModelProto())
    graph = _copy_without(model.graph, "initializer", onnx.GraphProto())
    inits = list(model.graph.initializer)
    big = [t.data_type in _FIXED and _nbytes(t) >= EXTERNAL_MIN_BYTES for t in inits]
    data_path = None
    if external:
        data_name = data_name or os.path.basename(path) + ".data"
        data_path = data_file or os.path.join(os.path.dirname(os.path.abspath(path)), data_name)
        with open(data_path, "wb") as fd:
            for t, b in zip(inits, big):
                if not b:
                    graph.initializer.add().CopyFrom(_embedded(t))
                    continue
                h = graph.initializer.add()
                h.CopyFrom(_header(t))
                raw = _raw(t)
                pos = fd.tell()
                pad = (-pos) % ALIGN
                fd.write(b"\0" * pad)
                h.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(pos + pad)), ("length", str(len(raw)))):
                    h.external_data.add(key=k, value=v)
                _write(fd, raw, t)
                del raw
        skel.graph.CopyFrom(graph)
        with open(path, "wb") as fo:
            fo.write(skel.SerializeToString())
        return data_path
    # embedded: the ModelProto's fields, then the graph (field 7): its fields and one
    # initializer (field 5) per tensor, each its header and then raw_data (field 9)
    parts = []
    for t, b in zip(inits, big):
        if b:
            hb = _header(t).SerializeToString()
            n = _nbytes(t)
            parts.append((hb + _enc(9 << 3 | 2) + _enc(n), n, t))
        else:
            parts.append((_embedded(t).SerializeToString(), 0, None))
    gbytes = graph.SerializeToString()
    glen = len(gbytes) + sum(len(_enc(5 << 3 | 2)) + len(_enc(len(h) + n)) + len(h) + n for h, n, _ in parts)
    with open(path, "wb") as fo:
        fo.write(skel.SerializeToString())
        fo.write(_enc(7 << 3 | 2) + _enc(glen))
        fo.write(gbytes)
        for h, n, t in parts:
            fo.write(_enc(5 << 3 | 2) + _enc(len(h) + n) + h)
            if t is not None:
                raw = _raw(t)
                if len(raw) != n:
                    raise ValueError(f"tensor {t.name!r}: {len(raw)} bytes of data, {n} expected")
                _write(fo, raw, t)
    return None


def _write(fo, raw, t):
    """``raw`` to ``fo``; a lean tensor's bytes in chunks whose mapped pages
    are handed back once written (writing reads them in: without this a
    model's every weight page would be resident at the end of the write)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        fo.write(raw)
        return
    mm, offset, _ = _span(t)
    for a in range(0, len(raw), _WRITE_CHUNK):
        b = min(a + _WRITE_CHUNK, len(raw))
        fo.write(raw[a:b])
        drop_pages(mm, offset + a, b - a)


_WRITE_CHUNK = 16 << 20
