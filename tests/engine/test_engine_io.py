"""Graph input: edge lists, GraphML, GML, networkx, igraph; bad input -> InputError."""
import os

import igraph as ig
import networkx as nx
import numpy as np
import pytest

from fibgraph.errors import InputError
from fibgraph.graphio import from_igraph, from_networkx, parse_edgelist, read_graph
from fibgraph.symmetry import fibration


def W(g):
    """Dense summed weight matrix W[dst, src] (scalar weights) of a graph."""
    M = np.zeros((g.n, g.n))
    for b in g.blocks:
        s, d, v, _ = b.coo()
        np.add.at(M, (d, s), v[:, 0])
    return M


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


# ------------------------------------------------------------------ edge lists
def test_edgelist_comments_blank_lines_isolated_selfloop_multiedge(tmp_path):
    p = write(tmp_path, "g.edgelist", "# header\n\n0 1 2\n1 2   # no weight = 1\n"
                                      "\t2 0 3\n0 1 5\n6 6 1\n\n")
    g = read_graph(p)
    assert g.n == 4                                   # the ids the edges name, relabelled densely
    assert list(g.node_ids) == [0, 1, 2, 6]
    M = W(g)
    assert M[1, 0] == 7 and M[2, 1] == 1 and M[0, 2] == 3 and M[3, 3] == 1
    assert g.n_edges == 5 and all(b.exact for b in g.blocks)
    assert fibration(g).labels.size == 4


def test_edgelist_sparse_ids_cost_their_edges_not_the_largest_id():
    """A 20-byte edge list naming node 300,000,000: two nodes, keyed by their ids."""
    g = parse_edgelist(b"0 300000000\n300000000 7\n")
    assert g.n == 3 and list(g.node_ids) == [0, 7, 300000000]
    assert W(g)[2, 0] == 1 and W(g)[1, 2] == 1


def test_edgelist_float_and_integer_weights(tmp_path):
    g = read_graph(write(tmp_path, "f.txt", "0 1 0.5\n1 0 1e-3\n"))
    assert not g.blocks[0].exact
    assert np.allclose(sorted(g.blocks[0].values[:, 0]), [1e-3, 0.5])
    g = read_graph(write(tmp_path, "i.txt", "0 1 -2\n1 0 3\n"))
    assert g.blocks[0].exact
    g = read_graph(write(tmp_path, "i2.txt", "0 1 2.0\n1 0 3\n"))   # integral values: exact
    assert g.blocks[0].exact


def test_edgelist_categorical_weights(tmp_path):
    g = read_graph(write(tmp_path, "c.txt", "0 1 excit\n0 2 inhib\n3 4 excit\n"))
    b = g.blocks[0]
    assert b.etype is not None and b.exact
    assert np.all(b.values == 1)
    lab = fibration(g).labels
    assert lab[1] != lab[2]                           # different edge types
    assert lab[1] == lab[4]


def test_edgelist_mixed_columns_and_crlf(tmp_path):
    g = read_graph(write(tmp_path, "m.txt", "0 1\r\n1 2 4\r\n", mode="w"))
    assert W(g)[1, 0] == 1 and W(g)[2, 1] == 4


def test_parse_edgelist_bytes_directly():
    g = parse_edgelist(b"0 1\n1 0\n")
    assert g.n == 2 and g.n_edges == 2


@pytest.mark.parametrize("text, needle", [
    ("0 1 1\n0\n", "line 2"),
    ("0 1 1\n0 1 2 3\n", "line 2"),
    ("0 1\n2 -1\n", "negative"),
    ("0 1\n1.5 2\n", "line 2"),
    ("0 1\nx 2\n", "not a non-negative integer"),
    ("0 1 nan\n", "not finite"),
    ("0 1 1\n1 2 inf\n", "line 2"),
    ("", "empty"),
    ("# only a comment\n\n", "no edges"),
    ("0 99999999999\n", "too large"),
    ("0 1_000\n", "not a non-negative integer"),
    ("0 +5\n", "not a non-negative integer"),
    ("0 1 2.5\n1_0 1 1\n", "line 2"),
])
def test_edgelist_bad_input(tmp_path, text, needle):
    p = write(tmp_path, "bad.txt", text)
    with pytest.raises(InputError) as e:
        read_graph(p)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_binary_and_unknown_files(tmp_path):
    rng = np.random.default_rng(0)
    junk = bytes(rng.integers(0, 256, 400, dtype=np.uint8)) + b"\x00\x01"
    for name in ("junk.txt", "junk.edgelist", "junk.graphml", "junk.gml"):
        with pytest.raises(InputError):
            read_graph(write(tmp_path, name, junk, mode="wb"))
    with pytest.raises(InputError, match="unknown graph file type"):
        read_graph(write(tmp_path, "g.csv", "0 1\n"))
    with pytest.raises(InputError, match="no such file"):
        read_graph(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="not a valid GraphML"):
        read_graph(write(tmp_path, "t.graphml", "this is not xml\n"))
    with pytest.raises(InputError, match="not a valid GML"):
        read_graph(write(tmp_path, "t.gml", "graph [ node [ id 0 \n"))


# ------------------------------------------------------------ graph objects
def test_networkx_digraph_multidigraph_and_undirected():
    G = nx.MultiDiGraph()
    G.add_nodes_from(["a", "b", "c", "iso"])
    G.add_edge("a", "b", weight=1)
    G.add_edge("a", "b", weight=1)                    # multi-edge: adds to 2
    G.add_edge("a", "c", weight=2)
    G.add_edge("c", "c", weight=1)                    # self-loop
    g = from_networkx(G)
    assert g.node_ids == ["a", "b", "c", "iso"] and g.n == 4
    M = W(g)
    assert M[1, 0] == 2 and M[2, 0] == 2 and M[2, 2] == 1
    H = nx.Graph()
    H.add_edge(0, 1, weight=0.5)
    H.add_edge(2, 2)
    h = from_networkx(H)
    M = W(h)
    assert M[1, 0] == 0.5 and M[0, 1] == 0.5 and M[2, 2] == 1   # both directions, loop once
    assert not h.blocks[0].exact


def test_networkx_categorical_type_and_initial():
    G = nx.DiGraph()
    G.add_edge(0, 1, type="A")
    G.add_edge(0, 2, type="B")
    G.add_edge(3, 4, weight="inhibitory")
    G.add_edge(3, 5, weight="inhibitory")
    g = from_networkx(G)
    lab = fibration(g).labels
    assert lab[1] != lab[2] and lab[4] == lab[5] and lab[1] != lab[4]
    G2 = nx.DiGraph([(0, 1), (0, 2)])
    G2.nodes[2]["initial"] = "red"
    lab = fibration(from_networkx(G2)).labels
    assert lab[1] != lab[2]
    lab = fibration(from_networkx(G2, initial={0: 0, 1: 1, 2: 1})).labels
    assert lab[1] == lab[2]


def test_networkx_bad_weights():
    G = nx.DiGraph()
    G.add_edge(0, 1, weight=float("nan"))
    with pytest.raises(InputError, match="not finite"):
        from_networkx(G)
    with pytest.raises(InputError, match="no nodes"):
        from_networkx(nx.DiGraph())


def test_igraph_directed_named_and_undirected():
    g = ig.Graph(n=4, edges=[(0, 1), (0, 2), (0, 2)], directed=True)
    g.es["weight"] = [2, 1, 1]
    g.vs["name"] = ["s", "x", "y", "z"]
    h = from_igraph(g)
    assert h.node_ids == ["s", "x", "y", "z"]
    lab = fibration(h).labels
    assert lab[1] == lab[2] and lab[3] != lab[1]      # 2 == 1 + 1 (multi-edges add)
    u = from_igraph(ig.Graph.Ring(5))                 # undirected ring: one fiber
    assert np.all(fibration(u).labels == 0)


def test_graphml_and_gml_roundtrip(tmp_path):
    G = nx.DiGraph()
    G.add_edge("in1", "h1", weight=1.5)
    G.add_edge("in1", "h2", weight=1.5)
    G.add_edge("h1", "out", weight=2.0)
    G.add_edge("h2", "out", weight=-1.0)
    G.add_node("lonely")
    for ext, writer in ((".graphml", nx.write_graphml), (".gml", nx.write_gml)):
        p = str(tmp_path / f"g{ext}")
        writer(G, p)
        g = read_graph(p)
        assert [str(x) for x in g.node_ids] == ["in1", "h1", "h2", "out", "lonely"]
        lab = fibration(g).labels
        assert lab[1] == lab[2] and lab[0] != lab[1]


def test_gml_without_labels_uses_ids(tmp_path):
    p = write(tmp_path, "n.gml", "graph [ directed 1 node [ id 7 ] node [ id 9 ] "
                                 "edge [ source 7 target 9 weight 3 ] ]\n")
    g = read_graph(p)
    assert [str(x) for x in g.node_ids] == ["7", "9"] and W(g)[1, 0] == 3


def test_graphml_string_weights_are_categories(tmp_path):
    G = nx.DiGraph()
    G.add_edge("a", "b", weight="x")
    G.add_edge("a", "c", weight="y")
    G.add_edge("a", "d", weight="x")
    p = str(tmp_path / "s.graphml")
    nx.write_graphml(G, p)
    lab = fibration(read_graph(p)).labels
    assert lab[1] == lab[3] != lab[2]


def test_edgelist_speed_is_vectorised(tmp_path):
    rng = np.random.default_rng(1)
    m = 200_000
    s, d, w = rng.integers(0, 20000, m), rng.integers(0, 20000, m), rng.integers(1, 9, m)
    p = str(tmp_path / "big.edgelist")
    with open(p, "w") as f:
        f.write("".join(f"{a} {b} {c}\n" for a, b, c in zip(s.tolist(), d.tolist(), w.tolist())))
    import time

    t0 = time.perf_counter()
    g = read_graph(p)
    assert time.perf_counter() - t0 < 3.0
    assert g.n_edges == m and g.blocks[0].exact
    assert os.path.getsize(p) > 0
