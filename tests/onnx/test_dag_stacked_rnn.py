"""Stacked recurrent layers (``nn.LSTM`` / ``nn.GRU`` with ``num_layers`` 2-3)
on the hypergraph path, both torch exporters (issue 11, item 7).

The reported crash: a voice encoder (3 stacked LSTM layers, a Linear on the
last hidden state, an L2 normalisation whose ReduceL2 is a barrier) stopped
``color`` / ``compress`` with ``block '...:d0g0': weight shape (H, H, 1) does
not match H dst x 1 src``.  The barrier made the importer also try the other
input layouts ("1": units along time, "none"); there the first LSTM is a
barrier whose fresh output has ONE node on its feature axis, and the second
LSTM read that one node with a weight over H features.  The recurrent rule now
refuses (a barrier) an input whose feature axis does not hold the op's
``input_size`` units, so those layouts lose and the features-last one is kept.

* Planted models: every layer's hidden units carry their own planted fibers
  (duplicate units: gate rows of ``W`` and ``R`` copied inside a fiber, the
  next layer's ``W`` columns and the own ``R`` columns divided by the fiber
  size, the Linear's columns likewise).  ``color_dag_model`` recovers every
  layer's fibers exactly (hidden units, per direction for the bidirectional
  one); ``compress_dag_model(eps=0, verify=True)`` writes a smaller model that
  equals the original and torch within 1e-5 (relative) at other batch sizes
  and (legacy export) other sequence lengths; its LSTM/GRU ops keep one hidden
  unit per fiber of the widest direction (and, where h_n is read, of the
  widest layer: h_n concatenates every layer's final state, whose cells must
  keep equal sizes; the colouring's classes are still exactly the planted).
* Random weights (no fibers) with the L2 normalisation: colour and compress
  succeed, nothing merges, the written model equals the original.
"""
import contextlib
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from torch import nn  # noqa: E402

import planted_nets as pn  # noqa: E402
from helpers import run_onnx  # noqa: E402
from fibgraph.importers.dag_api import color_dag_model, compress_dag_model  # noqa: E402

TOL = 1e-5
KINDS = ("legacy", "dynamo")
N_IN, SEQ = 5, 4


class Stacked(nn.Module):
    """x (batch, seq, n_in) -> stacked LSTM/GRU -> Linear on the last step's output
    (``head="last"``) or on the last layer's final hidden state ``h_n[-1]``
    (``head="hn"``) [-> L2 normalisation (``norm``: ReduceL2, a barrier)]."""

    def __init__(self, kind, hidden, layers, n_out, bidirectional=False, head="last", norm=False, n_in=N_IN):
        super().__init__()
        self.kind, self.head, self.norm = kind, head, norm
        self.rnn = getattr(nn, kind)(n_in, hidden, num_layers=layers, batch_first=True,
                                     bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), n_out)
        self.eval()

    def forward(self, x):
        out, state = self.rnn(x)
        h_n = state[0] if self.kind == "LSTM" else state
        y = self.fc(out[:, -1] if self.head == "last" else h_n[-1])
        if self.norm:
            y = y / (torch.norm(y, dim=1, keepdim=True) + 1e-5)
        return y


def _set(param, arr):
    with torch.no_grad():
        param.copy_(torch.as_tensor(np.asarray(arr), dtype=param.dtype))


def planted_stacked(kind, seed, sizes, bidirectional=False, head="last", n_out=3, norm=False):
    """``sizes[l][d]``: fiber sizes of layer l, direction d (each sums to H).
    Returns (model, fibers) with ``fibers[l][d]`` the planted partition of that
    layer's hidden units (lists of unit indices)."""
    rng = np.random.default_rng(seed)
    G = 4 if kind == "LSTM" else 3
    H = sum(sizes[0][0])
    model = Stacked(kind, H, len(sizes), n_out, bidirectional=bidirectional, head=head, norm=norm)
    fibers, prev = [], None          # prev: column map of the layer's input (None: raw input)
    for layer, per_dir in enumerate(sizes):
        maps, layer_fib = [], []
        for d, sz in enumerate(per_dir):
            assert sum(sz) == H
            f, _ = pn.make_map(rng, sz)
            k = len(sz)
            n_prev = N_IN if prev is None else int(prev.max()) + 1
            Wih = rng.normal(0, 0.6, (G * k, n_prev))
            Whh = rng.normal(0, 0.8, (G * k, k))
            bih, bhh = rng.normal(0, 0.5, G * k), rng.normal(0, 0.5, G * k)
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            _set(getattr(model.rnn, "weight_ih" + sfx), pn.lift_blocks(Wih, G, f, prev))
            _set(getattr(model.rnn, "weight_hh" + sfx), pn.lift_blocks(Whh, G, f, f))
            _set(getattr(model.rnn, "bias_ih" + sfx), pn.lift_blocks(bih, G, f))
            _set(getattr(model.rnn, "bias_hh" + sfx), pn.lift_blocks(bhh, G, f))
            maps.append(f)
            layer_fib.append(pn.fibers_of(f))
        # the next layer reads [forward units, reverse units]: base units of direction d offset
        shift = np.cumsum([0] + [int(m.max()) + 1 for m in maps])
        prev = np.concatenate([m + shift[d] for d, m in enumerate(maps)])
        fibers.append(layer_fib)
    if head == "last":
        col = prev
    else:                            # h_n[-1]: the last layer's LAST direction only
        col = maps[-1]
    Wo = rng.normal(0, 0.7, (n_out, int(col.max()) + 1))
    _set(model.fc.weight, pn.lift(Wo, None, col))
    _set(model.fc.bias, rng.normal(0, 0.5, n_out))
    model.eval()
    return model, fibers


def export(model, path, dynamo, dynamic=True):
    """Export with a dynamic batch and (legacy) sequence axis; ``dynamic=False``:
    static shapes."""
    x = torch.randn(3, SEQ, model.rnn.input_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if not dynamic:
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=dynamo,
                              **({"external_data": False} if dynamo else {"opset_version": pn.LEGACY_OPSET}))
        elif dynamo:
            # the batch only: torch.export specialises an RNN's sequence length (a
            # constraint violation; torch.onnx then falls back to strategies whose
            # result, dynamic or not, depends on what the process exported before)
            dims = ({0: torch.export.Dim("batch", min=1, max=1024)},)
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                              external_data=False, dynamic_shapes=dims, verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                              dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch"}},
                              opset_version=pn.LEGACY_OPSET)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return str(path)


CASES = {
    # name: (kind, per-layer per-direction fiber sizes, bidirectional, head)
    "lstm3": ("LSTM", [[(3, 2, 1)], [(2, 2, 1, 1)], [(1, 4, 1)]], False, "last"),
    "gru3": ("GRU", [[(2, 3, 1)], [(3, 1, 2)], [(2, 2, 2)]], False, "hn"),
    "lstm2_hn": ("LSTM", [[(1, 2, 3)], [(3, 3)]], False, "hn"),
    "lstm2_bi": ("LSTM", [[(3, 2, 1), (1, 4, 1)], [(2, 2, 1, 1), (3, 3)]], True, "last"),
    # the reported shape: h_n[-1] -> Linear -> L2 normalisation (ReduceL2: a barrier today)
    "lstm3_norm": ("LSTM", [[(2, 1, 3)], [(1, 1, 2, 2)], [(4, 2)]], False, "hn"),
}
SEEDS = {"lstm3": 1, "gru3": 2, "lstm2_hn": 3, "lstm2_bi": 4, "lstm3_norm": 5}
NORM = {"lstm3_norm"}


class _Store:
    def __init__(self, root):
        self.root = root
        self.models, self.paths, self.done = {}, {}, {}

    def model(self, name):
        if name not in self.models:
            kind, sizes, bi, head = CASES[name]
            self.models[name] = planted_stacked(kind, SEEDS[name], sizes, bidirectional=bi, head=head,
                                                norm=name in NORM)
        return self.models[name]

    def path(self, name, kind):
        if (name, kind) not in self.paths:
            self.paths[name, kind] = export(self.model(name)[0], self.root / f"{name}_{kind}.onnx", kind == "dynamo")
        return self.paths[name, kind]

    def compress(self, name, kind):
        if (name, kind) not in self.done:
            out = self.root / f"{name}_{kind}_base.onnx"
            self.done[name, kind] = (compress_dag_model(self.path(name, kind), out, eps=0.0, verify=True), str(out))
        return self.done[name, kind]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _Store(tmp_path_factory.mktemp("stacked_rnn"))


def _as_set(fibers):
    return {frozenset(int(u) for u in cl) for cl in fibers}


def _rnn_records(imp):
    """The LSTM/GRU records: stacked layers are separate ONNX ops, in graph (= layer) order."""
    return [r for r in imp.records if r.kind.value == "recurrent"]


@pytest.mark.parametrize("name,kind", [(n, k) for n in CASES for k in KINDS])
def test_colour_recovers_every_layers_fibers(store, name, kind):
    model, fibers = store.model(name)
    report, imp, col = color_dag_model(store.path(name, kind))
    assert all(b["op"] not in ("LSTM", "GRU") for b in report["barriers"]), report["barriers"]
    if name not in NORM:
        assert report["barriers"] == [], report["barriers"]
    recs = _rnn_records(imp)
    assert len(recs) == len(fibers), [r["node"] for r in recs]
    H = model.rnn.hidden_size
    for li, (rec, planted) in enumerate(zip(recs, fibers)):
        assert rec.op == CASES[name][0] and rec.dirs == len(planted) and rec.H == H
        for d, sp in enumerate(rec.hidden):
            got = pn.fibers_of(col.labels[imp.spaces[sp].ids])
            assert _as_set(got) == _as_set(planted[d]), (li, d, got, planted[d])
        # the report's W and R entries of this layer: its hidden units, all directions
        want = set().union(*[{frozenset(u + d * H for u in cl) for cl in planted[d]}
                             for d in range(len(planted))])
        entries = [e for e in report["layers"] if e["weight"] in (rec.W, rec.R)]
        assert len(entries) == 2, [e["weight"] for e in report["layers"]]
        for e in entries:
            # the colouring's classes are the planted fibers
            assert _as_set(e.get("colour_classes", e["fibers"])) == want, (li, e["weight"], e)
            # the base's units: inside the fibers, as many per direction as the
            # widest direction (one hidden_size per op) or, when h_n is read,
            # the widest layer (h_n concatenates every layer's final state)
            assert all(any(set(f) <= c for c in want) for f in e["fibers"]), (li, e["weight"], e["fibers"])
            k = kept_per_direction(name, fibers)[li]
            assert e["nodes_before"] == H * len(planted) and e["nodes_after"] == k * len(planted), (li, e)
            assert len(e["fibers"]) == k * len(planted), (li, e)


def kept_per_direction(name, fibers):
    """Hidden units per direction the base keeps, per layer (see above)."""
    widest = [max(len(p) for p in layer) for layer in fibers]
    return [max(widest)] * len(fibers) if CASES[name][3] == "hn" else widest


@pytest.mark.parametrize("name,kind", [(n, k) for n in CASES for k in KINDS])
def test_compress_exact_smaller_at_other_batch_and_seq(store, name, kind):
    model, fibers = store.model(name)
    report, out = store.compress(name, kind)
    v = report["verify"]
    assert v["max_abs_diff"] <= TOL * max(1.0, v["max_abs_output"]), v
    assert report["params_after"] < report["params_before"]
    m2 = onnx.load(out)
    onnx.checker.check_model(m2, full_check=True)
    # one LSTM/GRU op per layer, hidden_size as kept_per_direction says
    rnn = [n for n in m2.graph.node if n.op_type == CASES[name][0]]
    assert len(rnn) == len(fibers)
    for node, k in zip(rnn, kept_per_direction(name, fibers)):
        hs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["hidden_size"]
        assert hs == k, (node.name, hs)
    dim1 = onnx.load(store.path(name, kind)).graph.input[0].type.tensor_type.shape.dim[1]
    static_seq = kind == "dynamo"                              # see export()
    assert dim1.HasField("dim_value") == static_seq, dim1
    for batch, seq, seed in ((5, 7, 11), (1, 2, 12)):
        seq = SEQ if static_seq else seq
        x = torch.randn(batch, seq, N_IN, generator=torch.Generator().manual_seed(seed))
        y_orig = run_onnx(store.path(name, kind), x.numpy())[0]
        y_base = run_onnx(out, x.numpy())[0]
        with torch.no_grad():
            y_torch = model(x).numpy()
        assert y_base.shape == y_orig.shape == y_torch.shape == (batch, 3)
        scale = max(1.0, float(np.max(np.abs(y_orig))))
        assert float(np.max(np.abs(y_orig))) > 0.05                # real outputs compared
        assert np.max(np.abs(y_base - y_orig)) <= TOL * scale, (batch, seq)
        assert np.max(np.abs(y_base - y_torch)) <= TOL * scale, (batch, seq)


# ------------------------------------------------------------- the reported crash
@pytest.mark.parametrize("rnn", ["LSTM", "GRU"])
@pytest.mark.parametrize("kind", KINDS)
def test_random_stacked_encoder_with_l2_norm(tmp_path, rnn, kind):
    """The voice encoder's shape (3 layers, Linear on h_n[-1], L2 normalised),
    40 -> 24 instead of 40 -> 256: colour and compress succeed (they raised a
    ValueError from the graph's block check), nothing merges, exact."""
    torch.manual_seed(5)
    model = Stacked(rnn, 24, 3, 24, head="hn", norm=True, n_in=40)
    path = export(model, tmp_path / "enc.onnx", kind == "dynamo", dynamic=False)   # static, as reported
    report, imp, col = color_dag_model(str(path))
    assert all(b["op"] not in ("LSTM", "GRU") for b in report["barriers"]), report["barriers"]
    recs = _rnn_records(imp)
    assert len(recs) == 3
    for rec in recs:                   # every layer mapped on the features-last layout, nothing merged
        for sp in rec.hidden:
            assert np.unique(col.labels[imp.spaces[sp].ids]).size == 24
    out = tmp_path / "enc_base.onnx"
    r = compress_dag_model(str(path), out, eps=0.0, verify=True)
    assert r["params_after"] == r["params_before"]
    v = r["verify"]
    assert v["max_abs_diff"] <= TOL * max(1.0, v["max_abs_output"]), v
    x = torch.randn(3, SEQ, 40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model(x).numpy()
    assert np.max(np.abs(run_onnx(str(out), x.numpy())[0] - y)) <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_other_input_layouts_make_stacked_layers_barriers(tmp_path, kind):
    """The root cause, whatever else is a barrier: under the input layouts the
    importer also tries ("1": units along time; "none": no unit axis) the
    stacked layers read inputs with too few units on their feature axis; every
    LSTM is then a barrier (it raised ValueError), and the features-last
    layout maps all three."""
    from fibgraph.importers.onnx.build import Builder
    from fibgraph.importers.onnx.load import load_onnx
    from fibgraph.importers.onnx.probe import probe_model
    from fibgraph.importers.onnx.records import Kind
    from fibgraph.importers.onnx.rules import lookup

    torch.manual_seed(6)
    model = Stacked("LSTM", 8, 3, 4, head="hn", n_in=6)
    m = load_onnx(export(model, tmp_path / "enc.onnx", kind == "dynamo", dynamic=False))
    probe = probe_model(m)
    for axis, mapped in (("last", 3), ("1", 0), ("none", 0)):
        b = Builder(m, "enc", lookup, probe=probe, input_axis=axis).run()
        recs = [r for r in b.records if r.kind == Kind.RECURRENT]
        lstm_barriers = [x for x in b.barriers if x["op"] == "LSTM"]
        assert len(recs) == mapped and len(lstm_barriers) == 3 - mapped, (axis, b.barriers)
        if axis != "last":
            # the stacked layers' refusal names the feature axis
            assert any("feature axis" in x["why"] for x in lstm_barriers), lstm_barriers
