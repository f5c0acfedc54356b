"""Hand-computed examples (main paper, Fig. 1 style) for every symmetry."""
import numpy as np
import pytest

from fibgraph.graph import Block, WeightedDigraph
from fibgraph.hierarchy import hierarchy
from fibgraph.orbits import automorphism_orbits
from fibgraph.partition import canonical, classes
from fibgraph.symmetry import colour, covering, fibration, opfibration
from fibgraph.trees import expand, input_tree_certificates


def G(edges, n=None, initial=None, etype=None):
    e = np.array(edges, dtype=float).reshape(-1, 3) if edges else np.zeros((0, 3))
    w = e[:, 2]
    if np.all(w == np.round(w)):
        w = w.astype(np.int64)
    return WeightedDigraph.from_edges(e[:, 0].astype(int), e[:, 1].astype(int), w, n=n,
                                      initial=initial, etype=etype)


def test_two_nodes_fed_by_one_source_share_a_fiber():
    g = G([(0, 1, 1), (0, 2, 1)])
    assert classes(fibration(g).labels) == [[0], [1, 2]]
    assert classes(opfibration(g).labels) == [[0], [1, 2]]
    assert classes(automorphism_orbits(g).labels) == [[0], [1, 2]]


def test_different_weights_split_a_fiber():
    g = G([(0, 1, 1), (0, 2, 2)])
    assert classes(fibration(g).labels) == [[0], [1], [2]]
    assert classes(opfibration(g).labels) == [[0], [1, 2]]     # same (empty) outputs


def test_self_loop_and_two_cycle_form_one_fiber_but_two_orbits():
    # 0 -> 0, 1 -> 2 -> 1: every node receives one edge from its own colour
    g = G([(0, 0, 1), (1, 2, 1), (2, 1, 1)])
    assert classes(fibration(g).labels) == [[0, 1, 2]]
    assert classes(covering(g, kind="strict").labels) == [[0, 1, 2]]
    orb = automorphism_orbits(g)
    assert classes(orb.labels) == [[0], [1, 2]] and orb.group_size == 2
    rep = hierarchy(g)
    assert rep.counts["orbits"] == 2 and rep.counts["fibers"] == 1 and rep.ok


def test_cycle_is_one_fiber_until_one_weight_changes():
    g = G([(0, 1, 1), (1, 2, 1), (2, 3, 1), (3, 0, 1)])
    assert classes(fibration(g).labels) == [[0, 1, 2, 3]]
    assert automorphism_orbits(g).group_size == 4
    g = G([(0, 1, 1), (1, 2, 1), (2, 3, 1), (3, 0, 2)])
    assert classes(fibration(g).labels) == [[0], [1], [2], [3]]
    # input trees: depth 1 separates node 0 only; depth 3 separates all
    c1 = input_tree_certificates(g, depth=1)
    assert classes(c1.labels) == [[0], [1, 2, 3]]
    assert len(set(input_tree_certificates(g, depth=3).forms)) == 4


def test_sums_not_edges_define_fibers():
    # node 3 gets 1 + 1 from the two equivalent sources 0, 1; node 4 gets 2 from node 2
    g = G([(0, 3, 1), (1, 3, 1), (2, 4, 2)])
    lab = fibration(g).labels
    assert lab[3] == lab[4]
    # the tree certificate agrees (summed weights per class of predecessor form)
    c = input_tree_certificates(g)
    assert c.forms[3] == c.forms[4]
    assert expand(c, 3) == expand(c, 4)


def test_multi_edges_add():
    g = G([(0, 1, 1), (0, 1, 1), (0, 2, 2)])
    lab = fibration(g).labels
    assert lab[1] == lab[2]


def test_cancelling_weights_are_no_edge():
    # +1 and -1 from the same class sum to 0: node 1 looks like node 2 (no input)
    g = G([(0, 1, 1), (3, 1, -1)], n=4)
    lab = fibration(g).labels
    assert lab[1] == lab[2]


def test_integers_are_exact_floats_tolerant():
    big = 2 ** 52
    g = G([(0, 1, big), (0, 2, big + 1)])
    assert g.blocks[0].exact
    lab = fibration(g).labels
    assert lab[1] != lab[2]
    f = WeightedDigraph.from_edges([0, 0, 0], [1, 1, 2], [0.1, 0.2, 0.3])
    lab = fibration(f).labels
    assert lab[1] == lab[2]                            # 0.1 + 0.2 == 0.3 up to rounding
    f = WeightedDigraph.from_edges([0, 0], [1, 2], [0.3, 0.3001])
    lab = fibration(f).labels
    assert lab[1] != lab[2]


def test_edge_types_are_categories():
    g = WeightedDigraph.from_edges([0, 0, 0], [1, 2, 3], [1, 1, 1], etype=[0, 1, 0])
    assert classes(fibration(g).labels) == [[0], [1, 3], [2]]
    assert classes(automorphism_orbits(g).labels) == [[0], [1, 3], [2]]


def test_vector_weights_compared_as_vectors():
    nodes = np.arange(3)
    b = Block(src=nodes, dst=nodes, rows=[1, 2], cols=[0, 0], values=[[1.0, 2.0], [2.0, 1.0]])
    g = WeightedDigraph(n=3, blocks=[b])
    assert classes(fibration(g).labels) == [[0], [1], [2]]
    assert classes(automorphism_orbits(g).labels) == [[0], [1], [2]]


def test_initial_colouring_is_respected():
    g = G([(0, 1, 1), (0, 2, 1)], initial=[0, 1, 2])
    assert classes(fibration(g).labels) == [[0], [1], [2]]
    assert classes(automorphism_orbits(g).labels) == [[0], [1], [2]]


def test_feedforward_hierarchy_fig1_style():
    # inputs 0, 1 (distinct colours); hidden 2, 3, 4; output 5
    # 2 and 3 receive (1 from 0, 1 from 1); 4 receives 2 from 0: fibers {2, 3}
    # outputs: 2 -> 5 weight 1, 3 -> 5 weight 1, 4 -> 5 weight 1
    edges = [(0, 2, 1), (1, 2, 1), (0, 3, 1), (1, 3, 1), (0, 4, 2), (2, 5, 1), (3, 5, 1), (4, 5, 1)]
    g = G(edges, initial=[1, 2, 0, 0, 0, 3])
    assert classes(fibration(g).labels) == [[0], [1], [2, 3], [4], [5]]
    # inputs keep their distinct initial colours; every hidden node sends 1 to the output
    assert classes(opfibration(g).labels) == [[0], [1], [2, 3, 4], [5]]
    # same graph with one colour for both inputs: 0 sends 4 to the hidden layer, 1 sends 2
    g2 = G(edges, initial=[1, 1, 0, 0, 0, 3])
    assert classes(opfibration(g2).labels) == [[0], [1], [2, 3, 4], [5]]
    cov = covering(g).labels
    assert classes(cov) == [[0], [1], [2, 3], [4], [5]]
    orb = automorphism_orbits(g)
    assert classes(orb.labels) == [[0], [1], [2, 3], [4], [5]] and orb.group_size == 2
    assert hierarchy(g).ok


@pytest.mark.parametrize("sym", ["fibration", "opfibration", "opfibration-flavoured", "covering",
                                 "covering-strict", "automorphism"])
def test_colour_dispatch(sym):
    g = G([(0, 1, 1), (0, 2, 1), (1, 3, 1), (2, 3, 1)])
    lab = colour(g, sym).labels
    assert lab[1] == lab[2] and lab[0] != lab[3]


@pytest.mark.parametrize("direction", ["in", "out"])
def test_dense_blocks_hash_the_same_in_small_column_chunks(direction, monkeypatch):
    # a dense block with planted equal rows (in) / columns (out), float32 as a
    # weight is stored, some columns merged by colour: chunks of 7 entries give
    # the colouring of one chunk
    from fibgraph.engine import signatures as sig

    rng = np.random.default_rng(0)
    src, dst = np.arange(40), np.arange(40, 340)
    W = rng.normal(size=(6, 40)).astype(np.float32)[rng.integers(0, 6, 300)]        # 300 rows, 6 distinct
    if direction == "out":
        W = np.ascontiguousarray(rng.normal(size=(300, 6)).astype(np.float32)[:, rng.integers(0, 6, 40)])
    g = WeightedDigraph(n=340, blocks=[Block(src=src, dst=dst, weight=W)])
    nodes = dst if direction == "in" else src
    others = src if direction == "in" else dst
    for merged in (False, True):
        colours = np.full(340, 1000)                # the targets: one old colour
        colours[others] = others // (3 if merged else 1)   # the other ends: own colours, or by threes
        want = sig.split_exact(g, nodes, [direction], colours, np.ones(340), 1e-5)
        monkeypatch.setattr(sig, "_CHUNK", 7)
        got = sig.split_exact(g, nodes, [direction], colours, np.ones(340), 1e-5)
        monkeypatch.undo()
        assert np.array_equal(canonical(got), canonical(want))
        assert len(np.unique(want)) == 6           # the planted rows (in) / columns (out)


def test_the_relieve_hook_runs_after_every_refined_level():
    # an importer's hook (the ONNX importer hands back mapped weight pages) is
    # called once per non-empty level of a levelled sweep, and the colouring is
    # the same as without it
    calls = []
    g = WeightedDigraph.from_edges([0, 0, 1, 2], [1, 2, 3, 3], [1.0, 1.0, 2.0, 2.0], n=4)
    g.levels = [np.array([0]), np.array([1, 2]), np.array([3])]
    want = fibration(g).labels
    g.relieve = lambda: calls.append(1)
    got = fibration(g).labels
    assert np.array_equal(got, want) and len(calls) == 3


def test_multi_edges_cancelling_to_rounding_residue_are_no_edge_for_orbits():
    # -0.3 - 0.6 + 0.3 + 0.6 is 1.1e-16 in floats: node 0's self-loop is no
    # edge, so both nodes are isolated and one orbit (found by hypothesis)
    b = Block(src=np.array([0, 1]), dst=np.array([0, 1]), rows=[0, 0, 0, 0], cols=[0, 0, 0, 0],
              values=[[-0.3], [-0.6], [0.3], [0.6]])
    assert np.array_equal(automorphism_orbits(WeightedDigraph(n=2, blocks=[b])).labels, [0, 0])
