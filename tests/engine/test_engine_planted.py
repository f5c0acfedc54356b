"""Planted balanced colourings: randomised lifts of random bases with cycles."""
import numpy as np
import pytest

from engine_reference import edges_of, is_balanced, plain_refine
from fibgraph.base import quotient
from fibgraph.graph import Block, WeightedDigraph
from fibgraph.lift import lift
from fibgraph.orbits import automorphism_orbits
from fibgraph.partition import canonical, refines
from fibgraph.engine import refine
from fibgraph.trees import tree_certificates


def random_base(rng, nb, mb, exact=True, typed=False, dim=1):
    """A random base digraph (cycles, self-loops) whose coarsest colouring is discrete."""
    for _ in range(200):
        s, d = rng.integers(0, nb, mb), rng.integers(0, nb, mb)
        w = rng.integers(1, 6, (mb, dim))
        vals = w if exact else w * 0.37
        et = rng.integers(0, 2, mb) if typed else None
        nodes = np.arange(nb)
        base = WeightedDigraph(n=nb, blocks=[Block(src=nodes, dst=nodes, rows=d, cols=s,
                                                   values=vals.astype(float), etype=et,
                                                   exact=exact)])
        if refine(base, "in").labels.max() == nb - 1 and refine(base, "out").labels.max() == nb - 1:
            return base
    raise RuntimeError("no discrete base found")


def dense_W(g):
    M = np.zeros((g.n, g.n, max(b.dim for b in g.blocks)))
    for b in g.blocks:
        s, d, v, _ = b.coo()
        np.add.at(M, (d, s), v)
    return M


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("exact", [True, False])
def test_randomised_lift_recovers_planted_fibers(seed, exact):
    rng = np.random.default_rng(seed)
    nb = int(rng.integers(3, 9))
    base = random_base(rng, nb, 3 * nb, exact=exact, typed=seed % 3 == 0, dim=1 + (seed % 2))
    sizes = rng.integers(1, 5, nb)
    g, planted = lift(base, sizes, rng=rng)
    assert g.blocks[0].exact == exact
    # not a duplicated-rows graph: some two copies of one base node have different rows
    if exact and sizes.max() > 1:
        M = dense_W(g)
        dup = all(np.array_equal(M[i], M[j]) for i in range(g.n) for j in range(g.n)
                  if planted[i] == planted[j])
        assert not dup or sizes.max() == 1
    lab = refine(g, "in").labels
    assert np.array_equal(lab, planted)
    # the independent certificates agree
    assert np.array_equal(tree_certificates(g, "in").labels, planted)
    src, dst, w, et = edges_of(g)
    et = None if all(e is None for e in et) else et
    assert np.array_equal(canonical(plain_refine(g.n, src, dst, w, et, None, "in", exact)), planted)
    assert is_balanced(g.n, src, dst, w, et, planted.tolist(), "in", exact)
    # the quotient is the base again (base node c = planted class c)
    q = quotient(g, lab)
    assert np.allclose(dense_W(q), dense_W(base))


@pytest.mark.parametrize("seed", range(4))
def test_out_lift_recovers_planted_opfibers(seed):
    rng = np.random.default_rng(100 + seed)
    nb = int(rng.integers(3, 8))
    base = random_base(rng, nb, 3 * nb)
    sizes = rng.integers(1, 4, nb)
    g, planted = lift(base, sizes, rng=rng, direction="out")
    assert np.array_equal(refine(g, "out").labels, planted)
    assert np.array_equal(tree_certificates(g, "out").labels, planted)


def test_canonical_lift_duplicates_rows_and_orbits_follow():
    rng = np.random.default_rng(7)
    base = random_base(rng, 4, 10)
    sizes = np.array([2, 1, 3, 1])
    g, planted = lift(base, sizes)
    assert np.array_equal(refine(g, "in").labels, planted)
    # the canonical lift is symmetric under permuting copies inside every fiber
    orb = automorphism_orbits(g)
    assert refines(orb.labels, refine(g, "both").labels)
    assert orb.group_size % 2 == 0


def test_large_planted_lift_engine_vs_plain():
    rng = np.random.default_rng(11)
    base = random_base(rng, 60, 240)
    sizes = rng.integers(1, 6, 60)
    g, planted = lift(base, sizes, rng=rng)
    assert g.n_edges > 1000
    assert np.array_equal(refine(g, "in").labels, planted)
    src, dst, w, et = edges_of(g)
    assert np.array_equal(canonical(plain_refine(g.n, src, dst, w, None, None, "in", True)), planted)


def test_lift_argument_checks():
    base = WeightedDigraph.from_edges([0], [1], [1])
    with pytest.raises(ValueError):
        lift(base, [1])
    with pytest.raises(ValueError):
        lift(base, [1, 0])
