"""Tree certificates, orbits details, the tolerance grouping of the engine."""
import numpy as np
import pytest

from fibgraph.graph import Block, WeightedDigraph
from fibgraph.orbits import automorphism_orbits
from fibgraph.partition import classes
from fibgraph.engine import Exact, refine
from fibgraph.trees import certifies, expand, input_tree_certificates, output_tree_certificates


def test_path_needs_depth_n_minus_1():
    # 0 -> 1 -> 2 -> 3 -> 4 with node 0 marked: depth t separates node t from the rest
    n = 5
    g = WeightedDigraph.from_edges(np.arange(n - 1), np.arange(1, n), initial=[1] + [0] * (n - 1))
    for t in range(n - 1):
        c = input_tree_certificates(g, depth=t)
        assert c.labels.max() + 1 == t + 2 - (t == n - 1)
    c = input_tree_certificates(g)
    assert c.stable and c.labels.max() + 1 == n and c.depth <= n - 1
    assert certifies(g, refine(g, "in").labels, "in")


def test_output_trees_and_expand():
    g = WeightedDigraph.from_edges([0, 0, 1, 2], [1, 2, 3, 3], [1, 1, 2, 2])
    c = output_tree_certificates(g)
    assert classes(c.labels) == [[0], [1, 2], [3]]
    f = expand(c, 1)
    assert f[0] == 0 and len(f) == 2                  # (initial colour, out-part)
    assert expand(c, 1) == expand(c, 2) != expand(c, 0)


def test_certificate_rejects_a_wrong_partition():
    g = WeightedDigraph.from_edges([0, 0], [1, 2], [1, 2])
    assert not certifies(g, [0, 1, 1], "in")
    assert certifies(g, [0, 1, 2], "in")


def test_direction_checked():
    g = WeightedDigraph.from_edges([0], [1])
    with pytest.raises(ValueError):
        input_tree_certificates(g, initial=[0])
    from fibgraph.trees import tree_certificates

    with pytest.raises(ValueError):
        tree_certificates(g, "sideways")


def test_orbits_group_sizes():
    # complete digraph on 4 nodes: S4; with one node coloured: S3
    s, d = zip(*[(i, j) for i in range(4) for j in range(4) if i != j])
    g = WeightedDigraph.from_edges(s, d)
    assert automorphism_orbits(g).group_size == 24
    o = automorphism_orbits(g, initial=[1, 0, 0, 0])
    assert o.group_size == 6 and classes(o.labels) == [[0], [1, 2, 3]]
    # float weights quantised: 0.1 + 0.2 on one edge pair vs 0.3 are the same edge weight
    h = WeightedDigraph.from_edges([0, 0, 0], [1, 1, 2], [0.1, 0.2, 0.3])
    assert classes(automorphism_orbits(h).labels) == [[0], [1, 2]]
    # empty graph of 3 nodes: S3
    e = WeightedDigraph(n=3, blocks=[])
    assert automorphism_orbits(e).group_size == 6


def test_tolerance_does_not_chain_far_apart_values():
    """Many distinct sums spaced closer than the tolerance: equal values stay
    together, values far apart (1.0 vs 1.2) are never merged through a chain."""
    k = 60000
    w = 1.0 + np.arange(k) * 4e-6                      # spacing 4e-6 < tol = 1e-5 * 1.24
    w = np.concatenate([w, w[:10] + 1e-13])            # ten true duplicates
    n = w.size + 1
    g = WeightedDigraph.from_edges(np.zeros(w.size, np.int64), np.arange(1, n), w, n=n)
    lab = refine(g, "in", Exact()).labels
    node_of = lambda i: i + 1                          # noqa: E731
    assert lab[node_of(0)] != lab[node_of(50000)]      # 1.0 vs 1.2
    for i in range(10):                                # duplicates: same fiber
        assert lab[node_of(i)] == lab[node_of(k + i)]
    # the number of classes is about span / tol, not 1
    assert lab.max() + 1 > 1000
    # the dense (network) path groups the same way
    nodes = np.arange(n)
    W = np.zeros((w.size, 1))
    W[:, 0] = w
    gd = WeightedDigraph(n=n, blocks=[Block(src=nodes[:1], dst=nodes[1:], weight=W)])
    labd = refine(gd, "in", Exact(), schedule="rounds").labels
    assert labd[node_of(0)] != labd[node_of(50000)]
    for i in range(10):
        assert labd[node_of(i)] == labd[node_of(k + i)]


def test_twins_do_not_blow_up_orbits():
    import math

    from fibgraph.orbits import OrbitsTooLarge, format_group_size

    # a star 0 -> 1..50 (the leaves are twins), a 3-cycle 3100-3102, and 6049
    # isolated nodes (51..3099 and 3103..6102): S_50 x Z_3 x S_6049
    src = [0] * 50 + [3100, 3101, 3102]
    dst = list(range(1, 51)) + [3101, 3102, 3100]
    g = WeightedDigraph.from_edges(src, dst, n=6103)
    o = automorphism_orbits(g)
    assert o.group_size == math.factorial(50) * 3 * math.factorial(6049)
    lab = o.labels
    assert len(set(lab[1:51].tolist())) == 1 and lab[0] != lab[1]
    assert len(set(lab[3100:3103].tolist())) == 1
    assert format_group_size(o.group_size).startswith("~ ")
    with pytest.raises(OrbitsTooLarge):
        automorphism_orbits(WeightedDigraph.from_edges(src, dst), max_generator_bytes=1)
