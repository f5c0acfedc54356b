"""A layered (feed-forward) network as a format-free object, its graph, its
colourings layer by layer, and its compression to the base network.

A :class:`Network` is a chain of linear layers (dense or conv).  Layer ``l``
reads the units of level ``l`` (level 0 = the input units) and writes the units
of level ``l + 1``.  Its weight is held *in units*: ``weight[n_out, n_in, D]``
where ``D`` is the kernel size of a conv, or the number of positions of a
flattened ``C x H x W`` tensor that a dense layer reads (feature ``(c, p)`` has
unit ``c``).  Element-wise activations and pooling between layers keep colours;
BatchNorm is folded by the importer, or its per-channel parameters are made
part of the criterion through ``unit_key`` (units of a fiber must share them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .base import aggregate
from .graph import Block, WeightedDigraph
from .partition import canonical, classes
from .engine import Exact, Tolerance
from .symmetry import colour

__all__ = ["Layer", "Network", "NetworkColouring", "colour_network", "compress_network"]


@dataclass
class Layer:
    """One linear layer: ``z_i = sum_k sum_d weight[i, k, d] x_{k,d} + bias_i``."""

    name: str                      # the weight's name (ONNX initializer name)
    kind: str                      # 'dense' or 'conv'
    weight: np.ndarray             # (n_out, n_in, D)
    bias: np.ndarray               # (n_out,)
    homogeneous: bool = False      # activation up to the next layer is positively homogeneous
    activation: str = ""           # what follows the layer, e.g. 'Relu+MaxPool'
    unit_key: np.ndarray | None = None   # (n_out, r) per-unit parameters a fiber must share
    is_output: bool = False
    meta: dict = field(default_factory=dict)   # the importer's data for writing back

    @property
    def n_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_in(self) -> int:
        return int(self.weight.shape[1])


@dataclass
class Network:
    """A chain of layers reading ``input_units`` input units."""

    input_units: int
    layers: list
    name: str = "network"
    meta: dict = field(default_factory=dict)

    def level_sizes(self):
        return [self.input_units] + [ly.n_out for ly in self.layers]

    def graph(self) -> WeightedDigraph:
        """The network as a :class:`WeightedDigraph`: node per unit, one dense
        block per layer, one bias node (own colour) per layer with a bias.
        Initial colouring: inputs, outputs and bias nodes distinct; each hidden
        layer one class, split by ``unit_key``."""
        sizes = self.level_sizes()
        offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n_units = int(offs[-1])
        n_bias = len(self.layers)
        n = n_units + n_bias
        layer_of = np.repeat(np.arange(len(sizes)), sizes)
        index = np.concatenate([np.arange(s) for s in sizes]) if n_units else np.zeros(0, np.int64)
        layer_names = ["input"] + [ly.name for ly in self.layers] + ["bias"]
        kinds = ["input"] * sizes[0] + sum(([ly.kind] * ly.n_out for ly in self.layers), [])
        homog = np.zeros(n, dtype=bool)
        initial = np.zeros(n, dtype=np.int64)
        nxt = 0
        initial[:sizes[0]] = np.arange(sizes[0])
        nxt = sizes[0]
        blocks = []
        for l, ly in enumerate(self.layers):
            dst = np.arange(offs[l + 1], offs[l + 2])
            src = np.arange(offs[l], offs[l + 1])
            blocks.append(Block(src=src, dst=dst, weight=ly.weight, name=ly.name))
            blocks.append(Block(src=[n_units + l], dst=dst, weight=ly.bias[:, None, None],
                                name=f"{ly.name}:bias"))
            homog[dst] = ly.homogeneous
            if ly.is_output:
                initial[dst] = nxt + np.arange(ly.n_out)
                nxt += ly.n_out
            else:
                key = np.zeros((ly.n_out, 1)) if ly.unit_key is None else ly.unit_key
                lab = canonical(key)
                initial[dst] = nxt + lab
                nxt += int(lab.max()) + 1
        initial[n_units:] = nxt + np.arange(n_bias)
        levels = [np.concatenate([np.arange(offs[0], offs[1]), np.arange(n_units, n)])]
        levels += [np.arange(offs[l + 1], offs[l + 2]) for l in range(len(self.layers))]
        return WeightedDigraph(
            n=n, blocks=blocks, levels=levels, initial=initial,
            layer=np.concatenate([layer_of, np.full(n_bias, len(layer_names) - 1)]),
            index=np.concatenate([index, np.arange(n_bias)]),
            kind=np.array(kinds + ["bias"] * n_bias, dtype=object),
            layer_names=layer_names, homogeneous=homog)

    def n_params(self) -> int:
        return int(sum(ly.weight.size + ly.bias.size for ly in self.layers))


@dataclass
class NetworkColouring:
    """A colouring of a network's graph with per-layer views."""

    network: Network
    graph: WeightedDigraph
    labels: np.ndarray
    scales: np.ndarray
    symmetry: str
    criterion: object
    info: dict

    def _slice(self, level):
        sizes = self.network.level_sizes()
        start = int(np.sum(sizes[:level]))
        return slice(start, start + sizes[level])

    def level_labels(self, level) -> np.ndarray:
        """Canonical labels of the units of ``level`` (0 = inputs, l = layer l's outputs)."""
        return canonical(self.labels[self._slice(level)])

    def level_scales(self, level) -> np.ndarray:
        return self.scales[self._slice(level)]

    def layer_fibers(self, l) -> list:
        """The classes of layer ``l``'s output units (rows of its weight)."""
        return classes(self.level_labels(l + 1))


def _criterion_label(crit):
    if isinstance(crit, Tolerance):
        return {"eps": crit.eps, "linkage": crit.linkage, "metric": crit.metric}
    return {"eps": 0.0, "rtol": getattr(crit, "rtol", None)}


def colour_network(net: Network, symmetry="fibration", criterion=None) -> NetworkColouring:
    """Colour the network's graph with the engine; ``criterion`` may be a dict
    ``{layer name: criterion, None: default}`` for per-layer eps."""
    g = net.graph()
    crit = criterion if criterion is not None else Exact()
    r = colour(g, symmetry, crit)
    return NetworkColouring(net, g, r.labels, r.scales, symmetry, crit, r.info)


def compress_network(col: NetworkColouring) -> tuple:
    """The base network of an in-balanced colouring (fibration or a covering).

    Returns ``(base, maps)`` where ``maps[l]`` holds, for layer ``l``, the
    canonical labels of its output units (``'labels'``), the representative
    (first) unit of each fiber (``'rep'``) and the unit scales.  The output
    layer keeps all its units.
    """
    net = col.network
    in_labels = col.level_labels(0)
    in_scales = col.level_scales(0)
    layers, maps = [], []
    for l, ly in enumerate(net.layers):
        out_labels = col.level_labels(l + 1)
        out_scales = col.level_scales(l + 1)
        if ly.is_output:
            out_labels = np.arange(ly.n_out)
            out_scales = np.ones(ly.n_out)
        W = aggregate(ly.weight, out_labels, in_labels, out_scales, in_scales)
        b = aggregate(ly.bias[:, None, None], out_labels, np.zeros(1, np.int64), out_scales)[:, 0, 0]
        rep = np.zeros(int(out_labels.max()) + 1, dtype=np.int64)
        rep[out_labels[::-1]] = np.arange(ly.n_out)[::-1]
        key = None if ly.unit_key is None else ly.unit_key[rep]
        layers.append(replace(ly, weight=W, bias=b, unit_key=key,
                              meta={**ly.meta, "rep": rep, "in_labels": in_labels,
                                    "n_in_before": ly.n_in, "n_out_before": ly.n_out}))
        maps.append({"labels": out_labels, "rep": rep, "scales": out_scales})
        in_labels, in_scales = out_labels, out_scales
    return Network(net.input_units, layers, net.name, dict(net.meta)), maps
