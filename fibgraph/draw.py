"""Layered pictures of a coloured network graph (pygraphviz, fixed positions).

Each level (inputs, then each layer) is a column; within a column the units
are grouped by colour so that a fiber forms a band.  Units in a fiber of two
or more share a fill colour; singletons are pale grey.  For legibility only
the ``max_edges`` strongest incoming edges of each unit are drawn.
"""
from __future__ import annotations

import colorsys
import contextlib
import os
import sys
import tempfile

import numpy as np

from .errors import InputError
from .fileio import atomic_path

__all__ = ["draw_layered", "palette"]

MAX_NODES = 4000


def palette(k):
    """``k`` well-separated hex colours (golden-ratio hues)."""
    out = []
    for i in range(k):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.55 + 0.3 * (i % 2), 0.95 - 0.15 * (i % 3 == 2))
        out.append("#%02x%02x%02x" % (int(r * 255), int(g * 255), int(b * 255)))
    return out


@contextlib.contextmanager
def _quiet_fontconfig():
    """Graphviz's bundled fontconfig warns on stderr about newer system config
    files; keep what it writes to fd 2 and pass on every line but those."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as cap:
        os.dup2(cap.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            cap.seek(0)
            for line in cap.read().decode(errors="replace").splitlines():
                if line.strip() and not line.startswith("Fontconfig warning"):
                    print(line, file=sys.stderr)


def draw_layered(graph, labels, path, max_edges=3, title=None, dpi=110):
    """Draw ``graph`` coloured by ``labels`` to ``path`` (.png, .svg or .dot)."""
    import pygraphviz as pgv

    labels = np.asarray(labels)
    keep = np.array([k != "bias" for k in graph.kind])
    if keep.sum() > MAX_NODES:
        raise InputError(f"the graph has {int(keep.sum())} units; drawing is limited to {MAX_NODES}")
    A = pgv.AGraph(directed=True, strict=False)
    A.graph_attr.update(dpi=str(dpi), splines="false", outputorder="edgesfirst", bgcolor="white", fontsize="18",
                        fontname="Helvetica")
    if title:
        A.graph_attr.update(label=title, labelloc="t")
    A.node_attr.update(shape="circle", style="filled", label="", width="0.16", fixedsize="true",
                       penwidth="0.4")
    A.edge_attr.update(arrowhead="none", penwidth="0.5", color="#00000040")
    sizes = np.bincount(labels)
    multi = np.flatnonzero(sizes > 1)
    colmap = dict(zip(multi.tolist(), palette(len(multi))))
    levels = graph.levels if graph.levels is not None else [np.arange(graph.n)]
    dx, dy = 220.0, 18.0
    pos = {}
    for x, lv in enumerate(levels):
        lv = np.asarray([v for v in lv if keep[v]], dtype=np.int64)
        order = lv[np.lexsort((lv, labels[lv]))]
        h = (order.size - 1) * dy / 2
        name = graph.layer_names[graph.layer[lv[0]]] if lv.size else ""
        for y, v in enumerate(order):
            pos[int(v)] = (x * dx, h - y * dy)
            A.add_node(int(v), pos=f"{x * dx:.1f},{h - y * dy:.1f}",
                       fillcolor=colmap.get(int(labels[v]), "#e6e6e6"),
                       tooltip=graph.node_label(int(v)))
        if lv.size:
            A.add_node(f"L{x}", shape="plaintext", style="", label=f"{name}\n{lv.size} units, "
                       f"{len(np.unique(labels[lv]))} colours", width="2", fontsize="12",
                       pos=f"{x * dx:.1f},{h + 40:.1f}")
    for b in graph.blocks:
        if not (keep[b.src].all() and keep[b.dst].all()):
            continue
        if b.dense:
            mag = np.abs(b.weight).sum(axis=2)
            k = min(max_edges, mag.shape[1])
            if k <= 0:
                continue
            top = np.argpartition(-mag, k - 1, axis=1)[:, :k]
            for r in range(mag.shape[0]):
                for c in top[r]:
                    if mag[r, c] > 0:
                        A.add_edge(int(b.src[c]), int(b.dst[r]))
        else:
            s, d, v, _ = b.coo()
            for u, w in zip(s[: 20 * max_edges * 100], d[: 20 * max_edges * 100]):
                if int(u) in pos and int(w) in pos:
                    A.add_edge(int(u), int(w))
    ext = os.path.splitext(path)[1].lower()
    with atomic_path(path, suffix=ext) as tmp:
        if ext == ".dot":
            A.write(tmp)
        else:
            with _quiet_fontconfig():
                A.draw(tmp, format=ext[1:], prog="nop2")
    return len(pos)
