"""How the exact colouring combines a level's signature parts
(fibgraph/engine/signatures.py, ``_merge_parts``): dense parts that share keys
over disjoint targets (an LSTM's four gates reading the same inputs) are
stacked into one dense part instead of being turned into 24-byte entries, and
every partition equals the one the all-entries path gives."""
import numpy as np
import pytest

from fibgraph.engine import signatures as S
from fibgraph.partition import canonical


def _labels(dense, sparse, n, tol=1e-6):
    h1 = np.zeros(n, np.uint64)
    h2 = np.zeros(n, np.uint64)
    for p in dense:
        a, b = S._hash_dense(p["A"], p["keys"], tol)
        h1[p["targets"]] += a
        h2[p["targets"]] += b
    for p in sparse:
        a, b = S._hash_sparse(p["t"], p["key"], p["v"], tol, n)
        h1 += a
        h2 += b
    return canonical(S.group_rows([h1, h2]))


def _entries_only(parts):
    """The reference: every dense part as entries, summed with the sparse ones."""
    dense = [S._dense_to_sparse(p) for p in parts if "A" in p]
    return [], [S._sum_sparse(dense + [p for p in parts if "A" not in p])]


def _gates(rng, n_gate=6, k=5, dup=True):
    """Four 'gates' of ``n_gate`` targets each reading the same ``k`` keys, some
    rows repeated across gates, plus a bias part of entries on other keys."""
    keys = (np.arange(k, dtype=np.uint64) + np.uint64(11)) * np.uint64(0x9E3779B97F4A7C15)
    base = np.round(rng.normal(size=(3, k)), 1).astype(np.float32)
    parts = []
    for g in range(4):
        A = base[rng.integers(0, 3, n_gate)] if dup else rng.normal(size=(n_gate, k)).astype(np.float32)
        parts.append({"targets": np.arange(g * n_gate, (g + 1) * n_gate), "A": A, "keys": keys, "exact": True})
    t = np.arange(4 * n_gate)
    parts.append({"t": t, "key": np.full(t.size, np.uint64(3)), "v": np.round(rng.normal(size=t.size), 0),
                  "exact": True})
    return parts


def test_gates_reading_the_same_inputs_stay_dense_and_colour_alike():
    rng = np.random.default_rng(0)
    parts = _gates(rng)
    dense, sparse = S._merge_parts([dict(p) for p in parts])
    assert len(dense) == 1 and dense[0]["A"].shape == (24, 5) and dense[0]["A"].dtype == np.float32
    assert sparse and all(p["t"].size == 24 for p in sparse)          # only the bias is entries
    got, want = _labels(dense, sparse, 24), _labels(*_entries_only(parts), 24)
    np.testing.assert_array_equal(got, want)
    assert got.max() + 1 < 24                                     # rows repeated across gates share a colour


@pytest.mark.parametrize("seed", range(12))
def test_every_merge_partitions_as_the_all_entries_path(seed):
    """Random parts: shared keys over disjoint or shared targets, keys shared in
    part, a sparse part meeting a dense one's keys; the partition always equals
    the all-entries path's."""
    rng = np.random.default_rng(seed)
    n, pool = 20, (np.arange(8, dtype=np.uint64) + np.uint64(1)) * np.uint64(0xD6E8FEB86659FD93)
    parts = []
    for _ in range(rng.integers(2, 6)):
        if rng.random() < 0.7:
            t = np.sort(rng.choice(n, rng.integers(2, 8), replace=False))
            k = pool[np.sort(rng.choice(8, rng.integers(1, 4), replace=False))] if rng.random() < 0.5 else pool[:3]
            A = np.round(rng.normal(size=(t.size, k.size)), 0).astype(np.float32)
            parts.append({"targets": t, "A": A, "keys": k, "exact": True})
        else:
            m = rng.integers(1, 10)
            parts.append({"t": rng.integers(0, n, m), "key": pool[rng.integers(0, 8, m)],
                          "v": np.round(rng.normal(size=m), 0), "exact": True})
    dense, sparse = S._merge_parts([dict(p) for p in parts])
    np.testing.assert_array_equal(_labels(dense, sparse, n), _labels(*_entries_only(parts), n))
