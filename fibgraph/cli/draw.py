"""``fibgraph draw``: a layered picture of a coloured model (:mod:`fibgraph.draw`).

The layers are named by their module names (:func:`fibgraph.importers.onnx.groups.space_display_names`);
big models are drawn aggregated (one box per class) or by layer range (``--layers``).
"""
from __future__ import annotations

import os

import click

__all__ = ["draw_model", "CLASS_WORD"]

CLASS_WORD = {"fibration": "fiber", "opfibration": "opfiber", "opfibration-flavoured": "opfiber",
              "covering": "cover", "covering-strict": "cover", "automorphism": "orbit"}


def draw_model(model, out, symmetry="fibration", eps=0.0, eps_file=None, linkage="complete", metric="cosine",
               rescale=True, rtol=None, max_edges=3, layers=None, aggregate=None, dpi=200, title=None,
               err=True) -> dict:
    """Colour ``model`` and draw it to ``out`` (.svg, .pdf, .png, .dot); prints
    one line to stderr when the picture is aggregated automatically."""
    from fibgraph.importers.api import color_model
    from fibgraph.importers.onnx.groups import space_display_names

    from ..draw import FORMATS, draw_layered
    from ..engine import DEFAULT_RTOL
    from ..errors import InputError
    from ..fileio import check_output_path

    ext = os.path.splitext(os.fspath(out))[1].lower()
    if ext not in FORMATS:
        raise InputError(f"{out}: output must end in {', '.join(FORMATS)}")
    if dpi is not None and not 20 <= dpi <= 1200:
        raise InputError(f"--dpi must be in [20, 1200], got {dpi}")
    check_output_path(out, model)
    _, imp, col = color_model(model, symmetry, eps, eps_file, linkage, metric, rescale,
                              DEFAULT_RTOL if rtol is None else rtol)
    info = draw_layered(col.graph, col.labels, out, max_edges=max_edges, names=space_display_names(imp),
                        layers=layers, aggregate=aggregate, dpi=dpi, class_word=CLASS_WORD.get(symmetry, "class"),
                        title=title or f"{os.path.basename(os.fspath(model))}: {symmetry}, eps={eps:g}")
    if info.get("reason"):
        click.echo(f"note: {info['reason']}", err=err)
    return info
