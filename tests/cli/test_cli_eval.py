"""``fibgraph eval``: accuracy and mean cross-entropy on a tiny hand-checked
dataset, for a logits output, a Softmax output and a LogSoftmax output."""
import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from helpers import _init, assert_one_line_error, cli, cli_sub, finish, mlp_onnx, read_json, save

W = 2.0 * np.eye(3)
B = np.array([0.0, 0.5, -0.5])
X = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [0.2, 0, 0.9]], dtype=np.float32)
Y = np.array([0, 1, 1, 0, 1, 2])
# logits = 2x + b: argmax 0, 1, 2, 1, 1, 2 -> rows 2 and 3 wrong: accuracy 4/6
ACC = 4 / 6


def _expected_loss():
    z = X.astype(np.float64) @ W.T + B
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(6), Y].mean())


def _one_layer(out_op):
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["z" if out_op else "y"], name="fc", transB=1)]
    if out_op:
        nodes.append(helper.make_node(out_op, ["z"], ["y"], name="out", axis=1))
    g = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [_init("W", W), _init("b", B)])
    return finish(g)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    np.savez(d / "d.npz", x=X, y=Y)
    return {"npz": str(d / "d.npz"),
            **{k: save(_one_layer(op), d / f"{k}.onnx") for k, op in
               (("logits", None), ("softmax", "Softmax"), ("logsoftmax", "LogSoftmax"))}}


def test_hand_computed_loss():
    # a check on the check: row 0 by hand: e^2 / (e^2 + e^0.5 + e^-0.5) = 7.389 / 9.644
    z0 = np.array([2.0, 0.5, -0.5])
    assert -np.log(np.exp(2.0) / np.exp(z0).sum()) == pytest.approx(0.2664, abs=1e-4)
    assert _expected_loss() > 0


@pytest.mark.parametrize("kind", ["logits", "softmax", "logsoftmax"])
def test_eval_accuracy_and_loss(capsys, tmp_path, files, kind):
    out = tmp_path / "e.json"
    rc, so, err = cli(capsys, "eval", files[kind], "--data", files["npz"], "--json", out)
    assert rc == 0, err
    r = read_json(out)
    assert {"accuracy", "loss", "n"} <= set(r)
    assert r["n"] == 6 and isinstance(r["n"], int)
    assert r["accuracy"] == pytest.approx(ACC, abs=1e-12)
    assert r["loss"] == pytest.approx(_expected_loss(), rel=1e-5)


def test_eval_real_cli_json(tmp_path, files):
    out = tmp_path / "e.json"
    rc, so, err = cli_sub("eval", files["softmax"], "--data", files["npz"], "--json", out)
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["accuracy"] == pytest.approx(ACC) and r["n"] == 6
    assert r["loss"] == pytest.approx(_expected_loss(), rel=1e-5)


def test_eval_with_api(files):
    from fibgraph.importers.api import evaluate

    a = evaluate(files["logits"], files["npz"])
    b = evaluate(files["softmax"], files["npz"])
    assert a["accuracy"] == b["accuracy"] == pytest.approx(ACC)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_eval_of_compressed_model_is_unchanged(capsys, tmp_path):
    """A Softmax-topped MLP with a planted duplicate: eval before == after."""
    rng = np.random.default_rng(3)
    W1, b1 = rng.normal(0, 1, (5, 3)), rng.normal(0, 0.5, 5)
    W1[4], b1[4] = W1[0], b1[0]
    W2, b2 = rng.normal(0, 1, (3, 5)), rng.normal(0, 0.5, 3)
    p = save(mlp_onnx([W1, W2], [b1, b2], out_op="Softmax"), tmp_path / "m.onnx")
    x = rng.normal(0, 1, (40, 3)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rc, _, err = cli(capsys, "compress", p, "-o", tmp_path / "s.onnx", "--report", tmp_path / "r.json")
    assert rc == 0, err
    assert read_json(tmp_path / "r.json")["layers"][0]["nodes_after"] == 4
    rc, _, err = cli(capsys, "eval", p, "--data", tmp_path / "d.npz", "--json", tmp_path / "a.json")
    assert rc == 0, err
    rc, _, err = cli(capsys, "eval", tmp_path / "s.onnx", "--data", tmp_path / "d.npz", "--json", tmp_path / "b.json")
    assert rc == 0, err
    a, b = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert a["accuracy"] == b["accuracy"] and a["n"] == b["n"] == 40
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # by hand
    h = np.maximum(x.astype(np.float64) @ W1.T + b1, 0) @ W2.T + b2
    logp = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
    assert a["accuracy"] == pytest.approx(float(np.mean(h.argmax(1) == y)))
    assert a["loss"] == pytest.approx(float(-logp[np.arange(40), y].mean()), rel=1e-4)


def test_eval_labels_out_of_range(capsys, tmp_path, files):
    np.savez(tmp_path / "bad.npz", x=X, y=np.array([0, 1, 2, 3, 0, 0]))
    rc, _, err = cli(capsys, "eval", files["logits"], "--data", tmp_path / "bad.npz")
    assert_one_line_error(rc, err)
