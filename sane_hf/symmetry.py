"""Permutation symmetry of neural networks, as data: the spec and its derivation from the graph.

Hidden units of a network can be permuted without changing its function: reorder the output
channels of one layer and the input channels of every layer that reads them, and the network
computes exactly the same thing. SANE uses this twice: to *align* models to a reference before
comparing them (weight matching, Ainsworth et al. 2022, "Git Re-Basin", arXiv 2209.04836) and to
*augment* a model with a random, function-preserving permutation during training.

A :class:`PermutationSpec` says which axes of which ``state_dict`` tensors share one permutation.
It is **derived from the module graph**, never typed by hand per model:
:func:`permutation_spec` traces the module with :func:`torch.fx.symbolic_trace`, propagates
shapes through it with :class:`torch.fx.passes.shape_prop.ShapeProp` on an example input, and
propagates a *channel label* (which permutation group the channel axis — axis 1 — of every
intermediate tensor carries) through the graph:

============================================  ===============================================
op                                            rule
============================================  ===============================================
network input (placeholder)                   a fixed group (the data's channels are not ours)
``Linear`` / ``Conv{1,2,3}d`` (groups=1)      consumes its input group on ``weight`` axis 1;
                                              its out-channels start a new group
                                              (``weight`` axis 0, ``bias`` axis 0)
``ConvTranspose{1,2,3}d`` (groups=1)          the same with ``weight`` axes 0 and 1 swapped
depthwise conv (groups = in = out channels)   keeps the group; ``weight``/``bias`` axis 0 follow
``BatchNorm``/``InstanceNorm``                keeps the group; ``weight``, ``bias``,
                                              ``running_mean``, ``running_var`` follow it
                                              (``num_batches_tracked`` is invariant)
``LayerNorm`` over all non-batch dims,        keeps the group; affine parameters follow it
``GroupNorm`` with 1 or C groups, ``PReLU``
activations, dropout, softmax, identity,      keep the group (batch and channel sizes must be
max/avg/adaptive pooling, ``mean``/``sum``    unchanged; reductions only over dims ≥ 2)
over spatial dims
``flatten`` / ``view`` / ``reshape``          keep the batch dim; a group of C channels with
                                              spatial size h·w becomes a *blocked* group: it
                                              permutes contiguous blocks of h·w features
                                              (``block`` = h·w) of the next ``Linear``
``+ - * /`` of two tensors (residual adds)    the two groups are unified (union-find: a
                                              residual stream shares one permutation); a
                                              Python scalar operand is ignored
network output                                its group is fixed (the classes keep their order)
============================================  ===============================================

Two further rules make the result consistent: a ``(key, axis)`` acted on by two groups unifies
them (this handles a module called twice, i.e. weight sharing), and a group unified with a fixed
group is fixed. Fixed groups are dropped from the spec; every ``state_dict`` key that no
remaining group acts on is listed in :attr:`PermutationSpec.invariant_keys`.

Limits. Anything else — attention, ``cat``/``stack``, indexing, ``transpose``/``permute``,
``matmul``, a parameter used functionally (``get_attr``), ``Linear`` on inputs of rank > 2
(transformers), grouped convs, a reshape that splits a channel — raises
:class:`UnsupportedOperationError` naming the node and the op. With ``strict=False`` such an
op is treated conservatively instead: the groups of its inputs are fixed, its output starts a
fixed group and its own parameters are never permuted, so the spec stays function-preserving
(it just finds fewer symmetries). Models that ``symbolic_trace`` cannot trace (data-dependent
control flow) raise the same error. Parameters registered under two names (aliases) are not
detected. Sign/scale symmetries are out of scope.

Example::

    >>> from sane_hf.symmetry import permutation_spec
    >>> from sane_hf.zoo.architectures import create_model
    >>> spec = permutation_spec(create_model("cnn-s", image_size=8))
    >>> [g.name for g in spec.groups]
    ['conv1', 'conv2', 'conv3', 'fc1']
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = [
    "SPEC_VERSION",
    "UnsupportedOperationError",
    "PermutationAxis",
    "PermutationGroup",
    "PermutationSpec",
    "permutation_spec",
]

SPEC_VERSION = 1


class UnsupportedOperationError(ValueError):
    """The module graph holds an op whose permutation behaviour :func:`permutation_spec` does not know."""


# --------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PermutationAxis:
    """One axis of one ``state_dict`` tensor that a group permutes.

    ``block`` > 1 means the axis holds ``size * block`` entries and the permutation moves
    contiguous blocks of ``block`` entries (a conv's channels flattened into a linear's input).
    """

    key: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class PermutationGroup:
    """A set of tensor axes that share one permutation of ``size`` units."""

    name: str
    size: int
    axes: tuple[PermutationAxis, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """The distinct ``state_dict`` keys this group acts on, in order."""
        return tuple(dict.fromkeys(a.key for a in self.axes))


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which ``state_dict`` tensors are permutation-symmetric, and how they tie.

    Attributes:
        groups: the free permutation groups, in the order their first member appears.
        invariant_keys: ``state_dict`` keys no group acts on (the output layer's bias,
            ``num_batches_tracked``, ...); :func:`apply_permutation` leaves them alone.
        shapes: ``(key, shape)`` for every ``state_dict`` key of the module, in order.
    """

    groups: tuple[PermutationGroup, ...]
    invariant_keys: tuple[str, ...] = ()
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        seen: dict[tuple[str, int], str] = {}
        shapes = dict(self.shapes)
        for g in self.groups:
            if g.size < 1:
                raise ValueError(f"group {g.name!r} has size {g.size}")
            for a in g.axes:
                if (a.key, a.axis) in seen:
                    raise ValueError(
                        f"axis {a.axis} of {a.key!r} is in groups {seen[(a.key, a.axis)]!r} and {g.name!r}"
                    )
                seen[(a.key, a.axis)] = g.name
                if a.key in shapes and shapes[a.key][a.axis] != g.size * a.block:
                    raise ValueError(
                        f"group {g.name!r} (size {g.size}, block {a.block}) does not fit axis {a.axis} "
                        f"of {a.key!r} with shape {shapes[a.key]}"
                    )

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def key_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of the module the spec was derived from."""
        return dict(self.shapes)

    def group(self, name: str) -> PermutationGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no permutation group {name!r}; groups: {list(self.group_names)}")

    def validate(self, state_dict: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` unless ``state_dict`` has every key and shape the groups act on."""
        for g in self.groups:
            for a in g.axes:
                if a.key not in state_dict:
                    raise ValueError(f"state_dict has no key {a.key!r} (needed by group {g.name!r})")
                shape = tuple(state_dict[a.key].shape)
                if a.axis >= len(shape) or shape[a.axis] != g.size * a.block:
                    raise ValueError(
                        f"{a.key!r} has shape {shape}; group {g.name!r} expects axis {a.axis} of size "
                        f"{g.size * a.block}"
                    )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps(spec.to_dict())`` works)."""
        return {
            "version": SPEC_VERSION,
            "groups": [
                {
                    "name": g.name,
                    "size": g.size,
                    "axes": [{"key": a.key, "axis": a.axis, "block": a.block} for a in g.axes],
                }
                for g in self.groups
            ],
            "invariant_keys": list(self.invariant_keys),
            "shapes": {k: list(s) for k, s in self.shapes},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermutationSpec:
        """Inverse of :meth:`to_dict`."""
        version = data.get("version", SPEC_VERSION)
        if version > SPEC_VERSION:
            raise ValueError(
                f"permutation spec version {version} is newer than this sane-hf ({SPEC_VERSION})"
            )
        groups = tuple(
            PermutationGroup(
                name=str(g["name"]),
                size=int(g["size"]),
                axes=tuple(
                    PermutationAxis(str(a["key"]), int(a["axis"]), int(a.get("block", 1))) for a in g["axes"]
                ),
            )
            for g in data["groups"]
        )
        shapes = tuple((str(k), tuple(int(d) for d in s)) for k, s in dict(data.get("shapes", {})).items())
        return cls(groups=groups, invariant_keys=tuple(data.get("invariant_keys", ())), shapes=shapes)


# --------------------------------------------------------------------------------------------
# deriving the spec from the module graph
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Label:
    """The channel identity of a tensor: group id and the number of entries per unit on axis 1."""

    group: int
    block: int = 1


_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Softmax, nn.LogSoftmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip

_F = nn.functional
_ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.abs, torch.neg, torch.square, torch.sqrt,
    operator.neg, operator.pos,
    _F.relu, _F.relu6, _F.gelu, _F.silu, _F.leaky_relu, _F.elu, _F.selu, _F.celu, _F.softplus, _F.mish,
    _F.hardtanh, _F.hardswish, _F.hardsigmoid, _F.tanh, _F.sigmoid, _F.logsigmoid, _F.softsign,
    _F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d, _F.alpha_dropout, _F.softmax, _F.log_softmax,
    _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d,
    _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool1d, _F.adaptive_max_pool2d, _F.adaptive_max_pool3d,
})  # fmt: skip
_ELEMENTWISE_METHODS = frozenset({
    "relu", "relu_", "tanh", "sigmoid", "exp", "abs", "neg", "square", "sqrt", "contiguous", "clone",
    "detach", "float", "double", "half", "to", "softmax", "log_softmax",
})  # fmt: skip
_BINARY_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
})  # fmt: skip
_BINARY_METHODS = frozenset(
    {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum"}
)
_REDUCE_FUNCTIONS: frozenset[Any] = frozenset({torch.mean, torch.sum, torch.amax, torch.amin})
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin"})
_RESHAPE_FUNCTIONS: frozenset[Any] = frozenset({torch.flatten, torch.reshape})
_RESHAPE_METHODS = frozenset({"flatten", "view", "reshape"})
_NORM_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class _Unsupported(Exception):
    """Internal: raised by a rule; turned into an error or a conservative step by the walker."""


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        return getattr(target, "__name__", repr(target))
    if node.op == "call_method":
        return f".{target}()"
    return str(target)


class _GraphWalker:
    """Propagates channel labels through an fx graph, collecting groups in a union-find."""

    def __init__(self, gm: fx.GraphModule, state_keys: Sequence[str], strict: bool):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.state_keys = set(state_keys)
        self.strict = strict
        # union-find over group ids
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.name: list[str] = []
        self.members: list[tuple[int, PermutationAxis]] = []
        self.owner: dict[tuple[str, int], tuple[int, int]] = {}  # (key, axis) -> (group, block)
        self.pinned_keys: set[str] = set()
        self.labels: dict[fx.Node, _Label | None] = {}

    # -- union-find -------------------------------------------------------------------------
    def new_group(self, size: int, name: str, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise _Unsupported(f"cannot tie a group of {self.size[ra]} units to one of {self.size[rb]}")
        keep, drop = min(ra, rb), max(ra, rb)  # the earlier-created group names the union
        self.parent[drop] = keep
        self.fixed[keep] = self.fixed[keep] or self.fixed[drop]
        return keep

    def fix(self, label: _Label | None) -> None:
        if label is not None:
            self.fixed[self.find(label.group)] = True

    def add_member(self, group: int, key: str, axis: int, block: int) -> None:
        if key not in self.state_keys:
            return
        if (key, axis) in self.owner:
            other, other_block = self.owner[(key, axis)]
            if other_block != block:
                raise _Unsupported(
                    f"axis {axis} of {key!r} is used with block sizes {other_block} and {block}"
                )
            self.union(group, other)
            return
        self.owner[(key, axis)] = (group, block)
        self.members.append((group, PermutationAxis(key, axis, block)))

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(meta.shape)

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        nodes: list[fx.Node] = []
        fx.node.map_arg(
            (node.args, node.kwargs), lambda n: nodes.append(n) if self.shape(n) is not None else None
        )
        return nodes

    def first_label(self, node: fx.Node) -> _Label:
        inputs = self.tensor_inputs(node)
        if not inputs:
            raise _Unsupported("no tensor input")
        label = self.labels.get(inputs[0])
        if label is None:
            raise _Unsupported("its input has no channel axis")
        return label

    def same_channels(self, node: fx.Node) -> _Label:
        """Pass-through rule: batch and channel sizes must be unchanged."""
        label = self.first_label(node)
        inp, out = self.shape(self.tensor_inputs(node)[0]), self.shape(node)
        if out is None or len(out) < 2 or inp[:2] != out[:2]:
            raise _Unsupported(f"it changes the batch/channel dims {inp} -> {out}")
        return label

    def module_keys(self, target: str) -> dict[str, str]:
        """Local parameter/buffer name -> state_dict key for a leaf module."""
        prefix = f"{target}." if target else ""
        module = self.modules[target]
        local = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        return {n: prefix + n for n in local if prefix + n in self.state_keys}

    # -- rules ------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.labels[node] = self.visit(node)
            except _Unsupported as exc:
                if self.strict:
                    raise UnsupportedOperationError(
                        f"permutation_spec: node {node.name!r} ({node.op} {_op_name(node)}) is not supported: "
                        f"{exc}. Pass strict=False to treat it conservatively (its channels are not permuted), "
                        f"or give the spec by hand."
                    ) from None
                self.conservative(node)

    def conservative(self, node: fx.Node) -> None:
        for inp in self.tensor_inputs(node):
            self.fix(self.labels.get(inp))
        if node.op == "call_module":
            self.pinned_keys.update(self.module_keys(node.target).values())
        if node.op == "get_attr":
            self.pinned_keys.update(
                k for k in self.state_keys if k == node.target or k.startswith(f"{node.target}.")
            )
        out = self.shape(node)
        self.labels[node] = (
            _Label(self.new_group(out[1], f"{node.name}:fixed", fixed=True))
            if out is not None and len(out) >= 2
            else None
        )

    def visit(self, node: fx.Node) -> _Label | None:
        out = self.shape(node)
        if node.op == "placeholder":
            if out is None or len(out) < 2:
                return None
            return _Label(self.new_group(out[1], f"input:{node.name}", fixed=True))
        if node.op == "output":
            fx.node.map_arg(node.args, lambda n: self.fix(self.labels.get(n)))
            return None
        if node.op == "get_attr":
            raise _Unsupported("a parameter or buffer used functionally")
        if out is None:
            # non-tensor results (x.size(0), x.shape[1] * 2) carry no channel label; but a tensor
            # consumed by anything else with a non-tensor result (a tuple) must not be dropped
            if not self.tensor_inputs(node) or node.target in ("size", "dim", getattr):
                return None
            raise _Unsupported("its output is not a single tensor")
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target], out)
        if node.op == "call_function":
            return self.visit_function(node, node.target, out)
        if node.op == "call_method":
            return self.visit_method(node, node.target, out)
        raise _Unsupported("unknown node kind")

    def visit_module(self, node: fx.Node, module: nn.Module, out: tuple[int, ...]) -> _Label | None:
        keys = self.module_keys(node.target)
        if isinstance(module, nn.Linear):
            label = self.first_label(node)
            if len(self.shape(self.tensor_inputs(node)[0])) != 2:
                raise _Unsupported("Linear on an input of rank > 2 (features not on axis 1)")
            self.add_member(label.group, keys.get("weight", ""), 1, label.block)
            new = self.new_group(module.out_features, node.target)
            self.add_member(new, keys.get("weight", ""), 0, 1)
            self.add_member(new, keys.get("bias", ""), 0, 1)
            return _Label(new)
        if isinstance(module, _CONV_MODULES):
            label = self.first_label(node)
            if module.groups == 1:
                self.add_member(label.group, keys.get("weight", ""), 1, label.block)
                new = self.new_group(module.out_channels, node.target)
                self.add_member(new, keys.get("weight", ""), 0, 1)
                self.add_member(new, keys.get("bias", ""), 0, 1)
                return _Label(new)
            if module.groups == module.in_channels == module.out_channels:  # depthwise
                self.add_member(label.group, keys.get("weight", ""), 0, label.block)
                self.add_member(label.group, keys.get("bias", ""), 0, label.block)
                return label
            raise _Unsupported(f"grouped convolution (groups={module.groups})")
        if isinstance(module, _CONV_TRANSPOSE_MODULES):
            label = self.first_label(node)
            if module.groups != 1:
                raise _Unsupported(f"grouped transposed convolution (groups={module.groups})")
            self.add_member(label.group, keys.get("weight", ""), 0, label.block)
            new = self.new_group(module.out_channels, node.target)
            self.add_member(new, keys.get("weight", ""), 1, 1)
            self.add_member(new, keys.get("bias", ""), 0, 1)
            return _Label(new)
        if isinstance(module, _NORM_MODULES):
            label = self.same_channels(node)
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.add_member(label.group, keys.get(name, ""), 0, label.block)
            return label
        if isinstance(module, nn.LayerNorm):
            label = self.same_channels(node)
            if tuple(module.normalized_shape) != out[1:]:
                raise _Unsupported(
                    f"LayerNorm over {tuple(module.normalized_shape)} but not all of {out[1:]}"
                )
            self.add_member(label.group, keys.get("weight", ""), 0, label.block)
            self.add_member(label.group, keys.get("bias", ""), 0, label.block)
            return label
        if isinstance(module, nn.GroupNorm):
            label = self.same_channels(node)
            if module.num_groups not in (1, module.num_channels):
                raise _Unsupported(f"GroupNorm with {module.num_groups} groups mixes channel subsets")
            self.add_member(label.group, keys.get("weight", ""), 0, label.block)
            self.add_member(label.group, keys.get("bias", ""), 0, label.block)
            return label
        if isinstance(module, nn.PReLU):
            label = self.same_channels(node)
            if module.num_parameters > 1:
                self.add_member(label.group, keys.get("weight", ""), 0, label.block)
            return label
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, out)
        if isinstance(module, _ACTIVATION_MODULES):
            if (
                isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d))
                and module.return_indices
            ):
                raise _Unsupported("pooling with return_indices")
            return self.same_channels(node)
        raise _Unsupported(f"module type {type(module).__name__}")

    def visit_function(self, node: fx.Node, fn: Any, out: tuple[int, ...]) -> _Label | None:
        if fn in _ELEMENTWISE_FUNCTIONS:
            if node.kwargs.get("return_indices"):
                raise _Unsupported("pooling with return_indices")
            return self.same_channels(node)
        if fn in _BINARY_FUNCTIONS:
            return self.binary(node, out)
        if fn in _REDUCE_FUNCTIONS:
            return self.reduce(node, out)
        if fn in _RESHAPE_FUNCTIONS:
            return self.reshape(node, out)
        raise _Unsupported(f"function {_op_name(node)}")

    def visit_method(self, node: fx.Node, method: str, out: tuple[int, ...]) -> _Label | None:
        if method in _ELEMENTWISE_METHODS:
            return self.same_channels(node)
        if method in _BINARY_METHODS:
            return self.binary(node, out)
        if method in _REDUCE_METHODS:
            return self.reduce(node, out)
        if method in _RESHAPE_METHODS:
            return self.reshape(node, out)
        raise _Unsupported(f"method .{method}()")

    def binary(self, node: fx.Node, out: tuple[int, ...]) -> _Label:
        tensors = self.tensor_inputs(node)
        labeled = []
        for t in tensors:
            shape = self.shape(t)
            if len(shape) >= 2 and shape[0] == out[0] and shape[1] == 1 and out[1] != 1:
                continue  # a per-sample broadcast (size-1 channel axis) carries no channel identity
            if len(shape) != len(out) or shape[1] != out[1] or shape[0] != out[0]:
                raise _Unsupported(f"broadcast of shape {shape} against {out}")
            label = self.labels.get(t)
            if label is None:
                raise _Unsupported("an operand has no channel axis")
            labeled.append(label)
        if not labeled:
            raise _Unsupported("no operand carries the channel axis")
        first = labeled[0]
        for other in labeled[1:]:
            if other.block != first.block:
                raise _Unsupported(f"operands with block sizes {first.block} and {other.block}")
            self.union(first.group, other.group)
        return _Label(self.find(first.group), first.block)

    def reduce(self, node: fx.Node, out: tuple[int, ...]) -> _Label:
        label = self.first_label(node)
        inp = self.shape(self.tensor_inputs(node)[0])
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim is None:
            raise _Unsupported("a reduction over all dims")
        dims = [dim] if isinstance(dim, int) else list(dim)
        if any(not isinstance(d, int) or d % len(inp) < 2 for d in dims):
            raise _Unsupported(f"a reduction over dim {dim} (only dims >= 2 keep the channels)")
        if len(out) < 2 or out[:2] != inp[:2]:
            raise _Unsupported(f"it changes the batch/channel dims {inp} -> {out}")
        return label

    def reshape(self, node: fx.Node, out: tuple[int, ...]) -> _Label:
        """flatten/view/reshape keeping the batch dim: channel units of U flat entries -> blocks."""
        label = self.first_label(node)
        inp = self.shape(self.tensor_inputs(node)[0])
        if len(out) < 2 or inp[0] != out[0]:
            raise _Unsupported(f"a reshape {inp} -> {out} that does not keep the batch dim")
        units = inp[1] // label.block  # group size
        unit_numel = label.block * math.prod(inp[2:])  # flat entries per unit (channel-major order)
        out_inner = math.prod(out[2:])  # flat entries per index of the new axis 1
        if unit_numel % out_inner != 0 or out[1] * out_inner != units * unit_numel:
            raise _Unsupported(f"a reshape {inp} -> {out} that splits a channel across axis 1")
        return _Label(label.group, unit_numel // out_inner)

    # -- result -----------------------------------------------------------------------------
    def spec(self, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> PermutationSpec:
        for group, member in self.members:
            if member.key in self.pinned_keys:
                self.fixed[self.find(group)] = True
        by_root: dict[int, list[PermutationAxis]] = {}
        for group, member in self.members:
            root = self.find(group)
            if not self.fixed[root]:
                by_root.setdefault(root, []).append(member)
        groups = tuple(
            PermutationGroup(self.name[root], self.size[root], tuple(axes))
            for root, axes in sorted(by_root.items())
        )
        touched = {a.key for g in groups for a in g.axes}
        invariant = tuple(k for k, _ in shapes if k not in touched)
        return PermutationSpec(groups=groups, invariant_keys=invariant, shapes=tuple(shapes))


_SPATIAL_CANDIDATES = (8, 28, 32, 16, 12, 14, 24, 64)


def _default_example_input(module: nn.Module, gm: fx.GraphModule) -> Tensor:
    """Guess an input: (2, in_features) before a Linear, (2, C, s, s[, s]) before a conv."""
    first = None
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, (nn.Linear, *_CONV_MODULES, *_CONV_TRANSPOSE_MODULES)):
                first = m
                break
    if first is None:
        raise ValueError("permutation_spec: cannot guess an input for this module; pass example_input")
    if isinstance(first, nn.Linear):
        return torch.zeros(2, first.in_features)
    dims = len(first.kernel_size)
    sizes = list(_SPATIAL_CANDIDATES) + [s for s in range(1, 129) if s not in _SPATIAL_CANDIDATES]
    for s in sizes:
        x = torch.zeros(2, first.in_channels, *([s] * dims))
        try:
            with torch.no_grad():
                module(x)
        except Exception:  # noqa: BLE001 - any failure just means "not this size"
            continue
        return x
    raise ValueError("permutation_spec: no square input of size 1..128 fits this module; pass example_input")


def permutation_spec(
    module: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    *,
    strict: bool = True,
) -> PermutationSpec:
    """Derive the :class:`PermutationSpec` of ``module`` from its traced graph (see module docs).

    Args:
        module: the network; it is deep-copied and run in eval mode, so its buffers are untouched.
        example_input: one input (or a tuple of inputs) used for shape propagation. When ``None``
            it is guessed: ``(2, in_features)`` if the first layer is a ``Linear``, else
            ``(2, in_channels, s, s)`` for the first square size ``s`` the module accepts (the
            spec does not depend on which one: the flatten block is fixed by the ``Linear``).
        strict: raise :class:`UnsupportedOperationError` on an op without a rule; with ``False``
            fix the groups touching it instead.
    """
    work = copy.deepcopy(module).eval()
    shapes = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    try:
        gm = fx.symbolic_trace(work)
    except Exception as exc:  # noqa: BLE001 - fx raises many types
        raise UnsupportedOperationError(
            f"permutation_spec: torch.fx.symbolic_trace cannot trace {type(module).__name__}: {exc}"
        ) from exc
    if example_input is None:
        example_input = _default_example_input(work, gm)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    walker = _GraphWalker(gm, [k for k, _ in shapes], strict)
    walker.run()
    return walker.spec(shapes)
