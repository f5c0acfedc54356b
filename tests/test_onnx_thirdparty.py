"""ONNX files fibgraph did not produce: the test models shipped inside the onnx
package (old IR, weights computed by ConstantOfShape nodes, fixed batch 1)."""
import os

import onnx
import pytest

from importers.api import compress_model

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
VGG = os.path.join(DATA, "light_vgg19.onnx")


@pytest.mark.skipif(not os.path.exists(VGG), reason="this onnx build ships no light models")
def test_light_vgg19_compresses_exactly(tmp_path):
    out = tmp_path / "vgg_base.onnx"
    rep = compress_model(VGG, str(out), eps=0.0, verify=True)
    layers = rep["layers"]
    assert len(layers) == 19                      # 16 convs + 3 dense layers
    # the light model's weights are constants (ConstantOfShape), but the first two
    # convs have real, distinct biases: those units stay apart; every later hidden
    # layer is a single fiber
    assert [ly["nodes_after"] for ly in layers[:2]] == [64, 64]
    assert all(ly["nodes_after"] == 1 for ly in layers[2:-1])
    assert layers[-1]["nodes_after"] == layers[-1]["nodes_before"] == 1000
    assert rep["verify"]["max_abs_diff"] <= 1e-5 * 1000
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.output] == [o.name for o in onnx.load(VGG).graph.output]


@pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "light_squeezenet.onnx")),
                    reason="this onnx build ships no light models")
def test_branching_model_is_refused_with_one_clear_error():
    from fibgraph.errors import InputError

    with pytest.raises(InputError, match="not a feed-forward chain"):
        compress_model(os.path.join(DATA, "light_squeezenet.onnx"), "/tmp/never-written.onnx")
    assert not os.path.exists("/tmp/never-written.onnx")
