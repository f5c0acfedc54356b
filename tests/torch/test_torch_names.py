"""Torch names for ONNX files exported from torch (issue 13, item 1): layers
that both exporters store as anonymous copies (the dynamo exporter's
``val_12``, the TorchScript exporter's ``onnx::MatMul_34``: transposed weights
of a Linear applied to a 3-D input) are reported, drawn and keyed in eps files
by the torch tensor they stand for (``enc.0.weight``); eps files with either
name are read; a model from another producer keeps its ONNX names."""
import json

import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from helpers import cli, torch_export  # noqa: E402
from fibgraph.importers.api import compress_model  # noqa: E402
from fibgraph.importers.onnx.groups import display_names, node_module, torch_names  # noqa: E402
from fibgraph.importers.onnx.importer import import_dag  # noqa: E402
from fibgraph.importers.onnx.load import load_onnx  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU())
        self.head = nn.Linear(5, 3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():                   # enc.0: 4 distinct units, each twice (planted fibers)
            self.enc[0].weight.copy_(torch.randn(4, 6, generator=g).repeat(2, 1))
            self.enc[0].bias.copy_(torch.randn(4, generator=g).repeat(2))

    def forward(self, x):                       # (batch, seq, 6): MatMul on transposed copies
        return self.head(self.enc(x))


@pytest.fixture(scope="module", params=["dynamo", "legacy"])
def exported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    path = torch_export(Net(), torch.randn(2, 3, 6), d / "net.onnx", dynamo=request.param == "dynamo")
    return request.param, path


def test_anonymous_weights_get_their_torch_names(exported):
    _, path = exported
    imp = import_dag(load_onnx(path))
    names = torch_names(imp)
    anonymous = [t.name for t in imp.model.graph.initializer if t.name.startswith(("val_", "onnx::"))
                 and len(t.dims) == 2]
    assert anonymous, "the export should hold transposed copies"
    assert sorted(names[w] for w in anonymous) == ["enc.0.weight", "enc.2.weight", "head.weight"]
    assert sorted(display_names(imp).values()) == ["enc.0", "enc.2", "head"]


def test_report_and_eps_files_use_torch_names(exported, tmp_path, capsys):
    _, path = exported
    out, rep = tmp_path / "b.onnx", tmp_path / "r.json"
    rc, out, err = cli(capsys, "compress", path, "-o", out, "--eps", "0", "--report", rep, "--verify")
    assert rc == 0, err
    assert "enc.0.weight" in out and "val_" not in out and "onnx::" not in out
    report = json.loads(rep.read_text())
    first = next(ly for ly in report["layers"] if ly.get("torch_name") == "enc.0.weight")
    assert first["nodes_before"] == 8 and first["nodes_after"] == 4            # the planted fibers
    # an eps file keyed by the torch name reaches the right layer
    eps = tmp_path / "eps.json"
    eps.write_text(json.dumps({"enc.2.weight": 1.9}))
    rep2 = tmp_path / "r2.json"
    rc, out, err = cli(capsys, "compress", path, "-o", tmp_path / "b2.onnx", "--eps-file", eps, "--report", rep2)
    assert rc == 0, err
    layers = {ly.get("torch_name", ly["weight"]): ly for ly in json.loads(rep2.read_text())["layers"]}
    assert layers["enc.2.weight"]["criterion"]["eps"] == 1.9 and layers["enc.2.weight"]["nodes_after"] < 5
    assert layers["enc.0.weight"]["criterion"].get("exact")
    # the ONNX name still works
    onnx_name = layers["enc.2.weight"]["weight"]
    eps.write_text(json.dumps({onnx_name: 1.9}))
    rc, out, err = cli(capsys, "compress", path, "-o", tmp_path / "b3.onnx", "--eps-file", eps)
    assert rc == 0, err
    # an unknown name lists the torch names
    eps.write_text(json.dumps({"enc.9.weight": 0.1}))
    rc, out, err = cli(capsys, "compress", path, "-o", tmp_path / "b4.onnx", "--eps-file", eps)
    assert rc == 2 and "enc.9.weight" in err and "enc.2.weight" in err
    assert "val_" not in err and "onnx::" not in err


def test_keep_writes_an_eps_file_in_torch_names(exported, tmp_path):
    _, path = exported
    rep = compress_model(path, str(tmp_path / "k.onnx"), keep=0.6)
    assert rep["keep"]["names"] and set(rep["keep"]["names"].values()) <= {"enc.0.weight", "enc.2.weight", "head.weight"}


def test_other_producers_keep_their_names(exported, tmp_path):
    _, path = exported
    m = onnx.load(path)
    m.producer_name = "somebody"
    p2 = tmp_path / "other.onnx"
    onnx.save(m, p2)
    assert torch_names(import_dag(load_onnx(str(p2)))) == {}


def test_node_module_reads_both_exporters_conventions():
    n = onnx.helper.make_node("MatMul", ["a", "b"], ["c"], name="node_MatMul_3")
    p = n.metadata_props.add()
    p.key, p.value = "pkg.torch.onnx.name_scopes", "['', 'enc', 'enc.0', 'linear']"
    assert node_module(n) == "enc.0"
    assert node_module(onnx.helper.make_node("MatMul", ["a", "b"], ["c"], name="/enc/enc.0/MatMul")) == "enc.0"
    assert node_module(onnx.helper.make_node("MatMul", ["a", "b"], ["c"], name="/m/encoder/layer.0/q/MatMul")) \
        == "m.encoder.layer.0.q"
    assert node_module(onnx.helper.make_node("MatMul", ["a", "b"], ["c"], name="MatMul_3")) == ""
    p.value = "[broken"
    assert node_module(n) == ""
