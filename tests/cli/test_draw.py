"""``fibgraph draw``: figures for a paper (vector formats, PNG at 200 dpi, a
legend, layers by module name, big models aggregated or drawn by range)."""
import re

import numpy as np
import pytest

from helpers import cli, mlp_onnx, save, torch_export

from fibgraph.planted import planted_mlp


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """x(4) -> W1 (6 units, fibers {0,1,2} {3} {4} {5}) -> W2 (4 units, {0,1} {2} {3}) -> W3 (3)."""
    P1, P2 = [0, 0, 0, 1, 2, 3], [0, 0, 1, 2]
    layers = planted_mlp(np.random.default_rng(3), [4, 6, 4, 3], fibers=[None, P1, P2, None])
    return save(mlp_onnx([W for W, _ in layers], [b for _, b in layers]),
                tmp_path_factory.mktemp("draw") / "planted.onnx")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """x(300) -> 120 -> 40 -> 5: 465 units, a 300-unit input column (above the automatic threshold)."""
    rng = np.random.default_rng(0)
    sz = [300, 120, 40, 5]
    Ws = [rng.normal(0, 1, (sz[i + 1], sz[i])) for i in range(3)]
    bs = [rng.normal(0, 1, sz[i + 1]) for i in range(3)]
    return save(mlp_onnx(Ws, bs), tmp_path_factory.mktemp("draw") / "wide.onnx")


MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-", ".svg": b"<?xml"}


@pytest.mark.parametrize("ext", [".svg", ".pdf", ".png"])
def test_formats_by_extension(capsys, tmp_path, planted, ext):
    out = tmp_path / f"pic{ext}"
    rc, text, err = cli(capsys, "draw", planted, "-o", out)
    assert rc == 0, err
    data = out.read_bytes()
    assert data.startswith(MAGIC[ext])
    if ext == ".svg":
        assert b"<svg" in data[:2000]
    if ext == ".png":
        from PIL import Image

        with Image.open(out) as im:
            dpi = im.info["dpi"]
            w, h = im.size
        assert dpi == pytest.approx((200, 200), abs=0.5)
        assert w <= 3200 and h <= 2000
        assert f"{w}x{h} px" in text


def test_svg_has_legend_layer_names_one_font(capsys, tmp_path, planted):
    out = tmp_path / "pic.svg"
    rc, _, err = cli(capsys, "draw", planted, "-o", out)
    assert rc == 0, err
    svg = out.read_text()
    texts = " ".join(re.findall(r">([^<>]+)</text>", svg))
    # legend: the planted fibers of three units and of two, singletons in grey, the edge encoding
    assert "fiber of 3 units" in texts and "fiber of 2 units" in texts
    assert "singleton" in texts and "|weight|" in texts
    for name in ("input", "W1", "W2", "W3"):
        assert re.search(rf"\b{name}\b", texts), name
    assert "6 units, 4 fibers" in texts and "4 units, 3 fibers" in texts
    assert "onnx::" not in svg
    fonts = set(re.findall(r"font-family:\s*'?([^;'\"]+)", svg)) | set(re.findall(r'font-family="([^"]+)"', svg))
    assert fonts and all("DejaVu Sans" in f for f in fonts), fonts


def _torchscript_like(path):
    """What the TorchScript exporter writes for ``fc2(relu(fc1(x)))`` with ``fc1``
    bias-free: fc1's transposed weight is an initializer named ``onnx::MatMul_8``
    read by the node ``/fc1/MatMul``; fc2 is a Gemm on ``fc2.weight``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    W1, W2, b2 = rng.normal(0, 1, (5, 8)), rng.normal(0, 1, (3, 8)), rng.normal(0, 1, 3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n)
             for a, n in ((W1, "onnx::MatMul_8"), (W2, "fc2.weight"), (b2, "fc2.bias"))]
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_8"], ["h"], name="/fc1/MatMul"),
             helper.make_node("Relu", ["h"], ["a"], name="/Relu"),
             helper.make_node("Gemm", ["a", "fc2.weight", "fc2.bias"], ["y"], name="/fc2/Gemm", transB=1)]
    g = helper.make_graph(nodes, "ts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    from helpers import finish

    return save(finish(g), path)


def test_layers_named_by_module_not_initializer(capsys, tmp_path):
    """The picture and the hierarchy table say ``fc1``, not ``onnx::MatMul_8``."""
    path = _torchscript_like(tmp_path / "ts.onnx")
    out = tmp_path / "ts.svg"
    rc, _, err = cli(capsys, "draw", path, "-o", out)
    assert rc == 0, err
    svg = out.read_text()
    assert ">fc1" in svg and ">fc2" in svg and "onnx::" not in svg
    rc, text, err = cli(capsys, "hierarchy", path)
    assert rc == 0, err
    assert "fc1" in text and "onnx::" not in text


@pytest.mark.slow
def test_torchscript_export_is_named_by_module(capsys, tmp_path):
    """The same with a real TorchScript export (guards the naming rule above)."""
    import torch

    torch.manual_seed(0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(5, 8, bias=False)
            self.fc2 = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    path = torch_export(M(), torch.randn(2, 5), tmp_path / "ts.onnx", dynamo=False)
    import onnx

    assert any(i.name.startswith("onnx::") for i in onnx.load(path).graph.initializer)
    out = tmp_path / "ts.svg"
    rc, _, err = cli(capsys, "draw", path, "-o", out)
    assert rc == 0, err
    assert ">fc1" in out.read_text() and "onnx::" not in out.read_text()


def test_big_model_is_aggregated_not_refused(capsys, tmp_path, wide):
    out = tmp_path / "wide.png"
    rc, text, err = cli(capsys, "draw", wide, "-o", out)
    assert rc == 0, err
    assert "aggregated" in text and "--layers" in err
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] <= 3200 and im.size[1] <= 2000
    # unit by unit on request: still a bounded picture (the 300-unit column is squeezed, not 7000 px high)
    rc, text, err = cli(capsys, "draw", wide, "-o", out, "--no-aggregate")
    assert rc == 0, err
    assert "465 units, 1" in text and ", aggregated" not in text
    with Image.open(out) as im:
        assert im.size[0] <= 3200 and im.size[1] <= 2000
    svg = tmp_path / "wide.svg"
    rc, _, err = cli(capsys, "draw", wide, "-o", svg, "--aggregate")
    assert rc == 0, err
    assert "300 singletons" in svg.read_text()        # one box for the inputs, its size written


def test_layers_selects_a_range_or_names(capsys, tmp_path, wide):
    out = tmp_path / "r.svg"
    rc, text, err = cli(capsys, "draw", wide, "-o", out, "--layers", "2:4", "--no-aggregate")
    assert rc == 0, err
    assert "2 layers, 45 units" in text and ", aggregated" not in text
    texts = " ".join(re.findall(r">([^<>]+)</text>", out.read_text()))
    assert "W2" in texts and "W3" in texts and not re.search(r"\bW1\b", texts)
    rc, text, err = cli(capsys, "draw", wide, "-o", out, "--layers", "W1,W3", "--no-aggregate")
    assert rc == 0, err
    assert "2 layers, 125 units" in text


@pytest.mark.parametrize("spec, needle", [("7:9", "selects no layer"), ("fc9", "no layer named fc9")])
def test_bad_layers_one_line(capsys, tmp_path, wide, spec, needle):
    rc, _, err = cli(capsys, "draw", wide, "-o", tmp_path / "x.svg", "--layers", spec)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.svg").exists()


def test_too_many_units_one_by_one_suggests_options(capsys, tmp_path, wide, monkeypatch):
    import fibgraph.draw as D

    monkeypatch.setattr(D, "MAX_NODES", 100)
    rc, _, err = cli(capsys, "draw", wide, "-o", tmp_path / "x.png", "--no-aggregate")
    assert rc == 2 and "--aggregate" in err and "--layers" in err
