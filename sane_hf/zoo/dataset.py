"""Model zoos as Hugging Face Datasets: build, load, tokenize.

A zoo is a folder that ``datasets.load_dataset(folder)`` (or ``load_dataset(repo_id)`` once pushed)
reads as a :class:`datasets.DatasetDict` with splits ``train``, ``validation`` and ``test``::

    out_dir/
    ├── README.md                           dataset card (YAML ``configs`` → data files per split)
    ├── zoo_config.json                     the :class:`ZooConfig` that made the zoo
    ├── zoo_summary.json                    counts, property ranges, drops, build time
    └── data/
        ├── train-00000-of-00001.parquet
        ├── validation-00000-of-00001.parquet
        └── test-00000-of-00001.parquet

One row per checkpoint (model × epoch), columns in :data:`ZOO_FEATURES`. The weights are stored
tokenizer-free as safetensors bytes (``Value("binary")``), so one zoo serves any token size;
:func:`tokenize_zoo` adds ``tokens``/``positions``/``mask`` for a given :class:`WeightTokenizer`.
Splits are by model (a seeded permutation of model ids), never by checkpoint.

While a zoo is built (or imported) finished pieces are written to ``out_dir/.partial/`` as
parquet part files, each followed by a small JSON marker, both atomically (temp file +
``os.replace``). A rerun after an interruption skips finished pieces and then assembles the
splits, so the result equals an uninterrupted build. ``.partial`` is removed when the zoo is
complete.

Pitfalls measured here and handled:

- binary columns lose trailing NUL bytes under ``with_format("torch"/"numpy")``: format only
  the numeric columns (:func:`with_numeric_format`) and decode weights from Python bytes;
- an empty parquet file breaks ``load_dataset``: an empty split is left out of the card's
  ``configs`` and :func:`load_zoo` adds it back as an empty :class:`datasets.Dataset`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import time
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets import Array2D, Dataset, DatasetDict, Features, Value
from torch import nn

from sane_hf._version import __version__
from sane_hf.serialization import (
    JsonConfigMixin,
    atomic_path,
    atomic_write_text,
    check_output_folder,
    folder_lock,
    read_owner_marker,
    remove_if_only_bookkeeping,
    write_owner_marker,
)

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.tokenization_sane import WeightTokenizer

__all__ = [
    "SPLITS",
    "ZOO_FEATURES",
    "HPARAM_COLUMNS",
    "PROPERTY_COLUMNS",
    "NUMERIC_COLUMNS",
    "ZooConfig",
    "build_zoo",
    "load_zoo",
    "load_zoo_config",
    "load_zoo_summary",
    "zoo_model",
    "iter_state_dicts",
    "tokenize_zoo",
    "fit_tokenizer_on_zoo",
    "with_numeric_format",
    "state_dict_to_bytes",
    "state_dict_from_bytes",
    "split_model_ids",
]

SPLITS = ("train", "validation", "test")

#: The columns of every zoo, in order. Unknown values: ``-1`` for ints, NaN for floats,
#: ``"unknown"`` for strings (imported zoos).
ZOO_FEATURES = Features(
    {
        "model_id": Value("int64"),
        "epoch": Value("int32"),
        "seed": Value("int64"),
        "lr": Value("float64"),
        "weight_decay": Value("float64"),
        "optimizer": Value("string"),
        "activation": Value("string"),
        "init": Value("string"),
        "dropout": Value("float64"),
        "batch_size": Value("int32"),
        "arch": Value("string"),
        "task": Value("string"),
        "train_acc": Value("float32"),
        "val_acc": Value("float32"),
        "test_acc": Value("float32"),
        "train_loss": Value("float32"),
        "test_loss": Value("float32"),
        "ggap": Value("float32"),
        "weights": Value("binary"),
    }
)
HPARAM_COLUMNS = ("seed", "lr", "weight_decay", "optimizer", "activation", "init", "dropout", "batch_size")
PROPERTY_COLUMNS = ("train_acc", "val_acc", "test_acc", "train_loss", "test_loss", "ggap")
#: Columns safe to format as tensors/arrays (everything but strings and the weights blob).
NUMERIC_COLUMNS = tuple(
    name for name, feat in ZOO_FEATURES.items() if feat.dtype not in ("string", "binary")
)
_UNKNOWN = {"int64": -1, "int32": -1, "float64": math.nan, "float32": math.nan, "string": "unknown"}

_PARTIAL = ".partial"
_CONFIG_FILE = "zoo_config.json"
_SUMMARY_FILE = "zoo_summary.json"
_REQUEST_FILE = "request.json"


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["split_fractions"] = list(self.split_fractions)
        return out

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
        path = path / _CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is this a zoo folder written by build_zoo or an importer?")
    return ZooConfig.from_json_file(path)


def load_zoo_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The ``zoo_summary.json`` of a zoo folder: counts, property ranges, drops, build time."""
    return json.loads((Path(path) / _SUMMARY_FILE).read_text())


# ---------------------------------------------------------------------------------------------
# weights <-> bytes
# ---------------------------------------------------------------------------------------------


def state_dict_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state_dict with safetensors (no pickle); the key order is kept in the metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a torch.Tensor")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    return save(tensors, metadata={"sane_hf.key_order": json.dumps(list(tensors))})


def state_dict_from_bytes(data: bytes) -> OrderedDict[str, torch.Tensor]:
    """Inverse of :func:`state_dict_to_bytes` (plain safetensors bytes work too)."""
    from safetensors.torch import load

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected safetensors bytes, got {type(data).__name__}")
    data = bytes(data)
    tensors = load(data)
    order = list(tensors)
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        if "sane_hf.key_order" in meta:
            order = json.loads(meta["sane_hf.key_order"])
    except (struct.error, ValueError):  # pragma: no cover - load() already validated the header
        pass
    return OrderedDict((k, tensors[k]) for k in order)


def _is_finite_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state_dict.values() if v.is_floating_point())


def _is_finite_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


# ---------------------------------------------------------------------------------------------
# rows, parts and splits (shared by build_zoo and the importers)
# ---------------------------------------------------------------------------------------------


def _make_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """A full zoo row from ``values``: unknown columns get their "unknown" default, ggap is derived."""
    row: dict[str, Any] = {}
    for name, feat in ZOO_FEATURES.items():
        if name == "weights":
            continue
        value = values.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value) and feat.dtype.startswith("int")):
            value = _UNKNOWN[feat.dtype]
        elif feat.dtype.startswith("int"):
            value = int(value)
        elif feat.dtype.startswith("float"):
            value = float(value)
        else:
            value = str(value)
        row[name] = value
    if values.get("ggap") is None:
        row["ggap"] = row["train_acc"] - row["test_acc"]  # NaN when either is unknown
    row["weights"] = values["weights"]
    return row


def _write_parquet_atomic(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=ZOO_FEATURES.arrow_schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class _PartStore:
    """Resumable part files in ``out_dir/.partial``: ``<name>.parquet`` then ``<name>.json`` (the marker)."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / _PARTIAL

    def done(self, name: str) -> bool:
        return (self.dir / f"{name}.json").exists()

    def write(self, name: str, rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> None:
        if rows:
            _write_parquet_atomic(self.dir / f"{name}.parquet", rows)
        info = {**info, "rows": len(rows)}
        atomic_write_text(self.dir / f"{name}.json", json.dumps(info, sort_keys=True) + "\n")

    def infos(self) -> dict[str, dict[str, Any]]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json")) if p.name != _REQUEST_FILE}

    def tables(self) -> Iterator[pa.Table]:
        for name, info in self.infos().items():
            if info["rows"]:
                yield pq.read_table(self.dir / f"{name}.parquet", schema=ZOO_FEATURES.arrow_schema)

    def check_request(self, request: Mapping[str, Any]) -> None:
        """Store ``request`` on first use; refuse to resume a partial build of something else."""
        path = self.dir / _REQUEST_FILE
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != json.loads(json.dumps(request)):
                diff = sorted(k for k in set(previous) | set(request) if previous.get(k) != request.get(k))
                raise ValueError(
                    f"{self.dir.parent} holds an unfinished zoo made with different settings "
                    f"(differing: {diff}); rerun with the same settings to resume, pass overwrite=True "
                    "to start over, or choose another output folder"
                )
        else:
            atomic_write_text(path, json.dumps(request, indent=2, sort_keys=True) + "\n")

    def remove(self) -> None:
        if self.dir.exists():
            trash = self.dir.with_name(f"{_PARTIAL}-delete-{os.getpid()}")
            _note_temp_dirs(self.dir.parent, [trash.name])
            os.replace(self.dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        _remove_own_temp_dirs(self.dir.parent)


# temp folders this zoo's writers made, so that a rerun deletes exactly those (never another tool's)
_TEMP_JOURNAL = ".sane-hf-temp.json"


def _note_temp_dirs(out_dir: Path, names: Sequence[str]) -> None:
    journal = out_dir / _TEMP_JOURNAL
    known = json.loads(journal.read_text()) if journal.is_file() else []
    atomic_write_text(journal, json.dumps(sorted(set(known) | set(names))) + "\n")


def _remove_own_temp_dirs(out_dir: Path) -> None:
    """Delete the temp folders listed in this zoo's journal (left by a writer killed mid-way)."""
    journal = out_dir / _TEMP_JOURNAL
    if not journal.is_file():
        return
    for name in json.loads(journal.read_text()):
        if isinstance(name, str) and name.startswith(".") and "/" not in name and name not in (".", ".."):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    journal.unlink(missing_ok=True)


def split_model_ids(
    model_ids: Iterable[int], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[int]]:
    """Assign models to ``train``/``validation``/``test`` by a seeded permutation.

    Counts are ``round(fraction * n)`` for validation and test (at least one each when the
    fraction is positive and ``n >= 3``); train gets the rest. Each list is sorted.
    """
    ids = sorted(set(int(i) for i in model_ids))
    n = len(ids)
    perm = np.random.default_rng(seed).permutation(n)
    counts = []
    for frac in fractions[1:]:
        c = int(round(frac * n))
        if frac > 0 and n >= 3:
            c = max(c, 1)
        counts.append(c)
    n_val, n_test = counts
    while n_val + n_test > n:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    n_train = n - n_val - n_test
    shuffled = [ids[i] for i in perm]
    return {
        "train": sorted(shuffled[:n_train]),
        "validation": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }


def _meta(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "weights"}


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _stats(values: Iterable[float]) -> dict[str, Any]:
    """``{n, min, mean, max}`` of the finite values (None when there are none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "min": None, "mean": None, "max": None}
    return {"n": len(finite), "min": min(finite), "mean": float(np.mean(finite)), "max": max(finite)}


def _is_unknown_value(col: str, value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return value == "unknown" or (value == -1 and ZOO_FEATURES[col].dtype.startswith("int"))


def _summarise(metas: list[dict[str, Any]], splits: Mapping[str, list[int]]) -> dict[str, Any]:
    rows_per_split = {s: 0 for s in SPLITS}
    split_of = {m: s for s, ids in splits.items() for m in ids}
    for m in metas:
        rows_per_split[split_of[m["model_id"]]] += 1
    by_epoch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for m in metas:
        by_epoch[m["epoch"]].append(m)
    per_epoch = {}
    properties_per_epoch: dict[str, dict[str, Any]] = {prop: {} for prop in PROPERTY_COLUMNS}
    for epoch in sorted(by_epoch):
        rows = by_epoch[epoch]
        acc = _stats(r["test_acc"] for r in rows)
        per_epoch[str(epoch)] = {
            "checkpoints": len(rows),
            "test_acc_min": acc["min"],
            "test_acc_mean": acc["mean"],
            "test_acc_max": acc["max"],
        }
        for prop in PROPERTY_COLUMNS:
            properties_per_epoch[prop][str(epoch)] = _stats(r[prop] for r in rows)
    final: dict[int, dict[str, Any]] = {}
    for m in metas:
        if m["model_id"] not in final or m["epoch"] > final[m["model_id"]]["epoch"]:
            final[m["model_id"]] = m
    final_acc = _stats(m["test_acc"] for m in final.values())
    # hyperparameter values counted per model (each model has one recipe)
    hparam_counts: dict[str, dict[str, int]] = {}
    for col in HPARAM_COLUMNS:
        counts: dict[str, int] = defaultdict(int)
        for m in final.values():
            counts["unknown" if _is_unknown_value(col, m[col]) else _fmt(m[col])] += 1
        hparam_counts[col] = dict(sorted(counts.items()))
    return {
        "num_models": len({m["model_id"] for m in metas}),
        "num_checkpoints": len(metas),
        "models_per_split": {s: len([i for i in splits[s] if i in final]) for s in SPLITS},
        "checkpoints_per_split": rows_per_split,
        "final_test_acc": {"min": final_acc["min"], "mean": final_acc["mean"], "max": final_acc["max"]},
        "test_acc_per_epoch": per_epoch,
        "properties_per_epoch": properties_per_epoch,
        "hparam_counts": hparam_counts,
    }


def _assemble(
    out_dir: Path,
    store: _PartStore,
    config: ZooConfig,
    *,
    transform: Callable[[pa.Table], pa.Table] | None = None,
    notes: Sequence[str] = (),
    extra_summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the part files into ``data/<split>-XXXXX-of-XXXXX.parquet``, write card, config, summary.

    ``transform`` is applied to each part table (e.g. alignment). Parts are streamed one at a time,
    so memory holds one part, not the zoo. Returns the summary dict.
    """
    start = time.perf_counter()
    metas: list[dict[str, Any]] = []
    for table in store.tables():
        metas.extend(table.drop_columns(["weights"]).to_pylist())
    model_ids = sorted({m["model_id"] for m in metas})
    if not model_ids:
        raise RuntimeError(
            f"no checkpoints to write in {out_dir}: every checkpoint was dropped (see warnings) or none was produced"
        )
    splits = split_model_ids(range(config.num_models), config.split_fractions, config.seed)
    split_of = {m: s for s, ids in splits.items() for m in ids}
    missing = [m for m in model_ids if m not in split_of]
    if missing:  # pragma: no cover - importers size num_models from their sources
        raise RuntimeError(f"model ids {missing[:5]} are outside 0..{config.num_models - 1}")

    _remove_own_temp_dirs(out_dir)  # left by a run killed while assembling (only ours: see the journal)
    tmp_data = out_dir / f".data-tmp-{os.getpid()}"
    old = out_dir / f".data-old-{os.getpid()}"
    _note_temp_dirs(out_dir, [tmp_data.name, old.name])
    tmp_data.mkdir(parents=True)
    shard_files: dict[str, list[Path]] = {s: [] for s in SPLITS}
    split_nbytes: dict[str, int] = {s: 0 for s in SPLITS}  # in-memory (arrow) bytes: SplitInfo.num_bytes
    writers: dict[str, tuple[pq.ParquetWriter, int]] = {}
    first_weights: bytes | None = None

    def close(split: str) -> None:
        if split in writers:
            writers.pop(split)[0].close()

    try:
        for table in store.tables():
            if transform is not None:
                table = transform(table)
            table = table.sort_by([("model_id", "ascending"), ("epoch", "ascending")])
            if first_weights is None and table.num_rows:
                first_weights = table.column("weights")[0].as_py()
            ids = table.column("model_id").to_pylist()
            for split in SPLITS:
                mask = pa.array([split_of[i] == split for i in ids])
                part = table.filter(mask)
                if part.num_rows == 0:
                    continue
                if split in writers and writers[split][1] + part.nbytes > config.max_shard_bytes:
                    close(split)
                if split not in writers:
                    path = tmp_data / f"{split}-{len(shard_files[split]):05d}.parquet"
                    shard_files[split].append(path)
                    writers[split] = (pq.ParquetWriter(path, ZOO_FEATURES.arrow_schema), 0)
                writer, size = writers[split]
                writer.write_table(part, row_group_size=64)
                writers[split] = (writer, size + part.nbytes)
                split_nbytes[split] += part.nbytes
        for split in SPLITS:
            close(split)
    finally:
        for writer, _ in writers.values():
            writer.close()
    # rows of one split must be sorted across parts as well: parts are per chunk of model ids,
    # written in chunk order, so concatenation is already sorted by (model_id, epoch).
    data_files: dict[str, str] = {}
    for split in SPLITS:
        n = len(shard_files[split])
        for i, path in enumerate(shard_files[split]):
            path.rename(tmp_data / f"{split}-{i:05d}-of-{n:05d}.parquet")
        if n:
            data_files[split] = f"data/{split}-*"
    data_dir = out_dir / "data"
    if data_dir.exists():
        os.replace(data_dir, old)
    os.replace(tmp_data, data_dir)
    shutil.rmtree(old, ignore_errors=True)

    summary = _summarise(metas, splits)
    summary.update(extra_summary or {})
    summary["assemble_seconds"] = round(time.perf_counter() - start, 3)
    if "build_seconds" in summary:  # the caller's time so far + assembly
        summary["build_seconds"] = round(summary["build_seconds"] + summary["assemble_seconds"], 3)
    summary["notes"] = list(notes)
    summary["data_files"] = data_files
    summary["num_bytes"] = {s: int(split_nbytes[s]) for s in SPLITS}
    summary["download_bytes"] = {
        s: sum(p.stat().st_size for p in data_dir.glob(f"{s}-*.parquet")) for s in SPLITS
    }
    summary["versions"] = _versions()
    # an imported zoo's options name local folders: keep only names relative to the source
    config = ZooConfig.from_dict({**config.to_dict(), "import_options": _public_import_options(config.import_options)})
    from sane_hf.cards.dataset_card import render_zoo_card

    card = render_zoo_card(config, summary, metas, first_weights, data_files, notes, name=out_dir.resolve().name)
    atomic_write_text(out_dir / "README.md", card)
    atomic_write_text(out_dir / _SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    config.to_json_file(out_dir / _CONFIG_FILE)  # last: its presence (without .partial) marks a complete zoo
    return summary


# ---------------------------------------------------------------------------------------------
# provenance recorded in the summary and the card
# ---------------------------------------------------------------------------------------------

def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and len(value) > 1 and (
        os.path.isabs(value) or value.startswith(("/", "\\\\", "~")) or value[1:3] in (":\\", ":/")
    )


def _path_name(value: str) -> str:
    return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _public_import_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Import options without local folders: ``src`` becomes the source folder's name and other
    absolute paths become relative to the source folder (else just their file name).

    >>> _public_import_options({"src": "/home/me/zoos/cnn", "properties": "/home/me/zoos/cnn/p.csv", "x": 1})
    {'src': 'cnn', 'properties': 'p.csv', 'x': 1}
    """
    out = dict(options)
    src = out.get("src")
    if isinstance(src, str) and src:
        out["src"] = _path_name(src) if _is_local_path(src) else src
    for key, value in options.items():
        if key == "src" or not _is_local_path(value):
            continue
        rel = None
        if _is_local_path(src):
            try:
                rel = Path(value).relative_to(Path(src)).as_posix()
            except ValueError:
                rel = None
        out[key] = rel if rel else _path_name(value)
    return out


def _versions() -> dict[str, str]:
    """Versions of the libraries that made the zoo (recorded in the summary and the card)."""
    import platform

    import datasets

    return {
        "sane-hf": __version__,
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def _is_complete(out_dir: Path) -> bool:
    return (out_dir / _CONFIG_FILE).exists() and not (out_dir / _PARTIAL).exists()


def _prepare_out_dir(out_dir: Path, identity: Mapping[str, Any], overwrite: bool, what: str) -> bool:
    """Handle an existing ``out_dir``; True when it already holds this exact complete zoo."""
    if overwrite:
        _remove_own_temp_dirs(out_dir)
        for name in ("data", _PARTIAL, "README.md", _CONFIG_FILE, _SUMMARY_FILE):
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return False
    if _is_complete(out_dir):
        existing = json.loads((out_dir / _CONFIG_FILE).read_text())
        wanted = json.loads(json.dumps(identity))
        for data in (existing, wanted):  # the written config keeps only public (relative) import paths
            if isinstance(data.get("import_options"), dict):
                data["import_options"] = _public_import_options(data["import_options"])
        if {k: existing.get(k) for k in wanted} == wanted:
            return True
        raise ValueError(
            f"{out_dir} already holds a different zoo; pass overwrite=True (--overwrite) to replace it "
            f"or choose another folder ({what})"
        )
    return False


def _writes_zoo(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a zoo writer taking ``out_dir`` and ``overwrite``: refuse a folder that is not a zoo (unless
    ``overwrite``), hold the folder's lock for the whole call (rank 0 of a launch), and mark the folder as a zoo."""
    import functools
    import inspect

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out_dir = Path(bound.arguments["out_dir"])
            if os.environ.get("RANK", "0") != "0":  # other processes of a launch follow rank 0
                return fn(*args, **kwargs)
            own = (out_dir / _CONFIG_FILE).is_file() or (out_dir / _PARTIAL).is_dir()
            check_output_folder(out_dir, kind="zoo", own=own, overwrite=bool(bound.arguments.get("overwrite")))
            existed = out_dir.exists()
            try:
                with folder_lock(out_dir, what):
                    if (read_owner_marker(out_dir) or {}).get("kind") != "zoo":
                        write_owner_marker(out_dir, "zoo")
                    return fn(*args, **kwargs)
            except BaseException:
                if not existed:  # failed before writing anything: leave no empty folder behind
                    remove_if_only_bookkeeping(out_dir)
                raise

        return wrapper

    return decorate


def _distributed_state():
    """``accelerate.PartialState`` (1 process unless launched with ``accelerate launch`` / ``torchrun``).

    Without a GPU the state is created with ``cpu=True``: accelerate only sets up multi-process
    CPU runs (gloo) when asked for the CPU explicitly.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def _chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def _chunk_name(index: int) -> str:
    return f"chunk-{index:05d}"


@_writes_zoo("sane-hf zoo build")
def build_zoo(
    config: ZooConfig,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    overwrite: bool = False,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Train a population of models and write it as a Hugging Face dataset (see the module docs).

    Models are trained in chunks of ``config.models_per_chunk`` by ``train_population``; each
    finished chunk is written to ``out_dir/.partial``, so an interrupted build resumes where it
    stopped when run again with the same config (the result equals an uninterrupted build).
    Under ``accelerate launch --num_processes N`` each process trains its share of the chunks
    and the main process assembles the splits.

    Checkpoints with NaN/Inf weights or losses are dropped with a warning and a note in the card.
    With ``config.align`` every model is permutation-aligned to the final checkpoint of the lowest
    model id (model 0) and the same permutation is applied to all its epochs.

    Args:
        config: what to build.
        out_dir: the zoo folder (created).
        progress: show progress bars.
        overwrite: discard whatever ``out_dir`` holds (partial or complete) first.
        cache_dir: ``datasets`` cache used to load the result.

    Returns:
        The zoo, as :func:`load_zoo` reads it back from ``out_dir``.
    """
    from sane_hf.zoo import train as train_mod
    from sane_hf.zoo.tasks import load_task

    out_dir = Path(out_dir)
    state = _distributed_state()
    identity = config._identity()
    complete = False
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        complete = _prepare_out_dir(out_dir, identity, overwrite, "build_zoo")
        if not complete:
            _PartStore(out_dir).check_request(identity)
    state.wait_for_everyone()
    if _is_complete(out_dir) and (complete or not state.is_main_process):
        return load_zoo(out_dir, cache_dir=cache_dir)

    start = time.perf_counter()
    store = _PartStore(out_dir)
    task = load_task(
        config.task,
        image_size=config.image_size,
        train_subset=config.train_subset,
        eval_subset=config.eval_subset,
        seed=config.seed,
    )
    resolved = ZooConfig.from_dict(
        {
            **config.to_dict(),
            "image_size": task.image_size,
            "in_channels": task.in_channels,
            "num_classes": task.num_classes,
        }
    )
    hparams = train_mod.sample_grid(config.num_models, config.seed, **config.grid)
    chunks = _chunks(list(range(config.num_models)), config.models_per_chunk)
    mine = list(train_mod.shard_for_process(list(range(len(chunks))), state.process_index, state.num_processes))
    todo = [c for c in mine if not store.done(_chunk_name(c))]
    show = progress and state.is_main_process
    device = str(state.device) if config.device == "auto" else config.device
    stored = set(resolved.stored_epochs)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="zoo chunks", unit="chunk", disable=not show)
    for c in todo:
        ids = chunks[c]
        rows: list[dict[str, Any]] = []
        dropped: list[list[int]] = []
        records = train_mod.train_population(
            config.arch,
            task,
            [hparams[i] for i in ids],
            model_ids=ids,
            epochs=config.epochs,
            checkpoint_epochs=config.checkpoint_epochs,
            arch_kwargs=config.arch_kwargs,
            num_workers=config.num_workers,
            progress=show,
            device=device,
        )
        for rec in records:
            if rec.epoch not in stored:
                continue
            row = _record_row(rec, config)
            if row is None:
                dropped.append([int(rec.model_id), int(rec.epoch)])
            else:
                rows.append(row)
        rows.sort(key=lambda r: (r["model_id"], r["epoch"]))
        store.write(_chunk_name(c), rows, {"model_ids": ids, "dropped": dropped})
        bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - start
    state.wait_for_everyone()

    if state.is_main_process:
        infos = store.infos()
        missing = [c for c in range(len(chunks)) if _chunk_name(c) not in infos]
        if missing:  # pragma: no cover - every process finished its chunks
            raise RuntimeError(f"chunks {missing} were not written; rerun build_zoo to resume")
        dropped_all = sorted(tuple(d) for info in infos.values() for d in info["dropped"])
        notes = []
        if dropped_all:
            msg = (
                f"dropped {len(dropped_all)} checkpoint(s) with NaN/Inf weights or losses "
                f"(model, epoch): {[list(d) for d in dropped_all[:20]]}{' …' if len(dropped_all) > 20 else ''}"
            )
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
        transform = None
        if config.align:
            transform = _make_aligner(resolved, store)
            notes.append("models are permutation-aligned (weight matching) to the final checkpoint of model "
                         f"{transform.reference_id}")
        _assemble(
            out_dir,
            store,
            resolved,
            transform=transform,
            notes=notes,
            extra_summary={
                "dropped_checkpoints": len(dropped_all),
                "build_seconds": round(time.perf_counter() - start, 3),
                "train_seconds": round(train_seconds, 3),
            },
        )
        store.remove()
    state.wait_for_everyone()
    return load_zoo(out_dir, cache_dir=cache_dir)


def _record_row(rec: Any, config: ZooConfig) -> dict[str, Any] | None:
    """A zoo row from a ``CheckpointRecord``; None when its weights or losses are not finite."""
    m = rec.metrics
    values = {
        "model_id": rec.model_id,
        "epoch": rec.epoch,
        "arch": config.arch,
        "task": config.task,
        "train_acc": m.train_acc,
        "val_acc": m.val_acc,
        "test_acc": m.test_acc,
        "train_loss": m.train_loss,
        "test_loss": m.test_loss,
    }
    for col in HPARAM_COLUMNS:
        values[col] = getattr(rec.hparams, col)
    numbers = [m.train_acc, m.val_acc, m.test_acc, m.train_loss, m.test_loss]
    if not all(_is_finite_number(x) for x in numbers) or not _is_finite_state_dict(rec.state_dict):
        return None
    values["weights"] = state_dict_to_bytes(rec.state_dict)
    return _make_row(values)


class _Aligner:
    """Applies each model's permutation (found on its final checkpoint) to all its checkpoints."""

    def __init__(self, spec: Any, reference: Mapping[str, torch.Tensor], reference_id: int, final_epoch: dict[int, int]):
        self.spec = spec
        self.reference = reference
        self.reference_id = reference_id
        self.final_epoch = final_epoch

    def __call__(self, table: pa.Table) -> pa.Table:
        from sane_hf.alignment import align_to, apply_permutation

        rows = table.to_pylist()
        by_model: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_model[row["model_id"]].append(row)
        for model_id, model_rows in by_model.items():
            if model_id == self.reference_id:
                continue
            final = max(model_rows, key=lambda r: r["epoch"])
            _, perms = align_to(state_dict_from_bytes(final["weights"]), self.reference, self.spec)
            for row in model_rows:
                sd = apply_permutation(state_dict_from_bytes(row["weights"]), self.spec, perms)
                row["weights"] = state_dict_to_bytes(sd)
        return pa.Table.from_pylist(rows, schema=ZOO_FEATURES.arrow_schema)


def _make_aligner(config: ZooConfig, store: _PartStore) -> _Aligner:
    from sane_hf.alignment import permutation_spec
    from sane_hf.zoo.architectures import create_model

    reference: dict[str, Any] | None = None
    final_epoch: dict[int, int] = {}
    for table in store.tables():
        for m_id, epoch in zip(table.column("model_id").to_pylist(), table.column("epoch").to_pylist()):
            final_epoch[m_id] = max(epoch, final_epoch.get(m_id, epoch))
    reference_id = min(final_epoch)
    for table in store.tables():
        for row in table.filter(pc.equal(table.column("model_id"), reference_id)).to_pylist():
            if row["epoch"] == final_epoch[reference_id]:
                reference = row
    assert reference is not None
    kwargs = config.model_kwargs()
    module = create_model(config.arch, init="default", **kwargs)
    example = torch.zeros(2, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    spec = permutation_spec(module, example)
    return _Aligner(spec, state_dict_from_bytes(reference["weights"]), reference_id, final_epoch)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _looks_local(text: str) -> bool:
    """True for a path the user surely meant as local: ``./x``, ``/x``, ``~/x``, ``a/b/c``, or ``a/b`` with ``a`` here."""
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def _raise_for_bad_shard(folder: Path, err: BaseException) -> None:
    """Raise a ``ValueError`` naming the first parquet shard of ``folder`` that cannot be read, if any."""
    for shard in sorted((folder / "data").glob("*.parquet")):
        try:
            pq.read_table(shard)
        except Exception as shard_err:  # noqa: BLE001 - arrow raises several types for broken files
            raise ValueError(
                f"zoo shard {shard} is corrupt or truncated ({' '.join(str(shard_err).split())}); rebuild the zoo "
                "(--overwrite) or copy that file again"
            ) from err


def load_zoo(path_or_repo: str | os.PathLike, *, cache_dir: str | None = None, **kwargs: Any) -> DatasetDict:
    """Load a zoo folder (written by :func:`build_zoo` or an importer) or a Hub dataset repo id.

    Always returns the three splits ``train``, ``validation`` and ``test`` (an empty split is an
    empty dataset with the zoo features). ``kwargs`` go to ``datasets.load_dataset`` (e.g.
    ``revision``, ``token``).
    """
    import datasets

    path = Path(path_or_repo)
    if path.is_dir():
        try:
            if not (path / "README.md").exists():
                files = {s: sorted(str(p) for p in (path / "data").glob(f"{s}-*.parquet")) for s in SPLITS}
                files = {s: f for s, f in files.items() if f}
                if not files:
                    raise FileNotFoundError(
                        f"{path} holds no README.md and no data/<split>-*.parquet: not a zoo folder"
                    )
                zoo = datasets.load_dataset("parquet", data_files=files, cache_dir=cache_dir, **kwargs)
            else:
                zoo = datasets.load_dataset(str(path.resolve()), cache_dir=cache_dir, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as err:  # datasets wraps a broken shard in errors that name no file: find it
            _raise_for_bad_shard(path, err)
            raise
    elif path.exists() or _looks_local(str(path_or_repo)):
        what = "is a file, not a zoo folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"zoo folder {path} {what} (a Hub dataset id looks like 'user/name')")
    else:
        zoo = datasets.load_dataset(str(path_or_repo), cache_dir=cache_dir, **kwargs)
    if not isinstance(zoo, DatasetDict):  # pragma: no cover - split= was passed
        return zoo
    out = DatasetDict()
    for split in SPLITS:
        out[split] = zoo[split] if split in zoo else Dataset.from_dict(
            {k: [] for k in ZOO_FEATURES}, features=ZOO_FEATURES
        )
    for split in zoo:
        if split not in out:
            out[split] = zoo[split]
    return out


def with_numeric_format(dataset: Dataset, type: str = "torch", columns: Sequence[str] | None = None) -> Dataset:
    """Format the numeric columns as ``type`` and keep the rest (weights bytes, strings) as Python.

    Formatting a binary column as numpy/torch strips its trailing NUL bytes (corrupting the
    safetensors blob); this leaves it alone.
    """
    if columns is None:
        columns = [c for c in dataset.column_names if c in NUMERIC_COLUMNS or c in ("tokens", "positions", "mask")]
    return dataset.with_format(type, columns=list(columns), output_all_columns=True)


def iter_state_dicts(split: Dataset, batch_size: int = 64) -> Iterator[OrderedDict[str, torch.Tensor]]:
    """The state_dicts of a zoo split, in row order (reads only the ``weights`` column)."""
    weights = split.select_columns(["weights"]).with_format(None)
    for start in range(0, len(weights), batch_size):
        for blob in weights[start : start + batch_size]["weights"]:
            yield state_dict_from_bytes(blob)


def zoo_model(config: ZooConfig, row: Mapping[str, Any]) -> nn.Module:
    """The architecture instance for a zoo ``row`` (its activation and dropout), weights loaded strictly."""
    from sane_hf.zoo.architectures import create_model, list_architectures

    if config.arch_entrypoint:  # the user's architecture (sane_hf.zoo.custom)
        from sane_hf.zoo.custom import architecture_builder

        module = architecture_builder(config)()
        module.load_state_dict(state_dict_from_bytes(row["weights"]), strict=True)
        return module.eval()
    arch = row.get("arch", config.arch)
    if arch not in list_architectures():
        raise ValueError(
            f"architecture {arch!r} of this zoo is not in the registry {list_architectures()}; "
            "import the zoo with --arch module:callable (your function returning the nn.Module), or use "
            "state_dict_from_bytes(row['weights']) with your own module"
        )
    dropout = row.get("dropout", 0.0)
    dropout = 0.0 if dropout is None or not math.isfinite(float(dropout)) else float(dropout)
    activation = row.get("activation") or "relu"
    if activation == "unknown":
        activation = "relu"
    module = create_model(arch, activation=activation, dropout=dropout, init="default", **config.model_kwargs())
    module.load_state_dict(state_dict_from_bytes(row["weights"]), strict=True)
    return module.eval()


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------


def _check_single_arch(zoo: DatasetDict | Dataset) -> None:
    splits = zoo.values() if isinstance(zoo, DatasetDict) else [zoo]
    archs = set()
    for split in splits:
        if "arch" in split.column_names and len(split):
            archs.update(split.unique("arch"))
    if len(archs) > 1:
        raise ValueError(
            f"the zoo mixes architectures {sorted(archs)}; a WeightTokenizer covers one architecture: "
            "filter the zoo first (zoo.filter(lambda r: r['arch'] == ...))"
        )


def fit_tokenizer_on_zoo(
    zoo: DatasetDict | Dataset,
    token_size: int = 64,
    *,
    split: str = "train",
    include_norm_stats: bool = True,
    max_models: int | None = None,
) -> WeightTokenizer:
    """A :class:`WeightTokenizer` for the zoo's architecture, normalisation fitted on ``split``.

    ``max_models`` limits the fit to the first checkpoints of that many rows (None = all rows).
    """
    from sane_hf.tokenization_sane import WeightTokenizer

    _check_single_arch(zoo)
    data = zoo[split] if isinstance(zoo, DatasetDict) else zoo
    if len(data) == 0:
        raise ValueError(f"split {split!r} is empty: nothing to fit the tokenizer on")
    if max_models is not None:
        data = data.select(range(min(max_models, len(data))))
    reference = state_dict_from_bytes(data[0]["weights"])
    tokenizer = WeightTokenizer.from_reference(reference, token_size=token_size, include_norm_stats=include_norm_stats)
    return tokenizer.fit(iter_state_dicts(data))


def tokenize_zoo(
    zoo: DatasetDict | Dataset,
    tokenizer: WeightTokenizer,
    normalize: bool = True,
    batch_size: int = 64,
    *,
    keep_weights: bool = True,
    num_proc: int | None = None,
) -> DatasetDict | Dataset:
    """Add ``tokens`` ``(N, d)`` float32, ``positions`` ``(N, 3)`` int32 and ``mask`` ``(N, d)`` bool.

    Uses ``tokenizer.encode_batch`` in a batched ``Dataset.map``. Every row must be of the
    tokenizer's architecture (a clear ``ValueError`` otherwise). ``normalize=True`` needs a
    fitted tokenizer (:func:`fit_tokenizer_on_zoo` or ``tokenizer.fit``). With
    ``keep_weights=False`` the ``weights`` column is dropped.
    """
    _check_single_arch(zoo)
    if normalize and not tokenizer.is_fitted:
        raise ValueError(
            "tokenize_zoo(normalize=True) needs a fitted tokenizer: call fit_tokenizer_on_zoo(zoo, ...) "
            "or tokenizer.fit(iter_state_dicts(zoo['train'])) first, or pass normalize=False"
        )
    n, d = tokenizer.num_tokens, tokenizer.token_size

    def encode(batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        sds = [state_dict_from_bytes(b) for b in batch["weights"]]
        try:
            out = tokenizer.encode_batch(sds, normalize=normalize)
        except (ValueError, TypeError) as err:
            ids = batch.get("model_id", ["?"])
            raise ValueError(
                f"zoo rows (model_id {ids[0]}…) do not fit the tokenizer's architecture: {err}"
            ) from err
        return {
            "tokens": out.tokens.numpy(),  # (B, N, d)
            "positions": out.positions.to(torch.int32).numpy(),  # (B, N, 3)
            "mask": out.mask.numpy(),  # (B, N, d)
        }

    def features_for(ds: Dataset) -> Features:
        feats = ds.features.copy()
        feats["tokens"] = Array2D((n, d), "float32")
        feats["positions"] = Array2D((n, 3), "int32")
        feats["mask"] = Array2D((n, d), "bool")
        if not keep_weights:
            del feats["weights"]
        return feats

    def run(ds: Dataset) -> Dataset:
        if len(ds) == 0:
            empty = {k: [] for k in features_for(ds)}
            return Dataset.from_dict(empty, features=features_for(ds))
        return ds.with_format(None).map(
            encode,
            batched=True,
            batch_size=batch_size,
            writer_batch_size=batch_size,
            features=features_for(ds),
            remove_columns=None if keep_weights else ["weights"],
            num_proc=num_proc,
            desc="tokenizing",
        )

    if isinstance(zoo, DatasetDict):
        return DatasetDict({name: run(ds) for name, ds in zoo.items()})
    return run(zoo)
