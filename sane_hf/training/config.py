"""What to train: the SANE model presets and :class:`SaneTrainingConfig` (how to train).

Pure configuration, no training: :data:`PRESETS` / :func:`sane_config_preset` build the
:class:`~sane_hf.configuration_sane.SaneConfig` of a run (fitting the window to short networks),
and :class:`SaneTrainingConfig` holds every setting of :func:`~sane_hf.training.train_sane`, its
validation, and the split between fields that determine the weights (:meth:`~SaneTrainingConfig.identity`,
compared on resume) and runtime-only ones. Imports neither torch nor transformers (the defaults that
need torch ask it when a config is made), so ``sane-hf train --help`` builds its flags from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sane_hf.serialization import JsonConfigMixin

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.configuration_sane import SaneConfig

__all__ = ["PRESETS", "DEFAULT_PRESET", "SaneTrainingConfig", "sane_config_preset"]

# ----------------------------------------------------------------------------------------------
# model presets
# ----------------------------------------------------------------------------------------------

#: The preset of ``sane-hf train`` and the quickstart.
DEFAULT_PRESET = "small"
#: ``SaneConfig`` keyword arguments per preset name (``token_size`` comes from the tokenizer).
PRESETS: dict[str, dict[str, Any]] = {
    # the recipe (benchmarks/learning_curves.py): a small model that trains in minutes on 2 CPU cores; used by
    # `sane-hf train` (default) and the quickstart. Windows of 64 tokens cover a whole cnn-s (54 tokens); a latent as
    # wide as the token (no per-token compression) reconstructs well enough for sampled models to work (measured on
    # the quickstart zoo at 600 steps: val reconstruction R² 0.84 vs 0.68 with latent 16, epoch-0 samples 0.63 vs 0.37)
    "small": dict(
        d_model=64, num_encoder_layers=2, num_decoder_layers=2, num_heads=4, mlp_ratio=2.0,
        latent_dim=64, projection_dim=32, window_size=64, halo_size=8,
    ),
    # SaneConfig's own defaults (d_model 128, 4+4 layers, latent 32, windows of 64)
    "defaults": {},
    # closer to the paper (d_model 1024, latent 128): for GPUs and ResNet zoos
    "large": dict(
        d_model=512, num_encoder_layers=8, num_decoder_layers=8, num_heads=8, mlp_ratio=4.0,
        latent_dim=128, projection_dim=128, window_size=256, halo_size=32,
    ),
}  # fmt: skip


def sane_config_preset(
    name: str, token_size: int = 64, *, num_tokens: int | None = None, **overrides: Any
) -> SaneConfig:
    """A :class:`SaneConfig` from preset ``name`` (see :data:`PRESETS`), ``token_size`` and overrides.

    ``num_tokens`` (tokens per network of the zoo, at ``token_size``): when the preset's window is
    longer than the networks, the window becomes the whole network and the halo 0 — every token
    then sees every other one, in training and when embedding (measured: whole-model windows
    predict accuracy better than shorter ones on cnn-s zoos, ``benchmarks/learning_curves.py``).
    An explicit ``window_size`` / ``halo_size`` in ``overrides`` is kept as given.
    """
    from sane_hf.configuration_sane import SaneConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], "token_size": int(token_size)}
    if num_tokens is not None and "window_size" not in overrides and kwargs.get("window_size", 64) > num_tokens:
        kwargs["window_size"] = int(num_tokens)
        kwargs["halo_size"] = 0
    return SaneConfig(**{**kwargs, **overrides})



# ----------------------------------------------------------------------------------------------
# the training configuration
# ----------------------------------------------------------------------------------------------


def _default_threads() -> int:
    # torch's own choice, which follows OMP_NUM_THREADS (on busy shared cores, 1 is usually fastest: set it)
    import torch

    return max(1, torch.get_num_threads())


@dataclass
class SaneTrainingConfig(JsonConfigMixin):
    """How to train SANE. Every field is also a flag of ``sane-hf train``, with its ``help``.

    >>> cfg = SaneTrainingConfig(output_dir="runs/x", max_steps=100)
    >>> SaneTrainingConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    output_dir: str = field(default="runs/sane", metadata={"help": "Folder for checkpoints and the final model."})
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Peak learning rate of AdamW (reached after warm-up). 1e-3 suits the CPU presets; "
                          "use ~1e-4 for the large preset."},
    )
    weight_decay: float = field(
        default=0.01,
        metadata={"help": "AdamW weight decay, applied only to parameters with >= 2 dims (biases and "
                          "LayerNorm weights are not decayed)."},
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    lr_scheduler: Literal["onecycle", "cosine", "constant"] = field(
        default="onecycle",
        metadata={"help": "Learning-rate schedule: 'onecycle' (cosine warm-up from lr/25 to lr, then cosine "
                          "annealing to lr/25e4, the shape of torch's OneCycleLR; the SANE reference), 'cosine' "
                          "(linear warm-up, cosine decay to 0) or 'constant' (linear warm-up, then constant)."},
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of all optimizer steps spent warming up."})
    num_epochs: int = field(
        default=20, metadata={"help": "Passes over the training windows (ignored when max_steps is set)."}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Total optimizer steps; overrides num_epochs when set."}
    )
    batch_size: int = field(
        default=32, metadata={"help": "Windows per batch and process (>= 2: NT-Xent needs negatives)."}
    )
    eval_batch_size: int | None = field(default=None, metadata={"help": "Validation batch size; None = batch_size."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches accumulated per optimizer step."}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no",
        metadata={"help": "Accelerate mixed precision. For GPUs: on CPU bf16 is ~7x slower than fp32 and fp16 "
                          "is ignored (a warning says so)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the model init, data order, windows and augmentations."})
    eval_steps: int = field(
        default=100,
        metadata={"help": "Validate every N optimizer steps (and always at the end); 0 = only at the end."},
    )
    eval_split: str | None = field(
        default="validation",
        metadata={"help": "Split used for validation loss and reconstruction R^2; None = no validation."},
    )
    eval_on_start: bool = field(
        default=False, metadata={"help": "Also validate before the first step (recorded in the eval history)."}
    )
    save_steps: int = field(
        default=500, metadata={"help": "Write a resumable checkpoint every N optimizer steps (and at the end); "
                                       "0 = never."}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Keep only the newest N checkpoints; None = keep all."}
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log the mean training loss (progress bar, trackers) every N steps."}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the newest checkpoint in output_dir (exactly: same data order and RNG)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete checkpoints and a final model already in output_dir first; also allows writing "
                          "into a non-empty folder that sane-hf did not make (otherwise refused)."},
    )
    tracker: Literal["tensorboard"] | None = field(
        default=None, metadata={"help": "Experiment tracker (Accelerate init_trackers): None or 'tensorboard'."}
    )
    num_threads: int = field(
        default_factory=_default_threads,
        metadata={"help": "torch threads on CPU (default: torch's own choice, which follows OMP_NUM_THREADS; on a busy "
                          "shared machine 1 is usually fastest); ignored on GPUs."},
    )
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is available."})
    windows_per_sample: int = field(
        default=4, metadata={"help": "Random windows cut from each checkpoint per epoch (oversampling)."}
    )
    noise_std: float = field(
        default=0.05, metadata={"help": "Std of the multiplicative Gaussian noise x*(1+std*eps) on each view."}
    )
    erase_prob: float = field(
        default=0.5, metadata={"help": "Probability of random erasing (one rectangle of a window) per view."}
    )
    permutation: bool = field(
        default=True,
        metadata={"help": "Permutation views: each view is a random function-preserving permutation of the "
                          "network (needs a permutation spec: derived from the zoo's architecture)."},
    )
    permutation_bank_size: int = field(
        default=16,
        metadata={"help": "Precomputed permutations per architecture (each costs one int32 index per token "
                          "value: ~48 MB for ResNet-18 at token size 64)."},
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this; None or 0 = no clipping."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (main process only)."})

    # fields that may differ between a run and its resumption
    _RUNTIME_FIELDS = (
        "output_dir", "resume", "overwrite_output_dir", "tracker", "num_threads", "dataloader_num_workers",
        "progress", "eval_steps", "eval_on_start", "save_steps", "save_total_limit", "logging_steps",
        "eval_batch_size",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.output_dir = str(self.output_dir)
        positive = ("learning_rate", "batch_size", "gradient_accumulation_steps", "num_epochs", "windows_per_sample",
                    "permutation_bank_size", "logging_steps", "num_threads")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2 (the contrastive loss uses the other windows of a batch as negatives), "
                f"got {self.batch_size}"
            )
        for name in ("max_steps", "eval_batch_size", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        for name in ("eval_steps", "save_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2", "warmup_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr_scheduler not in ("onecycle", "cosine", "constant"):
            raise ValueError(f"lr_scheduler must be 'onecycle', 'cosine' or 'constant', got {self.lr_scheduler!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.tracker in ("", "none", "None"):
            self.tracker = None
        if self.tracker not in (None, "tensorboard"):
            raise ValueError(f"tracker must be None or 'tensorboard', got {self.tracker!r}")
        if self.eval_split in ("", "none", "None"):
            self.eval_split = None
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.erase_prob <= 1.0:
            raise ValueError(f"erase_prob must be in [0, 1], got {self.erase_prob}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm}")
        if self.resume and self.overwrite_output_dir:
            raise ValueError("resume and overwrite_output_dir exclude each other")

    def identity(self) -> dict[str, Any]:
        """The fields that determine the trained weights (compared on resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in self._RUNTIME_FIELDS}
