"""Plain-Python references for the engine tests and the benchmark (not part of the package).

- :func:`plain_refine`: the textbook refinement: every round builds, for every
  node, the tuple ``(old colour, sorted((colour of other end, edge type,
  summed weight)))`` and renumbers the distinct tuples; stops when the number
  of colours stops growing.  Float sums are rounded to ``1e-9 * max|w|``.
- :func:`is_balanced`: does a colouring satisfy the definition (equal
  per-colour weight sums inside every class, in the given direction)?
- :func:`coarsest_by_merge`: no two classes can be merged into a balanced
  colouring (the "nothing coarser" check).
- :func:`read_edgelist_plain`, :func:`write_json_plain`: plain IO for the benchmark.

Everything works on plain edge lists ``(src, dst, w, etype)`` of Python
scalars, independent of fibgraph's blocks (``edges_of`` converts a graph).
"""
from __future__ import annotations

import json


def edges_of(graph):
    """``(src, dst, weight, etype)`` Python lists of a WeightedDigraph (scalar weights)."""
    src, dst, w, et = [], [], [], []
    for b in graph.blocks:
        s, d, v, e = b.coo()
        src += s.tolist()
        dst += d.tolist()
        w += [tuple(r) for r in v.tolist()]
        et += [None] * len(s) if e is None else e.tolist()
    return src, dst, w, et


def _canon(keys):
    seen = {}
    return [seen.setdefault(k, len(seen)) for k in keys]


def _quantum(w, exact):
    if exact:
        return None
    m = max((abs(x) for t in w for x in (t if isinstance(t, tuple) else (t,))), default=0.0)
    return m * 1e-9 if m > 0 else 1.0


def _q(x, quantum):
    return int(round(x)) if quantum is None else int(round(x / quantum))


def _sig_lists(n, src, dst, w, et, direction):
    lists = [[] for _ in range(n)]
    for k in range(len(src)):
        wk = w[k] if isinstance(w[k], tuple) else (w[k],)
        e = None if et is None else et[k]
        if direction in ("in", "both"):
            lists[dst[k]].append(("in", src[k], e, wk))
        if direction in ("out", "both"):
            lists[src[k]].append(("out", dst[k], e, wk))
    return lists


def plain_refine(n, src, dst, w=None, et=None, initial=None, direction="in", exact=True):
    """Coarsest ``direction``-balanced colouring refining ``initial`` (list of ints)."""
    if w is None:
        w = [1] * len(src)
    quantum = _quantum(w, exact)
    colours = _canon(initial if initial is not None else [0] * n)
    lists = _sig_lists(n, src, dst, w, et, direction)
    ncol = len(set(colours))
    while True:
        keys = []
        for i in range(n):
            sums = {}
            for side, k, e, wk in lists[i]:
                key = (side, colours[k], e)
                cur = sums.get(key)
                sums[key] = list(wk) if cur is None else [a + b for a, b in zip(cur, wk)]
            sig = []
            for key, v in sums.items():
                qv = tuple(_q(x, quantum) for x in v)
                if any(qv):
                    sig.append((key[0], key[1], -1 if key[2] is None else key[2], qv))
            keys.append((colours[i], tuple(sorted(sig))))
        new = _canon(keys)
        k = len(set(new))
        colours = new
        if k == ncol:
            return colours
        ncol = k


def _class_sums(n, lists, labels, quantum):
    out = []
    for i in range(n):
        sums = {}
        for side, k, e, wk in lists[i]:
            key = (side, labels[k], e)
            cur = sums.get(key)
            sums[key] = list(wk) if cur is None else [a + b for a, b in zip(cur, wk)]
        out.append({key: tuple(_q(x, quantum) for x in v) for key, v in sums.items()
                    if any(_q(x, quantum) for x in v)})
    return out


def is_balanced(n, src, dst, w, et, labels, direction="in", exact=True, initial=None):
    """True iff nodes of one class have equal per-class weight sums (and equal
    initial colours when ``initial`` is given)."""
    if w is None:
        w = [1] * len(src)
    labels = list(labels)
    if initial is not None:
        first = {}
        for i, c in enumerate(labels):
            if first.setdefault(c, initial[i]) != initial[i]:
                return False
    lists = _sig_lists(n, src, dst, w, et, direction)
    sums = _class_sums(n, lists, labels, _quantum(w, exact))
    rep = {}
    for i, c in enumerate(labels):
        if c in rep:
            if sums[rep[c]] != sums[i]:
                return False
        else:
            rep[c] = i
    return True


def coarsest_by_merge(n, src, dst, w, et, labels, direction="in", exact=True, initial=None):
    """True iff merging any two classes of ``labels`` gives a colouring that is
    not balanced or mixes initial colours."""
    labels = list(labels)
    cls = sorted(set(labels))
    for a in range(len(cls)):
        for b in range(a + 1, len(cls)):
            merged = [cls[a] if x == cls[b] else x for x in labels]
            if is_balanced(n, src, dst, w, et, merged, direction, exact, initial):
                return False
    return True


def read_edgelist_plain(path):
    """Line-by-line reader: ``u v [w]``, ``#`` comments; integer ids and weights."""
    src, dst, w = [], [], []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].split()
            if not line:
                continue
            src.append(int(line[0]))
            dst.append(int(line[1]))
            w.append(int(line[2]) if len(line) > 2 else 1)
    n = max(max(src), max(dst)) + 1
    return n, src, dst, w


def plain_refine_fast(n, src, dst, w, direction="in"):
    """The same refinement specialised to scalar integer weights (a fair, not a
    strawman, Python baseline for the benchmark): per round one dict per node."""
    colours = [0] * n
    ncol = 1
    preds = [[] for _ in range(n)]
    if direction == "in":
        for s, d, x in zip(src, dst, w):
            preds[d].append((s, x))
    else:
        for s, d, x in zip(src, dst, w):
            preds[s].append((d, x))
    while True:
        index = {}
        new = [0] * n
        for i in range(n):
            sums = {}
            for k, x in preds[i]:
                c = colours[k]
                sums[c] = sums.get(c, 0) + x
            key = (colours[i], tuple(sorted((c, v) for c, v in sums.items() if v != 0)))
            new[i] = index.setdefault(key, len(index))
        colours = new
        if len(index) == ncol:
            return colours
        ncol = len(index)


def write_json_plain(path, labels):
    with open(path, "w") as f:
        json.dump({"nodes": len(labels), "colors": len(set(labels)),
                   "partition": {str(i): c for i, c in enumerate(labels)}}, f)
