"""The base of a coloured DAG model written back as ONNX (docs/design.md sections 5-6).

Modules: :mod:`.groups` (which positions are kept), :mod:`.axis` (the
compressed view of one unit axis), :mod:`.writer` (the model being written),
:mod:`.registry` (one rule per record kind) and the rules by record family:
:mod:`.linear`, :mod:`.elementwise`, :mod:`.norm`, :mod:`.recurrent`,
:mod:`.attention`.

Positions that element-wise ops, contractions and recurrences tie together
(a residual stream's every writer and reader, an LSTM's gates, cell and hidden
state) form one *family*; its positions are grouped by the meet of the colours
of all its node sets (the AND rule), and one position per group is kept.
Because nodes of one colour carry equal values, keeping any refinement of the
colouring is exact; a family whose layout cannot be rewritten (units on two
axes of one tensor, as attention heads, or a computed shape that names a
unit axis) keeps every position, and the report says why.

Rewrites, for kept positions ``q`` each standing for a group ``G(q)``:
- linear weights: ``W_hat[r, q] = mean_{i in G(r)} sum_{k in G(q)} W[i, k]``
  (rows: the mean over the output fiber, the papers' sum is wrong for
  biases; columns: the sum over the input group); biases the mean;
- the rescaling merge (``scales``, docs/design.md section 4): rows and
  biases divided by the node's scale, next layers' columns summed with the
  scales (the formulas: :mod:`.axis`);
- per-unit constants (bias adds, PRelu, LayerNorm's gamma/beta): the mean
  over the group; BatchNorm: the group's mean affine map (``channel_norm``);
- sums over a unit axis (ReduceMean/ReduceSum, LayerNorm's statistics,
  softmax's denominator, q.k over head dims): weighted by the group sizes
  ``m``, so that the compressed model sums what the original summed;
- LSTM/GRU: ``hidden_size`` = number of hidden groups, gate blocks
  compressed with the hidden grouping, ``R`` by rows and columns;
- q.k: a kept head dim standing for ``m`` (q colour, k colour) equal products
  has its q row (and q's bias) multiplied by ``m`` when nothing but the score
  reads q (else a Mul before the score); the scores' original 1/sqrt(d_k)
  stays (computed shapes report the original sizes);
- a packed projection (torch's ``in_proj``: q, k, v as one MatMul, reshaped to
  (..., 3, d) and cut) is read as Slices of its output, so q, k and v keep
  their own sizes; only the heads of each keep equal sizes.
"""
from __future__ import annotations

from fibgraph.progress import task

from . import attention, elementwise, linear, norm, recurrent  # noqa: F401  (the rules register)
from .groups import dag_groups, group_columns
from .registry import RULES
from .writer import Writer

__all__ = ["RULES", "Writer", "dag_groups", "group_columns", "write_dag_base"]


def write_dag_base(imp, labels, mode="merge", keep_pref=None, groups=None, scales=None, dry=False, spill=None):
    """The compressed ONNX model of ``imp`` under the colouring ``labels``;
    returns ``(model, gid, kept, why)``.

    ``mode="merge"`` (the base): a kept node stands for its group (rows
    averaged, input columns summed, multiplicities in sums over units).
    ``mode="prune"``: the groups only say which nodes vanish; the kept node of
    each group (the one with the largest ``keep_pref``, per node) keeps its
    rows as they are, the input columns of the other members are dropped, and
    every multiplicity is 1 (LayerNorm, means and softmax over the kept units).
    ``groups``: ``dag_groups(imp, labels, keep_pref)`` when the caller has it.
    ``scales``: per node, the rescaling merge's scales (``Refinement.scales``;
    None: all 1).  ``dry``: the new weights are written as shapes only (for a
    parameter count: the model cannot run).  ``spill``: a
    :class:`fibgraph.importers.onnx.spill.Spill` the new weights go to (the
    model is then lean and reads them from its file while the spill is open)."""
    if mode not in ("merge", "prune"):
        raise ValueError(f"mode must be 'merge' or 'prune', got {mode!r}")
    records = imp.records
    gid, kept, why = groups if groups is not None else dag_groups(imp, labels, keep_pref)
    w = Writer(imp, gid, kept, prune=mode == "prune", scales=scales, labels=labels, dry=dry, spill=spill)
    with task("writing the base", total=len(records) + 1) as advance:
        for rec in records:
            w.write(rec)
            if imp.graph.relieve is not None:   # the record's weight pages (a mapped file) go back
                imp.graph.relieve()
            advance(1)
        w.cuts()
        attention.packed_cuts(w)
        w.shapes()
        advance(1)
        return w.finish(), gid, kept, why
