"""The probe runs in chunks (importers/onnx/probe.py): each session exposes one
chunk of the tensors only (onnxruntime holds a run's graph outputs until it
ends), big values go to mapped temporary files, and the values and the import
are the same as from one run exposing everything."""
import numpy as np
import onnx
import onnxruntime as ort

from helpers import small_planted_mlp

from fibgraph.importers.onnx import external, probe
from fibgraph.importers.onnx.importer import import_dag


def _all_at_once(m, feeds):
    g = onnx.ModelProto()
    g.CopyFrom(m)
    have = {o.name for o in g.graph.output}
    for n in g.graph.node:
        for o in n.output:
            if o and o not in have:
                g.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    s = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def test_chunked_probe_values_equal_one_run(monkeypatch):
    _, m = small_planted_mlp(5)
    whole_feeds, whole = probe.probe_model(m)
    monkeypatch.setattr(probe, "FIRST_CHUNK", 2)
    monkeypatch.setattr(probe, "PROBE_CHUNK_BYTES", 64)      # a tensor or two per session
    monkeypatch.setattr(probe, "PROBE_SPILL_BYTES", 100)           # nearly every value to a mapped file
    exposed = []
    orig = external.session
    monkeypatch.setattr(external, "session", lambda mm, so=None, **k: (exposed.append(
        [o.name for o in mm.graph.output]), orig(mm, so, **k))[1])
    feeds, vals = probe.probe_model(m, whole_feeds)
    assert len(exposed) > 3 and max(len(e) for e in exposed) <= 3
    assert sorted(n for e in exposed for n in e) == sorted(set(n for e in exposed for n in e))   # each once
    ref = _all_at_once(m, feeds)
    assert set(ref) <= set(vals)
    for k, v in ref.items():                     # the reference runs optimised: float rounding apart
        np.testing.assert_allclose(np.asarray(vals[k]), v, rtol=1e-5, atol=1e-5)
    assert any(not vals[k].flags.owndata for k in ref if vals[k].nbytes >= 100)   # mapped, not held
    for k in whole:
        np.testing.assert_array_equal(np.asarray(vals[k]), np.asarray(whole[k]))


def test_chunked_probe_imports_the_same_graph(monkeypatch):
    _, m = small_planted_mlp(6)
    a = import_dag(m)
    monkeypatch.setattr(probe, "FIRST_CHUNK", 1)
    monkeypatch.setattr(probe, "PROBE_CHUNK_BYTES", 1)
    monkeypatch.setattr(probe, "PROBE_SPILL_BYTES", 1)
    b = import_dag(m)
    assert a.graph.n == b.graph.n and np.array_equal(a.graph.initial, b.graph.initial)
    assert sorted(a.layouts) == sorted(b.layouts)
    assert all(np.array_equal(a.layouts[k], b.layouts[k]) for k in a.layouts)
