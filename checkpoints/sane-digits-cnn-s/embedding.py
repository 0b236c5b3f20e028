"""Haloed windowed encoding and decoding of models of any length, and model embeddings.

SANE's transformer sees windows of ``window_size`` tokens. A whole model (a ResNet-18 is ~50k
tokens) is processed as a sequence of *content* windows; each is fed to the model together with
``halo`` tokens of context on each side, and only the content positions of the output are kept
(Schürholt et al. 2024, "haloing"). Memory is therefore proportional to ``window + 2·halo``, not to
the model's length. Near the ends of the sequence the context window is shifted inwards so that
every forward pass sees a full ``window + 2·halo`` tokens whenever the model has that many.

Window defaults follow :class:`~sane_hf.configuration_sane.SaneConfig`: ``window_size`` is the
length of a training window *including* its halos, so a forward pass here holds
``window_size`` tokens: content ``window = window_size - 2·halo_size`` plus ``halo_size`` on each
side (:func:`resolve_window`). The model then always sees sequences as long as the ones it was
trained on.

:func:`embed_models` turns models (state_dicts, modules, :class:`WeightTokens`, zoo splits) into
one vector per model. It streams: models are tokenized a group at a time, the windows of several
models share a forward batch, and per-token latents are pooled and dropped unless asked for.
Peak memory is one group's tokens and latents plus the activations of ``batch_size`` windows —
independent of the number of models, and for a model longer than a window, of its length (beyond
its own tokens). Windowing changes the attention context of a token whenever the model is longer
than ``window + 2·halo``: embeddings are invariant to ``batch_size`` (up to float round-off), but
to ``window``/``halo`` only while ``window + 2·halo`` covers the whole model.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from sane_hf import SaneConfig, SaneModel, WeightTokenizer
    >>> from sane_hf.embedding import embed_models
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    >>> tok = WeightTokenizer.from_reference(net, token_size=8)
    >>> sane = SaneModel(SaneConfig(token_size=8, d_model=32, latent_dim=4, num_encoder_layers=1,
    ...                             num_decoder_layers=1, window_size=8, halo_size=2))
    >>> out = embed_models(sane, tok, [net, net.state_dict()], normalize=False, return_token_latents=True)
    >>> out.embeddings.shape, out.token_latents.shape
    (torch.Size([2, 4]), torch.Size([2, 12, 4]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

# relative imports: this module travels to the Hub as remote code beside tokenization_sane.py
from .state_dict_io import state_dict_from_bytes
from .tokenization_sane import WeightTokens

if TYPE_CHECKING:  # pragma: no cover
    from .tokenization_sane import WeightTokenizer

__all__ = [
    "POOLINGS",
    "DEFAULT_POOLING",
    "layer_pool",
    "EmbeddingOutput",
    "resolve_window",
    "window_plan",
    "haloed_map",
    "encode_haloed",
    "decode_haloed",
    "embed_models",
    "check_positions",
]


def resolve_window(config: Any, window: int | None = None, halo: int | None = None) -> tuple[int, int]:
    """``(window, halo)`` for haloed encoding: content tokens per window and context on each side.

    ``config.window_size`` (a :class:`SaneConfig`) is the length of a *training* window, halos
    included, so the defaults keep every forward pass at that length: ``halo = halo_size`` and
    ``window = window_size - 2·halo``. Give ``window`` to choose the content length yourself
    (the pass is then ``window + 2·halo`` long).

    >>> from types import SimpleNamespace
    >>> resolve_window(SimpleNamespace(window_size=64, halo_size=8))
    (48, 8)
    >>> resolve_window(SimpleNamespace(window_size=64, halo_size=8), halo=0)
    (64, 0)
    """
    halo = int(config.halo_size) if halo is None else int(halo)
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    if window is None:
        window = int(config.window_size) - 2 * halo
        if window < 1:
            raise ValueError(
                f"halo {halo} leaves no content in a window of window_size={config.window_size} tokens "
                f"(window_size - 2·halo = {window}); pass a smaller halo or an explicit window"
            )
    window = int(window)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return window, halo


def window_plan(num_tokens: int, window: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Split ``num_tokens`` into content windows with halo context.

    Returns a list of ``(ctx_start, ctx_end, content_start, content_end)``: the model is run on
    tokens ``[ctx_start, ctx_end)`` and keeps outputs ``[content_start, content_end)``.

    >>> window_plan(10, 4, 1)
    [(0, 6, 0, 4), (3, 9, 4, 8), (4, 10, 8, 10)]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    if num_tokens < 1:
        raise ValueError("cannot window an empty token sequence")
    span = window + 2 * halo
    plan = []
    for content_start in range(0, num_tokens, window):
        content_end = min(content_start + window, num_tokens)
        if num_tokens <= span:
            ctx_start, ctx_end = 0, num_tokens
        else:
            ctx_start = min(max(0, content_start - halo), num_tokens - span)
            ctx_end = ctx_start + span
        plan.append((ctx_start, ctx_end, content_start, content_end))
    return plan


def haloed_map(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    positions: torch.Tensor,
    *,
    window: int,
    halo: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """Apply a per-token sequence model ``fn`` to one long sequence, window by window.

    ``inputs`` is ``(N, D_in)`` and ``positions`` ``(N, 3)``; ``fn(x, pos, attention_mask)`` takes
    ``(B, L, D_in)``, ``(B, L, 3)``, ``(B, L)`` and returns ``(B, L, D_out)``. The result is
    ``(N, D_out)``, each position taken from the window in which it is *content*.
    """
    if inputs.dim() != 2 or positions.dim() != 2 or positions.shape[-1] != 3:
        raise ValueError(
            f"haloed_map expects inputs (N, D) and positions (N, 3), got {tuple(inputs.shape)} and {tuple(positions.shape)}"
        )
    if inputs.shape[0] != positions.shape[0]:
        raise ValueError(f"inputs have {inputs.shape[0]} tokens but positions have {positions.shape[0]}")
    num_tokens = inputs.shape[0]
    plan = window_plan(num_tokens, window, halo)
    span = max(ctx_end - ctx_start for ctx_start, ctx_end, _, _ in plan)
    output: torch.Tensor | None = None
    for batch_start in range(0, len(plan), batch_size):
        chunk = plan[batch_start : batch_start + batch_size]
        x = inputs.new_zeros((len(chunk), span, inputs.shape[1]))  # (B, L, D_in)
        pos = positions.new_zeros((len(chunk), span, 3))  # (B, L, 3)
        attn = torch.zeros((len(chunk), span), dtype=torch.bool, device=inputs.device)  # (B, L)
        for i, (cs, ce, _, _) in enumerate(chunk):
            x[i, : ce - cs] = inputs[cs:ce]
            pos[i, : ce - cs] = positions[cs:ce]
            attn[i, : ce - cs] = True
        out = fn(x, pos, attn)  # (B, L, D_out)
        if output is None:
            output = out.new_empty((num_tokens, out.shape[-1]))  # (N, D_out)
        for i, (cs, _, s, e) in enumerate(chunk):
            output[s:e] = out[i, s - cs : e - cs]
    assert output is not None
    return output


@torch.no_grad()
def encode_haloed(
    model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    *,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-token latents of one model's token sequence: ``(N, d) -> (N, latent_dim)``.

    ``window``/``halo`` default to :func:`resolve_window` of the model's config (forward passes of
    ``window_size`` tokens: content ``window_size - 2·halo_size``, ``halo_size`` on each side).
    """
    window, halo = resolve_window(model.config, window, halo)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    def fn(x, pos, attn):
        return model.encode(x, pos, attention_mask=attn).latents

    return haloed_map(
        fn, tokens.to(device=device, dtype=dtype), positions.to(device), window=window, halo=halo,
        batch_size=batch_size,
    )


@torch.no_grad()
def decode_haloed(
    model,
    latents: torch.Tensor,
    positions: torch.Tensor,
    *,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Reconstructed tokens from per-token latents: ``(N, latent_dim) -> (N, token_size)``."""
    window, halo = resolve_window(model.config, window, halo)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    def fn(z, pos, attn):
        return model.decode(z, pos, attention_mask=attn).reconstruction

    return haloed_map(
        fn, latents.to(device=device, dtype=dtype), positions.to(device), window=window, halo=halo,
        batch_size=batch_size,
    )


# ----------------------------------------------------------------------------------------------
# model embeddings
# ----------------------------------------------------------------------------------------------

#: Pooling modes of :func:`embed_models`: ``"layer"`` (the default): per layer of the network, the
#: mean and the standard deviation of its tokens' latents (``2 · n_layers · latent_dim`` numbers);
#: ``"mean"`` / ``"max"`` over all of a model's real tokens (``latent_dim``); or ``"flatten"``
#: (alias ``"none"``): all token latents concatenated (``n_tokens · latent_dim``, small models only).
POOLINGS = ("layer", "mean", "max", "flatten", "none")
#: The pooling of :func:`embed_models` and of every probe (``sane-hf probe``, the quickstart).
DEFAULT_POOLING = "layer"


@dataclass
class EmbeddingOutput(ModelOutput):
    """Output of :func:`embed_models`.

    Args:
        embeddings (`torch.FloatTensor` of shape `(n_models, dim)`):
            One vector per model, float32 on CPU: `dim = 2 · n_layers · latent_dim` for `"layer"`
            pooling, `latent_dim` for `"mean"`/`"max"`, `n_tokens · latent_dim` for `"flatten"`.
        token_latents (`torch.FloatTensor` of shape `(n_models, n_tokens, latent_dim)`, *optional*):
            Every token's latent (float32, CPU), only with `return_token_latents=True`.
    """

    embeddings: torch.FloatTensor | None = None
    token_latents: torch.FloatTensor | None = None


@dataclass
class _Item:
    """One model's token sequence (CPU)."""

    tokens: torch.Tensor  # (N, d) float32
    positions: torch.Tensor  # (N, 3) int
    token_mask: torch.Tensor  # (N,) bool, True on tokens holding a real value


def _datasets_types() -> tuple[type, type] | None:
    """``(Dataset, DatasetDict)`` when ``datasets`` is imported (an instance implies it is)."""
    import sys

    module = sys.modules.get("datasets")
    if module is None:
        return None
    return module.Dataset, module.DatasetDict


def _per_token_stats(tokenizer: WeightTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenizer's fitted normalisation as ``(N,)`` mean and std per token."""
    stats = tokenizer.stats
    if stats is None:
        raise ValueError(
            "normalize=True needs a fitted tokenizer (tokenizer.fit(...) or WeightTokenizer.from_pretrained "
            "of a trained model's folder); pass normalize=False to embed raw tokens"
        )
    counts = torch.tensor([layer.num_tokens for layer in tokenizer.layers])
    mean = torch.tensor(stats.mean, dtype=torch.float32).repeat_interleave(counts)  # (N,)
    std = torch.tensor(stats.std, dtype=torch.float32).repeat_interleave(counts)  # (N,)
    return mean, std


class _ItemReader:
    """Turns every accepted input form into a stream of :class:`_Item` (one per model)."""

    def __init__(self, tokenizer: WeightTokenizer | None, normalize: bool, token_size: int):
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.token_size = token_size
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- single items ---------------------------------------------------------------------------

    def _from_state_dict(self, sd: Mapping[str, Any] | nn.Module, index: int) -> _Item:
        if self.tokenizer is None:
            raise ValueError(
                "embedding state_dicts or modules needs the model's WeightTokenizer "
                "(WeightTokenizer.from_pretrained(model_dir)); only WeightTokens and tokenized zoo splits "
                "can be embedded with tokenizer=None"
            )
        if self.normalize and not self.tokenizer.is_fitted:
            raise ValueError(
                "normalize=True needs a fitted tokenizer (tokenizer.fit(state_dicts), or the tokenizer saved with "
                "a trained model: WeightTokenizer.from_pretrained(model_dir)); pass normalize=False to embed raw tokens"
            )
        if isinstance(sd, Mapping) and isinstance(sd.get("weights"), (bytes, bytearray)):  # a zoo row
            sd = state_dict_from_bytes(sd["weights"])
        try:
            out = self.tokenizer.encode(sd, normalize=self.normalize)
        except (ValueError, TypeError) as err:  # the tokenizer names the key; say which input it is
            message = str(err)
            message = (
                message.replace("state_dicts[0]", f"inputs[{index}]", 1)
                if message.startswith("state_dicts[0]")
                else f"inputs[{index}]: {message}"
            )
            raise type(err)(message) from err
        return _Item(out.tokens, out.positions, out.mask.any(dim=-1))

    def _from_tokens(self, wt: WeightTokens, index: int) -> _Item:
        if wt.token_size != self.token_size:
            raise ValueError(
                f"inputs[{index}] has tokens of size {wt.token_size} but the SANE model expects token_size="
                f"{self.token_size}; tokenize with the model's own tokenizer (same token_size)"
            )
        tokens = wt.tokens.detach().to("cpu", torch.float32)
        if self.tokenizer is not None:
            if wt.num_tokens != self.tokenizer.num_tokens:
                raise ValueError(
                    f"inputs[{index}] has {wt.num_tokens} tokens but the tokenizer's architecture has "
                    f"{self.tokenizer.num_tokens}: these tokens come from another architecture or tokenizer"
                )
            if wt.normalized != self.normalize:
                if self._stats is None:
                    self._stats = _per_token_stats(self.tokenizer)
                mean, std = self._stats
                mask = wt.mask.to("cpu")
                if self.normalize:  # raw -> normalised (padding stays 0)
                    tokens = ((tokens - mean[:, None]) / std[:, None]).masked_fill(~mask, 0.0)
                else:
                    tokens = (tokens * std[:, None] + mean[:, None]).masked_fill(~mask, 0.0)
        elif wt.normalized != self.normalize:
            raise ValueError(
                f"inputs[{index}] are {'normalised' if wt.normalized else 'raw'} WeightTokens but normalize="
                f"{self.normalize}; pass the tokenizer so they can be converted, or a matching normalize"
            )
        return _Item(tokens, wt.positions.to("cpu"), wt.mask.to("cpu").any(dim=-1))

    def _from_any(self, obj: Any, index: int) -> _Item:
        if isinstance(obj, WeightTokens):
            if obj.is_batched:
                raise TypeError(f"inputs[{index}] is a batch of WeightTokens; pass it as the inputs itself")
            return self._from_tokens(obj, index)
        if isinstance(obj, (Mapping, nn.Module)):
            return self._from_state_dict(obj, index)
        raise TypeError(
            f"inputs[{index}] is a {type(obj).__name__}; expected a state_dict, an nn.Module or WeightTokens"
        )

    # -- collections ----------------------------------------------------------------------------

    def _from_dataset(self, ds: Any, chunk: int = 64) -> Iterator[_Item]:
        columns = set(ds.column_names)
        if "weights" in columns and self.tokenizer is not None:
            # tokenize from the weights with this tokenizer: cheap, and sure to match the model
            weights = ds.select_columns(["weights"]).with_format(None)
            for start in range(0, len(ds), chunk):
                for offset, blob in enumerate(weights[start : start + chunk]["weights"]):
                    yield self._from_state_dict(state_dict_from_bytes(blob), start + offset)
        elif {"tokens", "positions", "mask"} <= columns:
            # stored tokens are used as they are (tokenize_zoo normalises by default)
            view = ds.select_columns(["tokens", "positions", "mask"]).with_format("torch")
            for start in range(0, len(ds), chunk):
                batch = view[start : start + chunk]
                for offset in range(len(batch["tokens"])):
                    wt = WeightTokens(
                        batch["tokens"][offset].float(), batch["positions"][offset], batch["mask"][offset].bool(),
                        normalized=self.normalize,
                    )
                    yield self._from_tokens(wt, start + offset)
        elif "weights" in columns:
            raise ValueError("embedding a raw zoo split (a 'weights' column) needs the model's WeightTokenizer")
        else:
            raise ValueError(
                f"the dataset has neither a 'weights' column nor 'tokens'/'positions'/'mask' columns "
                f"(columns: {sorted(columns)}); pass a zoo split (load_zoo(...)['test']) or tokenize_zoo's output"
            )

    def items(self, inputs: Any) -> Iterator[_Item]:
        types = _datasets_types()
        if types is not None and isinstance(inputs, types[1]):
            raise TypeError(
                f"inputs is a DatasetDict with splits {list(inputs)}; embed one split at a time (e.g. zoo['test'])"
            )
        if types is not None and isinstance(inputs, types[0]):
            yield from self._from_dataset(inputs)
        elif isinstance(inputs, WeightTokens):
            for index, wt in enumerate(inputs.unbind()):
                yield self._from_tokens(wt, index)
        elif isinstance(inputs, (Mapping, nn.Module)):
            yield self._from_state_dict(inputs, 0)
        elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, torch.Tensor)):
            for index, obj in enumerate(inputs):
                yield self._from_any(obj, index)
        else:
            raise TypeError(
                f"cannot embed a {type(inputs).__name__}: pass state_dicts, nn.Modules, a list of them, "
                "WeightTokens, or a zoo split (datasets.Dataset)"
            )


def _groups(items: Iterator[_Item], models_per_group: Callable[[int], int]) -> Iterator[list[_Item]]:
    """Consecutive items of equal length, at most ``models_per_group(n_tokens)`` at a time."""
    group: list[_Item] = []
    for item in items:
        if group and (len(item.tokens) != len(group[0].tokens) or len(group) >= models_per_group(len(group[0].tokens))):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def check_positions(model: Any, positions: torch.Tensor) -> None:
    """Raise a ValueError naming the axis when ``positions`` ``(..., 3)`` hold an index ``model`` cannot embed.

    Uses ``model.check_positions`` when the model has one, else every submodule's (the position
    embeddings of a :class:`~sane_hf.modeling_sane.SaneModel`); a model with neither is not checked.
    """
    checks = [model.check_positions] if callable(getattr(model, "check_positions", None)) else []
    if not checks and isinstance(model, nn.Module):
        checks = [m.check_positions for m in model.modules() if callable(getattr(m, "check_positions", None))]
    for check in checks:
        try:
            check(positions)
        except ValueError as err:
            raise ValueError(f"these models cannot be embedded with this SANE model: {err}") from err


def _encode_group(
    model: Any, group: list[_Item], window: int, halo: int, batch_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Token latents ``(g, N, latent_dim)`` (float32, on ``device``) of a group of equal-length models.

    The windows of all models in the group are batched together ``batch_size`` at a time; every
    window of one length (``window_plan`` keeps the context span fixed), so no padding is needed.
    """
    num_tokens = len(group[0].tokens)
    check_positions(model, torch.stack([item.positions for item in group]))  # (g, N, 3), before any window
    plan = window_plan(num_tokens, window, halo)
    work = [(m, w) for m in range(len(group)) for w in plan]
    latents: torch.Tensor | None = None
    for start in range(0, len(work), batch_size):
        chunk = work[start : start + batch_size]
        x = torch.stack([group[m].tokens[cs:ce] for m, (cs, ce, _, _) in chunk])  # (B, L, d)
        pos = torch.stack([group[m].positions[cs:ce] for m, (cs, ce, _, _) in chunk])  # (B, L, 3)
        attn = torch.stack([group[m].token_mask[cs:ce] for m, (cs, ce, _, _) in chunk])  # (B, L)
        attn = attn.to(device)  # (B, L); the model drops it when every token is real
        out = model.encode(x.to(device=device, dtype=dtype), pos.to(device), attention_mask=attn).latents  # (B, L, latent)
        if latents is None:
            latents = torch.empty(len(group), num_tokens, out.shape[-1], dtype=torch.float32, device=device)
        for i, (m, (cs, _, s, e)) in enumerate(chunk):
            latents[m, s:e] = out[i, s - cs : e - cs]
    assert latents is not None
    return latents


def layer_pool(latents: torch.Tensor, layer_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-layer mean and standard deviation of token latents: ``(g, N, D)`` -> ``(g, 2·L·D)``.

    ``layer_ids`` ``(N,)`` is the layer index ``l`` of each token (the tokenizer's positions
    ``[:, 1]``); ``L = max(layer_ids) + 1``. The output holds, per layer in order, the mean ``(D,)``
    then the population standard deviation ``(D,)`` over that layer's real tokens (0 for a layer
    of one token). Both are invariant to the order of a layer's tokens, so to permutations of its
    neurons — and they are the latent-space analogue of the layer-statistics baseline
    (mean, variance, quantiles of each layer's weights), measured to predict accuracy better than
    flattening or one mean over all tokens.
    """
    layer_ids = layer_ids.to(latents.device).long()
    num_layers = int(layer_ids.max()) + 1
    weights = torch.ones(latents.shape[:2], dtype=latents.dtype, device=latents.device)  # (g, N)
    if token_mask is not None:
        weights = token_mask.to(latents.dtype)
    onehot = F.one_hot(layer_ids, num_layers).to(latents.dtype)  # (N, L)
    counts = (weights @ onehot).clamp(min=1.0).unsqueeze(-1)  # (g, L, 1)
    weighted = latents * weights.unsqueeze(-1)  # (g, N, D)
    mean = torch.einsum("gnd,nl->gld", weighted, onehot) / counts  # (g, L, D)
    second = torch.einsum("gnd,nl->gld", weighted * latents, onehot) / counts  # (g, L, D)
    std = (second - mean.pow(2)).clamp(min=0.0).sqrt()  # (g, L, D)
    return torch.cat([mean, std], dim=-1).reshape(latents.shape[0], -1)  # (g, L·2D)


def _pool(latents: torch.Tensor, token_mask: torch.Tensor, pooling: str, layer_ids: torch.Tensor) -> torch.Tensor:
    """``(g, N, D)`` latents -> ``(g, dim)`` embeddings."""
    if pooling == "layer":
        return layer_pool(latents, layer_ids, token_mask)
    if pooling == "mean":
        weights = token_mask.to(latents.dtype).unsqueeze(-1)  # (g, N, 1)
        return (latents * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    if pooling == "max":
        return latents.masked_fill(~token_mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    return latents.reshape(latents.shape[0], -1)  # flatten: (g, N·D)


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


@torch.no_grad()
def embed_models(
    model: Any,
    tokenizer: WeightTokenizer | None,
    inputs: Any,
    *,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 32,
    pooling: str = DEFAULT_POOLING,
    normalize: bool = True,
    return_token_latents: bool = False,
    progress: bool = False,
) -> EmbeddingOutput:
    """Embed models with a trained SANE: one vector per model (and optionally every token's latent).

    Each model is tokenized, encoded window by window with halo context (content windows of
    ``window`` tokens, ``halo`` tokens of context on each side, only content latents kept — see
    :func:`window_plan`), and its token latents are pooled. Memory is bounded by the window, not
    the model: a ResNet-18 (~45k tokens) embeds on a laptop CPU (``benchmarks/bench_embed.py``).
    The model is run in eval mode (its training flag is restored afterwards) under ``no_grad``.

    Args:
        model: a :class:`~sane_hf.modeling_sane.SaneModel` (anything with ``.config`` and
            ``.encode(tokens, positions, attention_mask) -> .latents``).
        tokenizer: the model's :class:`WeightTokenizer` (same ``token_size``). May be None when
            ``inputs`` are already tokens (``WeightTokens`` of the right normalisation, or a
            tokenized split without ``weights``).
        inputs: a state_dict, an ``nn.Module``, a list / iterable of them (also zoo rows with a
            ``weights`` blob), ``WeightTokens`` (one model ``(N, d)`` or a batch ``(B, N, d)``),
            or a zoo split (``datasets.Dataset``): a raw split is tokenized here from its
            ``weights``; a split without ``weights`` uses its stored ``tokens``/``positions``/``mask``
            as they are (they must have the normalisation given by ``normalize``). Iterables are
            streamed: models are read, encoded and dropped a group at a time.
        window: content tokens per forward pass; None = :func:`resolve_window` of ``model.config``
            (``window_size - 2·halo_size``, so each pass is ``window_size`` tokens long).
        halo: context tokens on each side of a window; None = ``model.config.halo_size``.
        batch_size: windows per forward pass (windows of several models share a batch). Changes
            speed and memory, not the result (up to float round-off).
        pooling: ``"layer"`` (default: per-layer mean and standard deviation of token latents,
            :func:`layer_pool`), ``"mean"`` (over real tokens, as in the paper), ``"max"``, or
            ``"flatten"`` / ``"none"`` (all token latents concatenated: small models only).
        normalize: SANE sees tokens normalised with the tokenizer's fitted per-layer statistics
            (as in training and ``tokenize_zoo``); ``WeightTokens`` given raw are normalised here
            and vice versa.
        return_token_latents: also return ``token_latents`` ``(n_models, n_tokens, latent_dim)``
            (kept in memory for every model; off by default so that only pooled vectors are held).
        progress: show a progress bar (models).

    Returns:
        :class:`EmbeddingOutput` with ``embeddings`` ``(n_models, dim)`` and, when asked for,
        ``token_latents`` — float32 tensors on CPU, in input order.

    Raises:
        ValueError: a state_dict that does not match the tokenizer's architecture (the
            tokenizer's message, naming the keys, prefixed with the input's index), tokens whose
            size differs from ``model.config.token_size``, a tokenizer of another token size, an
            unknown ``pooling``, no inputs, positions beyond what the model can embed (checked
            on the tokenizer's positions before any input is read, naming the axis).
        TypeError: inputs of an unsupported type (e.g. a whole ``DatasetDict``).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    token_size = int(model.config.token_size)
    if tokenizer is not None and tokenizer.token_size != token_size:
        raise ValueError(
            f"the tokenizer makes tokens of size {tokenizer.token_size} but the SANE model expects token_size="
            f"{token_size}; load the tokenizer saved with this model (WeightTokenizer.from_pretrained(model_dir))"
        )
    window, halo = resolve_window(model.config, window, halo)
    if tokenizer is not None:
        check_positions(model, tokenizer.positions)  # the whole model's positions, before reading any input
    device, dtype = _model_device_dtype(model)

    def models_per_group(num_tokens: int) -> int:
        # enough models to fill about one forward batch with their windows
        return max(1, batch_size // math.ceil(num_tokens / window))

    reader = _ItemReader(tokenizer, normalize, token_size)
    total = len(inputs) if isinstance(inputs, Sequence) and not isinstance(inputs, Mapping) else None
    if isinstance(inputs, (Mapping, nn.Module)):
        total = 1
    elif isinstance(inputs, WeightTokens):
        total = inputs.batch_size or 1
    elif total is None and hasattr(inputs, "num_rows"):
        total = int(inputs.num_rows)

    from tqdm.auto import tqdm

    embeddings: list[torch.Tensor] = []
    token_latents: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=total, desc="embedding", unit="model", disable=not progress) as bar:
            for group in _groups(reader.items(inputs), models_per_group):
                latents = _encode_group(model, group, window, halo, batch_size, device, dtype)  # (g, N, latent)
                token_mask = torch.stack([item.token_mask for item in group]).to(latents.device)  # (g, N)
                layer_ids = group[0].positions[:, 1]  # (N,) one architecture per group
                embeddings.append(_pool(latents, token_mask, pooling, layer_ids).cpu())
                if return_token_latents:
                    token_latents.append(latents.cpu())
                bar.update(len(group))
    finally:
        model.train(was_training)
    if not embeddings:
        raise ValueError("embed_models got no models to embed")
    if len({e.shape[-1] for e in embeddings}) > 1 or len({t.shape[1] for t in token_latents}) > 1:
        raise ValueError(
            "the inputs hold models of different lengths: 'layer' and 'flatten' pooling and return_token_latents need "
            "models of one architecture (embed each architecture separately)"
        )
    return EmbeddingOutput(
        embeddings=torch.cat(embeddings),
        token_latents=torch.cat(token_latents) if return_token_latents else None,
    )
