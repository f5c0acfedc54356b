"""Criteria from the command line's options and eps files: eps checked, one
criterion per weight (``{"<weight name>": eps, "*": default}``), the
symmetries whose colourings :func:`fibgraph.importers.api.compress_model` may compress."""
from __future__ import annotations

import json
import math
import os

from fibgraph.engine import DEFAULT_RTOL, make_criterion
from fibgraph.errors import InputError
from fibgraph.fileio import check_regular
from fibgraph.limits import EPS_FILE_MAX, format_size

__all__ = ["COMPRESS_SYMMETRIES", "check_eps", "check_options", "make_criteria", "read_eps_table",
           "criteria_from_table"]


COMPRESS_SYMMETRIES = ("fibration", "covering", "covering-strict", "automorphism")


def check_eps(eps, where="--eps"):
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"{where}: eps must be a number, got {eps!r}") from None
    if not math.isfinite(eps) or eps < 0 or eps >= 2:
        raise InputError(f"{where}: eps must be in [0, 2) (0 = exact fibers), got {eps}")
    return eps


def make_criteria(names, eps=0.0, eps_file=None, linkage="complete", metric="cosine",
                  rescale=True, rtol=DEFAULT_RTOL):
    """Criterion per layer: ``eps`` for all, overridden per layer by ``eps_file``
    (JSON ``{"<weight name>": eps, ...}``; the key ``"*"`` sets the default).
    ``names``: the model's layer (weight) names, or an object with ``layers``
    (each with a ``name``)."""
    eps = check_options(eps, linkage, metric)
    if hasattr(names, "layers"):
        names = [ly.name for ly in names.layers]
    table = {} if eps_file is None else read_eps_table(eps_file, list(names))
    return criteria_from_table(table, eps, linkage, metric, rescale, rtol, where=eps_file)


def read_eps_table(path, names, aliases=None):
    """``{layer weight name: eps}`` from a JSON eps file; names must be layers
    of the model (``"*"`` sets the default).  ``aliases``: ``{other name:
    [weight names]}`` (the torch module names of a model exported from torch,
    :func:`fibgraph.importers.onnx.groups.eps_names`), accepted as keys too and
    given to each of their weights."""
    check_regular(path, "eps file")
    table = _read_json_object(path)
    for k, v in table.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"{path}: eps of {k!r} must be a number, got {json.dumps(v)[:40]}")
    known = set(names)
    aliases = {a: ws for a, ws in (aliases or {}).items() if a not in known}
    unknown = sorted(k for k in table if k != "*" and k not in known and k not in aliases)
    if unknown:
        aliased = {w for ws in aliases.values() for w in ws}
        shown = sorted(aliases) + [n for n in names if n not in aliased] if aliases else list(names)
        raise InputError(f"{path}: layers not in the model: {', '.join(unknown)} "
                         f"(layers: {', '.join(shown)})")
    out = {}
    for k, v in table.items():
        for w in aliases.get(k, [k]):
            out[w] = v
    return out


def _parse_int(text):
    if len(text.lstrip("-")) > 20:
        raise InputError(f"integer with {len(text.lstrip('-'))} digits")
    return int(text)


def _read_json_object(path):
    """A small JSON object from ``path``: at most :data:`fibgraph.limits.EPS_FILE_MAX`
    bytes (checked before reading, and never more read), UTF-8, no giant integers,
    no deep nesting."""
    limit = EPS_FILE_MAX
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise InputError(f"{path}: eps file is {format_size(size)}, over the {format_size(limit)} "
                             "an eps file may have")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read eps file ({e.strerror})") from None
    if len(data) > limit:
        raise InputError(f"{path}: eps file is over the {format_size(limit)} an eps file may have")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: eps file is not UTF-8 text (byte {e.start})") from None
    try:
        table = json.loads(text, parse_int=_parse_int)
    except InputError as e:
        raise InputError(f"{path}: eps file holds an {e}; eps must be numbers in [0, 2)") from None
    except RecursionError:
        raise InputError(f"{path}: eps file is nested too deeply; it must be a flat JSON object "
                         "{layer weight name: eps}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(table, dict):
        raise InputError(f"{path}: eps file must be a JSON object {{layer weight name: eps}}")
    return table


def criteria_from_table(table, eps=0.0, linkage="complete", metric="cosine", rescale=True,
                        rtol=DEFAULT_RTOL, where="eps"):
    """``{None: default criterion, name: criterion}`` from ``{name: eps}``
    (``"*"`` sets the default; eps 0 means exact)."""
    crit = {None: make_criterion(check_eps(eps), linkage, metric, rescale, rtol)}
    for k, v in table.items():
        e = check_eps(v, f"{where}[{k!r}]")
        crit[None if k == "*" else k] = make_criterion(e, linkage, metric, rescale, rtol)
    return crit


def check_options(eps, linkage, metric):
    if linkage not in ("complete", "average"):
        raise InputError(f"--linkage must be complete or average, got {linkage!r}")
    if metric not in ("cosine", "euclidean"):
        raise InputError(f"--metric must be cosine or euclidean, got {metric!r}")
    return check_eps(eps)
