"""The settings of a quickstart run: :class:`QuickstartConfig`, typed configs of the modules it calls.

Imports neither torch nor transformers (defaults that need them are made when a config is), so
``sane-hf quickstart --help`` builds its flags from :class:`QuickstartConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sane_hf.constants import QUICKSTART_MODEL_DIR
from sane_hf.evaluation.config import SamplingEvalConfig
from sane_hf.serialization import JsonConfigMixin
from sane_hf.training.config import SaneTrainingConfig, sane_config_preset
from sane_hf.zoo.config import ZooConfig

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.configuration_sane import SaneConfig

__all__ = ["ProbeSettings", "QuickstartConfig"]


def _methods() -> tuple[str, ...]:
    from sane_hf.probing import METHODS

    return METHODS


def _pooling() -> str:
    from sane_hf.embedding import DEFAULT_POOLING

    return DEFAULT_POOLING


@dataclass
class ProbeSettings(JsonConfigMixin):
    """How the probing stage runs :func:`~sane_hf.probing.evaluate_zoo_probes`."""

    targets: tuple[str, ...] = field(
        default=("test_acc", "epoch", "ggap", "activation", "init"),
        metadata={"help": "Properties to probe (the zoo grids use Adam only: no 'optimizer')."},
    )
    methods: tuple[str, ...] = field(default_factory=_methods, metadata={"help": "Feature sets compared."})
    pooling: str = field(
        default_factory=_pooling,
        metadata={"help": "Token-latent readout of the SANE embedding; the default is the one of `sane-hf probe` "
                          "and embed_models (per-layer mean and std of token latents, chosen by "
                          "benchmarks/learning_curves.py), so the quickstart and the CLI give the same numbers."},
    )
    batch_size: int = field(default=64, metadata={"help": "Windows per SANE forward pass while embedding."})
    raw_max_params: int = field(default=50_000, metadata={"help": "Skip the raw-weights baseline above this size."})

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.methods = tuple(self.methods)
        from sane_hf.probing import METHODS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        if not self.targets:
            raise ValueError("targets must name at least one property")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _default_zoo() -> ZooConfig:
    # 100 models x 10 epochs of the small Model Zoos CNN on the 8x8 digits (about a minute on 2 cores), seven
    # stored epochs (init, early, mid, end). Adam only, lr 1e-4..3e-3, the default activations, inits, dropout
    # and weight decay: accuracies still span chance to ~0.96, and the weights stay comparable across models
    # (measured on 60-model zoos: with SGD at small learning rates in the grid many models barely move from
    # their init, and linear probes of test accuracy from layer statistics fell from R² 0.78 to below 0).
    return ZooConfig(
        task="digits", arch="cnn-s", num_models=100, epochs=10, checkpoint_epochs=[0, 1, 2, 3, 5, 7, 10],
        grid={"optimizers": ["adam"], "lr_range": [1e-4, 3e-3]}, num_workers=min(2, os.cpu_count() or 1), seed=0,
    )  # fmt: skip


def _default_model() -> SaneConfig:
    # the recipe of `sane-hf train` (the "small" preset: d_model 64, 2+2 layers, latent 64, dropout 0) with one
    # window over the whole network: a cnn-s is 54 tokens of 64 values, so window 54 without halo sees every token
    # in context (what `sane-hf train` picks for this zoo too); benchmarks/learning_curves.py measured it
    return sane_config_preset("small", token_size=64, num_tokens=54)


def _default_training() -> SaneTrainingConfig:
    # ~3 minutes on 2 CPU cores; the probe R² of test_acc plateaus by ~1000 steps (0.58 at 1000, 0.57 at 1500);
    # checkpoints every 250 steps make an interrupted run resumable
    return SaneTrainingConfig(
        output_dir=QUICKSTART_MODEL_DIR, max_steps=1000, batch_size=32, learning_rate=1e-3, eval_steps=250,
        save_steps=250, save_total_limit=1, logging_steps=25, seed=0,
    )  # fmt: skip


def _default_sampling() -> SamplingEvalConfig:
    # 8 samples (the best of 32 candidates by training accuracy) around the best 8 test models;
    # accuracy after 0, 1 and 5 fine-tuning epochs; novelty against 100 training checkpoints
    return SamplingEvalConfig(
        num_samples=8, num_prompts=8, bandwidth=0.1, score="train-acc", candidates=32, finetune_epochs=(0, 1, 5),
        max_neighbours=100, transfer_task="auto", transfer_epochs=1, transfer_train_subset=2000, seed=0,
    )  # fmt: skip


@dataclass
class QuickstartConfig:
    """Everything a quickstart run does, as typed configs of the modules it calls.

    ``QuickstartConfig()`` is the full run (minutes on a laptop CPU; the measured wall time is in
    README, Performance); :meth:`fast` is a smoke version. ``training.output_dir`` is ignored: the
    model always goes to ``<out>/model``.

    >>> cfg = QuickstartConfig.fast().with_seed(3)
    >>> (cfg.zoo.seed, cfg.training.seed, cfg.sample.seed)
    (3, 3, 3)
    """

    zoo: ZooConfig = field(default_factory=_default_zoo, metadata={"help": "The zoo to build (build_zoo)."})
    model: SaneConfig = field(default_factory=_default_model, metadata={"help": "The SANE model to train."})
    training: SaneTrainingConfig = field(
        default_factory=_default_training, metadata={"help": "How to train it (train_sane)."}
    )
    probe: ProbeSettings = field(default_factory=ProbeSettings, metadata={"help": "The probing stage."})
    sample: SamplingEvalConfig = field(
        default_factory=_default_sampling, metadata={"help": "The sampling stage (evaluate_sampling)."}
    )
    token_size: int = field(default=64, metadata={"help": "Values per weight token (tokenizer and model)."})
    num_threads: int = field(
        default=1,
        metadata={"help": "torch threads of SANE training, probing and sampling (replaces training.num_threads). "
                          "One, deliberately: these models are small, and when another process takes a core, two "
                          "threads on 2 cores ran them 5-20x slower than one (measured: 4-5 s per training step "
                          "instead of 0.2 s)."},
    )
    fast_mode: bool = field(
        default=False,
        metadata={"help": "The smoke settings of fast() (20 small models, a tiny SANE, 30 steps); numbers not meaningful."},
    )

    def __post_init__(self) -> None:
        if self.model.token_size != self.token_size:
            raise ValueError(f"model.token_size={self.model.token_size} differs from token_size={self.token_size}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.zoo.source != "build":
            raise ValueError("the quickstart builds its zoo: zoo.source must be 'build'")

    @classmethod
    def fast(cls) -> QuickstartConfig:
        """A smoke run: 20 models x 2 epochs on 300 images, a tiny SANE, 30 steps."""
        # Adam at lr 2e-3..2e-2 so that some models learn within 2 epochs on 300 images
        zoo = ZooConfig(
            task="digits", arch="cnn-s", num_models=20, epochs=2, train_subset=300, eval_subset=300, seed=0,
            num_workers=1, grid={"optimizers": ["adam"], "lr_range": [2e-3, 2e-2]},
        )  # fmt: skip
        model = sane_config_preset(
            "small", token_size=64, d_model=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2,
            latent_dim=8, projection_dim=16, window_size=54, halo_size=0,
        )  # fmt: skip
        training = SaneTrainingConfig(
            output_dir=QUICKSTART_MODEL_DIR, max_steps=30, batch_size=16, eval_steps=0, save_steps=15, save_total_limit=1,
            logging_steps=5, windows_per_sample=2, permutation_bank_size=4, seed=0,
        )  # fmt: skip
        sample = SamplingEvalConfig(
            num_samples=2, num_prompts=3, bandwidth=0.1, score="train-acc", score_samples=128, candidates=4,
            finetune_epochs=(0, 1, 5), bn_samples=128, max_neighbours=6, transfer_task="none", seed=0,
        )  # fmt: skip
        return cls(zoo=zoo, model=model, training=training, sample=sample, fast_mode=True)

    def with_seed(self, seed: int) -> QuickstartConfig:
        """A copy whose zoo grid and split, SANE training and sampling all use ``seed``."""
        return dataclasses.replace(
            self,
            zoo=dataclasses.replace(self.zoo, seed=seed),
            model=copy.deepcopy(self.model),
            training=dataclasses.replace(self.training, seed=seed),
            sample=dataclasses.replace(self.sample, seed=seed),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (written into ``quickstart_metrics.json``)."""
        return {
            "fast_mode": self.fast_mode,
            "token_size": self.token_size,
            "num_threads": self.num_threads,
            "zoo": self.zoo.to_dict(),
            "model": self.model.to_diff_dict(),
            "training": self.training.to_dict(),
            "probe": self.probe.to_dict(),
            "sample": self.sample.to_dict(),
        }
