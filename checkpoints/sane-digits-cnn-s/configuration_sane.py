"""SANE model configuration.

This file travels to the Hub as remote code next to ``modeling_sane.py``: it imports only
transformers (and huggingface_hub through it), never ``sane_hf``.
"""

# NOTE: no ``from __future__ import annotations`` here: ``@strict`` validates field types from the
# real annotations and silently skips string ones.
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

#: Position encodings a model may use; the first is the default (see `SaneConfig.position_encoding`).
POSITION_ENCODINGS = ("sinusoid-projection", "learned-tables")


@strict
class SaneConfig(PreTrainedConfig):
    r"""
    Configuration of a [`SaneModel`]: a transformer autoencoder over sequences of weight tokens
    (SANE, Schürholt, Mahoney & Borth, ICML 2024, arXiv 2406.09997).

    The defaults describe a small SANE that trains on a laptop CPU in minutes on zoos of small
    CNNs: 64-value tokens (the tokenizer's default), a 128-wide 4+4-layer transformer, a 32-d
    latent per token, and windows of 64 tokens. The paper's models are wider (d_model 1024,
    latent 128); scale `d_model`, the layer counts and `latent_dim` up for ResNet zoos on a GPU.

    Args:
        token_size (`int`, *optional*, defaults to 64):
            Values per weight token (`d` in the tokenizer's `(N, d)` tokens). Must equal the
            `token_size` of the `WeightTokenizer` the data was made with.
        d_model (`int`, *optional*, defaults to 128):
            Width of the encoder and decoder transformer. Must be even (sinusoidal position
            code) and divisible by `num_heads`.
        num_encoder_layers (`int`, *optional*, defaults to 4):
            Transformer blocks in the encoder.
        num_decoder_layers (`int`, *optional*, defaults to 4):
            Transformer blocks in the decoder.
        num_heads (`int`, *optional*, defaults to 4):
            Attention heads per block (head size `d_model // num_heads`).
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Width of each block's MLP as a multiple of `d_model`.
        latent_dim (`int`, *optional*, defaults to 32):
            Size of the per-token latent (the embedding SANE learns). A model's embedding is the
            mean of its token latents, so this is also the size of a pooled embedding.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on embeddings, attention probabilities, residual branches and MLPs; in `[0, 1)`.
            Off by default: on the zoos measured (`benchmarks/learning_curves.py`) dropout 0.1 cost a
            third of CPU throughput and lowered validation reconstruction (R² 0.54 vs 0.39 at 600 steps).
        max_positions (`tuple[int, int, int]`, *optional*, defaults to `(100000, 512, 4096)`):
            Wavelength scale of the sinusoid code of each position axis `(n, l, k)` = (global token
            index, layer index, row index within the layer): the slowest component has a period of
            about `2π·max_positions[axis]`, so indices up to a few times the scale are encoded without
            wrap-around. Not a limit: with `position_encoding="sinusoid-projection"` no index is
            rejected (ResNet-50 has ~170k tokens, a BERT word embedding 30,522 rows). For legacy
            checkpoints (`"learned-tables"`), `max_positions[1]` and `max_positions[2]` are the sizes of
            the learned `l` and `k` tables and larger indices raise a `ValueError`.
        position_encoding (`str`, *optional*, defaults to `"sinusoid-projection"`):
            `"sinusoid-projection"`: the three axes' sinusoid codes, concatenated and mapped by one
            learned linear layer (initialised like every linear layer, so positions start at the
            scale of the token content). `"learned-tables"`: the layout of checkpoints saved before
            this field existed (unscaled sinusoid for `n`, learned tables for `l` and `k`); configs
            without the field load with it, so those checkpoints keep working.
        latent_norm (`bool`, *optional*, defaults to `True`):
            Apply a final LayerNorm to the encoder's residual stream before the latent projection.
            `False` makes each token's latent a linear map of the residual stream, which keeps the
            token's magnitude (a LayerNorm divides it out).
        projection_dim (`int`, *optional*, defaults to 64):
            Output size of the projection head (an MLP on mean-pooled latents) used only by the
            contrastive loss.
        gamma (`float`, *optional*, defaults to 0.05):
            Weight of the contrastive loss: `loss = gamma·NT-Xent + (1 - gamma)·masked MSE`; in `[0, 1]`.
            The paper's starting point: reconstruction dominates, contrast shapes the latent space.
        temperature (`float`, *optional*, defaults to 0.1):
            NT-Xent temperature (cosine similarities are divided by it); `> 0`.
        window_size (`int`, *optional*, defaults to 64):
            Tokens per training window (the sequence length the model sees). Longer models are
            trained on random windows and embedded window by window.
        halo_size (`int`, *optional*, defaults to 8):
            Context tokens on each side of a window when embedding a long model: each window of
            `window_size` tokens keeps only its central `window_size - 2·halo_size` latents, so
            every kept token saw context on both sides. `2·halo_size < window_size`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear layers and position tables.

    Example:

    ```python
    >>> import torch
    >>> from sane_hf import SaneConfig, SaneModel

    >>> config = SaneConfig(token_size=16, d_model=32, latent_dim=8, num_encoder_layers=2, num_decoder_layers=2)
    >>> model = SaneModel(config).eval()
    >>> tokens = torch.randn(2, 10, 16)  # (batch, tokens, token_size)
    >>> positions = torch.stack([torch.arange(10), torch.zeros(10, dtype=torch.long), torch.arange(10)], -1)
    >>> out = model(tokens, positions.expand(2, 10, 3))
    >>> out.latents.shape, out.reconstruction.shape
    (torch.Size([2, 10, 8]), torch.Size([2, 10, 16]))

    ```
    """

    model_type = "sane"

    # Defaults: a small SANE trainable on CPU (see the class docstring for the reasoning).
    token_size: int = 64  # the tokenizer's default token size
    d_model: int = 128  # wide enough to reconstruct 64-value tokens, small enough for 2 CPU cores
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 4  # head size 32
    mlp_ratio: float | int = 4.0  # the usual transformer MLP width
    latent_dim: int = 32  # 2x compression of a 64-value token; pooled embedding of 32 numbers
    dropout: float | int = 0.0  # measured: dropout 0.1 slowed learning and cost a third of CPU throughput
    max_positions: list[int] | tuple[int, ...] = (100_000, 512, 4096)  # wavelength scales of (n, l, k)
    position_encoding: str = "sinusoid-projection"
    latent_norm: bool = True
    projection_dim: int = 64
    gamma: float | int = 0.05  # paper's starting point: mostly reconstruction
    temperature: float | int = 0.1  # SimCLR-style temperature
    window_size: int = 64  # tokens per training window (seconds per epoch on CPU at batch 32)
    halo_size: int = 8  # context on each side when embedding long models window by window
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # JSON round trips turn the tuple into a list; keep one canonical form.
        if isinstance(self.max_positions, list):
            self.max_positions = tuple(self.max_positions)
        super().__post_init__(**kwargs)

    # ``validate_*`` methods run after construction (``@strict``) and before ``save_pretrained``.
    def validate_sizes(self):
        for name in ("token_size", "d_model", "num_encoder_layers", "num_decoder_layers", "num_heads",
                     "latent_dim", "projection_dim", "window_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        if self.halo_size < 0:
            raise ValueError(f"`halo_size` must be >= 0, got {self.halo_size}.")
        if 2 * self.halo_size >= self.window_size:
            raise ValueError(
                f"`2 * halo_size` ({2 * self.halo_size}) must be smaller than `window_size` ({self.window_size}), "
                "otherwise a window keeps no tokens."
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"`mlp_ratio` must be > 0, got {self.mlp_ratio}.")
        if not self.initializer_range > 0:
            raise ValueError(f"`initializer_range` must be > 0, got {self.initializer_range}.")

    def validate_heads(self):
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"`d_model` ({self.d_model}) must be divisible by `num_heads` ({self.num_heads})."
            )
        if self.d_model % 2 != 0:
            raise ValueError(f"`d_model` must be even for the sinusoidal position code, got {self.d_model}.")

    def validate_loss(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"`gamma` must be in [0, 1], got {self.gamma}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")

    def validate_position_encoding(self):
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"`position_encoding` must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}."
            )

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # A saved config without `position_encoding` predates it: its weights hold learned l/k tables.
        if "model_type" in config_dict and "position_encoding" not in config_dict:
            config_dict = {**config_dict, "position_encoding": "learned-tables"}
        return super().from_dict(config_dict, **kwargs)

    def validate_max_positions(self):
        if len(self.max_positions) != 3:
            raise ValueError(
                "`max_positions` needs one size per position axis (n, l, k), got "
                f"{len(self.max_positions)} values: {self.max_positions}."
            )
        if any(int(v) < 1 for v in self.max_positions):
            raise ValueError(f"`max_positions` entries must be positive, got {self.max_positions}.")


SaneConfig.register_for_auto_class()  # save_pretrained copies this file and writes auto_map
AutoConfig.register("sane", SaneConfig, exist_ok=True)

__all__ = ["SaneConfig"]
