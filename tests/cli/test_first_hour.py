"""Issue 17 (the first hour): help on every option, one default per shared
option, ``python -m fibgraph``, the per-layer DataFrame and CSV."""
import os
import re
import subprocess
import sys

import click
import numpy as np
import pytest

from helpers import ROOT, cli, mlp_onnx, planted_mlp, read_json, save


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
    --steps too (tune and retune: 8)."""
    from fibgraph.cli.main import cli as group

    defaults = {}
    for name, cmd in _commands(group):
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name in ("linkage", "metric", "rtol", "quiet"):
                defaults.setdefault(p.name, {})[name] = p.default
            if isinstance(p, click.Option) and p.name == "steps":
                defaults.setdefault("steps", {})[name] = p.default
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
    assert df2["eps"].tolist()[0] == 0.05 and df2["metric"].tolist()[0] in {"cosine", "euclidean"}
    # the output layer is kept whole by the writer: coloured exactly whatever eps asks
    assert df2["eps"].tolist()[1] == 0.0 and df2["metric"].tolist()[1] == "exact"
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


# ---------------------------------------------------------------- progress (item 2)

def _run(*args, delay="0", cwd=None):
    """The real CLI in a subprocess (stderr is a pipe, not a terminal), with the
    progress display starting at once (FIBGRAPH_PROGRESS_DELAY)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FIBGRAPH_PROGRESS_DELAY=delay, COLUMNS="80")
    env.pop("FIBGRAPH_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "fibgraph", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd or ROOT, timeout=180)
    return p.returncode, p.stdout, p.stderr


BAR = re.compile("\u2501+ \\d+/\\d+")        # a rich progress bar and its count (3/3)


def test_progress_helper_is_a_no_op_outside_shown_and_silent_when_quiet():
    import io

    from rich.console import Console

    from fibgraph.progress import active, shown, task

    with task("nothing shown", total=3) as advance:       # no display: a no-op
        advance(1, "step")
    assert not active()
    buf = io.StringIO()
    with shown(delay=0, console=Console(file=buf, width=100)):
        assert active()
        with task("outer stage", total=2) as advance:
            with task("inner stage", total=5) as inner:    # nested: shown while it runs, then removed
                inner(5)
            advance(1, "outer stage: half")
            advance(1)
        with task("uncounted stage") as adv:
            adv()
        for _ in range(3):                                  # a stage run again keeps one row
            with task("repeated stage", total=4) as adv:
                adv(4)
    text = buf.getvalue()
    assert "outer stage" in text and "2/2" in text and "uncounted stage" in text
    assert text.count("repeated stage") == 1 and "4/4" in text
    assert "inner stage" not in text                      # finished nested stages leave no row
    buf = io.StringIO()
    with shown(quiet=True):
        assert not active()
        with task("hidden", total=1) as advance:
            advance()
    assert buf.getvalue() == ""


def test_compress_progress_goes_to_stderr_and_quiet_silences_it(planted, tmp_path):
    path, p = planted
    rc, so, err = _run("compress", path, "-o", tmp_path / "s.onnx", "--verify")
    assert rc == 0, err
    for stage in ("probing", "building the hypergraph", "colouring (fibers)", "writing the base", "verifying"):
        assert stage in err, (stage, err)
    assert BAR.search(err)
    assert not BAR.search(so) and "colouring (fibers)" not in so and "probing" not in so
    assert f"parameters: {p.params_before()} -> " in so                   # the report stays on stdout
    rc, so2, err2 = _run("compress", path, "-o", tmp_path / "s2.onnx", "--verify", "--quiet")
    assert rc == 0 and err2 == "", err2
    assert so2.replace("s2.onnx", "s.onnx") == so
    # the default delay: a run this short shows nothing
    rc, so3, err3 = _run("compress", path, "-o", tmp_path / "s3.onnx", delay="30")
    assert rc == 0 and err3 == ""


def _tanh_model_and_data(tmp_path):
    rng = np.random.default_rng(3)
    Ws = [rng.normal(size=(6, 4)), rng.normal(size=(3, 6))]
    path = save(mlp_onnx(Ws, [np.zeros(6), np.zeros(3)], act="Tanh"), tmp_path / "tanh.onnx")
    x = rng.normal(size=(60, 4)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x, y=rng.integers(0, 3, 60))
    return path, tmp_path / "cal.npz"


def test_tune_bar_on_stderr_explains_ok_and_the_command_is_one_line(tmp_path):
    # a long folder name: the suggested command is longer than any terminal line
    d = tmp_path / ("a_rather_long_folder_name_for_the_models_" * 3)
    d.mkdir()
    path, cal = _tanh_model_and_data(d)
    rc, so, err = _run("tune", path, "--data", cal, "--steps", "2", "-o", d / "eps.json")
    assert rc == 0, err
    assert "tuning" in err and "(ok = loss <= (1+tau) x original)" in err and BAR.search(err)
    assert not BAR.search(so) and "tuning" not in so.split("greedy eps")[0]
    cmd = [ln for ln in so.splitlines() if ln.strip().startswith("fibgraph compress")]
    assert len(cmd) == 1, so
    assert str(path) in cmd[0] and cmd[0].rstrip().endswith("-o SMALL.onnx")
    # tanh everywhere: cosine ran nowhere, so the command does not ask for it
    assert "--metric euclidean" in cmd[0] and "--metric cosine" not in cmd[0]
    assert "euclidean distance on every layer" in so
    # --no-progress is --quiet
    rc, so2, err2 = _run("tune", path, "--data", cal, "--steps", "2", "-o", d / "eps2.json", "--no-progress")
    assert rc == 0 and err2 == "", err2


# ---------------------------------------------------------------- messages (item 1)

def test_no_exact_fibers_says_what_to_try_on_one_line(tmp_path):
    d = tmp_path / ("long_folder_name_" * 8)
    d.mkdir()
    path, cal = _tanh_model_and_data(d)
    rc, so, err = _run("compress", path, "-o", d / "s.onnx", delay="30")
    assert rc == 0, err
    line = next(ln for ln in so.splitlines() if ln.startswith("no exact fibers"))
    assert f"try --keep F or `fibgraph tune {path} --data CAL.npz -o eps.json`" in line
    # a model that does shrink gets no such hint
    rc, so, err = _run("compress", path, "-o", d / "s.onnx", "--eps", "1.5", delay="30")
    assert rc == 0 and "no exact fibers" not in so


def test_verify_reports_relative_error_and_scores_on_labelled_data(planted, tmp_path, capsys):
    path, p = planted
    x = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 3)
    rep = tmp_path / "r.json"
    rc, so, err = cli(capsys, "compress", path, "-o", tmp_path / "s.onnx", "--data", tmp_path / "d.npz",
                      "--report", rep)
    assert rc == 0, err
    v = read_json(rep)["verify"]
    assert v["rel_diff"] == pytest.approx(v["max_abs_diff"] / v["max_abs_output"])
    a, b = v["scores"]["original"], v["scores"]["base"]
    assert a["n"] == b["n"] == 40 and a["accuracy"] == b["accuracy"]       # exact fibers: the same function
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert "relative" in so and "on the 40 samples of --data" in so
    assert f"accuracy {a['accuracy']:.4f} -> {b['accuracy']:.4f}" in so
    # made-up inputs: the count and the distribution are said
    rc, so, err = cli(capsys, "compress", path, "-o", tmp_path / "s.onnx", "--verify")
    assert "x 64 made-up inputs (x: normal(0,1)" in so and "relative" in so
    assert "next: accuracy and loss with `fibgraph eval" in so


def test_a_model_with_its_weights_behind_an_if_gets_a_sentence_not_an_empty_table(tmp_path, capsys):
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    W = nh.from_array(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "W")
    then = h.make_graph([h.make_node("Gemm", ["x", "W"], ["t"], transB=1)], "then", [],
                        [h.make_tensor_value_info("t", T.FLOAT, [1, 3])], initializer=[W])
    W2 = nh.from_array(np.ones((3, 4), np.float32), "W2")
    els = h.make_graph([h.make_node("Gemm", ["x", "W2"], ["e"], transB=1)], "else", [],
                       [h.make_tensor_value_info("e", T.FLOAT, [1, 3])], initializer=[W2])
    g = h.make_graph([h.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                      h.make_node("Greater", ["s", "zero"], ["c"]),
                      h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 3])],
                     initializer=[nh.from_array(np.array(0, np.float32), "zero")])
    path = save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "if.onnx")
    rc, so, err = cli(capsys, "color", path)
    assert rc == 0, err
    assert "no weight layer to colour" in so and "If at" in so and "fibgraph inspect" in so
    assert "layer (weight)" not in so                          # no table headers without rows
    rc, so, err = cli(capsys, "inspect", path)
    assert rc == 0, err
    assert "compressible weights: none" in so and "homogeneous" not in so
    rc, so, err = cli(capsys, "compare", path, path)
    assert rc == 0, err
    assert "no weight layer to compare" in so and "ARI" not in so


def test_compare_methods_drops_eps_points_with_the_same_base(tmp_path, capsys):
    model = os.path.join(ROOT, "fibgraph", "data", "digits_mlp.onnx")
    data = os.path.join(ROOT, "fibgraph", "data", "digits_test.npz")
    js = tmp_path / "c.json"
    rc, so, err = cli(capsys, "compare-methods", model, "--data", data, "--eps", "0.2,0.201",
                      "--methods", "random", "--json", js)
    assert rc == 0, err
    res = read_json(js)
    assert [r["point"] for r in res["rows"]] == ["original", "eps=0.2", "eps=0.2"]
    assert res["dropped"] == [{"point": "eps=0.201", "eps": 0.201, "same_as": "eps=0.2"}]
    assert "1 of 2 eps points dropped: the same base as the eps before (eps=0.201 = eps=0.2)" in so
