"""Property tests on random small digraphs (hypothesis): the engine against the
independent references (plain refinement, tree certificates, balance checker,
brute-force automorphisms) and the hierarchy."""
import itertools
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_reference import coarsest_by_merge, edges_of, is_balanced, plain_refine
from fibgraph.graph import WeightedDigraph
from fibgraph.hierarchy import hierarchy
from fibgraph.orbits import automorphism_orbits
from fibgraph.partition import canonical, refines
from fibgraph.engine import refine
from fibgraph.trees import tree_certificates

# ENGINE_EXAMPLES=2000 for a longer run
SETTINGS = settings(max_examples=int(os.environ.get("ENGINE_EXAMPLES", 100)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def digraphs(draw, max_n=7, float_weights=None, typed=None):
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(0, 3 * n))
    src = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
    dst = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
    w = draw(st.lists(st.integers(-2, 3), min_size=m, max_size=m))
    fl = draw(st.booleans()) if float_weights is None else float_weights
    ty = draw(st.booleans()) if typed is None else typed
    et = draw(st.lists(st.integers(0, 1), min_size=m, max_size=m)) if ty else None
    init = draw(st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    w = np.array(w, dtype=np.int64)
    weight = w * 0.3 if fl else w            # multiples of 0.3: sums need the tolerance
    return WeightedDigraph.from_edges(np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64),
                                      weight, n=n, etype=et, initial=init)


def _ref_args(g):
    src, dst, w, et = edges_of(g)
    exact = all(b.exact for b in g.blocks)
    return src, dst, w, (None if all(e is None for e in et) else et), exact


@SETTINGS
@given(digraphs())
def test_engine_equals_plain_refinement_and_tree_certificates(g):
    src, dst, w, et, exact = _ref_args(g)
    init = g.initial.tolist()
    for d in ("in", "out", "both"):
        lab = refine(g, d).labels
        ref = plain_refine(g.n, src, dst, w, et, init, d, exact)
        assert np.array_equal(lab, canonical(ref)), d
        cert = tree_certificates(g, d)
        assert np.array_equal(lab, cert.labels), d


@SETTINGS
@given(digraphs())
def test_every_output_is_balanced_and_nothing_coarser_is(g):
    src, dst, w, et, exact = _ref_args(g)
    init = g.initial.tolist()
    for d in ("in", "out", "both"):
        lab = refine(g, d).labels.tolist()
        assert is_balanced(g.n, src, dst, w, et, lab, d, exact, init)
        assert coarsest_by_merge(g.n, src, dst, w, et, lab, d, exact, init)


@SETTINGS
@given(digraphs())
def test_hierarchy_holds(g):
    rep = hierarchy(g)
    assert rep.ok
    L = rep.labels
    assert refines(L["orbits"], L["strict covers"])
    assert refines(L["strict covers"], L["intersection covers"])
    assert refines(L["intersection covers"], L["fibers"])
    assert refines(L["intersection covers"], L["opfibers"])


def _brute_force_orbits(g):
    n = g.n
    M = {}
    for b in g.blocks:
        s, d, v, e = b.coo()
        e = [None] * s.size if e is None else e.tolist()
        for k in range(s.size):
            key = (int(s[k]), int(d[k]), e[k])
            M[key] = M.get(key, 0) + round(float(v[k, 0]) * 10) / 10
    M = {k: round(x, 6) for k, x in M.items() if abs(x) > 1e-9}
    init = g.initial.tolist()
    parent = list(range(n))
    count = 0
    for p in itertools.permutations(range(n)):
        if any(init[p[i]] != init[i] for i in range(n)):
            continue
        if all(M.get((p[s], p[d], e)) == x for (s, d, e), x in M.items()):
            count += 1
            for i in range(n):
                a, b = i, p[i]
                while parent[a] != a:
                    a = parent[a]
                while parent[b] != b:
                    b = parent[b]
                parent[max(a, b)] = min(a, b)
    roots = []
    for i in range(n):
        a = i
        while parent[a] != a:
            a = parent[a]
        roots.append(a)
    return canonical(roots), count


@SETTINGS
@given(digraphs(max_n=6))
def test_orbits_equal_brute_force(g):
    orb = automorphism_orbits(g)
    lab, count = _brute_force_orbits(g)
    assert np.array_equal(orb.labels, lab)
    assert orb.group_size == count
    # every generator returned is an automorphism, and they generate the orbits
    M = {}
    for b in g.blocks:
        s, d, v, e = b.coo()
        e = [None] * s.size if e is None else e.tolist()
        for k in range(s.size):
            key = (int(s[k]), int(d[k]), e[k])
            M[key] = round(M.get(key, 0) + float(v[k, 0]), 6)
    M = {k: x for k, x in M.items() if abs(x) > 1e-9}
    for p in orb.generators:
        assert all(M.get((int(p[s]), int(p[d]), e)) == x for (s, d, e), x in M.items())
        assert all(g.initial[p[i]] == g.initial[i] for i in range(g.n))
