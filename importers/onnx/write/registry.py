"""The writer's rule table: one rule per record :class:`~fibgraph.importers.onnx.records.Kind`.

A rule is a function ``rule(writer, record)`` that rewrites the record's ONNX
node in the model being written (see :mod:`fibgraph.importers.onnx.write.writer`).
Rules register with the :func:`writes` decorator; the writer looks a record's
rule up by ``record.kind`` (a :class:`LinearRecord` is ``LINEAR`` or, for a
depthwise conv, ``DEPTHWISE``), and a record whose kind has no rule is an
error, never silently left as it was.

Example::

    @writes(Kind.SOFTMAX)
    def softmax(w, rec):
        ...
"""
from __future__ import annotations

from ..records import Kind, Record

__all__ = ["RULES", "rule_for", "writes"]

#: Kind -> rule function
RULES = {}


def writes(*kinds):
    """Decorator: the function is the writer's rule for records of ``kinds``."""
    for k in kinds:
        if not isinstance(k, Kind):
            raise TypeError(f"writes() takes record kinds, got {k!r}")

    def register(fn):
        for k in kinds:
            if k in RULES and RULES[k] is not fn:
                raise ValueError(f"two writer rules for {k.value!r}: {RULES[k].__module__}.{RULES[k].__name__} "
                                 f"and {fn.__module__}.{fn.__name__}")
            RULES[k] = fn
        return fn
    return register


def rule_for(rec):
    """The rule that writes ``rec``; a record that is not typed, or whose kind
    has no rule, raises ``TypeError`` naming it."""
    if not isinstance(rec, Record):
        raise TypeError(f"the writer takes typed records (fibgraph.importers.onnx.records), got {type(rec).__name__}")
    rule = RULES.get(rec.kind)
    if rule is None:
        raise TypeError(f"no writer rule for {type(rec).__name__} (kind {rec.kind!r}) of node {rec.node!r}")
    return rule
