"""The hypergraph importer's op rules, one module per op family, registered in
one table (:data:`RULES`, filled by the :func:`rule` decorator when the
modules below are imported; :func:`lookup` reads it).

- :mod:`.elementwise`: unary ops and aliases, element-wise ops of streams and
  constants (the AND rule), softmax;
- :mod:`.reduce`: reductions over unit axes;
- :mod:`.movement`: reshapes, transposes, gathers, slices, concats (applied
  to the id arrays), packed q/k/v cuts, pooling, shape ops;
- :mod:`.linear`: MatMul, Gemm, Conv, ConvTranspose, MatMul of two streams;
- :mod:`.norm`: BatchNormalization, InstanceNormalization, LayerNormalization;
- :mod:`.recurrent`: LSTM, GRU;
- :mod:`.attention`: the ONNX Attention op.
"""
from __future__ import annotations

from .registry import RULES, Rule, lookup, rule

# importing the rule modules fills RULES
from . import attention, elementwise, linear, movement, norm, recurrent, reduce  # noqa: E402,F401  isort: skip

#: every op type the importer maps (the others are barriers)
DAG_OPS = sorted(RULES)

__all__ = ["RULES", "Rule", "rule", "lookup", "DAG_OPS"]
