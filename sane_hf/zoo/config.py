"""What determines a zoo: :class:`ZooConfig`, and reading a zoo folder's ``zoo_config.json`` and
``zoo_summary.json``.

Imports neither torch nor ``datasets`` (checks that need the architecture and task registries import
them when a config is made), so ``sane-hf zoo build --help`` builds its flags from :class:`ZooConfig`
without loading them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sane_hf.constants import ZOO_CONFIG_FILE, ZOO_SUMMARY_FILE
from sane_hf.serialization import JsonConfigMixin

__all__ = ["ZooConfig", "load_zoo_config", "load_zoo_summary"]


@dataclass
class ZooConfig(JsonConfigMixin):
    """Everything that determines a zoo. Each field's ``help`` also drives ``sane-hf zoo build``.

    >>> cfg = ZooConfig(task="digits", arch="cnn-s", num_models=4, epochs=2)
    >>> ZooConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    task: str = field(default="digits", metadata={"help": "Offline task (data set) the models are trained on."})
    arch: str = field(default="cnn-s", metadata={"help": "Architecture name from the zoo registry."})
    num_models: int = field(default=64, metadata={"help": "Number of models (hyperparameter draws) to train."})
    epochs: int = field(default=10, metadata={"help": "Training epochs per model."})
    checkpoint_epochs: list[int] | None = field(
        default=None,
        metadata={"help": "Epochs to store a checkpoint for (0 = initialisation); None = every epoch 0..epochs."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Resize the task's images to this side length; None = native size."}
    )
    train_subset: int | None = field(
        default=None, metadata={"help": "Train on this many training images only (faster zoos); None = all."}
    )
    eval_subset: int | None = field(
        default=None, metadata={"help": "Evaluate on this many validation/test images only; None = all."}
    )
    arch_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra architecture arguments, e.g. {'width': 16} for resnet18."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the hyperparameter grid and of the split assignment."})
    split_fractions: tuple[float, float, float] = field(
        default=(0.7, 0.15, 0.15), metadata={"help": "Fractions of models in train/validation/test."}
    )
    align: bool = field(
        default=False,
        metadata={"help": "Permutation-align every model to model 0's final checkpoint (weight matching)."},
    )
    grid: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Keyword arguments for sample_grid (e.g. lr_range, optimizers, activations)."},
    )
    num_workers: int = field(
        default=1, metadata={"help": "Training worker processes per machine (train_population; 2 is fastest on 2 cores)."}
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "Where models train: 'auto' = this process's accelerate device (cuda:i under "
            "`accelerate launch --multi_gpu`, else the GPU if any, else cpu), or e.g. 'cpu', 'cuda:0'."
        },
    )
    models_per_chunk: int = field(
        default=16,
        metadata={
            "help": "Models trained together and written as one resumable part file "
            "(the granularity of resume and of multi-process sharding)."
        },
    )
    max_shard_bytes: int = field(
        default=500_000_000, metadata={"help": "Largest parquet shard written per split, in bytes."}
    )
    in_channels: int | None = field(
        default=None, metadata={"help": "Input channels (filled in from the task when the zoo is built)."}
    )
    num_classes: int | None = field(
        default=None, metadata={"help": "Output classes (filled in from the task when the zoo is built)."}
    )
    source: str = field(
        default="build",
        metadata={
            "help": "How the zoo was made: 'build' or 'import:<format>'. Imported zoos may name "
            "tasks and architectures outside the registries."
        },
    )
    import_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Source folder and options of an imported zoo (set by importers)."}
    )
    arch_entrypoint: str | None = field(
        default=None,
        metadata={
            "help": "Your architecture, 'module:callable' or '/abs/path/file.py:callable' returning the nn.Module "
            "(imported zoos; see sane_hf.zoo.custom). This imports and runs that code."
        },
    )
    task_entrypoint: str | None = field(
        default=None,
        metadata={
            "help": "Your task, 'module:callable' or '/abs/path/file.py:callable' returning (x_train, y_train, "
            "x_test, y_test) (imported zoos; see sane_hf.zoo.custom). This imports and runs that code."
        },
    )
    description: str = field(default="", metadata={"help": "Free text added to the dataset card."})

    # fields that change neither the rows nor their order (ignored when resuming)
    _RUNTIME_FIELDS = ("num_workers", "description", "max_shard_bytes", "device")
    # fields filled in from the task
    _DERIVED_FIELDS = ("in_channels", "num_classes")

    def __post_init__(self) -> None:
        self.split_fractions = tuple(float(f) for f in self.split_fractions)
        if self.checkpoint_epochs is not None:
            self.checkpoint_epochs = sorted({int(e) for e in self.checkpoint_epochs})
        self.arch_kwargs = dict(self.arch_kwargs)
        self.grid = dict(self.grid)
        self.import_options = dict(self.import_options)
        if self.source == "build":
            from sane_hf.zoo.architectures import list_architectures

            if self.arch not in list_architectures():
                raise ValueError(f"unknown architecture {self.arch!r}; registered: {list_architectures()}")
            from sane_hf.zoo.architectures import check_arch_kwargs

            check_arch_kwargs(self.arch, self.arch_kwargs)
            tasks = _list_tasks()
            if tasks is not None and self.task not in tasks:
                raise ValueError(f"unknown task {self.task!r}; available: {tasks}")
            grid_options = _grid_options()
            unknown = sorted(set(self.grid) - set(grid_options))
            if unknown:
                raise ValueError(f"unknown grid options {unknown}; sample_grid accepts {grid_options}")
        elif not self.source.startswith("import:"):
            raise ValueError(f"source must be 'build' or 'import:<format>', got {self.source!r}")
        if self.num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {self.num_models}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.checkpoint_epochs is not None:
            bad = [e for e in self.checkpoint_epochs if not 0 <= e <= self.epochs]
            if bad or not self.checkpoint_epochs:
                raise ValueError(
                    f"checkpoint_epochs must be a non-empty subset of 0..{self.epochs}, got {self.checkpoint_epochs}"
                )
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions):
            raise ValueError(f"split_fractions must be 3 non-negative numbers, got {self.split_fractions}")
        if not math.isclose(sum(self.split_fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")
        for name in ("image_size", "train_subset", "eval_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.models_per_chunk < 1:
            raise ValueError(f"models_per_chunk must be >= 1, got {self.models_per_chunk}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")

    @property
    def stored_epochs(self) -> list[int]:
        """The epochs a checkpoint is stored for."""
        if self.checkpoint_epochs is not None:
            return list(self.checkpoint_epochs)
        return list(range(self.epochs + 1))

    def _identity(self) -> dict[str, Any]:
        """The fields that determine the rows (for resume checks)."""
        skip = set(self._RUNTIME_FIELDS) | set(self._DERIVED_FIELDS)
        if self.image_size is None:  # "native size": a built zoo stores the resolved size
            skip.add("image_size")
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_model`` shared by every model of the zoo."""
        if self.in_channels is None or self.num_classes is None or self.image_size is None:
            if self.task_entrypoint:  # the user's task (sane_hf.zoo.custom)
                from sane_hf.zoo.custom import zoo_task

                task = zoo_task(self, required=True)
            else:
                from sane_hf.zoo.tasks import load_task

                task = load_task(self.task, image_size=self.image_size, train_subset=1, seed=self.seed)
            in_channels, num_classes, image_size = task.in_channels, task.num_classes, task.image_size
        else:
            in_channels, num_classes, image_size = self.in_channels, self.num_classes, self.image_size
        return {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes, **self.arch_kwargs}


def _list_tasks() -> list[str] | None:
    try:
        from sane_hf.zoo.tasks import list_tasks
    except ImportError:  # pragma: no cover - tasks module not installed in this build
        return None
    return list(list_tasks())


def _grid_options() -> list[str]:
    import inspect

    from sane_hf.zoo.train import sample_grid

    params = inspect.signature(sample_grid).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def load_zoo_config(path: str | os.PathLike) -> ZooConfig:
    """The :class:`ZooConfig` of a zoo folder (or of a ``zoo_config.json`` file)."""
    path = Path(path)
    if path.is_dir():
        path = path / ZOO_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is this a zoo folder written by build_zoo or an importer?")
    return ZooConfig.from_json_file(path)


def load_zoo_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The ``zoo_summary.json`` of a zoo folder: counts, property ranges, drops, build time."""
    return json.loads((Path(path) / ZOO_SUMMARY_FILE).read_text())
