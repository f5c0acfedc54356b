"""MLPs with planted symmetries, for tests, examples and the theorem checks.

Balance conditions are linear equalities in the weights, so a random weight
matrix projected onto their solution space (least squares) satisfies them to
rounding and is otherwise generic: the coarsest balanced colourings of the
result are the planted partitions (unless the random draw hits a
coincidence, which has probability 0).

For one weight ``W (n_out, n_in)`` and bias ``b (n_out)``:

- in-balance of the row partition ``R`` over the column partition ``C``
  (fibers): rows of one class of ``R`` have equal sums over every class of
  ``C`` and equal biases;
- out-balance of the column partition ``K`` over the row partition ``Q``
  (opfibers): columns of one class of ``K`` have equal sums over every class
  of ``Q``.

:func:`planted_mlp` chains layers: level 0 (inputs) and the last level
(outputs) are singletons unless given.  With ``fibers == opfibers == P`` the
partition ``P`` is balanced both ways: a strict covering.  With
``flavoured=True`` the out-balance of level ``l - 1`` is taken over the
flavoured classes of level ``l`` (``meet(fibers[l], opfibers[l])``), as the
flavoured opfibration requires.
"""
from __future__ import annotations

import numpy as np

from .partition import canonical, meet

__all__ = ["balanced_layer", "planted_mlp", "balance_violation"]


def _pair_rows(part):
    """(i, j) of consecutive members of each class (generates the class equalities)."""
    part = canonical(part)
    out = []
    for c in range(int(part.max()) + 1 if part.size else 0):
        m = np.flatnonzero(part == c)
        out += list(zip(m[:-1], m[1:]))
    return out


def balanced_layer(rng, n_out, n_in, in_rows=None, in_cols=None, out_cols=None, out_rows=None,
                   scale=1.0, bias_scale=0.5, bias=True):
    """Random ``(W, b)`` satisfying the planted balance conditions (module doc)."""
    nW = n_out * n_in
    nvar = nW + n_out
    cons = []
    if in_rows is not None:
        C = canonical(np.arange(n_in) if in_cols is None else in_cols)
        for i, j in _pair_rows(in_rows):
            for c in range(int(C.max()) + 1):
                row = np.zeros(nvar)
                ks = np.flatnonzero(C == c)
                row[i * n_in + ks] = 1.0
                row[j * n_in + ks] = -1.0
                cons.append(row)
            row = np.zeros(nvar)
            row[nW + i], row[nW + j] = 1.0, -1.0
            cons.append(row)
    if out_cols is not None:
        Q = canonical(np.arange(n_out) if out_rows is None else out_rows)
        for i, j in _pair_rows(out_cols):
            for q in range(int(Q.max()) + 1):
                row = np.zeros(nvar)
                ms = np.flatnonzero(Q == q)
                row[ms * n_in + i] = 1.0
                row[ms * n_in + j] = -1.0
                cons.append(row)
    x = np.concatenate([rng.normal(0, scale / np.sqrt(n_in), nW),
                        rng.normal(0, bias_scale, n_out) if bias else np.zeros(n_out)])
    if cons:
        A = np.array(cons)
        # project x onto {A x = 0}: x - A^T (A A^T)^+ A x, twice for accuracy
        for _ in range(2):
            y, *_ = np.linalg.lstsq(A.T, x, rcond=None)
            x = x - A.T @ y
    return x[:nW].reshape(n_out, n_in), x[nW:]


def planted_mlp(rng, sizes, fibers=None, opfibers=None, flavoured=False, scale=1.5, bias_scale=0.5):
    """Weights ``[(W, b), ...]`` of an MLP with layer sizes ``sizes`` and planted
    partitions.  ``fibers[l]``/``opfibers[l]``: label arrays for level ``l``
    (0 = inputs, ``len(sizes) - 1`` = outputs), ``None`` = singletons.  The
    in-balance of level ``l`` is over ``fibers[l - 1]``; the out-balance of
    level ``l - 1`` is over ``opfibers[l]`` (``flavoured``: over
    ``meet(fibers[l], opfibers[l])``)."""
    L = len(sizes)
    single = [np.arange(s) for s in sizes]
    F = [single[l] if fibers is None or fibers[l] is None else canonical(fibers[l]) for l in range(L)]
    O = [single[l] if opfibers is None or opfibers[l] is None else canonical(opfibers[l]) for l in range(L)]
    for l in range(L):
        if F[l].size != sizes[l] or O[l].size != sizes[l]:
            raise ValueError(f"level {l}: partition size does not match {sizes[l]} units")
    out = []
    for l in range(1, L):
        ref = meet(F[l], O[l]) if flavoured else O[l]
        W, b = balanced_layer(rng, sizes[l], sizes[l - 1], in_rows=F[l], in_cols=F[l - 1],
                              out_cols=O[l - 1], out_rows=ref, scale=scale, bias_scale=bias_scale)
        out.append((W, b))
    return out


def balance_violation(W, b, in_rows=None, in_cols=None, out_cols=None, out_rows=None) -> float:
    """Largest violation of the balance conditions (0 = exactly balanced)."""
    W = np.asarray(W, dtype=np.float64)
    worst = 0.0
    if in_rows is not None:
        C = canonical(np.arange(W.shape[1]) if in_cols is None else in_cols)
        S = np.stack([W[:, C == c].sum(1) for c in range(int(C.max()) + 1)], 1)
        for i, j in _pair_rows(in_rows):
            worst = max(worst, float(np.abs(S[i] - S[j]).max()), float(abs(b[i] - b[j])))
    if out_cols is not None:
        Q = canonical(np.arange(W.shape[0]) if out_rows is None else out_rows)
        S = np.stack([W[Q == q].sum(0) for q in range(int(Q.max()) + 1)], 0)
        for i, j in _pair_rows(out_cols):
            worst = max(worst, float(np.abs(S[:, i] - S[:, j]).max()))
    return worst
