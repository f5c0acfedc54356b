"""ONNX files fibgraph did not produce: the test models shipped inside the onnx
package (old IR, weights computed by ConstantOfShape nodes, fixed batch 1)."""
import os

import onnx
import pytest

from fibgraph.importers.api import compress_model

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
VGG = os.path.join(DATA, "light_vgg19.onnx")


@pytest.mark.slow
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
def test_branching_model_compresses_through_the_hypergraph(tmp_path):
    """squeezenet's fire modules branch and Concat along the channel axis: the
    chain importer refuses it, the hypergraph importer compresses it exactly."""
    src = os.path.join(DATA, "light_squeezenet.onnx")
    out = tmp_path / "sq_base.onnx"
    rep = compress_model(src, str(out), eps=0.0, verify=True)
    assert rep["graph"] == "hypergraph" and not rep["barriers"]
    assert len(rep["layers"]) == 26                 # every Conv of the fire modules and the classifier
    # the light model's weights are computed by ConstantOfShape (constant per
    # tensor), so most units of a layer fall into one fiber
    # (measured: 3,944 units -> 1,650; the squeeze layers have distinct biases)
    assert sum(ly["nodes_after"] for ly in rep["layers"]) < sum(ly["nodes_before"] for ly in rep["layers"]) / 2
    assert rep["layers"][-1]["nodes_after"] == rep["layers"][-1]["nodes_before"] == 1000
    assert rep["verify"]["max_abs_diff"] <= 1e-4 * max(1.0, rep["verify"]["max_abs_output"])
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
