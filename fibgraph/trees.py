"""Input-tree and output-tree certificates: an independent check of the engine.

The *input tree* of node ``i`` is the universal cover of the graph seen from
``i`` against the edges: its root is ``i``, the children of a tree node
``k`` are the in-neighbours of ``k`` (one child per edge), and so on; every
tree node carries its graph node's initial colour and every tree edge its
weight (and edge type).  The *output tree* is the same on reversed edges.

What is certified.  With weights, fibers are defined by SUMS (a node with two
edges of weight 1 from two equivalent nodes is in the fiber of a node with
one edge of weight 2 from such a node), so the right notion of "isomorphic
weighted input trees" identifies sibling subtrees that are equivalent and
adds their edge weights.  The depth-``t`` *form* of node ``i`` is::

    form_0(i)     = (initial colour of i,)
    form_{t+1}(i) = (initial colour of i,
                     sorted tuple of (f, edge type, S_i(f, type))
                     over the distinct (f, type) with S_i(f, type) != 0)
    S_i(f, type)  = sum of W[i, k] over the edges k -> i of that type
                    with form_t(k) = f

(weights summed as vectors; float sums rounded to ``1e-9 * max|W|``, integer
weights exact).  Two nodes have equal depth-``t`` forms iff their depth-``t``
weighted input trees are equal after merging equivalent sibling subtrees and
adding their weights.  The partition by depth-``t`` forms is the ``t``-th
round of in-balanced refinement from the initial colouring, so it stops
changing after at most ``n - 1`` rounds (Norris 1995) and is then the
coarsest in-balanced colouring (the fibration's fibers).  Output forms give
opfibers; ``direction='both'`` (in- and out-parts together) gives the strict
covering.

Deliberately slow and plain (Python dicts and tuples, no numpy in the
recursion), for small graphs.  Forms are interned: each distinct form tuple
gets an integer id from one table, and forms refer to their children's ids,
so equal ids mean equal (fully expanded) forms; :func:`expand` rebuilds the
nested tuple.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graph import WeightedDigraph

__all__ = ["TreeCertificates", "tree_certificates", "input_tree_certificates",
           "output_tree_certificates", "expand", "certifies"]


@dataclass
class TreeCertificates:
    """``forms[i]``: id of node ``i``'s depth-``depth`` form; ``labels``: the
    partition by forms (classes numbered by smallest member); ``stable``: True
    when the partition stopped changing (so it is the coarsest balanced one);
    ``table``: form id -> form tuple."""

    forms: list
    depth: int
    labels: np.ndarray
    stable: bool
    direction: str
    table: dict = field(default_factory=dict, repr=False)


def _plain_edges(graph: WeightedDigraph):
    """Summed edges as Python lists: {(dst, src, etype): [w_1..w_D]}, exactness,
    and the largest magnitude of a single (unsummed) weight entry."""
    acc: dict = {}
    exact = True
    wmax = 0.0
    for b in graph.blocks:
        exact = exact and bool(b.exact)
        s, d, v, et = b.coo()
        v = np.asarray(v, np.float64)
        if v.size:
            wmax = max(wmax, float(np.max(np.abs(v))))
        s, d, v = s.tolist(), d.tolist(), v.tolist()
        et = [None] * len(s) if et is None else et.tolist()
        for k in range(len(s)):
            key = (d[k], s[k], et[k])
            cur = acc.get(key)
            if cur is None:
                acc[key] = list(v[k])
            else:
                for j, x in enumerate(v[k]):
                    if j < len(cur):
                        cur[j] += x
                    else:
                        cur.append(x)
    return acc, exact, wmax


def _labels_of(values):
    seen: dict = {}
    return np.array([seen.setdefault(x, len(seen)) for x in values], dtype=np.int64)


def tree_certificates(graph: WeightedDigraph, direction="in", depth=None,
                      initial=None) -> TreeCertificates:
    """Depth-bounded forms of input (``'in'``), output (``'out'``) or both
    (``'both'``) trees.  ``depth=None``: go on until the partition is stable
    (at most ``n - 1`` levels); an integer: exactly that depth."""
    if direction not in ("in", "out", "both"):
        raise ValueError(f"direction must be 'in', 'out' or 'both', got {direction!r}")
    n = graph.n
    init = graph.initial if initial is None else np.asarray(initial)
    init = [int(x) for x in np.asarray(init).tolist()]
    if len(init) != n:
        raise ValueError(f"initial colouring has {len(init)} entries for {n} nodes")
    acc, exact, wmax = _plain_edges(graph)
    # the quantum is relative to the weights as given, not to their sums: parallel
    # edges that cancel (0.9 - 0.3 - 0.6) leave float noise, which is no edge
    quantum = 1.0 if exact else (wmax * 1e-9 if wmax > 0 else 1.0)

    def q(vec):
        if exact:
            return tuple(int(round(x)) for x in vec)
        return tuple(int(round(x / quantum)) for x in vec)

    ins = [[] for _ in range(n)]    # (other end, type, weight vector) per edge into i
    outs = [[] for _ in range(n)]
    for (d, s, et), v in acc.items():
        if not any(q(v)):
            continue                 # summed to zero (up to rounding): no edge
        ins[d].append((s, et, v))
        outs[s].append((d, et, v))
    sides = {"in": [ins], "out": [outs], "both": [ins, outs]}[direction]
    table: dict = {}
    ids: dict = {}

    def intern(form):
        fid = ids.get(form)
        if fid is None:
            fid = len(ids)
            ids[form] = fid
            table[fid] = form
        return fid

    forms = [intern((c,)) for c in init]
    nclass = len(set(forms))
    limit = max(n - 1, 0) if depth is None else int(depth)
    t = 0
    stable = n <= 1 or nclass == n
    while t < limit and not (depth is None and stable):
        new = []
        for i in range(n):
            parts = [init[i]]
            for side in sides:
                sums: dict = {}
                for k, et, v in side[i]:
                    key = (forms[k], "" if et is None else str(et))
                    cur = sums.get(key)
                    if cur is None:
                        sums[key] = list(v)
                    else:
                        for j, x in enumerate(v):
                            if j < len(cur):
                                cur[j] += x
                            else:
                                cur.append(x)
                entries = []
                for (f, et), v in sums.items():
                    qv = q(v)
                    if any(qv):
                        entries.append((f, et, qv))
                parts.append(tuple(sorted(entries)))
            new.append(intern(tuple(parts)))
        t += 1
        k = len(set(new))
        stable = k == nclass
        forms, nclass = new, k
    if depth is None:
        stable = True
    return TreeCertificates(forms, t, _labels_of(forms), stable, direction, table)


def input_tree_certificates(graph, depth=None, initial=None) -> TreeCertificates:
    """Forms of the input trees (fibers when stable)."""
    return tree_certificates(graph, "in", depth, initial)


def output_tree_certificates(graph, depth=None, initial=None) -> TreeCertificates:
    """Forms of the output trees (opfibers when stable)."""
    return tree_certificates(graph, "out", depth, initial)


def expand(cert: TreeCertificates, node: int):
    """The fully nested form tuple of ``node`` (form ids replaced by forms)."""
    table = cert.table

    def rec(fid):
        form = table[fid]
        if len(form) == 1:
            return form
        return (form[0],) + tuple(tuple((rec(f), et, w) for f, et, w in side) for side in form[1:])

    return rec(cert.forms[node])


def certifies(graph, labels, direction="in", initial=None) -> bool:
    """True iff ``labels`` is the partition of the stable tree forms."""
    from .partition import canonical

    cert = tree_certificates(graph, direction, None, initial)
    return bool(np.array_equal(canonical(labels), cert.labels))
