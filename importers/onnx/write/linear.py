"""Writer rules for linear layers (docs/design.md section 5): MatMul, Gemm,
Conv, ConvTranspose with a constant weight, grouped and depthwise convs, and
embedding tables.

For kept positions ``q`` each standing for a group ``G(q)``:
``W_hat[r, q] = mean_{i in G(r)} sum_{k in G(q)} W[i, k]`` (rows: the mean
over the output fiber, the papers' sum is wrong for biases; columns: the sum
over the input group); biases the mean.  With the rescaling merge (scales
``s``, docs/design.md section 4): ``W_hat[r, q] = mean_{i in G(r)} (1/s_i)
sum_{k in G(q)} s_k W[i, k]`` and biases divided by ``s_i`` before the mean.
A q projection whose score sums ``m`` equal products per kept head dim has
its rows (and bias) multiplied by ``m`` (:func:`.attention.row_factor`).
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..records import Kind
from .attention import row_factor
from .axis import CHUNK, two_sided
from .groups import nodes_along
from .registry import writes
from fibgraph.lazy import lazy_module

sp = lazy_module("scipy.sparse")     # imported on first use: fibgraph.lazy


@writes(Kind.LINEAR)
def linear(w, rec):
    k, node = w.node(rec)
    ax_in = w.axis(rec.input, scaled=True)
    ax_out = w.axis(rec.output, scaled=True)
    if ax_in.identity and ax_out.identity and not (ax_in.scaled or ax_out.scaled):
        return
    op = rec.op
    wname = node.input[1] if op != "MatMul" or rec.x_axis == -1 else node.input[0]
    slot = 1 if wname == node.input[1] else 0
    W = w.value(wname)                  # as stored (a float32 view of the mapped file); float64 per chunk
    dt = W.dtype
    a = rec.attrs
    Rm = ax_out.mean_matrix(scaled=True)
    fold = row_factor(w, rec.output, ax_out)          # q.k multiplicities folded into W_Q
    if fold is not None:
        Rm = sp.diags(fold) @ Rm
    C = ax_in.sum_matrix(scaled=True)

    def rows_cols(M, dtype=dt, values=not w.dry):   # M (n_out, n_in, ...) -> compressed, stored as dtype
        if not values:       # a parameter count (the --keep search): the shape, nothing computed
            return np.broadcast_to(np.zeros((), dtype), (Rm.shape[0], C.shape[0]) + M.shape[2:])
        return two_sided(Rm, M, C, dtype)

    group = int(a.get("group", 1))
    if op == "Conv" and group > 1:
        grouped_conv(w, k, node, W, dt, group, Rm, C, ax_in)
    elif op in ("Conv",):
        Wh = rows_cols(W)
    elif op == "ConvTranspose":
        Wh = np.moveaxis(rows_cols(np.moveaxis(W, 0, 1)), 0, 1)
    elif op == "Gemm":
        Wt = W if a.get("transB", 0) else W.T
        Wh = rows_cols(Wt)
        Wh = Wh if a.get("transB", 0) else Wh.T
    elif slot == 1:                                  # MatMul x @ B: B (K, N)
        Wh = rows_cols(W.T).T
    else:                                            # MatMul A @ x: A (N, K)
        Wh = rows_cols(W)
    if not (op == "Conv" and group > 1):
        w.put(node, slot, Wh, np.empty(0, dt))
    bslot = 2 if op in ("Gemm", "Conv", "ConvTranspose") else None
    if bslot is not None and len(node.input) > 2 and node.input[2] and not (ax_out.identity and not ax_out.scaled):
        b = w.value(node.input[2])
        if b.size > 1 or ax_out.scaled:
            if b.size == 1 and ax_out.L > 1:        # a scalar bias: one per unit once rescaled
                b = np.broadcast_to(b.reshape(-1), (ax_out.L,)).astype(b.dtype)
            bax = 0 if b.shape[0] == ax_out.L else b.ndim - 1
            bh = ax_out.mean_along(b, bax, scaled=True)
            if fold is not None:
                bh = bh * fold.reshape([-1 if j == bax else 1 for j in range(b.ndim)])
            w.put(node, 2, bh, b)


def _grouped_taps(Rm, W, C, group):
    """The base of a grouped Conv's block-diagonal form, one sparse
    ``(base out, base in)`` matrix per kernel tap: ``Rm @ W_t @ C^T`` with
    ``W_t`` the tap's sparse ``(c_out, c_in)`` matrix (``c_out * c_in / group``
    entries).  The dense form (``c_out x c_in x taps``: 184 MB in float64 for
    a 960-channel 5 x 5 depthwise conv, 17x the model it came from) is never
    built."""
    c_out, gi = W.shape[:2]
    go = c_out // group
    taps = int(np.prod(W.shape[2:]))
    o_e = np.repeat(np.arange(c_out), gi)
    c_e = (o_e // go) * gi + np.tile(np.arange(gi), c_out)
    V = W.reshape(c_out * gi, taps)                  # a view of the (mapped) weight
    Rm, CT = sp.csr_matrix(Rm), sp.csr_matrix(C).T.tocsr()
    mats = []
    for t in range(taps):
        S = sp.csr_matrix((np.asarray(V[:, t], dtype=np.float64), (o_e, c_e)), shape=(c_out, gi * group))
        mats.append(sp.csr_matrix(Rm @ S @ CT))
    return mats


def grouped_conv(w, k, node, W, dt, group, Rm, C, ax_in):
    """A grouped Conv (depthwise with any multiplier): the base of its dense,
    block-diagonal form, held as one sparse matrix per kernel tap
    (:func:`_grouped_taps`).  Where every base output channel reads one base
    input channel ``j(o)`` (the chain importer's rule), it stays depthwise:
    ``group`` = output channels, preceded by a Gather of the channels ``j``
    when they are not simply ``0..n-1``; otherwise a dense Conv (group 1),
    built only when it is no larger than the original.
    Base input channels of one colour carry equal (base) values, so a row
    reading several of them reads the first with their kernels summed: an
    input family split finer than its colours (a residual stream's meet)
    does not turn a depthwise conv dense."""
    mats = _grouped_taps(Rm, W, C, group)
    n_out, n_in = mats[0].shape
    # the base input channels a base output reads: a kernel within float
    # rounding of zero (the engine's eps = 0 tolerance) reads none
    from fibgraph.engine import DEFAULT_RTOL

    mag = abs(mats[0])
    for m in mats[1:]:
        mag = mag.maximum(abs(m))
    mag = sp.csr_matrix(mag)
    top = float(mag.data.max()) if mag.nnz else 0.0
    mag.data[mag.data <= DEFAULT_RTOL * top] = 0.0
    mag.eliminate_zeros()
    mag.sort_indices()
    reads = np.diff(mag.indptr)
    rows = np.repeat(np.arange(n_out), reads)            # the support, row by row
    some = np.flatnonzero(reads > 0)
    starts = mag.indptr[some]                            # strictly increasing: reduceat per row
    first = np.zeros(n_out, dtype=np.int64)
    first[some] = mag.indices[starts]
    merged = np.zeros(n_out, dtype=bool)
    if w.labels is not None and ax_in.axis is not None and np.any(reads > 1):
        ids_in = nodes_along(w.imp.layouts[node.input[0]], ax_in.axis)
        colour = np.asarray(w.labels)[ids_in[ax_in.keep_pos]][mag.indices]
        same = np.minimum.reduceat(colour, starts) == np.maximum.reduceat(colour, starts)
        merged[some[same & (reads[some] > 1)]] = True     # one colour: read the first, kernels summed
    if np.any((reads > 1) & ~merged):
        if n_out * n_in * len(mats) <= W.size:    # a dense Conv (group 1) no larger than the original
            Wh = np.stack([m.toarray() for m in mats], axis=-1)
            for o in np.flatnonzero(merged):
                q = mag.indices[mag.indptr[o]:mag.indptr[o + 1]]
                Wh[o, q[0]] = Wh[o, q].sum(axis=0)
                Wh[o, q[1:]] = 0
            for at in node.attribute:
                if at.name == "group":
                    at.i = 1
            w.put(node, 1, Wh.reshape((n_out, n_in) + W.shape[2:]), np.empty(0, dt))
            return
        # quasi-fibers (eps > 0) mixing input colours: each base output reads
        # the input it reads most (exact fibers never get here)
        top_of_row = np.zeros(n_out)
        top_of_row[some] = np.maximum.reduceat(mag.data, starts)
        many = (reads > 1) & ~merged
        hit = np.flatnonzero(many[rows] & (mag.data == top_of_row[rows]))
        o_hit, at_first = np.unique(rows[hit], return_index=True)   # the first column holding the maximum
        first[o_hit] = mag.indices[hit[at_first]]
    j = first
    extra = merged[rows] & (mag.indices != j[rows])       # a merged row's other supported inputs
    kern = np.empty((n_out, len(mats)))
    for t, m in enumerate(mats):
        kern[:, t] = np.asarray(m[np.arange(n_out), j]).ravel()
        if extra.any():
            np.add.at(kern[:, t], rows[extra], np.asarray(m[rows[extra], mag.indices[extra]]).ravel())
    w.put(node, 1, kern.reshape((n_out, 1) + W.shape[2:]), np.empty(0, dt))
    for at in node.attribute:
        if at.name == "group":
            at.i = n_out
    if n_in != n_out or not np.array_equal(j, np.arange(n_out)):
        t = w.tmp(node.input[0])
        g = helper.make_node("Gather", [node.input[0], w.const(j.astype(np.int64), np.int64)], [t],
                             axis=1, name=w.tmp("fib_gather"))
        node.input[0] = t
        w.own.add(g.name)                  # already in base positions: cuts() leaves it
        w.insert(k, [g])


@writes(Kind.DEPTHWISE)
def depthwise(w, rec):
    _, node = w.node(rec)
    ax = w.axis(rec.output)
    if ax.identity:
        return
    W = w.value(node.input[1])
    w.put(node, 1, ax.mean_along(W, 0), W)
    if len(node.input) > 2 and node.input[2]:
        b = w.value(node.input[2])
        w.put(node, 2, ax.mean_along(b, 0), b)
    for at in node.attribute:
        if at.name == "group":
            at.i = ax.L_hat


@writes(Kind.EMBEDDING)
def embedding(w, rec):
    _, node = w.node(rec)
    ax = w.axis(rec.output)
    if ax.identity:
        return
    T = w.value(node.input[0])          # (vocab, L): a view of the mapped table
    Rm = ax.mean_matrix()
    out = np.empty((T.shape[0], Rm.shape[0]), dtype=T.dtype)
    step = max(1, CHUNK // max(T.shape[1], 1))
    for r in range(0, T.shape[0], step):      # float64 per chunk of rows, never the whole table
        out[r:r + step] = (Rm @ np.asarray(T[r:r + step], dtype=np.float64).T).T
    w.put(node, 0, out, T)
