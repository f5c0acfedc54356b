"""Layered pictures of a coloured network graph (matplotlib), fit for a paper.

Columns are the graph's levels (inputs first; constant/bias nodes are left
out), named by the layer names given (the importer's module names: ``fc1``,
not ``onnx::MatMul_12``).  Two modes:

- *units*: one dot per unit, grouped by class inside a column so that a fiber
  is a band; a class of two or more units has its own colour, singletons are
  grey.  Only the ``max_edges`` strongest incoming edges of each unit are
  drawn; an edge's width and opacity grow with ``|weight|`` and its colour
  gives the sign.
- *aggregated*: one box per class of a column, its height proportional to the
  class size and its size written beside it; the column's singletons share
  one grey box; past :data:`MAX_BOXES` classes the smallest are pooled in
  one "other" box.  Edges between boxes carry the summed ``|weight|`` of the
  edges between their units.

Above :data:`AUTO_AGGREGATE_UNITS` units in all, or :data:`AUTO_AGGREGATE_COLUMN`
in one column, the picture is aggregated unless asked otherwise; ``layers``
draws a range of columns (``"2:4"``, Python style: 2 and 3) or named ones.
The figure is at most :data:`MAX_INCHES` (PNG at 200 dpi: 3200 x 2000 px).
Output by extension: ``.svg`` and ``.pdf`` (vector, text kept as text),
``.png`` (200 dpi by default) and ``.dot`` (the drawn units and edges as
Graphviz text, positions included).  One font family, DejaVu Sans
(shipped with matplotlib), everywhere.
"""
from __future__ import annotations

import colorsys
import os

import numpy as np

from .errors import InputError
from .fileio import atomic_path

__all__ = ["draw_layered", "palette", "select_columns", "FORMATS"]

FORMATS = (".png", ".svg", ".pdf", ".dot")
FONT = "DejaVu Sans"
DPI = 200
MAX_NODES = 4000                  # most units drawn one by one
AUTO_AGGREGATE_UNITS = 600        # above this many units: aggregated unless asked otherwise
AUTO_AGGREGATE_COLUMN = 96        # ... or above this many in one column
MAX_BOXES = 24                    # classes drawn per column when aggregated (the rest pooled)
MAX_COLUMNS = 40
MAX_INCHES = (16.0, 10.0)
GREY = "#c8c8c8"
POS, NEG = "#1f5a96", "#b2182b"
SKIP_KINDS = ("bias", "const")


def palette(k):
    """``k`` well-separated hex colours (golden-ratio hues, alternating saturation and value)."""
    out = []
    for i in range(k):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.55 + 0.3 * (i % 2), 0.92 - 0.17 * (i % 3 == 2))
        out.append("#%02x%02x%02x" % (int(r * 255), int(g * 255), int(b * 255)))
    return out


def _columns(graph, names):
    """[(name, node ids)] per level with drawable nodes."""
    kind = np.asarray(graph.kind, dtype=object)
    keep = ~np.isin(kind.astype(str), SKIP_KINDS)
    levels = graph.levels if graph.levels is not None else [np.arange(graph.n)]
    lname = list(names) if names is not None and len(names) == len(graph.layer_names) else \
        [str(x) for x in graph.layer_names]
    cols = []
    for lv in levels:
        lv = np.asarray(lv, dtype=np.int64)
        lv = lv[keep[lv]]
        if not lv.size:
            continue
        sets = list(dict.fromkeys(int(x) for x in graph.layer[lv]))
        title = ", ".join(lname[s] for s in sets[:2]) + (f" +{len(sets) - 2}" if len(sets) > 2 else "")
        cols.append((title, lv, [lname[s] for s in sets]))
    return cols


def select_columns(cols, spec):
    """The columns named by ``spec``: ``"A:B"`` (Python slice of column
    indices, inputs = 0), ``"A"`` (one index) or comma-separated layer names."""
    if spec is None or str(spec).strip() == "":
        return cols
    spec = str(spec).strip()
    n = len(cols)
    if all(p.strip().lstrip("-").isdigit() or p.strip() == "" for p in spec.split(":")) and spec.count(":") <= 1:
        parts = spec.split(":")
        try:
            if len(parts) == 1:
                i = int(parts[0])
                sel = [cols[i]]
            else:
                sel = cols[slice(int(parts[0]) if parts[0].strip() else None,
                                 int(parts[1]) if parts[1].strip() else None)]
        except IndexError:
            sel = []
        if not sel:
            raise InputError(f"--layers {spec}: selects no layer; columns are 0 (inputs) to {n - 1}")
        return sel
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    known = {nm for c in cols for nm in c[2]}
    missing = [w for w in wanted if w not in known]
    if missing:
        shown = ", ".join(list(dict.fromkeys(nm for c in cols for nm in c[2]))[:12])
        raise InputError(f"--layers: no layer named {', '.join(missing)} (layers: {shown}"
                         f"{', ...' if len(known) > 12 else ''})")
    return [c for c in cols if any(nm in wanted for nm in c[2])]


def _edges(graph, drawn):
    """(src, dst, signed weight, |weight|) of the summed edges between drawn nodes."""
    from .orbits import weighted_edges

    src, dst, _, vals, _ = weighted_edges(graph)
    ok = drawn[src] & drawn[dst] & (src != dst)
    w = vals[ok].sum(axis=1)
    mag = np.abs(vals[ok]).sum(axis=1)
    return src[ok], dst[ok], w, mag


def _top_incoming(dst, mag, k):
    """Mask of the ``k`` largest-magnitude edges into every destination."""
    if not dst.size or k <= 0:
        return np.zeros(dst.size, bool)
    order = np.lexsort((-mag, dst))
    d = dst[order]
    start = np.r_[0, np.flatnonzero(d[1:] != d[:-1]) + 1]
    first = np.repeat(start, np.diff(np.r_[start, d.size]))
    keep = np.zeros(dst.size, bool)
    keep[order[(np.arange(d.size) - first) < k]] = True
    return keep & (mag > 0)


def _edge_style(w, mag, floor=0.15):
    """Line widths and RGBA colours: width and opacity grow with ``|weight|``
    (relative to the largest), colour by sign."""
    from matplotlib.colors import to_rgba

    rel = mag / mag.max() if mag.size and mag.max() > 0 else mag
    widths = 0.25 + 2.25 * rel
    rgba = np.where((np.asarray(w) >= 0)[:, None], np.array(to_rgba(POS)), np.array(to_rgba(NEG)))
    rgba[:, 3] = floor + (0.85 - floor) * rel
    return widths, rgba


def _layout_units(cols, labels, n):
    """x and y per node (NaN where not drawn): columns at x = 0, 1, ...; in a
    column the units in class order, centred on the tallest column."""
    px, py = np.full(n, np.nan), np.full(n, np.nan)
    tallest = max(c[1].size for c in cols)
    for x, (_, lv, _) in enumerate(cols):
        _, inv, cnt = np.unique(labels[lv], return_inverse=True, return_counts=True)
        size = cnt[inv.reshape(-1)]
        # largest classes on top, singletons at the bottom, members together
        order = lv[np.lexsort((lv, labels[lv], -size, size == 1))]
        off = (tallest - order.size) / 2.0
        px[order] = x
        py[order] = tallest - 1 - (off + np.arange(order.size))
    return px, py, tallest


def _class_colours(labels, nodes):
    """Colour per class with two or more of the drawn nodes (largest first)."""
    cls, cnt = np.unique(labels[nodes], return_counts=True)
    multi = cls[cnt > 1][np.argsort(-cnt[cnt > 1], kind="stable")]
    return dict(zip(multi.tolist(), palette(len(multi)))), dict(zip(cls.tolist(), cnt.tolist()))


def _boxes(cols, labels, colmap, word):
    """Aggregated boxes: per column, (label text, size, colour, member nodes)."""
    out = []
    for _, lv, _ in cols:
        cls, inv, cnt = np.unique(labels[lv], return_inverse=True, return_counts=True)
        order = np.argsort(-cnt, kind="stable")
        multi = [c for c in order if cnt[c] > 1]
        boxes = []
        for c in multi[:MAX_BOXES]:
            boxes.append((f"{cnt[c]} units", int(cnt[c]), colmap.get(int(cls[c]), GREY), lv[inv == c]))
        rest = multi[MAX_BOXES:]
        if rest:
            members = lv[np.isin(inv, rest)]
            boxes.append((f"{len(rest)} more {word}s: {members.size} units", int(members.size), "#8c8c8c", members))
        single = [c for c in order if cnt[c] == 1]
        if single:
            members = lv[np.isin(inv, single)]
            boxes.append((f"{members.size} singleton{'s' * (members.size != 1)}", int(members.size), GREY,
                          members))
        out.append(boxes)
    return out


def draw_layered(graph, labels, path, max_edges=3, title=None, dpi=DPI, names=None, layers=None,
                 aggregate=None, class_word="fiber") -> dict:
    """Draw ``graph`` coloured by ``labels`` to ``path`` (see module doc).

    ``names``: a display name per layer (``graph.layer_names``' order);
    ``layers``: a column selection (:func:`select_columns`); ``aggregate``:
    True, False or None (automatic); ``class_word``: what a class is called in
    the legend (fiber, opfiber, cover, orbit).  Returns ``{"nodes", "columns",
    "aggregated", "reason", "size_px"}``."""
    labels = np.asarray(labels, dtype=np.int64)
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise InputError(f"{path}: output must end in {', '.join(FORMATS)}")
    cols = select_columns(_columns(graph, names), layers)
    if len(cols) > MAX_COLUMNS:
        raise InputError(f"{len(cols)} layers to draw, at most {MAX_COLUMNS} fit a figure: "
                         f"pick some with --layers A:B (e.g. --layers 0:{MAX_COLUMNS // 2})")
    units = int(sum(c[1].size for c in cols))
    widest = max(c[1].size for c in cols)
    reason = None
    if aggregate is None:
        if units > AUTO_AGGREGATE_UNITS or widest > AUTO_AGGREGATE_COLUMN:
            aggregate = True
            reason = (f"{units} units (widest layer {widest}): drawn aggregated, one box per {class_word}; "
                      "draw units one by one with --layers A:B --no-aggregate")
        else:
            aggregate = False
    elif not aggregate and units > MAX_NODES:
        raise InputError(f"{units} units are too many to draw one by one (at most {MAX_NODES}): "
                         "use --aggregate, or --layers A:B for a range of layers")
    if aggregate and ext == ".dot":
        raise InputError(f".dot output draws units one by one ({units} units here): pick layers with --layers A:B "
                         "and --no-aggregate, or write .svg/.pdf/.png for an aggregated picture")
    drawn = np.zeros(graph.n, bool)
    for _, lv, _ in cols:
        drawn[lv] = True
    nodes = np.flatnonzero(drawn)
    colmap, _ = _class_colours(labels, nodes)
    src, dst, w, mag = _edges(graph, drawn)
    if ext == ".dot":
        px, py, _ = _layout_units(cols, labels, graph.n)
        keep = _top_incoming(dst, mag, max_edges)
        _write_dot(path, nodes, px, py, labels, colmap, src[keep], dst[keep], mag[keep], title)
        return {"nodes": int(nodes.size), "columns": len(cols), "aggregated": False, "reason": None, "size_px": None}
    info = _render(path, ext, cols, labels, colmap, (src, dst, w, mag), max_edges, title, dpi, aggregate,
                   class_word, np.asarray(graph.kind, dtype=object).astype(str))
    info.update(columns=len(cols), aggregated=bool(aggregate), reason=reason)
    return info


def _render(path, ext, cols, labels, colmap, edges, max_edges, title, dpi, aggregate, class_word, kinds):
    import matplotlib
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    src, dst, w, mag = edges
    ncol = len(cols)
    rc = {"font.family": FONT, "font.size": 8, "svg.fonttype": "none", "pdf.fonttype": 42,
          "svg.hashsalt": "fibgraph"}
    with matplotlib.rc_context(rc):
        if aggregate:
            boxes = _boxes(cols, labels, colmap, class_word)
            tallest = max(len(b) for b in boxes)
            height = min(MAX_INCHES[1], 2.4 + 0.32 * tallest)
        else:
            px, py, tallest = _layout_units(cols, labels, labels.size)
            height = min(MAX_INCHES[1], 2.4 + 0.1 * tallest)
        width = min(MAX_INCHES[0], 1.6 + 1.7 * ncol)
        fig = Figure(figsize=(width, height), layout="constrained")
        ax = fig.add_subplot()
        ax.set_axis_off()
        if aggregate:
            n_drawn = _draw_boxes(ax, boxes, src, dst, w, mag, LineCollection, Rectangle)
            ytop = 1.0
        else:
            n_drawn = _draw_units(ax, px, py, tallest, labels, colmap, src, dst, w, mag, max_edges, height,
                                  LineCollection)
            ytop = tallest - 0.5
        tilt = ncol > 8                    # many columns: one slanted line per column title
        longest = 0
        for x, (name, lv, _) in enumerate(cols):
            k = len(np.unique(labels[lv]))
            kind = "" if kinds[lv[0]] == name else f"{kinds[lv[0]]}: "
            if tilt:
                txt = f"{name}: {lv.size} units, {k} {class_word}s"
                ax.text(x, ytop, txt, ha="left", va="bottom", fontsize=7, rotation=35, rotation_mode="anchor")
                longest = max(longest, len(txt))
            else:
                ax.text(x, ytop, f"{name}\n{kind}{lv.size} units, {k} {class_word}s", ha="center",
                        va="bottom", fontsize=8)
        ax.set_xlim(-0.6, ncol - 0.4 + (0.03 * longest if tilt else 0))
        if title:
            # room for the column titles above the axes (constrained layout does not see them)
            ax.set_title(title, fontsize=10, pad=26 if not tilt else 10 + 0.57 * 7 * 0.6 * longest)
        where = {}
        for x, (name, lv, _) in enumerate(cols):
            for c in np.unique(labels[lv]).tolist():
                where.setdefault(c, name)
        handles = _legend(colmap, labels, class_word, aggregate, Patch, Line2D, max_edges, where)
        fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=7,
                   frameon=False)
        kw = {"dpi": dpi} if ext == ".png" else {}
        with atomic_path(path, suffix=ext) as tmp:
            fig.savefig(tmp, format=ext[1:], **kw)
        px = None
        if ext == ".png":                  # the size written (PNG header: width, height at bytes 16-24)
            with open(path, "rb") as f:
                head = f.read(24)
            px = (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
    return {"nodes": n_drawn, "size_px": px}


def _draw_units(ax, px, py, tallest, labels, colmap, src, dst, w, mag, max_edges, height, LineCollection):
    keep = _top_incoming(dst, mag, max_edges)
    s, d = src[keep], dst[keep]
    if s.size:
        segs = np.stack([np.stack([px[s], py[s]], 1), np.stack([px[d], py[d]], 1)], 1)
        widths, rgba = _edge_style(w[keep], mag[keep])
        ax.add_collection(LineCollection(segs, linewidths=widths, colors=rgba, zorder=1,
                                         capstyle="round"))
    ids = np.flatnonzero(~np.isnan(px))
    fill = [colmap.get(int(c), GREY) for c in labels[ids]]
    # dot diameter: at most the spacing between units (points), between 2 and 9 pt
    spacing_pt = (height - 2.4) * 72.0 / max(tallest, 1)
    diam = float(np.clip(0.8 * spacing_pt, 2.0, 9.0))
    ax.scatter(px[ids], py[ids], s=diam ** 2, c=fill, edgecolors="#404040", linewidths=0.3, zorder=2)
    ax.set_ylim(-0.8, tallest + 0.2)
    return int(ids.size)


def _draw_boxes(ax, boxes, src, dst, w, mag, LineCollection, Rectangle):
    """One rectangle per box, heights proportional to size, each column's
    stack filling [0, 1]; edges between boxes by summed |weight|."""
    gap = 0.012
    box_of = {}
    centres = []
    for x, col in enumerate(boxes):
        total = sum(b[1] for b in col)
        free = 1.0 - gap * (len(col) - 1)
        y = 1.0
        for text, size, colour, members in col:
            h = max(free * size / total, 0.004)
            rect = Rectangle((x - 0.12, y - h), 0.24, h, facecolor=colour, edgecolor="#404040", linewidth=0.4,
                             zorder=2)
            ax.add_patch(rect)
            ax.text(x + 0.15, y - h / 2, text, va="center", ha="left", fontsize=6.5, zorder=3)
            for m in members:
                box_of[int(m)] = len(centres)
            centres.append((float(x), y - h / 2))
            y -= h + gap
    centres = np.array(centres)
    if src.size:
        lut = np.full(int(max(src.max(), dst.max())) + 1, -1, np.int64)
        ids = np.fromiter(box_of.keys(), np.int64)
        lut[ids] = np.fromiter(box_of.values(), np.int64)
        bs, bd = lut[src], lut[dst]
        ok = (bs >= 0) & (bd >= 0) & (bs != bd)
        code = bs[ok] * len(centres) + bd[ok]
        u, inv = np.unique(code, return_inverse=True)
        tot = np.bincount(inv, weights=mag[ok])
        sgn = np.bincount(inv, weights=w[ok])
        if u.size:
            segs = np.stack([centres[u // len(centres)], centres[u % len(centres)]], 1)
            widths, rgba = _edge_style(sgn, np.sqrt(tot), floor=0.3)
            ax.add_collection(LineCollection(segs, linewidths=widths * 1.4, colors=rgba, zorder=1))
    ax.set_ylim(-0.03, 1.08)
    return len(box_of)


def _legend(colmap, labels, class_word, aggregate, Patch, Line2D, max_edges, where):
    hs = []
    sizes = {c: int(np.count_nonzero(labels == c)) for c in list(colmap)[:6]}
    for c, colour in list(colmap.items())[:6]:
        hs.append(Patch(facecolor=colour, edgecolor="#404040", linewidth=0.4,
                        label=f"{class_word} of {sizes[c]} units ({where.get(c, '')})"))
    if len(colmap) > 6:
        hs.append(Patch(facecolor="white", edgecolor="white",
                        label=f"+ {len(colmap) - 6} more {class_word}s, one colour each"))
    hs.append(Patch(facecolor=GREY, edgecolor="#404040", linewidth=0.4,
                    label=f"singleton (a unit alone in its {class_word})"))
    what = "sum between boxes" if aggregate else f"{max_edges} strongest inputs per unit"
    hs.append(Line2D([], [], color=POS, lw=1.6, label=f"positive weight ({what})"))
    hs.append(Line2D([], [], color=NEG, lw=1.6, label="negative weight; width and opacity grow with |weight|"))
    return hs


def _write_dot(path, nodes, px, py, labels, colmap, src, dst, mag, title):
    lines = ["digraph fibgraph {", '  graph [splines=false, outputorder=edgesfirst' +
             (f', label="{_esc(title)}", labelloc=t' if title else "") + "];",
             '  node [shape=circle, style=filled, label="", width=0.16, fixedsize=true, fontname="DejaVu Sans"];',
             "  edge [arrowhead=none];"]
    lines += [f'  {v} [pos="{px[v] * 220:.1f},{py[v] * 18:.1f}!", fillcolor="{colmap.get(int(labels[v]), GREY)}"];'
              for v in nodes.tolist()]
    top = mag.max() if mag.size else 1.0
    lines += [f"  {a} -> {b} [penwidth={0.3 + 2.2 * m / top:.2f}];"
              for a, b, m in zip(src.tolist(), dst.tolist(), mag.tolist())]
    lines.append("}")
    with atomic_path(path, suffix=".dot") as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")


def _esc(s):
    return str(s).replace("\\", "\\\\").replace('"', '\\"')
