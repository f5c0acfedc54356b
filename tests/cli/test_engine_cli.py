"""CLI glue for graph files: JSON output, atomic writes, errors before writing, hierarchy."""
import json
import os

import networkx as nx
import numpy as np
import pytest

from fibgraph.cli import graphs as graphcli
from fibgraph.errors import HierarchyViolation, InputError
from fibgraph.cli.graphs import color_graph_file, hierarchy_file
from fibgraph.hierarchy import hierarchy

SYMS = ["fibration", "opfibration", "opfibration-flavoured", "covering", "covering-strict",
        "automorphism"]


@pytest.fixture
def edgelist(tmp_path):
    p = tmp_path / "g.edgelist"
    p.write_text("# two nodes fed by 0, a 2-cycle, an isolated node 6\n"
                 "0 1 1\n0 2 1\n1 3 2\n2 3 2\n4 5\n5 4\n")
    return str(p)


@pytest.mark.parametrize("sym", SYMS)
def test_color_graph_file_writes_json(edgelist, tmp_path, sym, capsys):
    out = str(tmp_path / "out.json")
    color_graph_file(edgelist, sym, json_out=out)
    doc = json.load(open(out))
    assert doc["nodes"] == 6 and set(doc["partition"]) == {str(i) for i in range(6)}
    part = doc["partition"]
    assert doc["colors"] == len(set(part.values()))
    assert part["1"] == part["2"]
    assert [f for f in os.listdir(tmp_path) if f.startswith(".fibgraph-")] == []
    text = capsys.readouterr().out
    assert "6 nodes" in text and "colours" in text


def test_graphml_ids_are_json_keys(tmp_path):
    G = nx.DiGraph()
    G.add_edge("src", "a", weight=1.5)
    G.add_edge("src", "b", weight=1.5)
    p = str(tmp_path / "g.graphml")
    nx.write_graphml(G, p)
    out = str(tmp_path / "o.json")
    color_graph_file(p, "fibration", json_out=out, quiet=True)
    part = json.load(open(out))["partition"]
    assert set(part) == {"src", "a", "b"} and part["a"] == part["b"] != part["src"]


def test_errors_before_writing_anything(edgelist, tmp_path):
    out = tmp_path / "keep.json"
    out.write_text("old")
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1\n1 two\n")
    with pytest.raises(InputError, match="line 2"):
        color_graph_file(str(bad), "fibration", json_out=str(out))
    assert out.read_text() == "old"
    with pytest.raises(InputError, match="unknown symmetry"):
        color_graph_file(edgelist, "isomorphism", json_out=str(out))
    with pytest.raises(InputError, match="does not exist"):
        color_graph_file(edgelist, "fibration", json_out=str(tmp_path / "no" / "o.json"))
    with pytest.raises(InputError, match="input path"):
        color_graph_file(edgelist, "fibration", json_out=edgelist)
    with pytest.raises(InputError):
        color_graph_file(edgelist, "fibration", eps=5.0, json_out=str(out))
    with pytest.raises(InputError):
        color_graph_file(edgelist, "automorphism", eps=0.1, json_out=str(out))
    assert out.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "g.edgelist", "keep.json"]


def test_eps_quasi_fibration_runs(edgelist, tmp_path):
    out = str(tmp_path / "q.json")
    color_graph_file(edgelist, "fibration", eps=0.5, json_out=out, quiet=True)
    assert json.load(open(out))["nodes"] == 6


def test_hierarchy_file_ok_and_violation(edgelist, capsys, monkeypatch):
    assert hierarchy_file(edgelist) == 0
    text = capsys.readouterr().out
    assert "orbits" in text and "fibers" in text and "VIOLATED" not in text

    # a bogus orbit partition (coarser than the strict covering) must be caught
    from fibgraph import orbits

    class Fake:
        def __init__(self, n):
            self.labels = np.zeros(n, np.int64)
            self.group_size = 1

    monkeypatch.setattr(orbits, "automorphism_orbits", lambda g, initial=None: Fake(g.n))
    assert hierarchy_file(edgelist) == 1
    assert "VIOLATED" in capsys.readouterr().out
    from fibgraph.graphio import read_graph

    with pytest.raises(HierarchyViolation) as e:
        hierarchy(read_graph(edgelist))
    assert not e.value.report.ok and e.value.report.violations
    rep = hierarchy(read_graph(edgelist), raise_on_violation=False)
    assert not rep.ok and rep.as_dict()["ok"] is False


def test_orbits_too_large_is_reported_not_crashed(edgelist, tmp_path, monkeypatch, capsys):
    from fibgraph import orbits
    from fibgraph.graphio import read_graph

    def boom(g, initial=None, **kw):
        raise orbits.OrbitsTooLarge("automorphism group of order ~2^99: too large")

    monkeypatch.setattr(orbits, "automorphism_orbits", boom)
    rep = hierarchy(read_graph(edgelist))
    assert rep.ok and rep.counts["orbits"] is None and rep.notes
    assert hierarchy_file(edgelist) == 0
    assert "not checked" in capsys.readouterr().out
    with pytest.raises(InputError, match="too large"):
        color_graph_file(edgelist, "automorphism", json_out=str(tmp_path / "a.json"))
    assert not (tmp_path / "a.json").exists()


def test_cli_commands_end_to_end(edgelist, tmp_path):
    click = pytest.importorskip("click.testing")
    from fibgraph.cli import cli

    r = click.CliRunner()
    out = str(tmp_path / "c.json")
    res = r.invoke(cli, ["color", edgelist, "--symmetry", "covering-strict", "--json", out])
    assert res.exit_code == 0, res.output
    assert json.load(open(out))["nodes"] == 6
    res = r.invoke(cli, ["hierarchy", edgelist])
    assert res.exit_code == 0, res.output


def test_partition_json_is_valid_for_int_and_str_ids():
    from fibgraph.graph import WeightedDigraph

    g = WeightedDigraph.from_edges([0], [1], node_ids=np.array([10, 20]))
    assert json.loads(graphcli.partition_json(g, np.array([0, 1])))["partition"] == {"10": 0, "20": 1}
    g = WeightedDigraph.from_edges([0], [1], node_ids=['a"b', "c"])
    assert json.loads(graphcli.partition_json(g, np.array([0, 1])))["partition"] == {'a"b': 0, "c": 1}
