"""Token layout of a state_dict: layers, rows, packed channels, and the copy plan.

The data side of :class:`~sane_hf.tokenization_sane.WeightTokenizer`: :class:`WeightTokens` (the
tokens, their mask and positions), :class:`LayerSpec`/:class:`TensorSpec`/:class:`LayerStats` (the
self-describing spec the tokenizer stores in ``weight_tokenizer.json``), how a reference state_dict
is grouped into layers, and the strided copy plan that encoding and decoding execute. Every public
name is re-exported by :mod:`sane_hf.tokenization_sane`; this module travels with it to the Hub as
remote code, so it imports nothing from ``sane_hf``.

The scheme
----------
*Layers.* The reference state_dict is split into layers by **structure**: every key is cut at its
last dot into a module prefix and a suffix, and the keys of one prefix are grouped as follows
(never by substrings of layer names such as ``"conv"``):

1. ``weight`` with ≥ 2 dims (any ``<stem>weight<rest>`` suffix, e.g. ``in_proj_weight``,
   ``weight_ih_l0``) → a ``"weight"`` layer with one **row per output channel**
   (``weight.view(out, -1)``). Its bias partner — the suffix with ``weight`` replaced by ``bias``
   in the same module, 1-D, of length ``out`` — is appended as the **last column** of each row.
   Linear, conv (any dims), embedding (one row per vocabulary entry) and attention projections
   all follow this rule.
2. A 1-D ``weight`` with a 1-D ``bias`` of the same length (BatchNorm, LayerNorm, GroupNorm
   affine parameters) → a ``"norm"`` layer with 2 values ``(weight, bias)`` per channel,
   several channels packed into one row (see *Packing*). A lone 1-D ``weight`` of a norm module
   (e.g. RMSNorm; known only when an ``nn.Module`` is given) is a ``"norm"`` layer with 1 value
   per channel.
3. ``running_mean`` + ``running_var`` (1-D, same length) → their own ``"norm_stats"`` layer with
   2 values ``(mean, var)`` per channel (packed) when ``include_norm_stats=True``. When it is
   False they are **not tokenized** and ``decode`` restores the values of a freshly built BatchNorm
   (mean 0, var 1): statistics are a property of data, not of one reference model, and the
   sampler re-estimates them on data (batch-norm conditioning). Storing a reference model's
   statistics would silently hand every decoded model someone else's normalisation.
4. Any other float tensor: ≥ 2 dims → a ``"weight"`` layer without bias column (rows
   ``[shape[0], -1]``); 1-D → a ``"vector"`` layer with one value per channel (packed, as for
   norm layers). Rank-0 float tensors are rejected (a scalar has no rows).
5. Non-float tensors (``num_batches_tracked``, ``position_ids``, bool masks) and empty float
   tensors are **buffers**: their values are stored in the spec and restored by ``decode``, never
   tokenized. Decoding therefore returns the *reference's* value of an integer buffer (e.g.
   the reference's ``num_batches_tracked``) whatever the encoded model held.

Layers are ordered by the first appearance of any of their keys in the reference state_dict,
and ``decode`` returns an ``OrderedDict`` in the reference's key order with the reference's
shapes and dtypes.

*Tokens.* A layer's rows are split into ``ceil(row_length / token_size)`` tokens each, the last
zero-padded; ``mask`` is True on real values. Positions per token are ``(n, l, k)``: global token
index, layer index (into :attr:`WeightTokenizer.layers`), row index within the layer (all tokens of
one row share ``k``).

*Packing (format 2).* Norm, norm-stats and vector layers hold a handful of values per channel
(2 for BatchNorm's ``(weight, bias)``), so one row per channel would leave tokens almost all
padding (a ResNet-18 at token size 288: 9,600 of its 48,724 tokens were ~99 % padding). Such a
layer packs ``p = token_size // row_length`` channels side by side into one row — channel ``c``
sits in row ``k = c // p`` at columns ``(c % p)·row_length ...`` — and its last row holds the
remaining channels. ``LayerSpec.channels_per_row`` (``p``) and ``num_channels`` record this, so the
layout is still exact and self-describing; weight layers keep one row per output channel.
``from_reference(..., pack_channels=False)`` builds the unpacked layout, and tokenizers saved in
format 1 (no packing) load with their old layout and decode exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LayerSpec",
    "TensorSpec",
    "LayerStats",
    "WeightTokens",
]

_PACKED_KINDS = ("norm", "norm_stats", "vector")  # per-channel 1-D values that format 2 packs
# Outputs at least this large are allocated through numpy, which asks the kernel for transparent
# huge pages (madvise): first-touch page faults of a fresh 56 MB token buffer took ~35 ms with
# torch's allocator vs ~19 ms this way on the 2-core benchmark machine (the copy itself: ~6 ms).
_HUGE_ALLOC_BYTES = 4 << 20
# numpy word types of the same size (numpy has no bfloat16: 16-bit words, viewed as bfloat16)
_NUMPY_WORDS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "int16", torch.bool: "bool_"}

_LAYER_KINDS = ("weight", "norm", "norm_stats", "vector")
_ROLES = ("tokenized", "buffer", "excluded")
# dtypes that embed exactly into float32 tokens
_EXACT_FLOATS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_MAX_LISTED = 8  # how many keys an error message lists before "..."

_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._BatchNorm,
        getattr(nn.modules.instancenorm, "_InstanceNorm", None),
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)


# ----------------------------------------------------------------------------------------------
# data classes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightTokens:
    """A tokenized network (or a batch of them).

    Attributes:
        tokens: ``(N, d)`` float32 values, or ``(B, N, d)`` for a batch.
        positions: ``(N, 3)`` int32 ``(n, l, k)`` = (global token index, layer index, row index
            within the layer), or ``(B, N, 3)``.
        mask: ``(N, d)`` bool, True on real values (False on padding), or ``(B, N, d)``.
        normalized: True when per-layer normalisation was applied to ``tokens``.
    """

    tokens: Tensor
    positions: Tensor
    mask: Tensor
    normalized: bool = False

    def __post_init__(self) -> None:
        for name in ("tokens", "positions", "mask"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"WeightTokens.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.tokens.dim() not in (2, 3):
            raise ValueError(f"WeightTokens.tokens must be (N, d) or (B, N, d), got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape:
            raise ValueError(
                f"WeightTokens.mask has shape {tuple(self.mask.shape)} but tokens have {tuple(self.tokens.shape)}"
            )
        if self.positions.shape != (*self.tokens.shape[:-1], 3):
            raise ValueError(
                f"WeightTokens.positions must have shape {(*self.tokens.shape[:-1], 3)}, got {tuple(self.positions.shape)}"
            )

    @property
    def is_batched(self) -> bool:
        """True for ``(B, N, d)`` tokens."""
        return self.tokens.dim() == 3

    @property
    def batch_size(self) -> int | None:
        """``B`` for a batch, None for a single network."""
        return self.tokens.shape[0] if self.is_batched else None

    @property
    def num_tokens(self) -> int:
        """``N``, the number of tokens per network."""
        return self.tokens.shape[-2]

    @property
    def token_size(self) -> int:
        """``d``, the number of values per token."""
        return self.tokens.shape[-1]

    @property
    def attention_mask(self) -> Tensor:
        """``(N,)`` or ``(B, N)`` bool: True on tokens holding at least one real value."""
        return self.mask.any(dim=-1)

    def __len__(self) -> int:
        """Number of tokens for one network; batch size for a batch (like ``len`` of a tensor)."""
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> WeightTokens:
        """The ``index``-th network of a batch."""
        if not self.is_batched:
            raise TypeError("indexing selects a network of a batch; use .window(start, end) to slice tokens")
        return WeightTokens(self.tokens[index], self.positions[index], self.mask[index], self.normalized)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WeightTokens:
        """Move all tensors to ``device``; ``dtype`` converts ``tokens`` only."""
        return WeightTokens(
            self.tokens.to(device=device, dtype=dtype),
            self.positions.to(device=device),
            self.mask.to(device=device),
            self.normalized,
        )

    def window(self, start: int, end: int) -> WeightTokens:
        """Tokens ``start:end`` (along the token axis), with their positions and mask."""
        return WeightTokens(
            self.tokens[..., start:end, :], self.positions[..., start:end, :], self.mask[..., start:end, :], self.normalized
        )

    def unbind(self) -> list[WeightTokens]:
        """Split a batch into one ``WeightTokens`` per network."""
        if not self.is_batched:
            return [self]
        return [self[i] for i in range(self.tokens.shape[0])]

    @classmethod
    def stack(cls, items: Sequence[WeightTokens]) -> WeightTokens:
        """Stack single networks of equal length into a batch."""
        if not items:
            raise ValueError("WeightTokens.stack needs at least one item")
        if any(it.is_batched for it in items):
            raise ValueError("WeightTokens.stack takes single (unbatched) WeightTokens")
        flags = {it.normalized for it in items}
        if len(flags) != 1:
            raise ValueError("cannot stack normalised and raw WeightTokens together")
        return cls(
            torch.stack([it.tokens for it in items]),  # (B, N, d)
            torch.stack([it.positions for it in items]),  # (B, N, 3)
            torch.stack([it.mask for it in items]),  # (B, N, d)
            flags.pop(),
        )


@dataclass(frozen=True)
class LayerSpec:
    """One tokenized layer: a group of state_dict keys laid out as rows.

    Attributes:
        name: the module prefix (``"conv1"``, ``"bn1"``), or the key itself for a tensor that is
            not a module's ``weight``/``bias``/running statistics.
        keys: state_dict keys whose values fill each row, in column order (weight, then bias).
        kind: ``"weight"`` (≥2-D weight, optional bias column), ``"norm"`` (1-D weight+bias of a
            norm layer), ``"norm_stats"`` (running mean+var) or ``"vector"`` (a lone 1-D tensor).
        token_start, token_end: the layer's tokens are ``token_start:token_end``.
        num_rows: rows along the ``k`` axis: one per output channel, or one per group of
            ``channels_per_row`` channels in a packed layer.
        row_length: real values per channel (``sum(columns)``).
        tokens_per_row: ``ceil(channels_per_row · row_length / token_size)``.
        columns: values each key contributes per channel, aligned with ``keys``.
        module_type: class name of the module owning the keys, when built from an ``nn.Module``.
        channels_per_row: channels laid side by side in one row (format 2 packs norm, norm-stats
            and vector layers this way; 1 otherwise and in format 1).
        num_channels: output channels (dim 0 of every key); ``num_rows = ceil(num_channels /
            channels_per_row)``. None when loading format 1 (then equal to ``num_rows``).
    """

    name: str
    keys: tuple[str, ...]
    kind: str
    token_start: int
    token_end: int
    num_rows: int
    row_length: int
    tokens_per_row: int
    columns: tuple[int, ...]
    module_type: str | None = None
    channels_per_row: int = 1
    num_channels: int | None = None

    def __post_init__(self) -> None:
        if self.num_channels is None:  # format 1: one row per channel
            object.__setattr__(self, "num_channels", self.num_rows)

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def num_values(self) -> int:
        """Real (non-padding) values in the layer."""
        return self.num_channels * self.row_length

    @property
    def is_packed(self) -> bool:
        """True when a row holds several channels (``channels_per_row > 1``)."""
        return self.channels_per_row > 1


@dataclass(frozen=True)
class TensorSpec:
    """One key of the reference state_dict.

    Attributes:
        key: the state_dict key.
        shape: its shape.
        dtype: its dtype name (``"float32"``, ``"int64"``, ...).
        role: ``"tokenized"`` (values in the tokens), ``"buffer"`` (values stored here) or
            ``"excluded"`` (running statistics left out by ``include_norm_stats=False``,
            restored to ``fill``).
        layer: index of the layer holding it (tokenized keys), else None.
        value: a buffer's flattened values (None when ``fill`` describes it).
        fill: the constant a buffer or excluded tensor is restored to.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    layer: int | None = None
    value: list | None = None
    fill: float | int | bool | None = None


@dataclass(frozen=True)
class LayerStats:
    """Per-layer normalisation statistics fitted on a population (aligned with ``layers``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_models: int
    min_std: float = 1e-8


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in tokenizer spec")
    return dtype


def _listed(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _split_key(key: str) -> tuple[str, str]:
    prefix, _, suffix = key.rpartition(".")
    return prefix, suffix


def _as_state_dict(obj: Any, what: str) -> Mapping[str, Any]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"{what} must be a state_dict (a mapping of key -> tensor) or an nn.Module, got {type(obj).__name__}")


def _check_float(key: str, value: Tensor) -> None:
    """Reject float/complex dtypes that float32 tokens cannot hold exactly."""
    if value.is_complex():
        raise TypeError(
            f"{key!r} is complex ({_dtype_name(value.dtype)}); weight tokens are real. "
            "Split it into real and imaginary parts (torch.view_as_real) before tokenizing."
        )
    if value.dtype == torch.float64:
        raise TypeError(
            f"{key!r} is float64; tokens are float32 and cannot hold float64 exactly. "
            "Convert first (model.float(), or {k: v.float() for k, v in state_dict.items()})."
        )
    if value.is_floating_point() and value.dtype not in _EXACT_FLOATS:
        raise TypeError(
            f"{key!r} has dtype {_dtype_name(value.dtype)}; supported float dtypes are "
            f"{sorted(_EXACT_FLOATS.values())}. Convert it with .float()."
        )


def _check_tensors(sd: Mapping[str, Any], what: str) -> None:
    if len(sd) == 0:
        raise ValueError(f"{what} is empty: pass a model's state_dict() (or the nn.Module itself)")
    for key, value in sd.items():
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be strings, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{what}[{key!r}] is a {type(value).__name__}, not a torch.Tensor; "
                "pass a flat state_dict of tensors (e.g. model.state_dict(), or the inner 'state_dict' of a checkpoint)"
            )
        if value.is_meta:
            raise ValueError(
                f"{what}[{key!r}] is a meta tensor (shape only, no values: the model was built on the 'meta' device "
                "or its weights were never loaded); load the weights first"
            )
        if value.is_complex() or value.is_floating_point():
            _check_float(key, value)


def _module_types(module: nn.Module | None) -> dict[str, nn.Module]:
    return dict(module.named_modules()) if module is not None else {}


def _is_norm_module(module: nn.Module | None) -> bool:
    if module is None:
        return False
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _group_layers(
    sd: Mapping[str, Tensor], modules: dict[str, nn.Module]
) -> tuple[list[tuple[str, tuple[str, ...], str, str | None]], set[str], set[str]]:
    """Group float keys into layers by module prefix and suffix.

    Returns ``(layers, stats_keys, buffer_keys)`` where ``layers`` holds
    ``(name, keys, kind, module_type)`` in order of first key appearance, ``stats_keys`` the
    running-statistics keys grouped into ``"norm_stats"`` layers, ``buffer_keys`` the keys stored
    as values.
    """
    order = {k: i for i, k in enumerate(sd)}
    groups: dict[str, list[str]] = {}
    for key in sd:
        groups.setdefault(_split_key(key)[0], []).append(key)

    layers: list[tuple[int, str, tuple[str, ...], str, str | None]] = []
    stats_keys: set[str] = set()
    buffers: set[str] = set()
    for prefix, keys in groups.items():
        module = modules.get(prefix)
        module_type = type(module).__name__ if module is not None else None
        by_suffix: dict[str, Tensor] = {}
        for key in keys:
            value = sd[key]
            if not value.is_floating_point() or value.numel() == 0:
                buffers.add(key)
                continue
            if value.dim() == 0:
                raise ValueError(
                    f"{key!r} is a rank-0 (scalar) float tensor; the tokenizer cuts tensors into rows and "
                    "cannot place a scalar. Reshape the parameter to shape (1,) in the model, or drop it from "
                    "the state_dict before building the tokenizer."
                )
            by_suffix[_split_key(key)[1]] = value

        def full(suffix: str, _prefix: str = prefix) -> str:
            return f"{_prefix}.{suffix}" if _prefix else suffix

        used: set[str] = set()
        mean, var = by_suffix.get("running_mean"), by_suffix.get("running_var")
        if mean is not None and var is not None and mean.dim() == 1 and mean.shape == var.shape:
            used |= {"running_mean", "running_var"}
            stats = (full("running_mean"), full("running_var"))
            stats_keys.update(stats)
            layers.append((min(order[k] for k in stats), prefix or stats[0], stats, "norm_stats", module_type))

        for suffix, value in by_suffix.items():
            if suffix in used or "weight" not in suffix:
                continue
            partner = suffix.replace("weight", "bias", 1)
            bias = by_suffix.get(partner)
            if bias is None or partner in used or bias.dim() != 1 or bias.shape[0] != value.shape[0]:
                continue
            used |= {suffix, partner}
            keys_ = (full(suffix), full(partner))
            kind = "weight" if value.dim() >= 2 else "norm"
            name = prefix if prefix and suffix == "weight" else keys_[0]
            layers.append((min(order[k] for k in keys_), name, keys_, kind, module_type))

        for suffix, value in by_suffix.items():
            if suffix in used:
                continue
            key = full(suffix)
            if value.dim() >= 2:
                kind = "weight"
            elif suffix == "weight" and _is_norm_module(module):
                kind = "norm"
            else:
                kind = "vector"
            name = prefix if prefix and suffix == "weight" else key
            layers.append((order[key], name, (key,), kind, module_type))

    layers.sort(key=lambda item: item[0])
    return [item[1:] for item in layers], stats_keys, buffers


def _buffer_spec(key: str, value: Tensor) -> TensorSpec:
    flat = value.detach().reshape(-1).cpu()
    shape, dtype = tuple(value.shape), _dtype_name(value.dtype)
    if flat.numel() > 0 and bool((flat == flat[0]).all()):
        return TensorSpec(key, shape, dtype, "buffer", fill=flat[0].item())
    return TensorSpec(key, shape, dtype, "buffer", value=flat.tolist())


# ----------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Strided:
    """A block of the flat ``(N·d,)`` token buffer: ``tokens.as_strided(size, stride, offset)``."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class _Copy:
    """Channels ``r0:r1`` of ``key`` (viewed as ``(channels, cols)``, reshaped to ``dst.size``) ⇄ ``dst``."""

    key: str
    r0: int
    r1: int
    cols: int
    dst: _Strided


@dataclass
class _Plan:
    copies: list[_Copy] = field(default_factory=list)
    by_key: dict[str, list[_Copy]] = field(default_factory=dict)
    pads: list[_Strided] = field(default_factory=list)  # padding blocks, zeroed after the copies
    mask: Tensor | None = None  # (N, d) bool
    positions: Tensor | None = None  # (N, 3) int32


def _layer_blocks(layer: LayerSpec, d: int) -> tuple[list[_Copy], list[_Strided], Tensor]:
    """Copies, padding blocks and the ``(num_tokens, d)`` mask of one layer (offsets into the flat buffer).

    Unpacked: the layer's tokens viewed as ``(rows, T·d)``, one row per channel, key ``j`` in
    columns ``c0:c1``. Packed (``p`` channels per row, one token per row): the first
    ``F = C // p`` rows viewed as ``(F, p, row_length)``, and a last row holding the remaining
    ``C - F·p`` channels.
    """
    base, width, rl, p = layer.token_start * d, layer.tokens_per_row * d, layer.row_length, layer.channels_per_row
    C = layer.num_channels
    copies: list[_Copy] = []
    pads: list[_Strided] = []
    mask = torch.zeros(layer.num_rows, width, dtype=torch.bool)  # (rows, T*d)
    full, rest = (C, 0) if p == 1 else divmod(C, p)
    c0 = 0
    for key, cols in zip(layer.keys, layer.columns):
        if full:
            if p == 1:  # (C, cols) in columns c0:c0+cols of each row
                dst = _Strided((full, cols), (width, 1), base + c0)
            else:  # (F, p, cols): channel slot s of row r starts at column s*rl
                dst = _Strided((full, p, cols), (width, rl, 1), base + c0)
            copies.append(_Copy(key, 0, full * p, cols, dst))
        if rest:
            dst = _Strided((rest, cols), (rl, 1), base + full * width + c0)
            copies.append(_Copy(key, full * p, C, cols, dst))
        c0 += cols
    used = p * rl
    if full and used < width:
        pads.append(_Strided((full, width - used), (width, 1), base + used))
    mask[:full, :used] = True
    if rest:
        pads.append(_Strided((width - rest * rl,), (1,), base + full * width + rest * rl))
        mask[full, : rest * rl] = True
    return copies, pads, mask.view(layer.num_tokens, d)


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty``, but large CPU buffers come from numpy (transparent huge pages: fewer page faults)."""
    shape = tuple(shape)
    words = _NUMPY_WORDS.get(dtype)
    if device.type == "cpu" and words is not None and math.prod(shape) * dtype.itemsize >= _HUGE_ALLOC_BYTES:
        import numpy as np

        return torch.from_numpy(np.empty(shape, getattr(np, words))).view(dtype)
    return torch.empty(tuple(shape), dtype=dtype, device=device)
