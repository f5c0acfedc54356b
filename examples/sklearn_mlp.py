"""An sklearn MLPClassifier on digits, converted with skl2onnx, compressed with fibgraph.

Trains ``MLPClassifier(hidden_layer_sizes=(64, 64), alpha=1e-3)`` (ReLU, Adam,
seed 0) on scikit-learn ``load_digits`` (pixels scaled to [0, 1], the same
stratified 75/25 split as ``train_digits_mlp.py``), converts it with skl2onnx
(``zipmap`` off, so the outputs are ``label`` and ``probabilities``), then
compresses it with fibgraph at eps = 0 and at a few eps > 0, printing the
units per layer, parameter counts, the verify result (largest output
difference on random inputs) and test accuracy of each compressed model.

Run from the repository root::

    python examples/sklearn_mlp.py [--eps 0.05 0.1 0.2] [--out examples/out]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from train_digits_mlp import load_split  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args(argv)

    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from fibgraph.importers.api import compress_model, count_params, evaluate

    t0 = time.perf_counter()
    xtr, xte, ytr, yte = load_split(0)
    clf = MLPClassifier(hidden_layer_sizes=(64, 64), alpha=1e-3, max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, ytr)
    print(f"sklearn MLPClassifier 64-64-64-10 (relu, adam, alpha=1e-3, seed 0): "
          f"sklearn test accuracy {clf.score(xte, yte):.4f} (n={len(yte)}), {time.perf_counter() - t0:.1f} s")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "digits_sklearn_mlp.onnx")
    onx = to_onnx(clf, xtr[:1].astype(np.float32), options={id(clf): {"zipmap": False}})
    with open(path, "wb") as f:
        f.write(onx.SerializeToString())
    npz = os.path.join(args.out, "digits_sklearn_test.npz")
    np.savez_compressed(npz, x=xte.astype(np.float32), y=yte.astype(np.int64))
    ev = evaluate(path, npz)
    print(f"{path}: {count_params(onx)} params, ops {', '.join(sorted({n.op_type for n in onx.graph.node}))}; "
          f"outputs {', '.join(o.name for o in onx.graph.output)}; onnxruntime accuracy {ev['accuracy']:.4f} "
          f"(evaluated output {ev['output']!r}, {ev['output_kind']})")

    for eps in [0.0] + list(args.eps):
        small = os.path.join(args.out, f"digits_sklearn_mlp_eps{eps:g}.onnx")
        r = compress_model(path, small, eps=eps, verify=True)
        ev2 = evaluate(small, npz)
        units = ", ".join(f"{ly['nodes_before']}->{ly['nodes_after']}" for ly in r["layers"])
        print(f"eps={eps:g}: units {units}; params {r['params_before']} -> {r['params_after']}; "
              f"verify max_abs_diff {r['verify']['max_abs_diff']:.3g} ({r['verify']['inputs']}); "
              f"test accuracy {ev2['accuracy']:.4f}, loss {ev2['loss']:.4f}")


if __name__ == "__main__":
    main()
