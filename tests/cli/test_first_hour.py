"""Issue 17 (the first hour): help on every option, one default per shared
option, ``python -m fibgraph``, the per-layer DataFrame and CSV."""
import os
import subprocess
import sys

import click
import numpy as np
import pytest

from helpers import ROOT, cli, cli_sub, mlp_onnx, planted_mlp, read_json, save


def _commands(group, prefix=""):
    for name, c in sorted(group.commands.items()):
        if isinstance(c, click.Group):
            yield from _commands(c, prefix + name + " ")
        else:
            yield prefix + name, c


def test_every_option_has_help_and_arguments_are_documented():
    from fibgraph.cli.main import cli as group

    missing = []
    for name, cmd in _commands(group):
        for p in cmd.params:
            if isinstance(p, click.Option) and not (p.help or "").strip():
                missing.append(f"{name} {'/'.join(p.opts)}")
            # hierarchy GRAPH: rewritten for ONNX models by issue 17 item 3 (another branch)
            if isinstance(p, click.Argument) and name != "hierarchy":
                doc = (cmd.help or "").upper()
                if p.human_readable_name.upper().split("...")[0] not in doc:
                    missing.append(f"{name} argument {p.human_readable_name} not named in the docstring")
    assert not missing, missing


def test_shared_options_have_one_default():
    """--linkage, --metric, --eps, --rtol, --symmetry: the same default wherever they appear;
    --steps differs (tune 10, retune 8) and both help texts say why."""
    from fibgraph.cli.main import cli as group

    defaults = {}
    for name, cmd in _commands(group):
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name in ("linkage", "metric", "rtol", "quiet"):
                defaults.setdefault(p.name, {})[name] = p.default
            if isinstance(p, click.Option) and p.name == "steps":
                assert "retune uses 8" in p.help or "not tune's 10" in p.help, (name, p.help)
    for opt, per in defaults.items():
        assert len(set(per.values())) == 1, (opt, per)
    assert len(defaults["linkage"]) >= 6 and len(defaults["metric"]) >= 6


def test_python_dash_m_fibgraph():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FIBGRAPH_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "fibgraph", "--help"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "compress" in p.stdout and "tune" in p.stdout
    p = subprocess.run([sys.executable, "-m", "fibgraph", "compress", "--help"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 0 and "--csv" in p.stdout


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    # 6 hidden units in fibers {0,1,4}, {2}, {3,5}; 3 outputs
    p = planted_mlp(np.random.default_rng(7), 4, [[0, 0, 1, 2, 0, 2]], 3)
    d = tmp_path_factory.mktemp("df")
    return save(mlp_onnx(p.Ws, p.bs), d / "m.onnx"), p


def test_layer_table_values_on_a_planted_model(planted, tmp_path):
    import pandas as pd

    from fibgraph.importers.api import compress_model, layer_table

    path, p = planted
    rep = compress_model(path, str(tmp_path / "s.onnx"))
    df = layer_table(rep)
    assert isinstance(df, pd.DataFrame)
    assert list(df["weight"]) == ["W1", "W2"]
    assert list(df["layer"]) == ["gemm1", "gemm2"]            # the ONNX node names
    assert list(df["units"]) == [6, 3]
    assert list(df["classes"]) == [3, 3]
    assert list(df["kept"]) == [3, 3]
    # W1: 6x4 -> 3x4 rows merged; W2: 3x6 -> 3x3 columns summed
    assert list(df["params_before"]) == [24, 18]
    assert list(df["params_after"]) == [12, 9]
    assert list(df["eps"]) == [0.0, 0.0] and list(df["metric"]) == ["exact", "exact"]
    assert list(df["output_layer"]) == [False, True]
    assert df["kept_fraction"].tolist() == pytest.approx([0.5, 1.0])
    # color at eps > 0 gives the same columns, the eps and metric that ran
    from fibgraph.importers.api import color_model

    rep2, _, _ = color_model(path, eps=0.05)
    df2 = layer_table(rep2)
    assert df2["eps"].tolist() == [0.05, 0.05] and set(df2["metric"]) <= {"cosine", "euclidean"}
    assert list(df2.columns) == list(df.columns)


def test_csv_option_on_color_and_compress(planted, tmp_path, capsys):
    import pandas as pd

    path, _ = planted
    csv1, csv2, rep = tmp_path / "c.csv", tmp_path / "k.csv", tmp_path / "r.json"
    rc, so, err = cli(capsys, "color", path, "--csv", csv1)
    assert rc == 0, err
    rc, so, err = cli(capsys, "compress", path, "-o", tmp_path / "s.onnx", "--csv", csv2, "--report", rep)
    assert rc == 0, err
    a, b = pd.read_csv(csv1), pd.read_csv(csv2)
    assert b["kept"].tolist() == [3, 3] and b["params_after"].tolist() == [12, 9]
    assert a["classes"].tolist() == [3, 3]
    # the JSON report carries the same per-layer numbers
    r = read_json(rep)
    assert [ly["weight_params_after"] for ly in r["layers"]] == [12, 9]
    assert [ly["node"] for ly in r["layers"]] == ["gemm1", "gemm2"]
