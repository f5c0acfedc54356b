"""What the hypergraph importer hands the writer: one typed record per mapped ONNX node.

The importer (:mod:`fibgraph.importers.onnx.importer`) turns each ONNX node it understands
into graph nodes and edges, and leaves a record saying what that node was, so
that the writer (:mod:`fibgraph.importers.onnx.write`) can rewrite it for the base.
Records are small dataclasses; ``kind`` names the writer rule, and the
writer looks its rule up in a table keyed by the record's kind
(:mod:`fibgraph.importers.onnx.write.registry`; no string dispatch on attribute names).

Example::

    >>> r = LinearRecord(node="fc1", op="Gemm", input="x", output="h", weight="W1", space=3)
    >>> r.kind
    <Kind.LINEAR: 'linear'>
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Kind", "Record", "LinearRecord", "EmbeddingRecord", "ElementwiseRecord", "ReduceRecord",
           "SoftmaxRecord", "ContractRecord", "AttentionRecord", "ChannelNormRecord", "LayerNormRecord",
           "RecurrentRecord", "PackedRecord", "record_from_dict", "WEIGHT_KINDS", "SINGLE_AXIS_KINDS",
           "RECORD_TYPES"]


class Kind(str, Enum):
    """The writer rule a record asks for."""

    LINEAR = "linear"              # MatMul/Gemm/Conv/ConvTranspose with a constant weight
    DEPTHWISE = "depthwise"        # grouped conv with one input channel per output channel
    EMBEDDING = "embedding"        # Gather from a constant table
    ELEMENTWISE = "elementwise"    # a sum/product of streams, or a stream and per-unit constants
    REDUCE = "reduce"              # ReduceMean/Sum/Max/Min over a unit axis
    SOFTMAX = "softmax"            # Softmax/LogSoftmax over a unit axis
    CONTRACT = "contract"          # MatMul of two streams contracting a unit axis (q.k)
    ATTENTION = "attention"        # the ONNX Attention op (opset 23)
    CHANNEL_NORM = "channel_norm"  # BatchNormalization / InstanceNormalization
    LAYERNORM = "layernorm"        # LayerNormalization
    PACKED = "packed"              # q, k or v cut out of a packed projection (torch's in_proj)
    RECURRENT = "recurrent"        # LSTM / GRU


@dataclass
class Record:
    """Common fields: the ONNX node's name and its position in the graph
    (``index``: the writer finds nodes by it, since names may be empty or repeated)."""

    node: str
    index: int | None = None

    kind = None   # set per subclass (a class attribute, not a field)


@dataclass
class LinearRecord(Record):
    """A linear op: ``weight`` (initializer or Constant name) maps ``input`` to
    ``output``; its output units are node set ``space``; ``D`` positions per
    unit (kernel size, or positions of a flattened map); ``x_axis`` is the
    contracted axis of the data operand; ``depthwise`` for grouped convs."""

    op: str = ""
    input: str = ""
    output: str = ""
    weight: str = ""
    space: int = -1
    D: int = 1
    x_axis: int = -1
    attrs: dict = field(default_factory=dict)
    depthwise: bool = False

    @property
    def kind(self):
        return Kind.DEPTHWISE if self.depthwise else Kind.LINEAR


@dataclass
class EmbeddingRecord(Record):
    """``Gather(weight, ids)``: the table's rows are node set ``space``."""

    weight: str = ""
    output: str = ""
    space: int = -1
    op: str = "Gather"
    kind = Kind.EMBEDDING


@dataclass
class ElementwiseRecord(Record):
    """An element-wise op of the ``streams`` and per-unit constants ``consts``."""

    op: str = ""
    output: str = ""
    streams: tuple = ()
    consts: tuple = ()
    kind = Kind.ELEMENTWISE


@dataclass
class ReduceRecord(Record):
    """A reduction over unit ``axes``; ``mode`` is 'mean', 'sum', 'ReduceMax' or 'ReduceMin'."""

    op: str = ""
    input: str = ""
    output: str = ""
    axes: tuple = ()
    mode: str = "mean"
    kind = Kind.REDUCE


@dataclass
class SoftmaxRecord(Record):
    """Softmax or LogSoftmax over the unit ``axis``."""

    op: str = "Softmax"
    input: str = ""
    output: str = ""
    axis: int = -1
    kind = Kind.SOFTMAX


@dataclass
class ContractRecord(Record):
    """``MatMul(A, B)`` of two streams contracting ``A``'s ``a_axis`` with ``B``'s ``b_axis``."""

    inputs: tuple = ()
    output: str = ""
    a_axis: int = -1
    b_axis: int = -2
    kind = Kind.CONTRACT


@dataclass
class AttentionRecord(Record):
    """The ONNX Attention op: query tensor ``q``, the layout ``heads`` of its
    (head, head dim) units, head size ``dh``; ``four``: 4-d (B, H, S, dh) inputs."""

    q: str = ""
    heads: str = ""
    four: bool = False
    dh: int = 0
    kind = Kind.ATTENTION


@dataclass
class ChannelNormRecord(Record):
    """BatchNormalization / InstanceNormalization on ``input``; ``training``: the
    batch statistics are used (training-mode BatchNormalization)."""

    op: str = ""
    input: str = ""
    output: str = ""
    training: bool = False
    epsilon: float = 1e-5
    kind = Kind.CHANNEL_NORM


@dataclass
class LayerNormRecord(Record):
    """LayerNormalization over ``axes``."""

    input: str = ""
    output: str = ""
    axes: tuple = ()
    kind = Kind.LAYERNORM


@dataclass
class RecurrentRecord(Record):
    """An LSTM/GRU op: weights ``W``, ``R``, ``B`` (and peepholes ``P``), initial
    states ``h0``/``c0``; ``spaces`` are its node sets, ``hidden`` the hidden
    node sets (one per direction), ``H`` the hidden size, ``dirs`` the
    number of directions, ``layout`` the ONNX layout attribute."""

    op: str = ""
    input: str = ""
    W: str = ""
    R: str = ""
    B: str = ""
    P: str = ""
    h0: str = ""
    c0: str = ""
    spaces: tuple = ()
    hidden: tuple = ()
    dirs: int = 1
    H: int = 0
    layout: int = 0
    outputs: tuple = ()
    kind = Kind.RECURRENT


@dataclass
class PackedRecord(Record):
    """``output`` equals the contiguous slice ``[start, end)`` along ``axis`` of the
    packed projection output ``source`` (``region``: the cut's element region;
    ``chain``: the layout ops between them, dead once the cut is a Slice)."""

    output: str = ""
    source: str = ""
    axis: int = -1
    start: int = 0
    end: int = 0
    region: tuple = ()
    chain: tuple = ()
    kind = Kind.PACKED


_BY_KIND = {"linear": LinearRecord, "depthwise": LinearRecord, "embedding": EmbeddingRecord,
            "elementwise": ElementwiseRecord, "reduce": ReduceRecord, "softmax": SoftmaxRecord,
            "contract": ContractRecord, "attention": AttentionRecord, "channel_norm": ChannelNormRecord,
            "layernorm": LayerNormRecord, "recurrent": RecurrentRecord, "packed": PackedRecord}


#: every record class, in the order of :class:`Kind`
RECORD_TYPES = (LinearRecord, EmbeddingRecord, ElementwiseRecord, ReduceRecord, SoftmaxRecord, ContractRecord,
                AttentionRecord, ChannelNormRecord, LayerNormRecord, PackedRecord, RecurrentRecord)


def record_from_dict(d):
    """A typed record from the importer's old dict form (``{"kind": ..., field: value}``);
    a record passes through unchanged."""
    if isinstance(d, Record):
        return d
    d = dict(d)
    kind = d.pop("kind")
    if kind == "depthwise":
        d["depthwise"] = True
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise ValueError(f"unknown record kind {kind!r} (node {d.get('node')!r})")
    return cls(**d)


#: records whose weight is a compressible layer of the report and the eps file
WEIGHT_KINDS = (Kind.LINEAR, Kind.EMBEDDING, Kind.RECURRENT)

#: records whose input and output tensors the writer can rewrite along one unit axis only
SINGLE_AXIS_KINDS = (Kind.ELEMENTWISE, Kind.CHANNEL_NORM, Kind.LAYERNORM, Kind.REDUCE, Kind.SOFTMAX,
                     Kind.DEPTHWISE, Kind.LINEAR, Kind.EMBEDDING)
