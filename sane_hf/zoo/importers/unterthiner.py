"""The ``unterthiner`` format: the CNN zoo of Unterthiner et al. 2020, see :mod:`sane_hf.zoo.importers`."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict

from sane_hf.zoo.importers.common import _columns_from, _resolve_user_code, _run_import, _units

__all__ = ["UNTERTHINER_COLUMNS", "import_unterthiner"]

#: Unterthiner ``metrics.csv`` column(s) → zoo column (first present wins)
UNTERTHINER_COLUMNS: dict[str, tuple[str, ...]] = {
    "train_acc": ("train_accuracy", "train_acc"),
    "val_acc": ("validation_accuracy", "val_accuracy", "val_acc"),
    "test_acc": ("test_accuracy", "test_acc"),
    "train_loss": ("train_loss",),
    "test_loss": ("test_loss",),
    "optimizer": ("config.optimizer",),
    "lr": ("config.learning_rate",),
    "activation": ("config.activation",),
    "init": ("config.w_init",),
    "dropout": ("config.dropout",),
    "weight_decay": ("config.l2reg",),
    "seed": ("config.random_seed", "config.seed"),
    "batch_size": ("config.batch_size",),
    "task": ("config.dataset",),
    "epoch": ("epoch", "step"),
}


_TF_SUFFIX = {
    "kernel": "weight",
    "gamma": "weight",
    "beta": "bias",
    "bias": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def _parse_shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return tuple(int(v) for v in re.findall(r"\d+", str(value)))


def _read_layout(src: Path) -> list[tuple[str, int, int, tuple[int, ...]]]:
    if (src / "layout.csv").exists():
        with open(src / "layout.csv", newline="") as fh:
            records = list(csv.DictReader(fh))
    elif (src / "layout.json").exists():
        records = json.loads((src / "layout.json").read_text())
    else:
        raise FileNotFoundError(f"{src} has no layout.csv or layout.json (varname, start_idx, end_idx, shape)")
    layout = []
    for rec in records:
        try:
            name, start, end = str(rec["varname"]), int(rec["start_idx"]), int(rec["end_idx"])
        except KeyError as err:
            raise ValueError(f"layout record {rec} lacks {err}; columns: varname, start_idx, end_idx, shape") from err
        shape = _parse_shape(rec.get("shape", ""))
        if math.prod(shape) != end - start:
            raise ValueError(f"layout entry {name!r}: shape {shape} holds {math.prod(shape)} values, not {end - start}")
        layout.append((name, start, end, shape))
    return layout


def _tf_key_names(varnames: Sequence[str]) -> list[str]:
    parts = [v.split(":")[0].split("/") for v in varnames]
    prefix = 0
    while all(len(p) > prefix + 2 for p in parts) and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    keys = []
    for p in parts:
        p = p[prefix:]
        p = p[:-1] + [_TF_SUFFIX.get(p[-1], p[-1])]
        keys.append(".".join(p))
    if len(set(keys)) != len(keys):
        raise ValueError(f"layout variable names collide after conversion: {varnames}")
    return keys


def _tf_to_torch(name: str, value: np.ndarray, torch_layout: bool) -> torch.Tensor:
    t = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    if torch_layout and name.split(":")[0].endswith("kernel"):
        if t.dim() == 4:  # (h, w, in, out) -> (out, in, h, w)
            t = t.permute(3, 2, 0, 1).contiguous()
        elif t.dim() == 2:  # (in, out) -> (out, in)
            t = t.t().contiguous()
    return t


def import_unterthiner(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str = "unterthiner-cnn",
    task: str | Callable[[], Any] | None = None,
    build: Callable[..., torch.nn.Module] | None = None,
    torch_layout: bool = True,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Import the Unterthiner et al. 2020 CNN zoo layout (see :mod:`sane_hf.zoo.importers` for the mapping).

    Args:
        src: folder with ``weights.npy``, ``metrics.csv`` and ``layout.csv``/``layout.json``.
        arch: architecture name for every row, or your ``"module:callable"`` (:mod:`sane_hf.zoo.custom`).
        task: task name; default the ``config.dataset`` column, else ``"unknown"``; or your
            ``"module:callable"`` / callable.
        build: your architecture callable itself.
        torch_layout: transpose TensorFlow kernels to PyTorch's layout.
    """
    src = Path(src)
    for name in ("weights.npy", "metrics.csv"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} not found (Unterthiner layout: weights.npy, metrics.csv, layout.csv)")
    weights = np.load(src / "weights.npy", mmap_mode="r")  # (n_checkpoints, n_params)
    with open(src / "metrics.csv", newline="") as fh:
        metrics = list(csv.DictReader(fh))
    if weights.ndim != 2 or weights.shape[0] != len(metrics):
        raise ValueError(
            f"weights.npy has shape {weights.shape} but metrics.csv has {len(metrics)} rows; expected "
            "[n_checkpoints, n_params] with one metrics row per checkpoint"
        )
    layout = _read_layout(src)
    if max(end for _, _, end, _ in layout) > weights.shape[1]:
        raise ValueError(f"layout addresses more values than weights.npy rows hold ({weights.shape[1]})")
    keys = _tf_key_names([name for name, *_ in layout])
    user = _resolve_user_code(arch, build, task, seed=seed)
    task = user.task if task is not None else None

    by_model: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(metrics):
        by_model[rec.get("modeldir") or f"row-{i:08d}"].append(i)
    names = sorted(by_model)

    def convert(rows: list[int]) -> list[dict[str, Any]]:
        out = []
        for i in rows:
            values = _columns_from(metrics[i], UNTERTHINER_COLUMNS)
            if task is not None:
                values["task"] = task
            flat = np.asarray(weights[i])
            values["state_dict"] = OrderedDict(
                (key, _tf_to_torch(name, flat[start:end].reshape(shape), torch_layout))
                for key, (name, start, end, shape) in zip(keys, layout)
            )
            out.append(values)
        return out

    return _run_import(
        "unterthiner", src, Path(out_dir), _units([(name, by_model[name]) for name in names], convert),
        options={"torch_layout": torch_layout},
        user=user, seed=seed, split_fractions=split_fractions, overwrite=overwrite, progress=progress,
        cache_dir=cache_dir,
    )
