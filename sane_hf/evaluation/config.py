"""The settings of the sampling evaluation: :class:`SamplingEvalConfig` and the transfer-task candidates.

Imports neither torch nor transformers, so ``sane-hf sample --help`` builds its flags from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from sane_hf.serialization import JsonConfigMixin

__all__ = ["SamplingEvalConfig", "TRANSFER_CANDIDATES", "GROUPS", "SamplingMode"]

#: The KDE modes of :class:`~sane_hf.latent_kde.LatentKDE` (its ``SAMPLING_MODES``, spelled here without torch).
SamplingMode = Literal["joint", "token"]

#: Tasks tried, in order, by ``transfer_task="auto"``.
TRANSFER_CANDIDATES = ("fashion-mnist", "mnist", "digits")
#: The groups compared after fine-tuning, in report order.
GROUPS = ("sampled", "random_init", "noise", "noise_matched_accuracy", "aligned_average", "prompts")


def _parse_bandwidth(value: Any) -> float | str:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class SamplingEvalConfig(JsonConfigMixin):
    """Settings of :func:`~sane_hf.evaluation.evaluate_sampling` (each field's ``help`` also drives ``sane-hf sample``)."""

    num_samples: int = field(default=16, metadata={"help": "Models to sample."})
    num_prompts: int | None = field(
        default=5, metadata={"help": "Prompts: the best N test models at --prompt-epoch (0 = all of them)."}
    )
    prompt_epoch: int | None = field(
        default=None, metadata={"help": "Checkpoint epoch of the prompts (default: the zoo's last stored epoch)."}
    )
    activation: str = field(
        default="auto",
        metadata={"help": "Activation of the prompts ('auto' = the best test model's); samples use it too."},
    )
    mode: SamplingMode = field(
        default="joint",
        metadata={"help": "KDE mode: 'joint' (whole latent sequences) or 'token' (each token position on its own)."},
    )
    bandwidth: float | str = field(
        default="scott",
        metadata={"help": "KDE kernel std in latent units, or a rule: 'scott' / 'silverman' (on the prompts)."},
    )
    bandwidth_scale: float = field(default=0.2, metadata={"help": "Multiplies a rule's bandwidth."})
    score: Literal["train-acc", "none"] = field(
        default="train-acc",
        metadata={"help": "Rank candidates by 'train-acc' (accuracy on --score-samples training images) or 'none'."},
    )
    score_samples: int = field(default=256, metadata={"help": "Training images the score uses."})
    candidates: int | None = field(
        default=None, metadata={"help": "Candidates drawn per round (default: 4 x num-samples when scored)."}
    )
    keep_top: int | None = field(default=None, metadata={"help": "Anchors kept per bootstrap round (default: num-samples)."})
    bootstrap_rounds: int = field(default=0, metadata={"help": "Bootstrap rounds after the first draw."})
    spread_anchors: bool = field(
        default=True,
        metadata={"help": "Keep scored samples spread over the prompts (each prompt's best first), not the global best."},
    )
    # default on (measured, benchmarks/learning_curves.py models, seed 0, samples spread over the prompts): epoch-0
    # accuracy with / without it 0.58 / 0.48 (quickstart zoo), 0.69 / 0.56 (digits-200), 0.90 / 0.88 (imported
    # 1-D CNN zoo), and only with it at or above prompts + noise at matched distance on all three
    residual: bool = field(
        default=True,
        metadata={"help": "Residual decoding: each sample = its prompt + (decode(z) - decode(encode(prompt))), so an "
                          "imperfect decoder does not pull samples toward its mean (default: yes)."},
    )
    finetune_epochs: tuple[int, ...] = field(
        default=(0, 1, 5), metadata={"help": "Fine-tuning epochs at which test accuracy is reported."}
    )
    finetune_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of fine-tuning."})
    bn_samples: int = field(default=512, metadata={"help": "Training images for BatchNorm conditioning."})
    max_neighbours: int | None = field(
        default=200, metadata={"help": "Train-split checkpoints searched for nearest neighbours (0 = all)."}
    )
    transfer_task: str | None = field(
        default="auto",
        metadata={"help": "Task for the transfer test ('auto', a task name, or 'none' to skip)."},
    )
    transfer_epochs: int = field(default=1, metadata={"help": "Fine-tuning epochs on the transfer task."})
    transfer_train_subset: int | None = field(
        default=1000,
        metadata={"help": "Training images of the transfer task (0 = all); few images are where an init matters."},
    )
    transfer_score: str = field(
        default="target",
        metadata={"help": "Score that picks the transfer samples: 'target' (drawn again, ranked and bootstrapped on "
                          "--transfer-score-samples labelled images of the new task) or 'source' (the samples above)."},
    )
    transfer_score_samples: int = field(
        default=100, metadata={"help": "Labelled images of the new task the 'target' score uses (from its training set)."}
    )
    transfer_bootstrap_rounds: int = field(
        default=2, metadata={"help": "Bootstrap rounds of the 'target'-scored draw: KDE refit on its best samples."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling, baselines, subsets and fine-tuning."})
    window: int | None = field(default=None, metadata={"help": "Content tokens per window (default: from the model)."})
    halo: int | None = field(default=None, metadata={"help": "Halo tokens on each side (default: from the model)."})
    batch_size: int = field(default=32, metadata={"help": "Windows per SANE forward pass."})

    def __post_init__(self) -> None:
        self.bandwidth = _parse_bandwidth(self.bandwidth)
        self.finetune_epochs = tuple(sorted({int(e) for e in self.finetune_epochs}))
        if self.num_prompts == 0:
            self.num_prompts = None
        if self.max_neighbours == 0:
            self.max_neighbours = None
        if self.transfer_train_subset == 0:
            self.transfer_train_subset = None
        if self.transfer_task in ("none", ""):
            self.transfer_task = None
        if self.mode not in get_args(SamplingMode):
            raise ValueError(f"mode must be one of {get_args(SamplingMode)}, got {self.mode!r}")
        if self.score not in ("train-acc", "none"):
            raise ValueError(f"score must be 'train-acc' or 'none', got {self.score!r}")
        for name in ("num_samples", "score_samples", "bn_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.finetune_epochs or self.finetune_epochs[0] < 0:
            raise ValueError(f"finetune_epochs must be non-negative integers, got {self.finetune_epochs}")
        if self.transfer_epochs < 0 or self.bootstrap_rounds < 0 or self.transfer_bootstrap_rounds < 0:
            raise ValueError("transfer_epochs, bootstrap_rounds and transfer_bootstrap_rounds must be >= 0")
        if self.transfer_score not in ("target", "source"):
            raise ValueError(f"transfer_score must be 'target' or 'source', got {self.transfer_score!r}")
        if self.transfer_score_samples < 2:
            raise ValueError(f"transfer_score_samples must be >= 2, got {self.transfer_score_samples}")
