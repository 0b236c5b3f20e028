"""Lossless weight tokenizer: state_dict ⇄ a sequence of fixed-size weight tokens.

SANE (Schürholt, Mahoney & Borth, ICML 2024, arXiv 2406.09997) reads a network as a sequence of
tokens. :class:`WeightTokenizer` holds everything needed to go both ways for one architecture —
key order, shapes, dtypes, the role of every tensor, per-layer normalisation statistics and the
token size — so ``decode`` never needs a reference checkpoint, and ``decode(encode(sd))`` returns
``sd`` bit for bit.

The scheme
----------
The layout — which keys form which layer, how rows are split into tokens and how per-channel
layers are packed — lives in :mod:`sane_hf.tokenization_layout` (with :class:`WeightTokens`,
:class:`LayerSpec`, :class:`TensorSpec` and :class:`LayerStats`, all re-exported here); this
module holds the tokenizer: validation, encoding and decoding, normalisation and
``weight_tokenizer.json``.

*Dtypes.* Tokens are float32. float32, float16 and bfloat16 tensors are held exactly (both half
formats embed into float32). float64 is rejected with an error saying how to convert: float32
cannot hold it exactly, and a silent rounding would break the lossless promise. Complex and
other float formats are rejected too.

*Normalisation.* :meth:`WeightTokenizer.fit` computes per-layer statistics over real values of a
population (as the reference implementation: mean of the per-model means, square root of the
mean of the per-model variances; a layer with zero spread gets ``std = 1``).
``encode(..., normalize=True)`` applies ``(x - mean) / std`` to real values (padding stays 0) and
``decode`` undoes it, exact to float32 round-off.

*Speed.* Per spec, a copy plan (for each key: the strided block of the flat token buffer its
values occupy — ``(rows, cols)`` with the row stride, or ``(rows, p, cols)`` for a packed layer —
and the padding blocks to zero) plus the mask and positions are computed once. Encoding is then
one ``as_strided`` copy per key and block (a packed layer's partial last row is a second block)
plus the padding zeroing, decoding one copy per key out of the tokens — no per-element or
per-row Python, and no parameter-sized index tensor (an int64 index map for BERT-base would take
880 MB). Large CPU outputs are allocated through numpy for transparent huge pages (first-touch
page faults dominated a fresh output); ``encode(..., out=buffer)`` and ``decode(..., out=model)``
write into preallocated tensors instead. ``benchmarks/bench_tokenizer.py`` reports GB/s against a
copy-bound baseline (``torch.cat`` of all tensors and back) and the SANE reference code.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from sane_hf.tokenization_sane import WeightTokenizer
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    >>> tok = WeightTokenizer.from_reference(model, token_size=2)
    >>> tokens = tok.encode(model.state_dict())
    >>> tokens.tokens.shape, tokens.positions.shape
    (torch.Size([6, 2]), torch.Size([6, 3]))
    >>> all(torch.equal(a, b) for a, b in zip(tok.decode(tokens).values(), model.state_dict().values()))
    True
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# relative import: this module travels to the Hub as remote code beside tokenization_layout.py
from .tokenization_layout import (
    _LAYER_KINDS,
    _PACKED_KINDS,
    _ROLES,
    LayerSpec,
    LayerStats,
    TensorSpec,
    WeightTokens,
    _as_state_dict,
    _buffer_spec,
    _check_float,
    _check_tensors,
    _dtype_from_name,
    _dtype_name,
    _empty,
    _group_layers,
    _layer_blocks,
    _listed,
    _module_types,
    _Plan,
    _split_key,
)

__all__ = [
    "TOKENIZER_FILE",
    "FORMAT_VERSION",
    "LayerSpec",
    "TensorSpec",
    "LayerStats",
    "WeightTokens",
    "WeightTokenizer",
]

TOKENIZER_FILE = "weight_tokenizer.json"
FORMAT_VERSION = 2  # 2: packed norm/norm-stats/vector layers (LayerSpec.channels_per_row); 1 still loads


class WeightTokenizer:
    """Turns state_dicts of one architecture into :class:`WeightTokens` and back, losslessly.

    Build one with :meth:`from_reference` (a module or state_dict of the architecture) or load
    one with :meth:`from_pretrained`. See the module docstring for the scheme.
    """

    def __init__(
        self,
        token_size: int,
        tensors: Sequence[TensorSpec],
        layers: Sequence[LayerSpec],
        include_norm_stats: bool = True,
        stats: LayerStats | None = None,
    ):
        if not isinstance(token_size, int) or isinstance(token_size, bool) or token_size < 1:
            raise ValueError(f"token_size must be a positive int, got {token_size!r}")
        self._token_size = token_size
        self._tensors: tuple[TensorSpec, ...] = tuple(tensors)
        self._layers: tuple[LayerSpec, ...] = tuple(layers)
        self.include_norm_stats = bool(include_norm_stats)
        self._by_key = {t.key: t for t in self._tensors}
        self._validate_spec()
        self._stats: LayerStats | None = None
        self._token_stats: tuple[Tensor, Tensor] | None = None  # (N,) mean, (N,) std as float32
        self._plan: _Plan | None = None
        if stats is not None:
            self._set_stats(stats)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_reference(
        cls,
        module_or_state_dict: nn.Module | Mapping[str, Tensor],
        token_size: int = 64,
        include_norm_stats: bool = True,
        pack_channels: bool = True,
    ) -> WeightTokenizer:
        """A new tokenizer for the architecture of ``module_or_state_dict``.

        Args:
            module_or_state_dict: an ``nn.Module`` (module types then label norm layers and
                ``LayerSpec.module_type``) or its state_dict. Only keys, shapes, dtypes and the
                values of non-float buffers are read.
            token_size: values per token (``d``).
            include_norm_stats: tokenize BatchNorm running statistics (True) or leave them out
                and restore them as mean 0 / var 1 on decode (False).
            pack_channels: pack the per-channel values of norm, norm-stats and vector layers
                ``token_size // row_length`` channels to a row (True, format 2), or keep one row
                per channel as format 1 did (False).
        """
        module = module_or_state_dict if isinstance(module_or_state_dict, nn.Module) else None
        sd = _as_state_dict(module_or_state_dict, "module_or_state_dict")
        _check_tensors(sd, "reference state_dict")
        if not isinstance(token_size, int) or isinstance(token_size, bool) or token_size < 1:
            raise ValueError(f"token_size must be a positive int, got {token_size!r}")
        groups, stats_keys, buffer_keys = _group_layers(sd, _module_types(module))

        layers: list[LayerSpec] = []
        layer_of: dict[str, int] = {}
        start = 0
        for name, keys, kind, module_type in groups:
            if kind == "norm_stats" and not include_norm_stats:
                continue
            channels = sd[keys[0]].shape[0]
            columns = tuple(int(math.prod(sd[k].shape[1:])) for k in keys)
            row_length = sum(columns)
            pack = max(1, token_size // row_length) if pack_channels and kind in _PACKED_KINDS else 1
            rows = -(-channels // pack)
            per_row = -(-(pack * row_length) // token_size)
            end = start + rows * per_row
            for k in keys:
                layer_of[k] = len(layers)
            layers.append(LayerSpec(
                name, tuple(keys), kind, start, end, rows, row_length, per_row, columns, module_type,
                channels_per_row=pack, num_channels=channels,
            ))  # fmt: skip
            start = end
        if not layers:
            raise ValueError(
                "the reference state_dict has no float tensors to tokenize "
                f"(keys: {_listed(sd)}); pass the weights of a network"
            )

        tensors: list[TensorSpec] = []
        for key, value in sd.items():
            shape, dtype = tuple(value.shape), _dtype_name(value.dtype)
            if key in layer_of:
                tensors.append(TensorSpec(key, shape, dtype, "tokenized", layer=layer_of[key]))
            elif key in stats_keys:  # running statistics left out by include_norm_stats=False
                fill = 0.0 if _split_key(key)[1] == "running_mean" else 1.0
                tensors.append(TensorSpec(key, shape, dtype, "excluded", fill=fill))
            else:
                assert key in buffer_keys, key
                tensors.append(_buffer_spec(key, value))
        return cls(token_size, tensors, layers, include_norm_stats)

    def _validate_spec(self) -> None:
        position = 0
        for i, layer in enumerate(self._layers):
            if layer.kind not in _LAYER_KINDS:
                raise ValueError(f"layer {i} ({layer.name!r}) has unknown kind {layer.kind!r}")
            pack = layer.channels_per_row
            per_row = -(-(pack * layer.row_length) // self._token_size) if pack >= 1 else 0
            if (
                pack < 1
                or (pack > 1 and per_row != 1)  # a packed row fits one token
                or layer.num_rows != -(-layer.num_channels // pack)
                or layer.token_start != position
                or layer.tokens_per_row != per_row
                or layer.token_end - layer.token_start != layer.num_rows * per_row
                or sum(layer.columns) != layer.row_length
                or len(layer.columns) != len(layer.keys)
            ):
                raise ValueError(f"inconsistent tokenizer spec at layer {i} ({layer.name!r})")
            for key, cols in zip(layer.keys, layer.columns):
                spec = self._by_key.get(key)
                if spec is None or spec.role != "tokenized" or spec.layer != i:
                    raise ValueError(f"inconsistent tokenizer spec: layer {i} lists {key!r}")
                if spec.shape[0] != layer.num_channels or math.prod(spec.shape[1:]) != cols:
                    raise ValueError(f"inconsistent tokenizer spec: shape of {key!r} does not match layer {i}")
            position = layer.token_end
        for spec in self._tensors:
            if spec.role not in _ROLES:
                raise ValueError(f"{spec.key!r} has unknown role {spec.role!r}")
            if spec.role == "tokenized" and (spec.layer is None or spec.key not in self._layers[spec.layer].keys):
                raise ValueError(f"inconsistent tokenizer spec: {spec.key!r} is not in its layer")
        if len(self._by_key) != len(self._tensors):
            raise ValueError("duplicate keys in tokenizer spec")

    # -- properties ----------------------------------------------------------------------------

    @property
    def token_size(self) -> int:
        """``d``, values per token."""
        return self._token_size

    @property
    def num_tokens(self) -> int:
        """``N``, tokens per network."""
        return self._layers[-1].token_end

    @property
    def layers(self) -> list[LayerSpec]:
        """The tokenized layers, in token order."""
        return list(self._layers)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def tensors(self) -> list[TensorSpec]:
        """One spec per key of the reference state_dict, in its order."""
        return list(self._tensors)

    @property
    def keys(self) -> list[str]:
        """The reference state_dict's keys, in order (``decode`` returns these)."""
        return [t.key for t in self._tensors]

    @property
    def positions(self) -> Tensor:
        """``(N, 3)`` int32 ``(n, l, k)`` of every token (the same for every network of the architecture)."""
        return self._get_plan().positions.clone()

    @property
    def num_params(self) -> int:
        """Real values held by the tokens of one network."""
        return sum(layer.num_values for layer in self._layers)

    @property
    def stats(self) -> LayerStats | None:
        """Per-layer normalisation statistics, or None before :meth:`fit`."""
        return self._stats

    @property
    def is_fitted(self) -> bool:
        return self._stats is not None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(token_size={self.token_size}, num_layers={self.num_layers}, "
            f"num_tokens={self.num_tokens}, num_params={self.num_params}, "
            f"include_norm_stats={self.include_norm_stats}, fitted={self.is_fitted})"
        )

    # -- precomputed plan ----------------------------------------------------------------------

    def _get_plan(self) -> _Plan:
        if self._plan is not None:
            return self._plan
        d = self._token_size
        plan = _Plan()
        masks, positions = [], []
        for index, layer in enumerate(self._layers):
            copies, pads, mask = _layer_blocks(layer, d)
            plan.copies += copies
            plan.pads += pads
            for c in copies:
                plan.by_key.setdefault(c.key, []).append(c)
            masks.append(mask)  # (rows*T, d)
            pos = torch.empty(layer.num_tokens, 3, dtype=torch.int32)  # (rows*T, 3)
            pos[:, 0] = torch.arange(layer.token_start, layer.token_end, dtype=torch.int32)
            pos[:, 1] = index
            pos[:, 2] = torch.arange(layer.num_rows, dtype=torch.int32).repeat_interleave(layer.tokens_per_row)
            positions.append(pos)
        plan.mask = torch.cat(masks)  # (N, d)
        plan.positions = torch.cat(positions)  # (N, 3)
        self._plan = plan
        return plan

    def _set_stats(self, stats: LayerStats) -> None:
        if len(stats.mean) != self.num_layers or len(stats.std) != self.num_layers:
            raise ValueError(
                f"normalisation stats cover {len(stats.mean)} layers but the spec has {self.num_layers}"
            )
        counts = torch.tensor([layer.num_tokens for layer in self._layers])
        mean = torch.tensor(stats.mean, dtype=torch.float32).repeat_interleave(counts)  # (N,)
        std = torch.tensor(stats.std, dtype=torch.float32).repeat_interleave(counts)  # (N,)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("normalisation stats must be finite with std > 0")
        self._stats = stats
        self._token_stats = (mean, std)

    # -- validation ----------------------------------------------------------------------------

    def _validate(self, sd: Mapping[str, Any], what: str = "state_dict") -> None:
        if len(sd) == 0:
            raise ValueError(f"{what} is empty: pass a model's state_dict() (or the nn.Module itself)")
        missing = [k for k in self._by_key if k not in sd]
        unexpected = [k for k in sd if k not in self._by_key]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys: {_listed(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_listed(unexpected)}")
            raise ValueError(
                f"{what} does not match the tokenizer's architecture ({'; '.join(parts)}). "
                "Pass a state_dict of the reference architecture (all keys, buffers included), "
                "or build a tokenizer for this one with WeightTokenizer.from_reference(...)."
            )
        for spec in self._tensors:
            value = sd[spec.key]
            if not isinstance(value, Tensor):
                raise TypeError(f"{what}[{spec.key!r}] is a {type(value).__name__}, not a torch.Tensor")
            if value.is_meta:
                raise ValueError(
                    f"{what}[{spec.key!r}] is a meta tensor (shape only, no values: the model was built on the "
                    "'meta' device or its weights were never loaded); load the weights first"
                )
            if tuple(value.shape) != spec.shape:
                raise ValueError(
                    f"{what}[{spec.key!r}] has shape {tuple(value.shape)} but the tokenizer expects {spec.shape}; "
                    "build a tokenizer for this architecture with WeightTokenizer.from_reference(...)"
                )
            if spec.role == "tokenized":
                if not (value.is_floating_point() or value.is_complex()):
                    raise TypeError(
                        f"{what}[{spec.key!r}] has dtype {_dtype_name(value.dtype)} but is a tokenized float "
                        f"tensor ({spec.dtype}) in the spec; convert it with .float()"
                    )
                _check_float(spec.key, value)

    def _raise_non_finite(self, sd: Mapping[str, Tensor], what: str) -> None:
        """Raise naming the first tokenized key holding NaN/Inf; return if there is none."""
        for index, layer in enumerate(self._layers):
            for key in layer.keys:
                if not bool(torch.isfinite(sd[key]).all()):
                    raise ValueError(
                        f"{what}[{key!r}] (layer {index}, {layer.name!r}) contains NaN or Inf values; "
                        "tokens must be finite — check the checkpoint (a diverged training run?)"
                    )

    # -- encoding ------------------------------------------------------------------------------

    def _fill(self, out: Tensor, sd: Mapping[str, Tensor]) -> None:
        """Write ``sd``'s tokenized tensors into ``out`` (N, d) and zero the padding (``out`` may be uninitialised)."""
        plan, base = self._get_plan(), out.storage_offset()
        for c in plan.copies:
            src = sd[c.key].detach()
            src = src.reshape(src.shape[0], c.cols)[c.r0 : c.r1].reshape(c.dst.size)  # (channels, cols) -> block
            out.as_strided(c.dst.size, c.dst.stride, base + c.dst.offset).copy_(src)
        for pad in plan.pads:
            out.as_strided(pad.size, pad.stride, base + pad.offset).zero_()

    def _device_of(self, sd: Mapping[str, Tensor]) -> torch.device:
        return sd[self._layers[0].keys[0]].device

    def _require_stats(self) -> tuple[Tensor, Tensor]:
        if self._token_stats is None:
            raise ValueError(
                "normalize=True needs per-layer statistics: call tokenizer.fit(state_dicts) on a population "
                "first (or load a fitted tokenizer with WeightTokenizer.from_pretrained)"
            )
        return self._token_stats

    def encode_batch(
        self,
        state_dicts: Sequence[Mapping[str, Tensor] | nn.Module],
        normalize: bool = False,
        *,
        out: Tensor | None = None,
    ) -> WeightTokens:
        """Encode several networks into one batch: tokens ``(B, N, d)``, positions ``(B, N, 3)``, mask ``(B, N, d)``.

        ``out``: an optional contiguous float32 ``(B, N, d)`` buffer (on the state_dicts' device)
        to write the tokens into and return, instead of allocating one (reuse it across calls to
        skip the first-touch cost of fresh memory).
        """
        if isinstance(state_dicts, (Mapping, nn.Module)) or not isinstance(state_dicts, Iterable):
            raise TypeError("encode_batch takes a sequence of state_dicts; use encode() for one")
        sds = [_as_state_dict(sd, "each item of state_dicts") for sd in state_dicts]
        if not sds:
            raise ValueError("encode_batch got no state_dicts")
        for i, sd in enumerate(sds):
            self._validate(sd, f"state_dicts[{i}]")
        if normalize:
            self._require_stats()
        plan = self._get_plan()
        device = self._device_of(sds[0])
        n, d = self.num_tokens, self._token_size
        if out is None:
            tokens = _empty((len(sds), n, d), torch.float32, device)  # (B, N, d), filled by _fill
        else:
            tokens = self._check_out(out, (len(sds), n, d), device)
        for i, sd in enumerate(sds):
            self._fill(tokens[i], sd)
            # NaN/Inf make the sum non-finite (a cheap one-pass test); a finite sum proves all values
            # finite. A non-finite sum may also be an overflow of huge finite values: check per key.
            if not bool(torch.isfinite(tokens[i].sum())):
                self._raise_non_finite(sd, f"state_dicts[{i}]")
        mask = plan.mask.to(device)  # (N, d)
        if normalize:
            self._normalize_(tokens, mask)
            if not bool(torch.isfinite(tokens.sum())):  # finite weights can overflow float32 once normalised
                bad = int((~torch.isfinite(tokens)).flatten(1).any(1).nonzero()[0])
                raise ValueError(
                    f"state_dicts[{bad}] gives non-finite tokens after normalisation (weights far outside the range "
                    "the tokenizer was fitted on, e.g. ~3e38); check the checkpoint or encode with normalize=False"
                )
        masks = _empty((len(sds), n, d), torch.bool, device)  # (B, N, d)
        masks.copy_(mask.expand(len(sds), n, d))
        return WeightTokens(
            tokens,
            plan.positions.to(device).expand(len(sds), n, 3).clone(),  # (B, N, 3)
            masks,
            normalized=normalize,
        )

    def encode(
        self, state_dict: Mapping[str, Tensor] | nn.Module, normalize: bool = False, *, out: Tensor | None = None
    ) -> WeightTokens:
        """Encode one network: tokens ``(N, d)`` float32, positions ``(N, 3)`` int32, mask ``(N, d)`` bool.

        Args:
            state_dict: a state_dict of the reference architecture (or the module itself); keys
                in any order, float tensors in float32/float16/bfloat16.
            normalize: apply the fitted per-layer normalisation (see :meth:`fit`).
            out: optional contiguous float32 ``(N, d)`` buffer to write the tokens into (returned
                as ``.tokens``); reusing one buffer across calls skips the cost of fresh memory.
        """
        sd = _as_state_dict(state_dict, "state_dict")
        if out is not None:
            out = self._check_out(out, (self.num_tokens, self._token_size), None)[None]  # (1, N, d) view
        batch = self.encode_batch([sd], normalize=normalize, out=out)
        return batch[0]

    def _check_out(self, out: Tensor, shape: tuple[int, ...], device: torch.device | None) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous float32 tensor of shape {shape} (tokens of this tokenizer), got "
                f"{'a non-contiguous ' if not out.is_contiguous() else ''}{_dtype_name(out.dtype)} tensor of shape "
                f"{tuple(out.shape)}; allocate it with torch.empty({', '.join(map(str, shape))})"
            )
        if device is not None and out.device != device:
            raise ValueError(f"out is on {out.device} but the state_dict is on {device}; allocate out on {device}")
        return out

    def _normalize_(self, tokens: Tensor, mask: Tensor) -> None:
        mean, std = self._require_stats()
        mean, std = mean.to(tokens.device), std.to(tokens.device)
        tokens.sub_(mean[:, None]).div_(std[:, None])  # (..., N, d)
        tokens.masked_fill_(~mask, 0.0)  # padding stays exactly 0

    # -- decoding ------------------------------------------------------------------------------

    def _check_tokens(self, tokens: WeightTokens | Tensor, batched: bool) -> Tensor:
        """Validate tokens against the spec; return raw (denormalised) contiguous float32 values."""
        if isinstance(tokens, WeightTokens):
            values, normalized = tokens.tokens, tokens.normalized
        elif isinstance(tokens, Tensor):
            values, normalized = tokens, False
        else:
            raise TypeError(f"decode takes WeightTokens (from encode), got {type(tokens).__name__}")
        want = 3 if batched else 2
        if values.dim() != want:
            hint = "use decode_batch for (B, N, d) tokens" if values.dim() == 3 else "use decode for (N, d) tokens"
            raise ValueError(f"expected {want}-D tokens, got shape {tuple(values.shape)}; {hint}")
        n, d = values.shape[-2:]
        if (n, d) != (self.num_tokens, self._token_size):
            raise ValueError(
                f"tokens have {n} tokens of size {d} but this tokenizer's spec has {self.num_tokens} tokens "
                f"of size {self._token_size}; decode the full sequence of the same architecture "
                "(reassemble windows first) with the tokenizer that encoded it"
            )
        if not values.is_floating_point():
            raise TypeError(f"tokens must be floating point, got {_dtype_name(values.dtype)}")
        values = values.to(torch.float32).contiguous()
        if normalized:
            mean, std = self._require_stats()
            values = values * std.to(values.device)[:, None] + mean.to(values.device)[:, None]  # (..., N, d)
        return values

    def _extract(self, values: Tensor, into: Mapping[str, Tensor] | None = None) -> OrderedDict[str, Tensor]:
        """``values`` (N, d) raw float32 → state_dict in the spec's order (written into ``into``'s tensors if given)."""
        device = values.device
        plan, base = self._get_plan(), values.storage_offset()
        out: OrderedDict[str, Tensor] = OrderedDict()
        for spec in self._tensors:
            dtype = _dtype_from_name(spec.dtype)
            target = into[spec.key] if into is not None else None
            if spec.role == "tokenized":
                if target is None:
                    target = _empty(spec.shape, dtype, device)
                rows = target.view(spec.shape[0], -1)  # (channels, cols)
                for c in plan.by_key[spec.key]:
                    src = values.as_strided(c.dst.size, c.dst.stride, base + c.dst.offset)  # block of the tokens
                    rows[c.r0 : c.r1].view(c.dst.size).copy_(src)
            else:
                if spec.value is not None:
                    value = torch.tensor(spec.value, dtype=dtype, device=device).reshape(spec.shape)
                else:
                    value = torch.full(spec.shape, spec.fill, dtype=dtype, device=device)
                target = value if target is None else target.copy_(value)
            out[spec.key] = target
        return out

    def _check_into(self, into: Mapping[str, Tensor] | nn.Module, device: torch.device) -> Mapping[str, Tensor]:
        into = _as_state_dict(into, "out")
        self._validate(into, "out")
        for spec in self._tensors:
            t = into[spec.key]
            if t.dtype != _dtype_from_name(spec.dtype) or t.device != device or not t.is_contiguous():
                raise ValueError(
                    f"out[{spec.key!r}] must be a contiguous {spec.dtype} tensor on {device} to decode into, got a "
                    f"{'' if t.is_contiguous() else 'non-contiguous '}{_dtype_name(t.dtype)} tensor on {t.device}"
                )
        return into

    def decode(
        self, tokens: WeightTokens | Tensor, *, out: Mapping[str, Tensor] | nn.Module | None = None
    ) -> OrderedDict[str, Tensor]:
        """Rebuild the state_dict of one network (keys, shapes and dtypes of the reference).

        Normalisation is undone when ``tokens.normalized``; a bare ``(N, d)`` tensor is taken as
        raw (unnormalised) tokens. Padding values are ignored.

        ``out``: an optional state_dict (or module) of the architecture, with contiguous tensors of
        the spec's dtypes on the tokens' device; the values are written into its tensors (e.g.
        straight into a model's parameters, no allocation) and those tensors are returned.
        """
        values = self._check_tokens(tokens, batched=False)
        into = self._check_into(out, values.device) if out is not None else None
        with torch.no_grad():
            return self._check_decoded(self._extract(values, into), "decode")

    def _check_decoded(self, sd: OrderedDict[str, Tensor], what: str) -> OrderedDict[str, Tensor]:
        """Raise naming the first weight that came out NaN/Inf (NaN tokens would decode to NaN weights)."""
        for key, value in sd.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"{what}: the tokens give non-finite values for {key!r} (NaN or Inf tokens); check the model "
                    "output that produced them"
                )
        return sd

    def decode_batch(self, tokens: WeightTokens | Tensor) -> list[OrderedDict[str, Tensor]]:
        """Rebuild one state_dict per network of ``(B, N, d)`` tokens."""
        values = self._check_tokens(tokens, batched=True)
        return [self._check_decoded(self._extract(v), f"decode_batch[{i}]") for i, v in enumerate(values)]

    # -- normalisation -------------------------------------------------------------------------

    def fit(self, state_dicts: Iterable[Mapping[str, Tensor] | nn.Module], min_std: float = 1e-8) -> WeightTokenizer:
        """Fit per-layer normalisation statistics on a population; returns ``self``.

        Per layer, over real values only: ``mean`` = mean of the per-model means, ``std`` =
        sqrt of the mean of the per-model (population) variances. A layer whose std is below
        ``min_std`` (e.g. constant across the whole zoo) gets ``std = 1`` so normalised tokens
        stay finite.
        """
        if isinstance(state_dicts, (Mapping, nn.Module)):
            state_dicts = [state_dicts]
        sums_mean = torch.zeros(self.num_layers, dtype=torch.float64)
        sums_var = torch.zeros(self.num_layers, dtype=torch.float64)
        count = 0
        for i, item in enumerate(state_dicts):
            sd = _as_state_dict(item, "each item of state_dicts")
            what = f"state_dicts[{i}]"
            self._validate(sd, what)
            for index, layer in enumerate(self._layers):
                values = torch.cat([sd[k].detach().reshape(-1).to("cpu", torch.float64) for k in layer.keys])
                var, mean = torch.var_mean(values, correction=0)
                if not (math.isfinite(mean.item()) and math.isfinite(var.item())):
                    self._raise_non_finite(sd, what)
                sums_mean[index] += mean
                sums_var[index] += var
            count += 1
        if count == 0:
            raise ValueError("fit got no state_dicts")
        mean = (sums_mean / count).tolist()
        std = (sums_var / count).sqrt().tolist()
        std = [s if math.isfinite(s) and s >= min_std else 1.0 for s in std]
        self._set_stats(LayerStats(tuple(mean), tuple(std), count, float(min_std)))
        return self

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (what :meth:`save_pretrained` writes)."""
        return {
            "format": "sane-weight-tokenizer",
            "version": FORMAT_VERSION,
            "token_size": self._token_size,
            "include_norm_stats": self.include_norm_stats,
            "num_tokens": self.num_tokens,
            "layers": [asdict(layer) for layer in self._layers],
            "tensors": [asdict(t) for t in self._tensors],
            "stats": asdict(self._stats) if self._stats is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightTokenizer:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != "sane-weight-tokenizer":
            raise ValueError("not a sane-hf weight tokenizer description (missing 'format': 'sane-weight-tokenizer')")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"tokenizer format version {data['version']} is newer than this sane-hf supports ({FORMAT_VERSION}); "
                "upgrade sane-hf"
            )
        layers = [
            replace(LayerSpec(**layer), keys=tuple(layer["keys"]), columns=tuple(layer["columns"]))
            for layer in data["layers"]
        ]
        tensors = [replace(TensorSpec(**t), shape=tuple(t["shape"])) for t in data["tensors"]]
        stats = None
        if data.get("stats") is not None:
            s = data["stats"]
            stats = LayerStats(tuple(s["mean"]), tuple(s["std"]), int(s["num_models"]), float(s.get("min_std", 1e-8)))
        return cls(int(data["token_size"]), tensors, layers, bool(data.get("include_norm_stats", True)), stats)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``weight_tokenizer.json`` into ``save_directory`` (atomically); returns its path."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_directory {str(directory)!r} exists and is not a folder")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / TOKENIZER_FILE
        fd, tmp = tempfile.mkstemp(prefix=f".{TOKENIZER_FILE}.", suffix=".tmp", dir=directory)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual mode
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def from_pretrained(
        cls,
        pretrained_path: str | os.PathLike,
        *,
        subfolder: str = "",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> WeightTokenizer:
        """Load a tokenizer from a folder (or its JSON file), else from a Hub repo id.

        A local folder holding ``weight_tokenizer.json`` (or a path to the file itself) is read
        directly; anything else is taken as a Hub repo id and fetched with
        ``huggingface_hub.hf_hub_download`` (served from the cache when offline).
        """
        path = Path(pretrained_path) / subfolder if subfolder else Path(pretrained_path)
        if path.is_dir():
            file = path / TOKENIZER_FILE
            if not file.is_file():
                raise OSError(f"{str(path)!r} is a folder but holds no {TOKENIZER_FILE}; save one with save_pretrained()")
        elif path.is_file():
            file = path
        else:
            from huggingface_hub import hf_hub_download

            try:
                file = Path(
                    hf_hub_download(
                        str(pretrained_path), TOKENIZER_FILE, subfolder=subfolder or None, revision=revision,
                        cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                    )
                )
            except Exception as err:  # HF raises several error types (offline, not found, bad id)
                raise OSError(
                    f"could not load a weight tokenizer from {str(pretrained_path)!r}: it is not a local folder "
                    f"holding {TOKENIZER_FILE}, and fetching it from the Hugging Face Hub failed "
                    f"({type(err).__name__}: {err})"
                ) from err
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file} is not a valid {TOKENIZER_FILE} ({err}); save the tokenizer again") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file} is not a valid {TOKENIZER_FILE} (expected a JSON object)")
        return cls.from_dict(data)
