"""Saving study figures: PNG and SVG side by side, one font.

Every study figure (``examples/study_*.py``, the sweep plots) is written as
a PNG at :data:`DPI` and as an SVG beside it (same stem; text kept as text),
in one font family, DejaVu Sans (shipped with matplotlib), so that a figure
can go into a paper as a vector file.  :func:`paper_rc` is the rc settings
to draw under; :func:`save_figure` writes both files atomically.
"""
from __future__ import annotations

import os

from .fileio import atomic_path

__all__ = ["FONT", "DPI", "paper_rc", "save_figure"]

FONT = "DejaVu Sans"
DPI = 200


def paper_rc() -> dict:
    """matplotlib rc settings: one font family; SVG and PDF text kept as text."""
    return {"font.family": FONT, "svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "fibgraph"}


def save_figure(fig, path, dpi=DPI, same_layout=False) -> list:
    """Write ``fig`` to ``path`` (a .png, at ``dpi``) and to the .svg beside it; returns both paths.
    ``same_layout``: the figure is laid out once, for the PNG, and the SVG keeps those positions."""
    stem, ext = os.path.splitext(os.fspath(path))
    if ext.lower() != ".png":
        raise ValueError(f"{path}: save_figure writes a .png and the .svg beside it")
    d = os.path.dirname(os.path.abspath(stem))
    os.makedirs(d, exist_ok=True)
    out = []
    for fmt in ("png", "svg"):
        p = f"{stem}.{fmt}"
        with atomic_path(p, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
        out.append(p)
        if same_layout:
            fig.set_layout_engine("none")
    return out
