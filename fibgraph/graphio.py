"""Any directed weighted graph as a :class:`~fibgraph.graph.WeightedDigraph`.

Sources: a networkx ``DiGraph``/``MultiDiGraph`` (or undirected graph),
an igraph ``Graph``, and files: a weighted edge list (``.edgelist``/``.txt``),
GraphML (``.graphml``) and GML (``.gml``).

What the graph means:

- nodes ``0..n-1``; ``node_ids`` keeps each node's id as in the source (edge
  list: the integer ids the edges name, in increasing order, relabelled densely,
  so a graph costs memory by its edges and never by its largest id;
  GraphML/GML/networkx/igraph: every declared node, isolated ones included, in
  declaration order);
- an edge ``u -> v`` with weight ``w`` is ``W[v, u] += w``: multi-edges add,
  self-loops and cycles are allowed; an undirected edge ``{u, v}`` is the two
  directed edges ``u -> v`` and ``v -> u`` (a self-loop once);
- weights: integer values (every weight integral) are compared exactly; other
  numbers are compared up to the engine's tolerance; a non-numeric weight is
  an edge *type* (a category, compared exactly, value 1), and so is an edge
  attribute ``type`` (then ``weight`` stays the numeric value);
  a missing weight is 1; NaN and infinite weights are refused;
- initial colouring (optional): ``initial=`` a sequence, a dict
  ``{node id: colour}`` or a node attribute name; by default a node attribute
  called ``initial`` is used when present (nodes without it share one colour).

Edge list format: one edge per line, ``u v`` or ``u v w``, whitespace
separated, ``u``/``v`` non-negative integers (plain digits: no sign, no
``_``, below 2**31 - 1); ``#`` starts a comment; blank
lines are skipped.  Parsing is vectorised (numpy on the file's bytes; one
``bytes.split``).  Bad input raises :class:`~fibgraph.errors.InputError` with a
one-line message naming the line.
"""
from __future__ import annotations

import numbers
import os
import re

import numpy as np

from .errors import InputError
from .fileio import read_input
from .graph import WeightedDigraph

__all__ = ["read_graph", "read_edgelist", "parse_edgelist", "from_networkx", "from_igraph",
           "EDGELIST_EXT", "GRAPH_EXT", "MAX_NODE_ID"]

EDGELIST_EXT = (".edgelist", ".txt")
GRAPH_EXT = EDGELIST_EXT + (".graphml", ".gml")
MAX_NODE_ID = 2 ** 31 - 2          # node ids must fit int32 (n <= 2**31 - 1)
_WS = np.zeros(256, bool)
_WS[[9, 10, 11, 12, 13, 32]] = True
_BAD = np.zeros(256, bool)           # control bytes that never occur in a text file
_BAD[[b for b in range(32) if not _WS[b]] + [127]] = True
_CLS = np.full(256, 3, np.uint8)      # byte classes: 0 space, 1 digit, 2 '-', 3 other, 4 bad
_CLS[_WS] = 0
_CLS[list(b"0123456789")] = 1
_CLS[ord("-")] = 2
_CLS[_BAD] = 4


# ------------------------------------------------------------------ files
def read_graph(path, weight="weight", initial=None) -> WeightedDigraph:
    """Read a graph file, dispatching on the extension (see module doc)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in GRAPH_EXT:
        raise InputError(f"{path}: unknown graph file type {ext or '(none)'!r} "
                         f"(expected {', '.join(GRAPH_EXT)})")
    data = read_input(path)
    if not data.strip():
        raise InputError(f"{path}: empty file (no nodes, no edges)")
    if ext in EDGELIST_EXT:
        g = parse_edgelist(data, path)
        if initial is not None:
            g.initial = _initial_from_values(initial, list(g.node_ids), None, g.n)
        return g
    _check_text(data, path)
    import networkx as nx

    try:
        if ext == ".graphml":
            G = nx.read_graphml(path)
        else:
            try:
                G = nx.read_gml(path)               # nodes named by their labels
            except nx.NetworkXError:
                G = nx.read_gml(path, label="id")   # labels missing or repeated
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the parsers raise many kinds
        kind = "GraphML" if ext == ".graphml" else "GML"
        msg = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{path}: not a valid {kind} file: {msg[:200]}") from None
    return from_networkx(G, weight=weight, initial=initial, name=path)


def read_edgelist(path) -> WeightedDigraph:
    """Read a weighted edge list file (any extension)."""
    path = os.fspath(path)
    return parse_edgelist(read_input(path), path)


def _check_text(data: bytes, name):
    head = np.frombuffer(data[: 1 << 20], np.uint8)
    if _BAD[head].any():
        raise InputError(f"{name}: not a text graph file (binary data)")


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def parse_edgelist(data: bytes, name="edge list") -> WeightedDigraph:
    """Parse edge-list bytes (see module doc) into a graph."""
    if isinstance(data, str):
        data = data.encode()
    if data.startswith(b"\xef\xbb\xbf"):          # UTF-8 byte order mark
        data = data[3:]
    b = np.frombuffer(data, np.uint8)
    cls = _CLS[b]
    if cls.size and cls.max() == 4:
        pos = int(np.argmax(cls == 4))
        raise InputError(f"{name}: line {_line_of(data, pos)}: not a text edge list "
                         f"(byte 0x{data[pos]:02x})")
    if b"#" in data:   # comments out, line numbers kept
        data = re.sub(rb"#[^\n]*", b"", data)
        b = np.frombuffer(data, np.uint8)
        cls = _CLS[b]
    all_int = not cls.size or cls.max() <= 2   # only digits, '-' and whitespace
    if not all_int and b.max() >= 128:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{name}: line {_line_of(data, e.start)}: not a text edge list "
                             f"(invalid UTF-8)") from None
    ws = cls == 0
    del cls
    start = ~ws
    start[1:] &= ws[:-1]                       # first byte of every token
    del ws
    nlpos = np.flatnonzero(b == 10)
    seg = np.concatenate([[0], nlpos + 1])
    seg = seg[seg < b.size]
    spos = np.flatnonzero(start)
    del start, nlpos
    ntok = np.diff(np.searchsorted(spos, np.append(seg, b.size)))   # tokens per line
    badline = (ntok == 1) | (ntok > 3)
    if badline.any():
        k = int(np.argmax(badline))
        text = data[seg[k]: data.find(b"\n", seg[k]) if data.find(b"\n", seg[k]) >= 0 else None]
        shown = text.decode("utf-8", "replace").strip()[:60]
        raise InputError(f"{name}: line {k + 1}: expected 'u v' or 'u v w', "
                         f"got {int(ntok[k])} field{'s' if ntok[k] != 1 else ''}: {shown!r}")
    if spos.size == 0:
        raise InputError(f"{name}: no edges (empty graph)")
    counts = ntok[ntok > 0]
    lines = np.flatnonzero(ntok > 0)             # 0-based line of every edge
    m = counts.size
    fast = _fast_integers(data, spos, counts, lines, name) if all_int else None
    if fast is not None:
        return fast
    del spos
    toks = data.split()
    if np.all(counts == 3):
        us, vs, wt = toks[0::3], toks[1::3], toks[2::3]
        wline = None
    elif np.all(counts == 2):
        us, vs, wt = toks[0::2], toks[1::2], None
        wline = None
    else:
        first = np.cumsum(counts) - counts
        us = [toks[i] for i in first.tolist()]
        vs = [toks[i] for i in (first + 1).tolist()]
        has_w = counts == 3
        wline = np.flatnonzero(has_w)            # edges that carry a weight
        wt = [toks[i] for i in (first[has_w] + 2).tolist()]
    del toks
    src = _parse_ids(us, lines, name)
    dst = _parse_ids(vs, lines, name)
    del us, vs
    etype = None
    exact = True
    weight = None
    if wt is not None:
        wl = lines if wline is None else lines[wline]
        try:
            wv = np.fromiter(map(float, wt), np.float64, len(wt))
        except ValueError:
            wv = None
        if wv is None:                           # categorical: every weight token is a type
            cats = np.array(wt)
            if wline is not None:
                full = np.full(m, b"", dtype=cats.dtype)
                full[wline] = cats
                cats = full
            _, etype = np.unique(cats, return_inverse=True)
            etype = etype.reshape(-1).astype(np.int64)
        else:
            fin = np.isfinite(wv)
            if not fin.all():
                k = int(np.argmin(fin))
                raise InputError(f"{name}: line {int(wl[k]) + 1}: weight "
                                 f"{wt[k].decode('utf-8', 'replace')!r} is not finite")
            if wline is not None:
                weight = np.ones(m)
                weight[wline] = wv
            else:
                weight = wv
            exact = _integral(weight)
    if exact:
        weight = None if weight is None else weight.astype(np.int64)
    src, dst, ids = _dense(src, dst)
    return WeightedDigraph.from_edges(src, dst, weight, n=ids.size, etype=etype, exact=exact, node_ids=ids)


def _dense(src, dst):
    """Node ids relabelled ``0..n-1`` in increasing order: ``(src, dst, ids)``."""
    m = src.size
    ids, inv = np.unique(np.concatenate([src, dst]), return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    return inv[:m], inv[m:], ids.astype(np.int64)


def _fast_integers(data, spos, counts, lines, name):
    """Whole-file parse when every token is an integer (the caller checked the
    bytes) and every line has the same number of fields (unweighted or
    integer-weighted lists); None otherwise."""
    k = int(counts[0])
    if not np.all(counts == k):
        return None
    try:
        arr = np.fromstring(data, dtype=np.int64, sep=" ")
    except ValueError:
        return None
    if arr.size != spos.size:
        return None
    arr = arr.reshape(-1, k)
    if arr[:, :2].max() > MAX_NODE_ID:
        return None                               # slow path names the token exactly
    src = _check_ids(arr[:, 0].copy(), lines, name)
    dst = _check_ids(arr[:, 1].copy(), lines, name)
    weight = arr[:, 2].copy() if k == 3 else None
    del arr
    if weight is not None and np.abs(weight).max() >= 2 ** 53:
        return None                               # huge (or saturated) integers: slow path
    src, dst, ids = _dense(src, dst)
    return WeightedDigraph.from_edges(src, dst, weight, n=ids.size, exact=True, node_ids=ids)


def _parse_ids(tokens, lines, name):
    joined = np.frombuffer(b"".join(tokens), np.uint8)
    digits = bool(np.all((joined >= 48) & (joined <= 57)))     # int() also takes '1_000', '+5'
    try:
        if not digits:
            raise ValueError
        ids = np.fromiter(map(int, tokens), np.int64, len(tokens))
    except (ValueError, OverflowError):
        for k, t in enumerate(tokens):
            shown = t.decode("utf-8", "replace")[:40]
            try:
                if not t.isdigit():
                    raise ValueError
                x = int(t)
            except ValueError:
                raise InputError(f"{name}: line {int(lines[k]) + 1}: node id {shown!r} is not a "
                                 f"non-negative integer") from None
            if not 0 <= x <= MAX_NODE_ID:
                raise InputError(f"{name}: line {int(lines[k]) + 1}: node id {shown} is "
                                 + ("negative" if x < 0 else "too large (ids must be < 2**31 - 1)"))
        raise  # pragma: no cover
    return _check_ids(ids, lines, name)


def _check_ids(ids, lines, name):
    neg = ids < 0
    if neg.any():
        k = int(np.argmax(neg))
        raise InputError(f"{name}: line {int(lines[k]) + 1}: negative node id {int(ids[k])}")
    big = ids > MAX_NODE_ID
    if big.any():
        k = int(np.argmax(big))
        raise InputError(f"{name}: line {int(lines[k]) + 1}: node id {int(ids[k])} is too large "
                         "(ids must be < 2**31 - 1)")
    return ids


def _integral(w) -> bool:
    w = np.asarray(w, dtype=np.float64)
    return bool(w.size == 0 or (np.all(w == np.round(w)) and np.abs(w).max() <= 2 ** 53))


# ---------------------------------------------------------- graph objects
def _num(x):
    """float value of a numeric weight, or None if it is not a number."""
    if isinstance(x, (bool, np.bool_)):
        return float(x)
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, (str, bytes)):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _cat_key(x):
    if isinstance(x, bytes):
        x = x.decode("utf-8", "replace")
    return str(x)


def _build(n, src, dst, wvals, tvals, directed, node_ids, initial, name, node_attr=None):
    """Common tail of the graph-object readers: weights, types, undirected edges."""
    if n == 0:
        raise InputError(f"{name}: graph has no nodes (empty graph)")
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    m = src.size
    nums = [None if w is None else _num(w) for w in wvals]
    categorical = any(w is not None and v is None for w, v in zip(wvals, nums))
    etype = None
    if categorical:
        for w, v in zip(wvals, nums):
            if w is not None and v is None and not isinstance(w, (str, bytes, numbers.Number)):
                raise InputError(f"{name}: unsupported edge weight {w!r} "
                                 f"(numbers or category names only)")
        cats = ["" if w is None else _cat_key(w) for w in wvals]
        weight = np.ones(m)
        exact = True
    else:
        weight = np.array([1.0 if v is None else v for v in nums], dtype=np.float64)
        if m:
            fin = np.isfinite(weight)
            if not fin.all():
                k = int(np.argmin(fin))
                raise InputError(f"{name}: edge {node_ids[src[k]]!r} -> {node_ids[dst[k]]!r}: "
                                 f"weight {wvals[k]!r} is not finite")
        exact = _integral(weight)
        cats = None
    if tvals is not None and any(t is not None for t in tvals):
        tk = ["" if t is None else _cat_key(t) for t in tvals]
        cats = tk if cats is None else [a + "\x00" + c for a, c in zip(tk, cats)]
    if cats is not None:
        _, etype = np.unique(np.array(cats, dtype=object).astype(str), return_inverse=True)
        etype = etype.reshape(-1).astype(np.int64)
    if not directed and m:
        nl = src != dst
        src, dst = np.concatenate([src, dst[nl]]), np.concatenate([dst, src[nl]])
        weight = np.concatenate([weight, weight[nl]])
        if etype is not None:
            etype = np.concatenate([etype, etype[nl]])
    init = _initial_from_values(initial, node_ids, node_attr, n)
    if exact:
        weight = weight.astype(np.int64)
    return WeightedDigraph.from_edges(src, dst, weight, n=n, etype=etype, exact=exact,
                                      node_ids=list(node_ids), initial=init)


def _initial_from_values(initial, node_ids, node_attr, n):
    """Initial colouring from a sequence, a dict by node id, or an attribute name."""
    if initial is None:
        if node_attr is not None and any(a is not None and "initial" in a for a in node_attr):
            initial = "initial"
        else:
            return None
    if isinstance(initial, str):
        if node_attr is None:
            raise InputError(f"initial colouring from attribute {initial!r}: "
                             f"this source has no node attributes")
        vals = [None if a is None else a.get(initial) for a in node_attr]
    elif isinstance(initial, dict):
        vals = [initial.get(v) for v in node_ids]
    else:
        vals = list(np.asarray(initial).reshape(-1).tolist())
        if len(vals) != n:
            raise InputError(f"initial colouring has {len(vals)} entries for {n} nodes")
    seen: dict = {}
    out = np.empty(n, np.int64)
    for i, v in enumerate(vals):
        k = (type(v).__name__, _cat_key(v)) if v is not None else None
        out[i] = seen.setdefault(k, len(seen))
    return out


def from_networkx(G, weight="weight", initial=None, name="networkx graph",
                  type_attr="type") -> WeightedDigraph:
    """Graph from a networkx graph (directed or not, multi or not); see module doc."""
    nodes = list(G.nodes())
    index = {v: i for i, v in enumerate(nodes)}
    src, dst, wv, tv = [], [], [], []
    has_t = False
    for u, v, d in G.edges(data=True):
        src.append(index[u])
        dst.append(index[v])
        wv.append(d.get(weight))
        t = d.get(type_attr)
        has_t |= t is not None
        tv.append(t)
    attrs = [G.nodes[v] for v in nodes]
    return _build(len(nodes), src, dst, wv, tv if has_t else None, G.is_directed(), nodes,
                  initial, name, node_attr=attrs)


def from_igraph(g, weight="weight", initial=None, name="igraph graph",
                type_attr="type") -> WeightedDigraph:
    """Graph from an ``igraph.Graph`` (node ids: the ``name`` attribute if any)."""
    n = g.vcount()
    el = np.array(g.get_edgelist(), dtype=np.int64).reshape(-1, 2)
    eattrs = g.es.attributes()
    wv = g.es[weight] if weight in eattrs else [None] * el.shape[0]
    tv = g.es[type_attr] if type_attr in eattrs else None
    vattrs = g.vs.attributes()
    node_ids = g.vs["name"] if "name" in vattrs else list(range(n))
    attrs = [{k: g.vs[i][k] for k in vattrs} for i in range(n)] if vattrs else None
    return _build(n, el[:, 0], el[:, 1], list(wv), None if tv is None else list(tv),
                  g.is_directed(), node_ids, initial, name, node_attr=attrs)
