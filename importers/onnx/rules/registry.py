"""The op table of the hypergraph importer: one rule per ONNX op type.

A rule is a function ``rule(builder, node, name, attrs, kinds) -> role``
(``builder``: the :class:`fibgraph.importers.onnx.build.Builder`; ``name``: the node's
name or ``{op}_{index}``; ``attrs``: its attributes; ``kinds``: per input,
'stream', 'const', 'meta', 'unknown' or 'none').  :func:`rule` registers it
for the op types it handles; registering an op twice is an error, so every op
has exactly one rule.  An op without a rule is a barrier.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["RULES", "Rule", "rule", "lookup"]

Rule = Callable[..., str]

#: op type -> its rule
RULES: dict[str, Rule] = {}


def rule(*ops):
    """Decorator: register the function as the rule of the op types ``ops``."""
    def register(fn):
        for op in ops:
            if op in RULES:
                raise ValueError(f"op {op} already has the rule {RULES[op].__module__}.{RULES[op].__name__}")
            RULES[op] = fn
        return fn
    return register


def lookup(op):
    """The rule registered for op type ``op``, or None."""
    return RULES.get(op)
