"""Training SANE with Accelerate: :class:`SaneTrainingConfig` and :func:`train_sane`.

One loop runs everywhere Accelerate does — a laptop CPU, one GPU, ``accelerate launch
--multi_gpu --num_processes N`` on GPUs or on CPUs (gloo) — with mixed precision, gradient
accumulation, gradient clipping, periodic validation, atomic checkpoints and exact resume.

What a run writes (``output_dir``)::

    output_dir/
    ├── config.json, model.safetensors        the trained SaneModel (SaneModel.from_pretrained(output_dir))
    ├── configuration_sane.py, modeling_sane.py   remote code (AutoModel, trust_remote_code=True)
    ├── weight_tokenizer.json                 its WeightTokenizer (WeightTokenizer.from_pretrained(output_dir))
    ├── training_config.json                  the SaneTrainingConfig
    ├── zoo_config.json                       the zoo's ZooConfig, when the zoo had one
    ├── metrics.json                          final losses, R², steps, time, tokens/s, eval history (written last)
    ├── checkpoints/checkpoint_<step>/        resumable training state (safetensors + JSON, no pickle), the newest few
    └── logs/                                 tracker output (TensorBoard), when a tracker is set

Atomicity. A checkpoint is written to ``checkpoints/.tmp_checkpoint_<step>`` by every process
and renamed into place by the main process once complete; a folder
named ``checkpoint_<step>`` is therefore always whole. The final model is written to a temporary
folder and its files are then moved into ``output_dir`` one by one with ``os.replace`` (each
atomic), ``metrics.json`` last: a folder with ``metrics.json`` holds a complete final model.

Exact resume. Everything random is either restored or a pure function of the step:

- model (``model.safetensors``), optimizer (AdamW moments in ``optimizer.safetensors``, the rest
  in ``optimizer.json``), grad scaler, the learning-rate schedule and the loop state (epoch,
  batches consumed in the epoch, step, time, losses) are saved as safetensors + JSON, and so are
  the RNG states of every process (python, numpy, torch CPU/CUDA: ``rng_state_<rank>.*``), so
  dropout continues where it stopped. Nothing is pickled and nothing is unpickled on resume:
  files other tools put into a checkpoint (``*.pkl``, ``*.bin``) are never read, and a folder
  written by Accelerate's ``save_state`` is refused. ``checkpoint.json`` (written last) holds the
  format version, the number of processes and a fingerprint of the zoo, which must match to resume;
- the order of an epoch is a permutation seeded by ``(seed, epoch)`` (:class:`~sane_hf.data.EpochSampler`,
  nothing drawn from the global RNG), and each window's offset, views and noise are seeded by
  ``(seed, epoch, index)`` (:class:`~sane_hf.data.ZooWindowDataset`);
- on resume the current epoch is re-entered with ``Accelerator.skip_first_batches`` past the
  batches already consumed.

A run killed after checkpoint ``k`` and resumed therefore performs the same steps on the same
data with the same dropout masks and reaches the same parameters as an uninterrupted run
(bit-equal on one CPU process; see ``tests/test_training.py``).

Example::

    >>> from sane_hf.training import SaneTrainingConfig, sane_config_preset, train_sane  # doctest: +SKIP
    >>> out = train_sane(sane_config_preset("small", token_size=64), "zoos/digits-cnn",
    ...                  SaneTrainingConfig(output_dir="runs/sane-digits", max_steps=500))
    >>> SaneModel.from_pretrained(out), WeightTokenizer.from_pretrained(out)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from sane_hf.constants import METRICS_FILE, TRAINING_CONFIG_FILE, ZOO_CONFIG_FILE
from sane_hf.serialization import JsonConfigMixin, json_default

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from accelerate import Accelerator

    from sane_hf.alignment import PermutationSpec
    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.tokenization_sane import WeightTokenizer
    from sane_hf.zoo.dataset import ZooConfig

__all__ = [
    "PRESETS",
    "DEFAULT_PRESET",
    "SaneTrainingConfig",
    "StepInfo",
    "TrainingInterrupted",
    "sane_config_preset",
    "train_sane",
    "latest_checkpoint",
    "TRAINING_CONFIG_FILE",
    "METRICS_FILE",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_MANIFEST",
    "check_checkpoint_format",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
_TMP_PREFIX = ".tmp_"

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
    return max(1, torch.get_num_threads())


@dataclass
class SaneTrainingConfig(JsonConfigMixin):
    """How to train SANE. Every field's ``help`` also drives ``sane-hf train`` (``HfArgumentParser``).

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


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


class TrainingInterrupted(RuntimeError):
    """Raise this from a ``step_callback`` to stop a run as if it were killed (no final model)."""


@dataclass
class StepInfo:
    """What a ``step_callback`` sees after every optimizer step (on every process)."""

    step: int
    epoch: int
    loss: float  # this process's training loss of the step (mean over accumulated batches)
    learning_rate: float
    model: nn.Module  # unwrapped
    accelerator: Accelerator




def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/checkpoint_<step>`` folder of a run, or None."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def _schedule(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step (a picklable-free closure; LambdaLR stores only its step count)."""

    def onecycle(step: int) -> float:
        # torch OneCycleLR's shape (anneal_strategy='cos', div_factor=25, final_div_factor=1e4)
        initial, final = 1.0 / 25.0, 1.0 / 25.0 / 1e4
        if step < warmup_steps:
            pct = step / max(1, warmup_steps)
            return final_lr(initial, 1.0, pct)
        pct = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_lr(1.0, final, min(1.0, pct))

    def final_lr(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        pct = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, pct)))

    def constant(step: int) -> float:
        return (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0

    return {"onecycle": onecycle, "cosine": cosine, "constant": constant}[kind]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on >= 2-dim parameters only (not on biases, LayerNorm or 1-dim vectors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _LoopState:
    """The loop's own state, saved with ``save_state`` via ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_in_epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self.tokens_seen = 0
        self.recent_losses: list[float] = []  # per-step losses (mean over processes) since the last log
        self.last_logged_loss: float | None = None
        self.history: list[dict[str, Any]] = []  # evaluations

    def state_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ----------------------------------------------------------------------------------------------
# inputs: zoo, tokenizer, permutation spec
# ----------------------------------------------------------------------------------------------


@dataclass
class _PreparedZoo:
    zoo: Any  # DatasetDict, tokenized
    tokenizer: WeightTokenizer
    zoo_config: ZooConfig | None
    zoo_config_path: Path | None
    num_tokens: int
    token_size: int


def _load_zoo_any(path: Path) -> datasets.DatasetDict:
    from sane_hf.zoo.dataset import load_zoo

    if not path.exists():
        raise FileNotFoundError(f"zoo folder {str(path)!r} does not exist")
    if (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk (e.g. a tokenized zoo)
        import datasets

        return datasets.load_from_disk(str(path))
    return load_zoo(path)


def _check_single_arch(zoo: Mapping[str, Any]) -> None:
    archs: set[str] = set()
    for split in zoo.values():
        if "arch" in split.column_names and len(split):
            archs.update(split.unique("arch"))
    if len(archs) > 1:
        raise ValueError(
            f"the zoo mixes architectures {sorted(archs)}; SANE trains on one architecture per tokenizer: "
            "filter the zoo first (zoo.filter(lambda r: r['arch'] == ...))"
        )


def _prepare_zoo(
    zoo: Any,
    tokenizer: WeightTokenizer | str | os.PathLike | None,
    token_size: int,
    zoo_config: ZooConfig | None,
    training_config: SaneTrainingConfig,
    accelerator: Accelerator,
) -> _PreparedZoo:
    """Load, check and (if raw) tokenize the zoo; returns the tokenized splits and the tokenizer."""
    import datasets

    from sane_hf.data import token_shape
    from sane_hf.tokenization_sane import TOKENIZER_FILE, WeightTokenizer
    from sane_hf.zoo.dataset import fit_tokenizer_on_zoo, iter_state_dicts, load_zoo_config, tokenize_zoo

    zoo_config_path = None
    if isinstance(zoo, (str, os.PathLike)):
        path = Path(zoo)
        data = _load_zoo_any(path)
        if (path / ZOO_CONFIG_FILE).is_file():
            zoo_config_path = path / ZOO_CONFIG_FILE
            if zoo_config is None:
                zoo_config = load_zoo_config(path)
        if tokenizer is None and (path / TOKENIZER_FILE).is_file() and "tokens" in data["train"].column_names:
            tokenizer = path
    elif isinstance(zoo, datasets.DatasetDict):
        data = zoo
    else:
        raise TypeError(
            f"zoo must be a zoo folder path or a datasets.DatasetDict (raw or tokenized), got {type(zoo).__name__}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = WeightTokenizer.from_pretrained(tokenizer)

    needed = ["train"] + ([training_config.eval_split] if training_config.eval_split else [])
    for split in needed:
        if split not in data:
            raise ValueError(f"the zoo has no {split!r} split (splits: {list(data)})")
        if len(data[split]) == 0:
            hint = "" if split == "train" else " (or set eval_split=None to train without validation)"
            raise ValueError(f"the zoo's {split!r} split is empty: nothing to train on{hint}")
    _check_single_arch(data)
    splits = datasets.DatasetDict({s: data[s] for s in needed})

    if "tokens" in splits["train"].column_names:  # already tokenized
        if tokenizer is None:
            raise ValueError(
                "the zoo is already tokenized but no tokenizer was given: pass the WeightTokenizer it was made "
                "with (tokenizer=..., or --tokenizer), or train on the raw zoo"
            )
        n, d = token_shape(splits["train"])
        if (n, d) != (tokenizer.num_tokens, tokenizer.token_size):
            raise ValueError(
                f"the tokenized zoo holds {n} tokens of size {d} per checkpoint but the tokenizer makes "
                f"{tokenizer.num_tokens} tokens of size {tokenizer.token_size}: pass the tokenizer it was made with"
            )
        for s in needed[1:]:
            if token_shape(splits[s]) != (n, d):
                raise ValueError(f"split {s!r} has tokens of shape {token_shape(splits[s])}, train has {(n, d)}")
    else:
        if "weights" not in splits["train"].column_names:
            raise ValueError("the zoo has neither 'weights' (raw) nor 'tokens' (tokenized) columns: not a zoo")
        if tokenizer is not None and tokenizer.token_size != token_size:
            raise ValueError(
                f"the tokenizer's token size is {tokenizer.token_size} but the model's config.token_size is "
                f"{token_size}; they must agree"
            )
        with accelerator.main_process_first():
            if tokenizer is None:
                tokenizer = fit_tokenizer_on_zoo(splits, token_size=token_size, split="train")
            elif not tokenizer.is_fitted:
                tokenizer.fit(iter_state_dicts(splits["train"]))
            splits = tokenize_zoo(splits, tokenizer, normalize=True, keep_weights=False)
    if tokenizer.token_size != token_size:
        raise ValueError(
            f"the zoo's tokens have size {tokenizer.token_size} but the model's config.token_size is {token_size}; "
            f"build the model with token_size={tokenizer.token_size} (or tokenize the zoo with token_size={token_size})"
        )
    n, d = token_shape(splits["train"])
    return _PreparedZoo(splits, tokenizer, zoo_config, zoo_config_path, n, d)


def _permutation_spec(zoo_config: ZooConfig | None) -> tuple[PermutationSpec | None, str]:
    """The spec of the zoo's architecture, or (None, why not)."""
    if zoo_config is None:
        return None, "the zoo has no zoo_config.json naming its architecture (pass permutation_spec=...)"
    from sane_hf.zoo.architectures import list_architectures, permutation_spec_for_arch

    if getattr(zoo_config, "arch_entrypoint", None):  # the user's module: derived from its graph likewise
        from sane_hf.alignment import permutation_spec
        from sane_hf.zoo.custom import architecture_builder, zoo_task

        try:
            module = architecture_builder(zoo_config)()  # an unimportable entry point raises ValueError here
        except ValueError as err:
            raise ValueError(f"the zoo's architecture cannot be built: {err}") from err
        try:
            task = zoo_task(zoo_config)
            example = task.x_train[:2] if task is not None else None
            return permutation_spec(module, example), ""
        except Exception as err:  # noqa: BLE001 - any failure just means "no permutation views"
            return None, (f"deriving the permutation spec of {zoo_config.arch!r} from its module graph failed "
                          f"({type(err).__name__}: {err})")
    if zoo_config.arch not in list_architectures():
        return None, (f"architecture {zoo_config.arch!r} is not in the registry (import the zoo with "
                      "--arch module:callable, or pass permutation_spec=...)")
    try:
        return permutation_spec_for_arch(zoo_config.arch, **zoo_config.model_kwargs()), ""
    except Exception as err:  # noqa: BLE001 - any failure just means "no permutation views"
        return None, f"deriving the permutation spec of {zoo_config.arch!r} failed ({type(err).__name__}: {err})"


def _check_model_fits(config: SaneConfig, tokenizer: WeightTokenizer, num_tokens: int) -> None:
    if config.window_size > num_tokens:
        raise ValueError(
            f"the model's window_size ({config.window_size}) is larger than the sequences of this zoo "
            f"({num_tokens} tokens per checkpoint); use a SaneConfig with window_size <= {num_tokens} "
            "(and halo_size < window_size / 2)"
        )
    if config.position_encoding != "learned-tables":
        return  # the sinusoid-projection position code has no upper bound
    max_rows = max((layer.num_rows for layer in tokenizer.layers), default=0)
    if tokenizer.num_layers > config.max_positions[1] or max_rows > config.max_positions[2]:
        raise ValueError(
            f"the zoo's networks have {tokenizer.num_layers} layers and up to {max_rows} rows per layer but the "
            f"model's position tables hold {config.max_positions[1]} layers and {config.max_positions[2]} rows; "
            "raise SaneConfig.max_positions"
        )


# ----------------------------------------------------------------------------------------------
# checkpoints: pickle-free training state
# ----------------------------------------------------------------------------------------------

CHECKPOINT_MANIFEST = "checkpoint.json"
_CHECKPOINT_FORMAT = "sane-hf-training-checkpoint"
_CHECKPOINT_VERSION = 1
_MODEL_FILE = "model.safetensors"
_OPTIMIZER_TENSORS = "optimizer.safetensors"
_OPTIMIZER_JSON = "optimizer.json"
_SCHEDULER_JSON = "scheduler.json"
_LOOP_JSON = "loop_state.json"
_SCALER_JSON = "scaler.json"
# files other tools write into checkpoint folders (Accelerate's save_state, torch.save): never loaded
_FOREIGN_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".pickle")


def _rng_files(rank: int) -> tuple[str, str]:
    return f"rng_state_{rank}.safetensors", f"rng_state_{rank}.json"


def _to_json(value: Any) -> Any:
    """Plain JSON for optimizer/scheduler state values; tuples are tagged so they come back as tuples."""
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a JSON checkpoint file")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _flatten_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors for safetensors, the rest as JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        entry: dict[str, Any] = {}
        for name, value in param_state.items():
            if torch.is_tensor(value):
                key = f"state.{param_id}.{name}"
                tensors[key] = value.detach().to("cpu").contiguous()
                entry[name] = {"__tensor__": key}
            else:
                entry[name] = _to_json(value)
        per_param[str(param_id)] = entry
    return tensors, {"state": per_param, "param_groups": _to_json(list(state["param_groups"]))}


def _unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for param_id, entry in meta["state"].items():
        state[int(param_id)] = {
            name: tensors[value["__tensor__"]] if isinstance(value, dict) and "__tensor__" in value else _from_json(value)
            for name, value in entry.items()
        }
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: python ``random``, numpy's global generator, torch CPU and CUDA."""
    import random

    import numpy as np

    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    meta: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cuda_devices": 0,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states = torch.cuda.get_rng_state_all()
        meta["cuda_devices"] = len(states)
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(states)})
    return tensors, meta


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    import random

    import numpy as np

    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npm = meta["numpy"]
    np.random.set_state(
        (npm["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), npm["pos"], npm["has_gauss"], npm["cached_gaussian"])
    )
    torch.set_rng_state(tensors["torch_cpu"])
    n_cuda = int(meta.get("cuda_devices", 0))
    if n_cuda and torch.cuda.is_available():
        states = [tensors[f"torch_cuda_{i}"] for i in range(n_cuda)]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing: the checkpoint is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file {path} is not valid JSON ({err}); the checkpoint is damaged") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from sane_hf.serialization import load_safetensors_file

    return load_safetensors_file(path, what="checkpoint file")


def _foreign_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(_FOREIGN_SUFFIXES))


def check_checkpoint_format(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a sane-hf checkpoint folder; a clear error for anything else (nothing is unpickled).

    A folder written by an older sane-hf (``accelerate.save_state``: ``custom_checkpoint_*.pkl``,
    ``random_states_*.pkl``, ``optimizer.bin``) is refused: loading those pickles can run code.
    """
    folder = Path(checkpoint)
    manifest_path = folder / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        pickles = _foreign_files(folder) if folder.is_dir() else []
        if pickles:
            raise ValueError(
                f"checkpoint {folder} holds pickled training state ({', '.join(pickles)}) written by an older sane-hf "
                "or another tool; pickles can run code and are never loaded. Start a new run (another --out, or "
                "--overwrite_output_dir to delete this one)"
            )
        raise ValueError(f"{folder} is not a sane-hf checkpoint (no {CHECKPOINT_MANIFEST}); it cannot be resumed")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{manifest_path} is not a sane-hf training checkpoint manifest")
    if manifest.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(
            f"{manifest_path} has checkpoint format version {manifest.get('version')!r}; this sane-hf reads version "
            f"{_CHECKPOINT_VERSION}: resume with the sane-hf version that wrote it"
        )
    return manifest


def _save_training_state(
    accelerator: Accelerator, folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: _LoopState,
    extra_manifest: Mapping[str, Any],
) -> None:
    """Write model, optimizer, schedule, loop and RNG state into ``folder`` as safetensors + JSON (no pickle)."""
    import safetensors.torch

    from sane_hf.serialization import usual_file_mode

    rank = accelerator.process_index
    rng_tensors, rng_meta = _rng_state()
    tensor_file, json_file = _rng_files(rank)
    safetensors.torch.save_file(rng_tensors, str(folder / tensor_file))
    usual_file_mode(folder / tensor_file)
    (folder / json_file).write_text(json.dumps(rng_meta) + "\n")
    if not accelerator.is_main_process:
        return
    safetensors.torch.save_model(accelerator.unwrap_model(model), str(folder / _MODEL_FILE))
    opt_tensors, opt_meta = _flatten_optimizer_state(optimizer.state_dict())
    safetensors.torch.save_file(opt_tensors, str(folder / _OPTIMIZER_TENSORS))
    (folder / _OPTIMIZER_JSON).write_text(json.dumps(opt_meta) + "\n")
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (folder / _SCHEDULER_JSON).write_text(json.dumps(_to_json(sched)) + "\n")
    (folder / _LOOP_JSON).write_text(json.dumps(state.state_dict(), indent=1) + "\n")
    if accelerator.scaler is not None:
        (folder / _SCALER_JSON).write_text(json.dumps(_to_json(accelerator.scaler.state_dict())) + "\n")
    usual_file_mode(*(folder / name for name in (_MODEL_FILE, _OPTIMIZER_TENSORS)))
    manifest = {
        "format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "step": state.global_step,
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        **extra_manifest,
    }  # fmt: skip
    (folder / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _load_training_state(
    accelerator: Accelerator, folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: _LoopState
) -> None:
    """Restore what :func:`_save_training_state` wrote; reads only safetensors and JSON."""
    import safetensors
    import safetensors.torch

    manifest = check_checkpoint_format(folder)
    if manifest.get("num_processes") != accelerator.num_processes:
        raise ValueError(
            f"checkpoint {folder} was written by {manifest.get('num_processes')} process(es) but this run has "
            f"{accelerator.num_processes}; resume with the same number of processes (exact resume needs each "
            "process's RNG state)"
        )
    ignored = _foreign_files(folder)
    if ignored and accelerator.is_main_process:
        logger.warning("ignoring files in %s that sane-hf did not write (never loaded): %s", folder, ", ".join(ignored))
    unwrapped = accelerator.unwrap_model(model)
    model_file = folder / _MODEL_FILE
    try:
        missing, unexpected = safetensors.torch.load_model(unwrapped, str(model_file), strict=False,
                                                           device=str(accelerator.device))  # fmt: skip
    except (safetensors.SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"checkpoint file {model_file} cannot be read ({err}); the checkpoint is damaged") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint file {model_file} does not match the model: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}"
        )
    opt_meta = _read_json(folder / _OPTIMIZER_JSON)
    try:
        optimizer.load_state_dict(_unflatten_optimizer_state(_read_tensors(folder / _OPTIMIZER_TENSORS), opt_meta))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the optimizer state in {folder} does not fit this model/optimizer ({err})") from None
    sched = _from_json(_read_json(folder / _SCHEDULER_JSON))
    sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    state.load_state_dict(_read_json(folder / _LOOP_JSON))
    if accelerator.scaler is not None and (folder / _SCALER_JSON).is_file():
        accelerator.scaler.load_state_dict(_from_json(_read_json(folder / _SCALER_JSON)))
    tensor_file, json_file = _rng_files(accelerator.process_index)
    _set_rng_state(_read_tensors(folder / tensor_file), _read_json(folder / json_file))


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def _save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    extra: Mapping[str, str],
    total_limit: int | None,
    training_objects: tuple[nn.Module, Any, Any, _LoopState],
    extra_manifest: Mapping[str, Any],
) -> Path:
    """Training state into a temp folder (all processes), then renamed into place (main process)."""
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"checkpoint_{step}"
    tmp = root / f"{_TMP_PREFIX}checkpoint_{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _save_training_state(accelerator, tmp, *training_objects, extra_manifest)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, text in extra.items():
            (tmp / name).write_text(text)
        if final.exists():  # re-saving the same step (a resumed run): swap atomically
            old = root / f"{_TMP_PREFIX}old_checkpoint_{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if total_limit is not None:
            found = sorted(
                (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
            )
            for _, path in found[: max(0, len(found) - total_limit)]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _clear_output_dir(output_dir: Path) -> None:
    from sane_hf.hub import remote_code_files

    for name in (CHECKPOINTS_DIR, "logs"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in (METRICS_FILE, "config.json", "model.safetensors", "weight_tokenizer.json", TRAINING_CONFIG_FILE,
                 ZOO_CONFIG_FILE, "generation_config.json", "README.md", *remote_code_files()):
        (output_dir / name).unlink(missing_ok=True)


def _write_final(
    output_dir: Path,
    model: SaneModel,
    tokenizer: WeightTokenizer,
    training_config: SaneTrainingConfig,
    zoo: _PreparedZoo,
    metrics: Mapping[str, Any],
) -> None:
    """Write the final folder into a temp dir, then move each file into ``output_dir`` (metrics.json last).

    The folder is pipeline-ready (:func:`sane_hf.hub.save_model_folder`: remote code,
    ``custom_pipelines`` for ``weight-sampling`` and ``weight-embedding``, and the model card).
    """
    from sane_hf.cards import write_model_card
    from sane_hf.hub import save_model_folder

    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}final_", dir=output_dir))
    try:
        save_model_folder(model, tokenizer, tmp, card=False)
        training_config.to_json_file(tmp / TRAINING_CONFIG_FILE)
        if zoo.zoo_config_path is not None:
            shutil.copyfile(zoo.zoo_config_path, tmp / ZOO_CONFIG_FILE)
        elif zoo.zoo_config is not None:
            zoo.zoo_config.to_json_file(tmp / ZOO_CONFIG_FILE)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=json_default) + "\n")
        write_model_card(tmp, model_name=output_dir.resolve().name)
        (output_dir / METRICS_FILE).unlink(missing_ok=True)  # the folder is incomplete until it is back
        names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != METRICS_FILE)
        for name in [*names, METRICS_FILE]:
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

_MODEL_INPUTS = ("tokens", "positions", "mask", "attention_mask", "tokens_2", "labels", "labels_2")


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in _MODEL_INPUTS if k in batch}


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Any, accelerator: Accelerator) -> dict[str, float]:
    """Mean validation loss and reconstruction R² of the clean first view over real values."""
    was_training = model.training
    model.eval()
    if hasattr(loader, "set_epoch"):  # the same windows at every evaluation (Accelerate counts iterations)
        loader.set_epoch(0)
    rows = []
    for batch in loader:
        out = model(**_model_inputs(batch))
        labels = batch["labels"].float()  # (B, W, d)
        real = batch["mask"].bool()
        if "attention_mask" in batch:
            real = real & batch["attention_mask"].bool()[..., None]
        real_f = real.to(torch.float64)
        err = (out.reconstruction.double() - labels.double()).pow(2) * real_f
        y = labels.double() * real_f
        per_window = torch.stack(
            [
                err.sum(dim=(1, 2)),  # SSE
                y.sum(dim=(1, 2)),  # Σy
                (y * y).sum(dim=(1, 2)),  # Σy²
                real_f.sum(dim=(1, 2)),  # n
                out.loss.detach().double().expand(labels.shape[0]),  # the batch loss, once per window
                out.reconstruction_loss.detach().double().expand(labels.shape[0]),
            ],
            dim=1,
        )  # (B, 6)
        rows.append(accelerator.gather_for_metrics(per_window))
    if was_training:
        model.train()
    stats = torch.cat(rows).sum(dim=0) if rows else torch.zeros(6, dtype=torch.float64)
    count_windows = sum(r.shape[0] for r in rows)
    sse, sum_y, sum_y2, n, loss_sum, rec_sum = stats.tolist()
    sst = sum_y2 - sum_y * sum_y / max(n, 1.0)
    return {
        "val_loss": loss_sum / max(count_windows, 1),
        "val_reconstruction_loss": rec_sum / max(count_windows, 1),
        "val_reconstruction_r2": 1.0 - sse / sst if sst > 0 else float("nan"),
    }


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def train_sane(
    model_or_config: SaneModel | SaneConfig,
    zoo: str | os.PathLike | datasets.DatasetDict,
    training_config: SaneTrainingConfig | None = None,
    tokenizer: WeightTokenizer | str | os.PathLike | None = None,
    *,
    zoo_config: ZooConfig | None = None,
    permutation_spec: PermutationSpec | None = None,
    step_callback: Callable[[StepInfo], None] | None = None,
) -> Path:
    """Train SANE on a zoo with Accelerate; returns ``output_dir`` holding the final model (see module docs).

    Args:
        model_or_config: a :class:`SaneConfig` (a fresh model is initialised with ``seed``) or a
            :class:`SaneModel` to continue training. Its ``token_size`` must match the tokens and
            its ``window_size`` is the training window.
        zoo: a zoo folder (raw, as ``sane-hf zoo build`` writes it, or a tokenized ``save_to_disk``
            folder with its ``weight_tokenizer.json``), a raw ``DatasetDict`` (a tokenizer is built
            for its architecture with ``token_size = config.token_size`` and fitted on the train
            split), or a tokenized ``DatasetDict`` (then ``tokenizer`` is required).
        training_config: how to train (default :class:`SaneTrainingConfig` ()).
        tokenizer: a :class:`WeightTokenizer` (or a folder holding one) for the zoo; fitted on the
            train split if it is not fitted yet. Saved into ``output_dir``.
        zoo_config: the zoo's :class:`ZooConfig` when ``zoo`` is a DatasetDict (read from
            ``zoo_config.json`` for a folder); names the architecture for permutation views and is
            copied to ``output_dir``.
        permutation_spec: the architecture's :class:`PermutationSpec`; derived from ``zoo_config``
            when None. Without either, permutation views are turned off with a warning.
        step_callback: called with a :class:`StepInfo` after every optimizer step on every
            process; raising :class:`TrainingInterrupted` stops the run as a kill would.

    Raises:
        ValueError: before any training, for inputs that cannot work: token sizes that disagree,
            a zoo mixing architectures, an empty split, a window longer than the sequences,
            an output folder with another run (without ``resume``/``overwrite_output_dir``).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.modeling_sane import SaneModel
    from sane_hf.tokenization_sane import WeightTokenizer

    cfg = training_config if training_config is not None else SaneTrainingConfig()
    if isinstance(model_or_config, SaneConfig):
        model_config = model_or_config
    elif isinstance(model_or_config, SaneModel):
        model_config = model_or_config.config
    else:
        raise TypeError(f"model_or_config must be a SaneModel or a SaneConfig, got {type(model_or_config).__name__}")
    output_dir = Path(cfg.output_dir)
    if cfg.tracker == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ValueError("tracker='tensorboard' needs the tensorboard package: pip install tensorboard")

    # -- output folder ------------------------------------------------------------------------
    from sane_hf.serialization import check_output_folder

    own = (output_dir / TRAINING_CONFIG_FILE).is_file() or latest_checkpoint(output_dir) is not None
    check_output_folder(output_dir, kind="train", own=own, overwrite=cfg.overwrite_output_dir,
                        flag="overwrite_output_dir=True (--overwrite)")  # fmt: skip
    resume_from = latest_checkpoint(output_dir) if cfg.resume else None
    if resume_from is not None:
        check_checkpoint_format(resume_from)  # refuses pickled (old Accelerate) checkpoints before anything runs
    if not cfg.resume and not cfg.overwrite_output_dir:
        if latest_checkpoint(output_dir) is not None or (output_dir / METRICS_FILE).exists():
            raise ValueError(
                f"{str(output_dir)!r} already holds a training run; pass resume=True (--resume) to continue it or "
                "overwrite_output_dir=True (--overwrite_output_dir) to start over"
            )

    _allow_new_accelerator_settings(cfg.mixed_precision, cfg.cpu)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cfg.cpu,
        log_with="tensorboard" if cfg.tracker == "tensorboard" else None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs"), automatic_checkpoint_naming=False
        ),
    )
    on_cpu = accelerator.device.type == "cpu"
    if on_cpu and cfg.mixed_precision != "no":
        warnings.warn(
            f"mixed_precision={cfg.mixed_precision!r} on CPU: bf16 runs ~7x slower than fp32 on typical CPUs and "
            "fp16 is ignored by Accelerate on CPU; use mixed precision on GPUs",
            stacklevel=2,
        )
    previous_threads = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(cfg.num_threads)
    lock = contextlib.ExitStack()
    try:
        from sane_hf.serialization import (
            FolderLockedError,
            folder_lock,
            read_owner_marker,
            write_owner_marker,
        )

        locked_out: FolderLockedError | None = None
        if accelerator.is_main_process:  # one writer per run folder; the other processes of a launch follow
            try:
                lock.enter_context(folder_lock(output_dir, "sane-hf train"))
                if (read_owner_marker(output_dir) or {}).get("kind") != "train":
                    write_owner_marker(output_dir, "train")
            except FolderLockedError as err:
                locked_out = err
        if accelerator.num_processes > 1:  # every process stops, not only the main one
            from accelerate.utils import broadcast

            flag = torch.tensor([int(locked_out is not None)], device=accelerator.device)
            if broadcast(flag, from_process=0).item() and locked_out is None:
                raise FolderLockedError(f"{output_dir} is being written by another process (see the main process)")
        if locked_out is not None:
            raise locked_out
        if resume_from is not None and tokenizer is None and (resume_from / "weight_tokenizer.json").is_file():
            tokenizer = WeightTokenizer.from_pretrained(resume_from)  # the exact normalisation of the run
        return _train(
            accelerator, cfg, model_or_config, model_config, zoo, tokenizer, zoo_config, permutation_spec,
            step_callback, resume_from, output_dir,
        )  # fmt: skip
    finally:
        lock.close()
        if on_cpu:
            torch.set_num_threads(previous_threads)
        # not accelerator.end_training(): it would also destroy the process group, which the caller may still use
        for tracker in accelerator.trackers:
            tracker.finish()


def _allow_new_accelerator_settings(mixed_precision: str, cpu: bool) -> None:
    """Let a second ``train_sane`` in one process use other mixed-precision/CPU settings.

    Accelerate keeps one ``AcceleratorState`` per process and refuses a new ``Accelerator`` with a
    different ``mixed_precision`` (or ``cpu=True`` after a GPU run). Only in that case, where
    creating the Accelerator would fail anyway, the state is reset; the process group (held by
    ``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if not shared:
        return
    device = shared.get("device")
    changed_precision = shared.get("_mixed_precision") not in (None, mixed_precision)
    changed_device = cpu and device is not None and torch.device(device).type != "cpu"
    if changed_precision or changed_device:
        AcceleratorState._reset_state(reset_partial_state=False)


def _train(
    accelerator: Accelerator,
    cfg: SaneTrainingConfig,
    model_or_config: SaneModel | SaneConfig,
    model_config: SaneConfig,
    zoo: Any,
    tokenizer: WeightTokenizer | str | os.PathLike | None,
    zoo_config: ZooConfig | None,
    permutation_spec: PermutationSpec | None,
    step_callback: Callable[[StepInfo], None] | None,
    resume_from: Path | None,
    output_dir: Path,
) -> Path:
    """The body of :func:`train_sane` once the Accelerator exists."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from sane_hf.data import Augmentation, EpochSampler, PermutationBank, ZooWindowDataset, collate_windows
    from sane_hf.modeling_sane import SaneModel

    # -- data (all checks happen here, before any training) -----------------------------------
    prepared = _prepare_zoo(zoo, tokenizer, model_config.token_size, zoo_config, cfg, accelerator)
    tokenizer = prepared.tokenizer
    _check_model_fits(model_config, tokenizer, prepared.num_tokens)
    fingerprint = _zoo_fingerprint(prepared.zoo)
    if resume_from is not None:
        _check_resume_compatible(resume_from, cfg, model_config, fingerprint)

    bank = None
    if cfg.permutation:
        spec, why = (permutation_spec, "") if permutation_spec is not None else _permutation_spec(prepared.zoo_config)
        if spec is None:
            warnings.warn(f"permutation views are off: {why}", stacklevel=3)
        else:
            bank = PermutationBank.build(tokenizer, spec, cfg.permutation_bank_size, seed=cfg.seed)
    augmentation = Augmentation(noise_std=cfg.noise_std, erase_prob=cfg.erase_prob,
                                permutation_prob=1.0 if bank is not None else 0.0)  # fmt: skip
    window = model_config.window_size
    train_set = ZooWindowDataset(
        prepared.zoo["train"], window, cfg.windows_per_sample, augmentation, bank, seed=cfg.seed
    )
    world = accelerator.num_processes
    if len(train_set) < cfg.batch_size * world:
        raise ValueError(
            f"the train split gives {len(train_set)} windows ({train_set.num_samples} checkpoints x "
            f"{cfg.windows_per_sample} windows_per_sample), fewer than one batch of {cfg.batch_size} per process "
            f"x {world} process(es); lower batch_size or raise windows_per_sample"
        )
    sampler = EpochSampler(len(train_set), seed=cfg.seed, shuffle=True)
    loader_kwargs = dict(
        collate_fn=collate_windows, num_workers=cfg.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )  # fmt: skip
    train_loader = DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs,
    )  # fmt: skip
    val_loader = None
    if cfg.eval_split is not None:
        val_set = ZooWindowDataset(
            prepared.zoo[cfg.eval_split], window, cfg.windows_per_sample, augmentation, bank,
            clean_first_view=True, seed=cfg.seed + 1,
        )  # fmt: skip
        val_loader = DataLoader(
            val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False,
            generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs,
        )  # fmt: skip

    # -- inputs are valid: from here on the output folder changes ------------------------------
    if cfg.overwrite_output_dir and accelerator.is_main_process:
        _clear_output_dir(output_dir)
    accelerator.wait_for_everyone()

    # -- model, optimizer, schedule -------------------------------------------------------------
    set_seed(cfg.seed)
    model = model_or_config if isinstance(model_or_config, SaneModel) else SaneModel(model_config)
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2)
    )
    if val_loader is not None:
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.num_epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_ratio * total_steps))
    # not prepared: Accelerate would step it once per process; it is stepped once per optimizer step here
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg.lr_scheduler, total_steps, warmup_steps))
    state = _LoopState()
    training_objects = (model, optimizer, scheduler, state)
    manifest_extra = {"zoo_fingerprint": fingerprint}

    if resume_from is not None:
        _load_training_state(accelerator, resume_from, model, optimizer, scheduler, state)
        logger.info("resumed from %s at step %d", resume_from, state.global_step)
        if state.batches_in_epoch >= batches_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    elif cfg.resume and accelerator.is_main_process:
        logger.warning("resume=True but %s holds no checkpoint: starting from scratch", output_dir)

    extra_files = {
        "sane_config.json": model_config.to_json_string(),
        TRAINING_CONFIG_FILE: json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n",
        "weight_tokenizer.json": json.dumps(tokenizer.to_dict(), indent=1) + "\n",
    }
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.tracker is not None:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}
        accelerator.init_trackers("sane", config=tracker_config)

    tokens_per_batch = cfg.batch_size * window * world
    unwrapped = accelerator.unwrap_model(model)
    last_eval: dict[str, float] = {}
    last_saved = state.global_step if resume_from is not None else -1

    def evaluate() -> dict[str, float]:
        if val_loader is None:
            return {}
        result = _evaluate(model, val_loader, accelerator)
        state.history.append({"step": state.global_step, **result})
        accelerator.log(result, step=state.global_step)
        return result

    if cfg.eval_on_start and state.global_step == 0 and not state.history:
        last_eval = evaluate()

    bar = tqdm(
        total=total_steps, initial=state.global_step, desc="train SANE", unit="step", dynamic_ncols=True,
        disable=not (cfg.progress and accelerator.is_local_main_process),
    )  # fmt: skip
    step_losses: list[torch.Tensor] = []
    run_start = time.perf_counter()
    seconds_before = state.train_seconds
    throughput = 0.0
    while state.global_step < total_steps:
        train_set.set_epoch(state.epoch)
        train_loader.set_epoch(state.epoch)  # Accelerate's loader sets the sampler's and dataset's epoch
        loader = train_loader
        if state.batches_in_epoch > 0:
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            loader.set_epoch(state.epoch)
        finished = False
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(**_model_inputs(batch))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            state.tokens_seen += tokens_per_batch
            step_losses.append(out.loss.detach())
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.global_step += 1
            local_loss = torch.stack(step_losses).float().mean()  # mean over the accumulated batches
            step_losses.clear()
            step_loss = local_loss.item()
            # the mean over processes (one scalar all-reduce): every process logs and checkpoints the same numbers
            state.recent_losses.append(accelerator.reduce(local_loss, reduction="mean").item() if world > 1 else step_loss)
            state.train_seconds = seconds_before + time.perf_counter() - run_start
            throughput = state.tokens_seen / max(state.train_seconds, 1e-9)
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            if state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps:
                state.last_logged_loss = sum(state.recent_losses) / len(state.recent_losses)
                state.recent_losses = []
                bar.set_postfix(loss=f"{state.last_logged_loss:.4f}", tok_s=f"{throughput:,.0f}", lr=f"{lr:.2e}")
                accelerator.log(
                    {"train_loss": state.last_logged_loss, "learning_rate": lr, "tokens_per_second": throughput},
                    step=state.global_step,
                )
            if cfg.eval_steps and state.global_step % cfg.eval_steps == 0 and state.global_step < total_steps:
                last_eval = evaluate()
                bar.set_postfix(loss=f"{state.last_logged_loss or step_loss:.4f}",
                                val=f"{last_eval.get('val_loss', float('nan')):.4f}", tok_s=f"{throughput:,.0f}")  # fmt: skip
            if cfg.save_steps and state.global_step % cfg.save_steps == 0:
                _save_checkpoint(accelerator, output_dir, state.global_step, extra_files, cfg.save_total_limit,
                                 training_objects, manifest_extra)
                last_saved = state.global_step
            if step_callback is not None:
                step_callback(StepInfo(state.global_step, state.epoch, step_loss, lr, unwrapped, accelerator))
            if state.global_step >= total_steps:
                break
        else:
            finished = True
        if finished or state.batches_in_epoch >= batches_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    bar.close()

    # -- the end: final evaluation, checkpoint and model folder ---------------------------------
    if val_loader is not None:
        if not state.history or state.history[-1]["step"] != state.global_step:
            last_eval = evaluate()
        else:
            last_eval = {k: v for k, v in state.history[-1].items() if k != "step"}
    if cfg.save_steps and last_saved != state.global_step:
        _save_checkpoint(accelerator, output_dir, state.global_step, extra_files, cfg.save_total_limit,
                                 training_objects, manifest_extra)
    metrics = {
        "train_loss": state.last_logged_loss,
        "val_loss": last_eval.get("val_loss"),
        "val_reconstruction_loss": last_eval.get("val_reconstruction_loss"),
        "val_reconstruction_r2": last_eval.get("val_reconstruction_r2"),
        "initial_val_loss": state.history[0]["val_loss"] if state.history and state.history[0]["step"] == 0 else None,
        "steps": state.global_step,
        "epochs": round(state.global_step / max(steps_per_epoch, 1), 4),
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_second": round(state.tokens_seen / max(state.train_seconds, 1e-9), 1),
        "tokens_seen": state.tokens_seen,
        "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "num_processes": world,
        "train_windows_per_epoch": len(train_set),
        "train_checkpoints": train_set.num_samples,
        "num_tokens_per_checkpoint": prepared.num_tokens,
        "window_size": window,
        "permutation_views": bank is not None,
        "eval_history": state.history,
    }
    if accelerator.is_main_process:
        _write_final(output_dir, unwrapped, tokenizer, cfg, prepared, metrics)
    accelerator.wait_for_everyone()
    return output_dir


def _zoo_fingerprint(splits: Mapping[str, Any]) -> str:
    """A content hash of the training data: sizes, columns, ``model_id``/``epoch`` and the tokens of 8 rows per split."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(splits):
        ds = splits[name]
        n = len(ds)
        digest.update(f"{name}:{n}:{sorted(ds.column_names)}".encode())
        for column in ("model_id", "epoch"):
            if column in ds.column_names:
                digest.update(json.dumps(list(ds[column]), default=str).encode())
        if "tokens" in ds.column_names and n:
            rows = ds.with_format("numpy", columns=["tokens"])
            for index in sorted({round(i * (n - 1) / 7) for i in range(8)}):
                digest.update(rows[index]["tokens"].tobytes())
    return digest.hexdigest()[:32]


def _check_resume_compatible(
    checkpoint: Path, cfg: SaneTrainingConfig, model_config: SaneConfig, zoo_fingerprint: str | None = None
) -> None:
    """Raise unless the checkpoint was written by a run with the same settings and zoo (exact resume needs them)."""
    saved_print = check_checkpoint_format(checkpoint).get("zoo_fingerprint")
    if zoo_fingerprint is not None and saved_print is not None and saved_print != zoo_fingerprint:
        raise ValueError(
            f"cannot resume from {checkpoint}: the zoo is not the one this run was trained on (zoo fingerprint "
            f"{zoo_fingerprint} != {saved_print}); resume with the original --zoo, or start a new run in another folder"
        )
    saved_file = checkpoint / TRAINING_CONFIG_FILE
    if saved_file.is_file():
        saved = SaneTrainingConfig.from_json_file(saved_file).identity()
        now = cfg.identity()
        diff = sorted(k for k in now if saved.get(k) != now[k])
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
            raise ValueError(
                f"cannot resume from {checkpoint}: the training settings changed ({details}); resume with the "
                "original settings or start a new run"
            )
    config_file = checkpoint / "sane_config.json"
    if config_file.is_file():
        saved_model = json.loads(config_file.read_text())
        now_model = json.loads(model_config.to_json_string())
        keys = [k for k in now_model if k not in ("transformers_version", "_name_or_path", "architectures", "auto_map")]
        diff = sorted(k for k in keys if saved_model.get(k) != now_model[k])
        if diff:
            raise ValueError(f"cannot resume from {checkpoint}: the model config changed in {diff}")

