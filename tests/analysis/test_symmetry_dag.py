"""Permutation rows of `fibgraph symmetry-metrics`, computed from the hypergraph
(importers/dag_units.py, the only source) for models beyond feed-forward chains:
a Transformer and an LSTM with planted fibers (tests/planted_nets.py), and
random models of the same architectures."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import cli, read_json, wrap_module

torch = pytest.importorskip("torch")

from planted_nets import (RNNNet, TransformerNet, example_input, export_both, export_one,  # noqa: E402
                          planted_lstm, planted_transformer)

from fibgraph.importers.dag_api import weight_entries  # noqa: E402
from fibgraph.importers.dag_units import dag_layers  # noqa: E402
from fibgraph.importers.onnx.importer import import_dag  # noqa: E402

TINY = 1e-6
TH = ("--threshold", "1e-6", "--threshold", "0.1")


def _pairs(fibers):
    """Planted duplicate pairs: sum over fibers of (size - 1)."""
    return sum(len(f) - 1 for f in fibers)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("dagsym")
    tr, tr_info = planted_transformer(seed=0)
    lstm, lstm_info = planted_lstm(seed=0)
    torch.manual_seed(3)
    rnd_tr = TransformerNet().eval()
    rnd_lstm = RNNNet("LSTM", 5, 6, 4)
    return {"tr": (export_both(tr, example_input(tr_info), d, "tr"), tr_info),
            # the LSTM with the legacy exporter only (the dynamo export costs ~3 s; same rows)
            "lstm": ({"legacy": export_one(lstm, example_input(lstm_info), d / "lstm.onnx", dynamo=False)},
                     lstm_info),
            "rnd_tr": export_one(rnd_tr, example_input(tr_info), d / "rnd_tr.onnx", dynamo=False),
            "rnd_lstm": export_one(rnd_lstm, example_input(lstm_info), d / "rnd_lstm.onnx", dynamo=False)}


def _run(capsys, path, out):
    rc, so, err = cli(capsys, "symmetry-metrics", path, *TH, "--json", out)
    assert rc == 0, err
    return read_json(out), so


def _weight_names(path):
    names = []
    for w, *_ in weight_entries(import_dag(path)):
        if w not in names:
            names.append(w)
    return names


# ------------------------------------------------------------ (a) Transformer
@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
def test_planted_transformer_rows_count_planted_duplicates(capsys, models, tmp_path, kind):
    paths, info = models["tr"]
    r, so = _run(capsys, paths[kind], tmp_path / "t.json")
    names = _weight_names(paths[kind])
    assert [ly["name"] for ly in r["layers"]] == names and len(names) == 6      # one row per weight layer
    assert all(ly["source"] == "hypergraph" for ly in r["layers"])
    assert [ly["output_layer"] for ly in r["layers"]] == [False] * 5 + [True]  # fc
    assert not any("skipped" in w for w in r["warnings"])
    by_units = {}
    for ly in r["layers"][:-1]:
        by_units.setdefault(ly["units"], []).append(ly)
    ff = by_units[info["dim_feedforward"]]
    assert len(ff) == 1
    assert ff[0]["n_dos"]["1e-06"] >= _pairs(info["fibers"]["ff.linear1"]) == 6
    # linear1's unit: 8 incoming, 1 bias, 8 outgoing (linear2's column)
    assert ff[0]["vector"] == {"incoming": 8, "bias": 1, "outgoing": 8}
    in_proj = by_units[3 * info["d_model"]]
    assert in_proj[0]["n_dos"]["1e-06"] >= _pairs(info["fibers"]["attn.in_proj"])
    # the residual stream writers (inp, out_proj, linear2): read by in_proj, linear1 and fc
    res = by_units[info["d_model"]]
    assert len(res) == 3
    for ly in res:
        assert ly["n_dos"]["1e-06"] >= _pairs(info["fibers"]["inp"]) == 4
        assert ly["vector"]["outgoing"] == 3 * 8 + 12 + 3
    assert r["summary"]["n_dos"]["1e-06"] >= 6 + 12 + 3 * 4
    assert "N_dos<1e-06" in so and "hypergraph importer" in so and "double rotation" in so


def test_planted_fiber_units_have_identical_vectors(models):
    paths, info = models["tr"]
    ff = [ly for ly in dag_layers(import_dag(paths["legacy"])) if ly["units"] == info["dim_feedforward"]][0]
    U = ff.vectors()
    for f in info["fibers"]["ff.linear1"]:
        for u in f[1:]:
            np.testing.assert_allclose(U[u], U[f[0]], atol=1e-6, rtol=0)
    # units of different fibers differ
    reps = [U[f[0]] for f in info["fibers"]["ff.linear1"]]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(reps) for b in reps[i + 1:]) > 1e-2


def test_random_transformer_has_no_duplicates(capsys, models, tmp_path):
    r, _ = _run(capsys, models["rnd_tr"], tmp_path / "r.json")
    assert len(r["layers"]) == 6 and r["layers"][-1]["output_layer"]
    assert [ly["n_dos"]["1e-06"] for ly in r["layers"][:-1]] == [0] * 5
    assert all(ly["min_delta"] > 1e-3 for ly in r["layers"][:-1])


def test_bare_encoder_layer_residual_writers_are_output_units(capsys, tmp_path):
    """A TransformerEncoderLayer whose residual stream IS the output: out_proj and
    linear2 write the output columns (tied through the Adds and LayerNorms)."""
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True).eval()
    path = export_one(wrap_module(enc), torch.randn(2, 5, 8), tmp_path / "enc.onnx", dynamo=False)
    r, _ = _run(capsys, path, tmp_path / "e.json")
    assert [(ly["units"], ly["output_layer"]) for ly in r["layers"]] == [(24, False), (8, True), (12, False),
                                                                       (8, True)]


# ------------------------------------------------------------------ (b) LSTM
@pytest.mark.parametrize("kind", ["legacy"])
def test_planted_lstm_rows_for_hidden_units(capsys, models, tmp_path, kind):
    paths, info = models["lstm"]
    r, so = _run(capsys, paths[kind], tmp_path / "l.json")
    assert len(r["layers"]) == 2                  # W and R: one layer of hidden units; fc
    lstm, fc = r["layers"]
    assert lstm["kind"] == "LSTM" and " + " in lstm["name"] and lstm["units"] == info["hidden_size"] == 6
    assert not lstm["output_layer"] and fc["output_layer"]
    H, n_in = info["hidden_size"], info["n_in"]
    # 4 gate rows of W (n_in) and R (H); one bias per gate (W and R biases summed); R's and fc's columns
    assert lstm["vector"] == {"incoming": 4 * (n_in + H), "bias": 4, "outgoing": 4 * H + info["n_out"]}
    assert lstm["n_dos"]["1e-06"] >= _pairs(info["fibers"]["rnn.hidden"]) == 3
    assert lstm["zero_out_units"] == 0 and lstm["zero_in_units"] == 0
    U = [ly for ly in dag_layers(import_dag(paths[kind])) if ly["op"] == "LSTM"][0].vectors()
    for f in info["fibers"]["rnn.hidden"]:
        for u in f[1:]:
            np.testing.assert_allclose(U[u], U[f[0]], atol=1e-6, rtol=0)


def test_random_lstm_has_no_duplicates(capsys, models, tmp_path):
    r, _ = _run(capsys, models["rnd_lstm"], tmp_path / "rl.json")
    assert r["layers"][0]["units"] == 6 and r["layers"][0]["n_dos"]["1e-06"] == 0


def test_importer_refuses_rows_skipped_with_warning(capsys, models, tmp_path, monkeypatch):
    """Where the hypergraph importer refuses, the attention rows stay and the
    permutation rows are skipped with a warning naming the reason; with no
    attention rows either, the refusal is the command's error."""
    import fibgraph.importers.onnx.importer as od
    from fibgraph.errors import InputError

    def refuse(*a, **k):
        raise InputError("planted refusal")

    monkeypatch.setattr(od, "import_dag", refuse)
    r, _ = _run(capsys, models["rnd_tr"], tmp_path / "s.json")
    assert r["layers"] == [] and len(r["attention"]) == 2
    skipped = [w for w in r["warnings"] if w.startswith("dense-layer metrics skipped for 5 weight layers")]
    assert len(skipped) == 1 and skipped[0].endswith("the hypergraph importer refuses the model: planted refusal")
    from helpers import assert_one_line_error, mlp_onnx, save

    rng = np.random.default_rng(0)
    mlp = save(mlp_onnx([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))], [np.zeros(4), np.zeros(2)]),
               tmp_path / "mlp.onnx")
    rc, _, err = cli(capsys, "symmetry-metrics", mlp)
    assert_one_line_error(rc, err, "planted refusal")
