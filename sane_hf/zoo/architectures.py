"""Zoo architectures: a name → builder registry (timm style).

Every builder returns a plain ``nn.Module`` whose ``state_dict`` keys are stable:

``mlp``
    ``fc1.weight/bias`` (in → hidden[0]), ``fc2`` (hidden[0] → hidden[1]), ``fc3`` (→ classes).
``cnn-s``
    The Model Zoos small CNN: ``conv1`` (8 ch), ``conv2`` (6 ch), ``conv3`` (4 ch), ``fc1`` (20),
    ``fc2`` (classes). On 28×28 inputs it uses the original 5/5/2 kernels (2,464 parameters);
    on smaller images 3/3/1 kernels with padding so the spatial size stays useful
    (8×8 digits: 1,096 parameters).
``cnn-m``
    The Model Zoos CNN-l shape: ``conv1`` (16), ``conv2`` (32), ``conv3`` (15), ``fc1`` (20), ``fc2``.
``resnet18``
    CIFAR-style ResNet-18 with BasicBlocks and BatchNorm, torchvision key names
    (``conv1``, ``bn1``, ``layer{1..4}.{0,1}.conv{1,2}``, ``...bn{1,2}``,
    ``...downsample.{0,1}``, ``fc``). ``width`` sets the first stage's channels (64 = the
    standard 11.2 M-parameter model).

All builders take ``in_channels``, ``image_size``, ``num_classes``, ``activation``, ``dropout``
and ``init``. Dropout follows every hidden activation of the MLP and the CNNs; it is a
:class:`SeededDropout`, an ``nn.Dropout`` that draws its masks from an explicit
``torch.Generator`` when one is set, so that population training can reproduce every model's
masks exactly (see :func:`dropout_mask`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.alignment import PermutationSpec

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "register_architecture",
    "list_architectures",
    "create_model",
    "permutation_spec_for_arch",
    "init_weights",
    "dropout_mask",
    "SeededDropout",
    "MLP",
    "SmallCNN",
    "BasicBlock",
    "ResNet18",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky-relu": nn.LeakyReLU,
}

INITS = ("kaiming-uniform", "kaiming-normal", "xavier", "uniform", "normal", "default")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under ``name`` (decorator)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_architectures() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


@torch.no_grad()
def init_weights(module: nn.Module, init: str = "kaiming-uniform", generator: torch.Generator | None = None) -> None:
    """Re-initialise every conv/linear weight with ``init``; biases to zero (``default`` keeps torch's init).

    Norm layers get weight 1 and bias 0. ``generator`` makes the draw reproducible.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INITS)}")
    if init == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = m.weight
            fan_in = w[0].numel()
            fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)
            if init == "kaiming-uniform":
                bound = math.sqrt(6.0 / fan_in)
                w.uniform_(-bound, bound, generator=generator)
            elif init == "kaiming-normal":
                w.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
            elif init == "xavier":
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                w.uniform_(-bound, bound, generator=generator)
            elif init == "uniform":
                w.uniform_(-0.1, 0.1, generator=generator)
            elif init == "normal":
                w.normal_(0.0, 0.05, generator=generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The inverted-dropout multiplier for one forward pass: ``(rand >= p) / (1 - p)``, float32.

    One ``torch.rand(shape, generator=generator)`` draw per call; the population trainer calls
    this with the same per-model generator, in the same order, so its masks equal these.
    """
    keep = torch.rand(shape, generator=generator) >= p
    return keep.to(torch.float32) * (1.0 / (1.0 - p))


class SeededDropout(nn.Dropout):
    """``nn.Dropout`` whose masks come from ``self.generator`` when it is set (else torch's RNG).

    With ``generator=None`` it is exactly ``nn.Dropout``. The attribute is not saved in the
    ``state_dict``.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__(p, inplace)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.generator is None:
            return super().forward(x)
        return x * dropout_mask(x.shape, self.p, self.generator).to(x.dtype)


class MLP(nn.Module):
    """Fully connected classifier: flatten → fc1 → act → fc2 → act → fc3."""

    def __init__(
        self,
        in_features: int,
        num_classes: int = 10,
        hidden: tuple[int, int] = (32, 16),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.act = _activation(activation)
        self.drop = SeededDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (batch, C, H, W) -> (batch, C*H*W)
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.act(self.fc2(x)))
        return self.fc3(x)  # (batch, classes)


class SmallCNN(nn.Module):
    """Three convs and two linears, the Model Zoos CNN family (``cnn-s``, ``cnn-m``)."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels: tuple[int, int, int] = (8, 6, 4),
        hidden: int = 20,
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size >= 28:
            # the original Model Zoos kernels: 28 -> 24 -> 12 -> 8 -> 4 -> 3
            k, pad, k3 = 5, 0, 2
        else:
            # small images: keep the spatial size with padded 3x3 convs, 1x1 last conv
            k, pad, k3 = 3, 1, 1
        self.conv1 = nn.Conv2d(in_channels, channels[0], k, padding=pad)
        self.conv2 = nn.Conv2d(channels[0], channels[1], k, padding=pad)
        self.conv3 = nn.Conv2d(channels[1], channels[2], k3)
        self.pool = nn.MaxPool2d(2)
        self.act = _activation(activation)
        self.drop = SeededDropout(dropout)
        size = image_size
        size = (size + 2 * pad - k + 1) // 2
        size = (size + 2 * pad - k + 1) // 2
        size = size - k3 + 1
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for this CNN")
        self.fc1 = nn.Linear(channels[2] * size * size, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.pool(self.conv1(x))))  # (B, C, H, W) -> (B, c1, H/2, W/2)
        x = self.drop(self.act(self.pool(self.conv2(x))))  # -> (B, c2, H/4, W/4)
        x = self.drop(self.act(self.conv3(x)))  # -> (B, c3, h, w)
        x = x.flatten(1)
        x = self.drop(self.act(self.fc1(x)))  # (B, hidden)
        return self.fc2(x)  # (B, classes)


class BasicBlock(nn.Module):
    """ResNet BasicBlock: conv3x3-BN-act-conv3x3-BN + shortcut, act."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = _activation(activation)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(out + shortcut)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool), BasicBlocks [2, 2, 2, 2]."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = _activation(activation)
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        for i, (p, stride) in enumerate(zip(planes, [1, 2, 2, 2]), start=1):
            blocks = [BasicBlock(in_planes, p, stride, activation), BasicBlock(p, p, 1, activation)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = p
        self.drop = SeededDropout(dropout)
        self.fc = nn.Linear(planes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))  # (B, C, H, W) -> (B, width, H, W)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # -> (B, 8*width, H/8, W/8)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # -> (B, 8*width)
        return self.fc(self.drop(x))  # (B, classes)


@register_architecture("mlp")
def _mlp(in_channels: int = 1, image_size: int = 8, num_classes: int = 10, hidden=(32, 16), **kw) -> nn.Module:
    return MLP(in_channels * image_size * image_size, num_classes, tuple(hidden), kw.get("activation", "relu"), kw.get("dropout", 0.0))


@register_architecture("cnn-s")
def _cnn_s(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **kw) -> nn.Module:
    return SmallCNN(in_channels, image_size, num_classes, (8, 6, 4), 20, kw.get("activation", "relu"), kw.get("dropout", 0.0))


@register_architecture("cnn-m")
def _cnn_m(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **kw) -> nn.Module:
    return SmallCNN(in_channels, image_size, num_classes, (16, 32, 15), 20, kw.get("activation", "relu"), kw.get("dropout", 0.0))


@register_architecture("resnet18")
def _resnet18(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 64, **kw) -> nn.Module:
    return ResNet18(in_channels, num_classes, width, kw.get("activation", "relu"), kw.get("dropout", 0.0))


_COMMON_ARGS = ("in_channels", "image_size", "num_classes", "activation", "dropout")


def check_arch_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the argument when ``kwargs`` are not extra arguments of builder ``name``.

    Accepted: the builder's own named parameters (e.g. ``width`` of ``resnet18``, ``hidden`` of
    ``mlp``), with positive integers where the default is an integer or a tuple of integers.
    """
    import inspect

    if name not in _REGISTRY:
        return
    params = {
        p.name: p for p in inspect.signature(_REGISTRY[name]).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _COMMON_ARGS
    }  # fmt: skip
    for key, value in kwargs.items():
        if key not in params:
            raise ValueError(
                f"architecture {name!r} takes no argument {key!r} (arch_kwargs); it accepts {sorted(params) or 'none'}"
            )
        default = params[key].default
        ints = list(value) if isinstance(value, (list, tuple)) else [value]
        wants_ints = isinstance(default, int) or (isinstance(default, tuple) and all(isinstance(d, int) for d in default))
        if wants_ints and (isinstance(default, tuple) != isinstance(value, (list, tuple))
                           or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints)):
            want = "a list of positive integers" if isinstance(default, tuple) else "a positive integer"
            raise ValueError(f"arch_kwargs[{key!r}] of {name!r} must be {want} (default {default!r}), got {value!r}")


def create_model(
    name: str,
    *,
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    activation: str = "relu",
    dropout: float = 0.0,
    init: str = "kaiming-uniform",
    seed: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build architecture ``name`` and initialise it with ``init`` (seeded when ``seed`` is given).

    >>> model = create_model("cnn-s", image_size=8, activation="tanh", init="xavier", seed=0)
    >>> sum(p.numel() for p in model.parameters())
    1096
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; registered: {list_architectures()}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    check_arch_kwargs(name, kwargs)
    model = _REGISTRY[name](
        in_channels=in_channels, image_size=image_size, num_classes=num_classes,
        activation=activation, dropout=dropout, **kwargs,
    )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    init_weights(model, init, generator)
    return model


def permutation_spec_for_arch(arch_name: str, **create_model_kwargs: Any) -> PermutationSpec:
    """The permutation symmetry of architecture ``arch_name`` built with ``create_model(arch_name, **kwargs)``.

    Derived from the module graph by :func:`sane_hf.alignment.permutation_spec`; the example input
    is ``(2, in_channels, image_size, image_size)`` with ``create_model``'s defaults for missing keywords.
    """
    from sane_hf.alignment import permutation_spec

    defaults = inspect.signature(create_model).parameters
    in_channels = create_model_kwargs.get("in_channels", defaults["in_channels"].default)
    image_size = create_model_kwargs.get("image_size", defaults["image_size"].default)
    kwargs = {"init": "default", **create_model_kwargs}
    model = create_model(arch_name, **kwargs)
    return permutation_spec(model, torch.zeros(2, in_channels, image_size, image_size))
