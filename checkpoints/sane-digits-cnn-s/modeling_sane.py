"""SANE: a transformer autoencoder over sequences of weight tokens (arXiv 2406.09997).

Windows of weight tokens `(batch, tokens, token_size)` with their `(n, l, k)` positions go through
an encoder to per-token latents `(batch, tokens, latent_dim)` and back through a mirrored decoder.
Training combines a masked reconstruction loss with NT-Xent between two augmented views of the
same window: `loss = gamma·NT-Xent + (1 - gamma)·masked MSE`.

This file travels to the Hub as remote code next to ``configuration_sane.py``: it imports only
torch, transformers and (relatively) the configuration, never ``sane_hf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_sane import SaneConfig

logger = logging.get_logger(__name__)

POSITION_AXES = ("n (global token index)", "l (layer index)", "k (row index within the layer)")


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class SaneEncoderOutput(ModelOutput):
    """Output of [`SaneModel.encode`].

    Args:
        latents (`torch.FloatTensor` of shape `(batch, tokens, latent_dim)`):
            Per-token latents (the SANE embedding of each token).
        last_hidden_state (`torch.FloatTensor` of shape `(batch, tokens, d_model)`):
            Encoder output after the final layer norm, before the latent projection.
    """

    latents: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class SaneDecoderOutput(ModelOutput):
    """Output of [`SaneModel.decode`].

    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch, tokens, token_size)`):
            Reconstructed weight tokens.
        last_hidden_state (`torch.FloatTensor` of shape `(batch, tokens, d_model)`):
            Decoder output after the final layer norm, before the token projection.
    """

    reconstruction: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class SaneOutput(ModelOutput):
    """Output of [`SaneModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            `gamma·contrastive_loss + (1 - gamma)·reconstruction_loss`, or `reconstruction_loss` alone
            when there is no contrastive term (one view, or a batch of one).
        reconstruction_loss (`torch.FloatTensor` of shape `()`):
            Masked MSE over real (unpadded) values; the mean over both views when two are given.
        contrastive_loss (`torch.FloatTensor` of shape `()`):
            NT-Xent between the projections of the two views; `None` with one view or a batch of one.
        latents (`torch.FloatTensor` of shape `(batch, tokens, latent_dim)`):
            Per-token latents of the first view.
        reconstruction (`torch.FloatTensor` of shape `(batch, tokens, token_size)`):
            Reconstruction of the first view.
        projections (`torch.FloatTensor` of shape `(batch, projection_dim)`):
            Projection-head output for the first view (pooled latents → projection head).
        latents_2, reconstruction_2, projections_2:
            The same for the second view; `None` with one view.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None
    latents_2: torch.FloatTensor | None = None
    reconstruction_2: torch.FloatTensor | None = None
    projections_2: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------
# Losses (module-level so that training, tests and baselines can reuse them)
# ----------------------------------------------------------------------------------------------


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the values where `mask` is True (padding excluded).

    `mask` is broadcast to `pred`'s shape (e.g. `(B, T, d)` per-value or `(B, T, 1)` per-token);
    `None` means every value is real. Computed in float32. With no real value at all the loss is a
    zero that still carries the graph (so a step on an empty batch is a no-op, not a NaN).
    """
    diff = (pred.float() - target.float()).pow(2)
    if mask is None:
        return diff.mean()
    mask = mask.to(torch.bool).expand_as(diff)
    count = mask.sum()
    return diff.masked_fill(~mask, 0.0).sum() / count.clamp(min=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) loss between two views, `z1`, `z2` of shape `(batch, dim)`.

    The 2B embeddings are L2-normalised; each one's positive is the other view of the same item and
    its negatives are the other 2B - 2 embeddings; cosine similarities are divided by
    `temperature`; the loss is the mean cross-entropy over all 2B anchors. Needs `batch >= 2`
    (with one item there is no negative and the loss is identically zero).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent expects two (batch, dim) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    batch = z1.shape[0]
    if batch < 2:
        raise ValueError(f"nt_xent needs a batch of at least 2 items (other items are the negatives), got {batch}.")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # (2B, dim)
    sim = z @ z.T / temperature  # (2B, 2B)
    self_mask = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(batch, device=z.device)
    targets = torch.cat([idx + batch, idx])  # anchor i's positive is i + B, and vice versa
    return F.cross_entropy(sim, targets)


def _token_mask(mask: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool, True on real tokens: `attention_mask`, else tokens with any real value, else None."""
    if attention_mask is not None:
        return attention_mask.to(torch.bool)
    if mask is not None:
        return mask.to(torch.bool).any(dim=-1)
    return None


def _attention_mask_or_none(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool mask, or None when every token is real: no additive mask is built then, which keeps
    attention on the fused kernels (flash attention on GPUs refuses an explicit mask)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask.to(torch.bool)
    return None if bool(attention_mask.all()) else attention_mask


def _mean_pool(latents: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `latents` (B, T, D) over real tokens -> (B, D); a window with no real token gives zeros."""
    if token_mask is None:
        return latents.mean(dim=1)
    weights = token_mask.to(latents.dtype).unsqueeze(-1)  # (B, T, 1)
    return (latents * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def sinusoid_code(index: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """(…,) integer indices -> (…, dim) float32 sin/cos code (Vaswani et al.), computed on the fly.

    `base` is the wavelength scale: the slowest component has a period of about `2π·base`, so
    indices up to a few times `base` are encoded without wrap-around. No index is ever rejected.
    """
    half = dim // 2
    exponent = torch.arange(half, device=index.device, dtype=torch.float32) * (-2.0 / dim)
    inv_freq = torch.exp(exponent * math.log(base))  # (half,) from 1 down to base^(-1 + 2/dim)
    # float32 (portable to every device); n is exact up to 2^24, the phase error stays ~1e-2 rad at n ~ 2e5
    angles = index.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _check_non_negative(positions: torch.Tensor) -> list[int]:
    """Validate the `(…, 3)` layout and non-negative indices; returns the per-axis maxima."""
    if positions.shape[-1] != 3:
        raise ValueError(f"positions must have a last axis of 3 (n, l, k), got shape {tuple(positions.shape)}.")
    if positions.numel() == 0:
        return [0, 0, 0]
    flat = positions.reshape(-1, 3)
    lows, highs = flat.amin(dim=0).tolist(), flat.amax(dim=0).tolist()  # one host sync each
    for axis in range(3):
        if lows[axis] < 0:
            raise ValueError(f"Negative position index {lows[axis]} on axis {POSITION_AXES[axis]}.")
    return highs


class SanePositionEmbedding(nn.Module):
    """Embedding of `(n, l, k)` positions: a learned linear map of three sinusoid codes.

    Each axis index (global token `n`, layer `l`, row within the layer `k`) gets a fixed sinusoid
    code of `d_model` values with wavelength scale `max_positions[axis]`; the three codes are
    concatenated and projected by one bias-free `Linear(3·d_model -> d_model)`. There is no table,
    so no index is ever out of range (a word embedding of 30,522 rows embeds with a model trained
    on small CNNs), it holds `3·d_model²` parameters whatever the models' sizes, and, initialised
    like every linear layer (std `initializer_range`), it starts at the scale of the projected token
    content instead of drowning it (an unscaled sinusoid measured ~7x the content in the encoder).
    """

    def __init__(self, config: SaneConfig):
        super().__init__()
        self.d_model = config.d_model
        self.bases = tuple(float(max(b, 2)) for b in config.max_positions)
        self.projection = nn.Linear(3 * config.d_model, config.d_model, bias=False)

    def check_positions(self, positions: torch.Tensor) -> None:
        """Raise a `ValueError` for a malformed or negative position tensor (no upper bound exists)."""
        _check_non_negative(positions)

    def codes(self, positions: torch.Tensor) -> torch.Tensor:
        # (batch, tokens, 3) -> (batch, tokens, 3·d_model), scaled by 1/sqrt(3): the three codes together have the
        # norm of one d_model-wide code, so the projection starts at the scale of the projected token content
        positions = positions.long()
        codes = [sinusoid_code(positions[..., a], self.d_model, self.bases[a]) for a in range(3)]
        return torch.cat(codes, dim=-1) * (1.0 / math.sqrt(3.0))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # (batch, tokens, 3) -> (batch, tokens, d_model)
        if not torch.compiler.is_compiling():
            self.check_positions(positions)
        codes = self.codes(positions).to(self.projection.weight.dtype)
        return self.projection(codes)


class SaneLegacyPositionEmbedding(nn.Module):
    """The position embedding of checkpoints saved before `position_encoding` existed (sane-hf 0.1).

    sinusoid(n) added unscaled + learned tables for `l` (`max_positions[1]` rows) and `k`
    (`max_positions[2]` rows); an index beyond a table raises a ValueError. Kept so that those
    checkpoints load and embed exactly as before; new models use [`SanePositionEmbedding`].
    """

    def __init__(self, config: SaneConfig):
        super().__init__()
        self.d_model = config.d_model
        self.base = float(config.max_positions[0])
        self.layer_embeddings = nn.Embedding(config.max_positions[1], config.d_model)
        self.row_embeddings = nn.Embedding(config.max_positions[2], config.d_model)

    def check_positions(self, positions: torch.Tensor) -> None:
        highs = _check_non_negative(positions)
        limits = (None, self.layer_embeddings.num_embeddings, self.row_embeddings.num_embeddings)
        for axis in (1, 2):
            if highs[axis] >= limits[axis]:
                raise ValueError(
                    f"Position index {highs[axis]} on axis {POSITION_AXES[axis]} is beyond the learned table of "
                    f"{limits[axis]} entries of this legacy checkpoint (position_encoding='learned-tables'); "
                    "retrain the model with the current sane-hf, whose position code has no upper bound."
                )

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # (batch, tokens, 3) -> (batch, tokens, d_model)
        if not torch.compiler.is_compiling():
            self.check_positions(positions)
        positions = positions.long()
        return (
            sinusoid_code(positions[..., 0], self.d_model, self.base)
            + self.layer_embeddings(positions[..., 1])
            + self.row_embeddings(positions[..., 2])
        )


POSITION_EMBEDDINGS = {"sinusoid-projection": SanePositionEmbedding, "learned-tables": SaneLegacyPositionEmbedding}


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax(QK^T·scaling + mask)·V; `attention_mask` is additive, (B, 1, 1, T) or None.

    The `"eager"` implementation; every other one comes from transformers' `ALL_ATTENTION_FUNCTIONS`
    (same calling convention). Returns the output `(batch, tokens, heads, head_dim)` and the weights.
    """
    # (batch, heads, tokens, head_dim) x3 -> (batch, heads, tokens, tokens)
    weights = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (batch, tokens, heads, head_dim)
    return out, weights


class SaneAttention(nn.Module):
    """Bidirectional multi-head self-attention; implementation chosen by `config._attn_implementation`."""

    def __init__(self, config: SaneConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.d_model // config.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.dropout
        self.is_causal = False  # SANE attends both ways; read by transformers' attention kernels
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        # (batch, tokens, d_model) -> 3 x (batch, heads, tokens, head_dim)
        qkv = self.qkv(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        additive_mask = None
        if attention_mask is not None:
            # (batch, tokens) bool, True on real keys -> (batch, 1, 1, tokens) additive mask in the compute dtype.
            # A finite minimum (not -inf) keeps an all-padding window finite in both implementations.
            additive_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            additive_mask = additive_mask.masked_fill(~attention_mask, torch.finfo(query.dtype).min)[:, None, None, :]
        # "eager" is this file's function; "sdpa" and any other registered kernel come from transformers
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation or "sdpa", eager_attention_forward)
        dropout = self.dropout if self.training else 0.0
        out, _ = attention(self, query, key, value, additive_mask, scaling=self.scaling, dropout=dropout, is_causal=False)
        out = out.reshape(batch, tokens, -1)  # (batch, tokens, heads, head_dim) -> (batch, tokens, d_model)
        return self.out_proj(out)


class SaneMLP(nn.Module):
    def __init__(self, config: SaneConfig):
        super().__init__()
        hidden = int(round(config.d_model * config.mlp_ratio))
        self.fc1 = nn.Linear(config.d_model, hidden)
        self.fc2 = nn.Linear(hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(hidden_states))))


class SaneLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: SaneConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attention = SaneAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = SaneMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.attention(self.norm1(hidden_states), attention_mask))
        return hidden_states + self.dropout(self.mlp(self.norm2(hidden_states)))


class SaneStack(nn.Module):
    """Input projection + position embedding -> blocks -> final LayerNorm -> output projection.

    The encoder maps `token_size -> latent_dim`, the decoder `latent_dim -> token_size`.
    """

    def __init__(self, config: SaneConfig, in_dim: int, out_dim: int, num_layers: int, final_norm: bool = True):
        super().__init__()
        self.input_proj = nn.Linear(in_dim, config.d_model)
        self.embed_positions = POSITION_EMBEDDINGS[config.position_encoding](config)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([SaneLayer(config) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(config.d_model) if final_norm else nn.Identity()
        self.output_proj = nn.Linear(config.d_model, out_dim)

    def forward(
        self, inputs: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (batch, tokens, in_dim) -> (batch, tokens, d_model)
        hidden_states = self.input_proj(inputs)
        hidden_states = hidden_states + self.embed_positions(positions).to(hidden_states.dtype)
        hidden_states = self.dropout(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)  # positional: checkpoint-friendly
        hidden_states = self.norm(hidden_states)
        return self.output_proj(hidden_states), hidden_states  # (batch, tokens, out_dim), (batch, tokens, d_model)


class SaneProjectionHead(nn.Module):
    """SimCLR-style MLP on pooled latents: latent_dim -> projection_dim -> projection_dim."""

    def __init__(self, config: SaneConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.latent_dim, config.projection_dim)
        self.fc2 = nn.Linear(config.projection_dim, config.projection_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(pooled)))  # (batch, latent_dim) -> (batch, projection_dim)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _looks_local(path: str, subfolder: str | None = None) -> bool:
    """True for a path the user surely meant as a local folder (not a Hub repo id)."""
    import os

    if path.startswith((".", "/", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path):
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0]) or os.path.exists(path)


def _check_weights_file(file: str) -> None:
    """Raise naming ``file`` when it cannot be a whole safetensors file (truncated, absurd header)."""
    import os

    if not os.path.isfile(file):
        return
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or int.from_bytes(head, "little") > size - 8:
        raise ValueError(f"{file} is truncated or not a safetensors file ({size} bytes); save or download it again")


class SanePreTrainedModel(PreTrainedModel):
    config_class = SaneConfig
    base_model_prefix = "sane"
    main_input_name = "tokens"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SaneLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class SaneModel(SanePreTrainedModel):
    """SANE autoencoder: `encode` windows of weight tokens to per-token latents, `decode` them back.

    Inputs (all batch-first):
        tokens (`(B, T, token_size)` float): weight tokens (normalised by the tokenizer).
        positions (`(B, T, 3)` int): `(n, l, k)` per token, as produced by `WeightTokenizer`.
        mask (`(B, T, token_size)` bool): True on real values (the tokenizer's value mask).
        attention_mask (`(B, T)` bool): True on real tokens, False on window padding. When omitted
            and `mask` is given, a token is real if any of its values is.

    Example:

    ```python
    >>> import torch
    >>> from sane_hf import SaneConfig, SaneModel
    >>> model = SaneModel(SaneConfig(token_size=16, d_model=32, latent_dim=8)).eval()
    >>> tokens = torch.randn(4, 12, 16)
    >>> positions = torch.stack([torch.arange(12), torch.arange(12) // 4, torch.arange(12) % 4], -1).expand(4, 12, 3)
    >>> out = model(tokens, positions, tokens_2=tokens + 0.01 * torch.randn_like(tokens))
    >>> out.loss.shape, out.contrastive_loss is not None, model.embed(tokens, positions).shape
    (torch.Size([]), True, torch.Size([4, 8]))

    ```
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict about what a SANE checkpoint holds.

        Missing, unexpected or mismatched weights are an error (transformers would initialise the
        missing layers at random and carry on; pass `output_loading_info=True` to inspect them
        instead). A local path that does not exist, a truncated `model.safetensors` and a
        `config.json` with values of the wrong type are one-line errors naming the file.
        """
        import os

        path = os.fspath(pretrained_model_name_or_path)
        if isinstance(path, str) and not os.path.isdir(path) and _looks_local(path, kwargs.get("subfolder")):
            what = "is a file, not a model folder" if os.path.exists(path) else "does not exist"
            raise OSError(f"model folder {path} {what} (a Hub repo id looks like 'user/name')")
        if isinstance(path, str) and os.path.isdir(path):
            _check_weights_file(os.path.join(path, kwargs.get("subfolder") or "", "model.safetensors"))
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        except Exception as err:
            if any(c.__name__ == "StrictDataclassError" for c in type(err).__mro__):  # huggingface_hub's @strict
                raise ValueError(f"config.json of {path} has a wrong value: {' '.join(str(err).split())}") from None
            raise
        if wants_info:
            return model, info
        problems = [f"{name.replace('_', ' ')} {sorted(map(str, info[name]))[:8]}"
                    for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(name)]  # fmt: skip
        if problems:
            raise ValueError(
                f"the weights in {path} do not fit its config.json ({'; '.join(problems)}): the checkpoint would run "
                "with randomly initialised layers. Use the config.json saved with these weights"
            )
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, then the usual file mode (umask) on the weights, which
        safetensors writes as 0600."""
        import os

        result = super().save_pretrained(save_directory, *args, **kwargs)
        umask = os.umask(0)
        os.umask(umask)
        for entry in os.scandir(save_directory):
            if entry.is_file() and entry.name.endswith(".safetensors"):
                os.chmod(entry.path, 0o666 & ~umask)
        return result

    def __init__(self, config: SaneConfig):
        super().__init__(config)
        self.encoder = SaneStack(
            config, config.token_size, config.latent_dim, config.num_encoder_layers, final_norm=config.latent_norm
        )
        self.decoder = SaneStack(config, config.latent_dim, config.token_size, config.num_decoder_layers)
        self.projection_head = SaneProjectionHead(config)
        self.post_init()

    def _check_inputs(self, inputs: torch.Tensor, positions: torch.Tensor, size: int, what: str) -> None:
        if inputs.ndim != 3 or inputs.shape[-1] != size:
            raise ValueError(f"{what} must have shape (batch, tokens, {size}), got {tuple(inputs.shape)}.")
        if positions.shape[:-1] != inputs.shape[:-1]:
            raise ValueError(
                f"positions {tuple(positions.shape)} do not match {what} {tuple(inputs.shape)}: expected "
                f"{(*inputs.shape[:-1], 3)}."
            )

    def encode(
        self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> SaneEncoderOutput:
        """Tokens `(B, T, token_size)` + positions `(B, T, 3)` -> latents `(B, T, latent_dim)`."""
        self._check_inputs(tokens, positions, self.config.token_size, "tokens")
        attention_mask = _attention_mask_or_none(attention_mask)
        latents, hidden = self.encoder(tokens, positions, attention_mask)
        return SaneEncoderOutput(latents=latents, last_hidden_state=hidden)

    def decode(
        self, latents: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> SaneDecoderOutput:
        """Latents `(B, T, latent_dim)` + positions `(B, T, 3)` -> reconstruction `(B, T, token_size)`."""
        self._check_inputs(latents, positions, self.config.latent_dim, "latents")
        attention_mask = _attention_mask_or_none(attention_mask)
        reconstruction, hidden = self.decoder(latents, positions, attention_mask)
        return SaneDecoderOutput(reconstruction=reconstruction, last_hidden_state=hidden)

    def embed(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One vector per window: the mean of token latents over real tokens -> `(B, latent_dim)`.

        A token is real if `attention_mask` is True there; without `attention_mask`, if any of its
        values is real in `mask`; without either, every token is real.
        """
        token_mask = _token_mask(mask, attention_mask)
        latents = self.encode(tokens, positions, token_mask).latents
        return _mean_pool(latents, token_mask)

    def _view(self, tokens, positions, mask, attention_mask, labels):
        """Encode, decode, project one view; returns (latents, reconstruction, projections, mse)."""
        token_mask = _token_mask(mask, attention_mask)
        if mask is not None:  # padded values carry no information: the encoder sees zeros there, whatever was passed
            tokens = tokens.masked_fill(~mask.to(torch.bool), 0.0)  # (B, T, token_size)
        latents = self.encode(tokens, positions, token_mask).latents
        reconstruction = self.decode(latents, positions, token_mask).reconstruction
        projections = self.projection_head(_mean_pool(latents, token_mask))
        value_mask = mask.to(torch.bool) if mask is not None else None
        if token_mask is not None:
            token_mask = token_mask.unsqueeze(-1)  # (B, T, 1)
            value_mask = token_mask if value_mask is None else value_mask & token_mask
        target = labels if labels is not None else tokens
        return latents, reconstruction, projections, masked_mse(reconstruction, target, value_mask)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        tokens_2: torch.Tensor | None = None,
        positions_2: torch.Tensor | None = None,
        mask_2: torch.Tensor | None = None,
        attention_mask_2: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        labels_2: torch.Tensor | None = None,
    ) -> SaneOutput:
        """Autoencode one or two views of a batch of windows and compute the SANE loss.

        `labels` / `labels_2` are the reconstruction targets (clean tokens; default: the inputs).
        With one view, `loss = reconstruction_loss`. With two views (`tokens_2` given; its
        `positions_2`, `mask_2` and `attention_mask_2` default to the first view's, since both are
        augmentations of the same window), the reconstruction loss is the mean over both views and
        `loss = gamma·NT-Xent + (1 - gamma)·reconstruction_loss`. NT-Xent needs other items as
        negatives: with a batch of one the contrastive term is skipped (`contrastive_loss=None`,
        `loss = reconstruction_loss`) and a warning is logged.
        """
        latents, reconstruction, projections, rec_loss = self._view(tokens, positions, mask, attention_mask, labels)
        if tokens_2 is None:
            return SaneOutput(
                loss=rec_loss, reconstruction_loss=rec_loss, latents=latents,
                reconstruction=reconstruction, projections=projections,
            )

        positions_2 = positions if positions_2 is None else positions_2
        mask_2 = mask if mask_2 is None else mask_2
        attention_mask_2 = attention_mask if attention_mask_2 is None else attention_mask_2
        latents_2, reconstruction_2, projections_2, rec_loss_2 = self._view(
            tokens_2, positions_2, mask_2, attention_mask_2, labels_2
        )
        rec_loss = (rec_loss + rec_loss_2) / 2
        contrastive_loss = None
        loss = rec_loss
        if tokens.shape[0] >= 2:
            contrastive_loss = nt_xent(projections, projections_2, self.config.temperature)
            gamma = self.config.gamma
            loss = gamma * contrastive_loss + (1.0 - gamma) * rec_loss
        else:
            logger.warning_once(
                "SaneModel: a batch of one window has no negatives for NT-Xent; the contrastive term is skipped "
                "and loss = reconstruction_loss. Use batches of at least 2 (e.g. drop_last=True)."
            )
        return SaneOutput(
            loss=loss, reconstruction_loss=rec_loss, contrastive_loss=contrastive_loss,
            latents=latents, reconstruction=reconstruction, projections=projections,
            latents_2=latents_2, reconstruction_2=reconstruction_2, projections_2=projections_2,
        )


def estimate_flops_per_token(config: SaneConfig, window: int) -> float:
    """Approximate forward FLOPs per token (multiply-add = 2 FLOPs) of `SaneModel.forward` for one view.

    Counts the matmuls: input/output projections, QKV/out projections, attention scores and
    weighted sums (2·window·d_model per token each), and the MLPs. Training ≈ 3x this.
    """
    d, hidden = config.d_model, int(round(config.d_model * config.mlp_ratio))
    per_layer = 2 * (3 * d * d + d * d + 2 * d * hidden) + 2 * 2 * window * d
    layers = config.num_encoder_layers + config.num_decoder_layers
    io = 2 * (config.token_size * d + d * config.latent_dim) * 2
    return float(layers * per_layer + io)


SaneModel.register_for_auto_class("AutoModel")  # save_pretrained copies the code and writes auto_map
AutoModel.register(SaneConfig, SaneModel, exist_ok=True)

__all__ = [
    "SaneConfig",
    "SaneDecoderOutput",
    "SaneEncoderOutput",
    "SaneModel",
    "SaneOutput",
    "SanePreTrainedModel",
    "estimate_flops_per_token",
    "masked_mse",
    "nt_xent",
]
