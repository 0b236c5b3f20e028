"""What a zoo member is: its :class:`HyperParams`, the grid they are drawn from, and its records.

:class:`HyperParams` (with the architecture and task) fixes a model exactly; :func:`sample_grid`
draws a population's recipes; :func:`model_generators` derives a model's data-order and dropout
generators from its seed; :class:`CheckpointMetrics` / :class:`CheckpointRecord` are what
training yields per (model, checkpoint epoch). The optimizer constants here are the ones every
training path (per model, stacked, fine-tuning) uses and the dataset card reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from sane_hf.zoo.architectures import ACTIVATIONS, INITS

__all__ = [
    "OPTIMIZERS",
    "ADAM_BETAS",
    "ADAM_EPS",
    "SGD_MOMENTUM",
    "DEFAULT_TRAIN_EVAL_SAMPLES",
    "HyperParams",
    "CheckpointMetrics",
    "CheckpointRecord",
    "sample_grid",
    "model_generators",
]

OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9
DEFAULT_TRAIN_EVAL_SAMPLES = 10_000  # train_acc/train_loss on at most this many (fixed) train images



@dataclass(frozen=True)
class HyperParams:
    """One model's training recipe; with the architecture and task it fixes the model exactly."""

    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    activation: str = "relu"
    init: str = "kaiming-uniform"
    dropout: float = 0.0
    batch_size: int = 32

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {list(INITS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CheckpointMetrics:
    """Measured properties of one checkpoint (accuracies in [0, 1], mean cross-entropy losses)."""

    train_acc: float
    val_acc: float
    test_acc: float
    train_loss: float
    test_loss: float

    @property
    def ggap(self) -> float:
        """Generalisation gap ``train_acc - test_acc``."""
        return self.train_acc - self.test_acc

    def to_dict(self) -> dict:
        return {**asdict(self), "ggap": self.ggap}


@dataclass
class CheckpointRecord:
    """One checkpoint: model ``model_id`` after ``epoch`` epochs (0 = the initialisation).

    ``state_dict`` holds contiguous CPU clones with the architecture's keys (float32 for
    parameters and float buffers; integer buffers such as ``num_batches_tracked`` keep int64).
    """

    model_id: int
    epoch: int
    hparams: HyperParams
    metrics: CheckpointMetrics
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def sample_grid(
    num_models: int,
    seed: int = 0,
    *,
    lr_range: tuple[float, float] = (1e-4, 1e-2),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3),
    dropouts: Sequence[float] = (0.0, 0.1, 0.2),
    optimizers: Sequence[str] = OPTIMIZERS,
    activations: Sequence[str] = ("relu", "tanh", "gelu", "sigmoid"),
    inits: Sequence[str] = ("kaiming-uniform", "kaiming-normal", "xavier", "uniform"),
    batch_sizes: Sequence[int] = (16,),
) -> list[HyperParams]:
    """Draw ``num_models`` recipes: lr log-uniform in ``lr_range``, the rest uniformly from the lists.

    The grid is wide on purpose (sigmoid + SGD at lr 1e-4 stays near chance, ReLU + Adam at 1e-3
    trains well) so that the zoo's accuracies spread. Model seeds are distinct. The same
    arguments always give the same list.

    Defaults measured on digits ``cnn-s`` (48 models, 10 epochs, see the zoo tests):
    batch 32 and dropout up to 0.3 left ~2/3 of the zoo below 50 % test accuracy (quartiles
    0.08 / 0.24 / 0.65); batch 16 and dropout ≤ 0.2 give quartiles 0.08 / 0.47 / 0.78, max 0.96 —
    still from chance to near-best, with fewer dead models.
    """
    if num_models < 0:
        raise ValueError(f"num_models must be >= 0, got {num_models}")
    lo, hi = lr_range
    if not 0 < lo <= hi:
        raise ValueError(f"lr_range must satisfy 0 < low <= high, got {lr_range}")
    rng = np.random.default_rng(seed)
    seeds = rng.choice(2**31 - 1, size=num_models, replace=False)
    lrs = np.exp(rng.uniform(math.log(lo), math.log(hi), size=num_models))

    def pick(options: Sequence) -> list:
        options = list(options)
        if not options:
            raise ValueError("every option list needs at least one value")
        return [options[i] for i in rng.integers(0, len(options), size=num_models)]

    wds, drops, opts, acts, ins, bss = (
        pick(weight_decays), pick(dropouts), pick(optimizers), pick(activations), pick(inits), pick(batch_sizes)
    )
    return [
        HyperParams(
            seed=int(seeds[i]), lr=float(lrs[i]), weight_decay=float(wds[i]), optimizer=str(opts[i]),
            activation=str(acts[i]), init=str(ins[i]), dropout=float(drops[i]), batch_size=int(bss[i]),
        )
        for i in range(num_models)
    ]


def model_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The model's ``(data_order, dropout)`` generators, derived from ``seed`` (init uses ``seed`` itself)."""
    data_seed, dropout_seed = np.random.SeedSequence([int(seed), 0x5A4E]).generate_state(2, np.uint64)
    return (
        torch.Generator().manual_seed(int(data_seed)),
        torch.Generator().manual_seed(int(dropout_seed)),
    )
