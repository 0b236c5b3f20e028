"""The ``modelzoos`` format: the Model Zoos layout (Schürholt et al. 2022), see :mod:`sane_hf.zoo.importers`."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict

from sane_hf.zoo.importers.checkpoints import load_checkpoint_file
from sane_hf.zoo.importers.common import _columns_from, _resolve_user_code, _run_import, _units

__all__ = ["MODELZOOS_PARAMS", "import_modelzoos"]

#: Model Zoos ``params.json`` key → zoo column
MODELZOOS_PARAMS: dict[str, str] = {
    "seed": "seed",
    "optim::lr": "lr",
    "optim::wd": "weight_decay",
    "optim::optimizer": "optimizer",
    "model::nlin": "activation",
    "model::init_type": "init",
    "model::dropout": "dropout",
    "training::batchsize": "batch_size",
    "model::type": "arch",
}
#: result line key(s) → zoo column (first present wins)
_RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "train_acc": ("train_acc", "train_accuracy"),
    "val_acc": ("val_acc", "validation_acc", "val_accuracy"),
    "test_acc": ("test_acc", "test_accuracy"),
    "train_loss": ("train_loss",),
    "test_loss": ("test_loss",),
}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}::{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _read_result_lines(path: Path) -> dict[int, dict[str, Any]]:
    """``{epoch: result line}`` from a Model Zoos ``result.json`` (JSON lines)."""
    out: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            warnings.warn(f"{path}:{n}: unreadable result line skipped ({err})", stacklevel=3)
            continue
        epoch = rec.get("epoch", rec.get("training_iteration"))
        if epoch is None:
            continue
        out[int(epoch)] = rec
    return out


_CKPT_DIR = re.compile(r"^checkpoint_(\d+)$")


def import_modelzoos(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str | None = None,
    task: str | Callable[[], Any] = "unknown",
    build: Callable[..., torch.nn.Module] | None = None,
    checkpoint_file: str = "checkpoints",
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Import a zoo in the Model Zoos layout (see :mod:`sane_hf.zoo.importers` for the mapping).

    Args:
        src: folder whose sub-folders (at any depth) are trials with a ``params.json``.
        arch: architecture name for every row; default ``params["model::type"]`` or ``"unknown"``; or
            your ``"module:callable"`` (see :func:`import_folder` and :mod:`sane_hf.zoo.custom`).
        task: task name for every row, or your ``"module:callable"`` / callable.
        build: your architecture callable itself.
        checkpoint_file: file name inside ``checkpoint_<epoch>/``.
    """
    src = Path(src)
    trials = sorted(p.parent for p in src.rglob("params.json")) if src.is_dir() else []
    first_params = _flatten(json.loads((trials[0] / "params.json").read_text())) if trials else {}
    user = _resolve_user_code(arch or str(first_params.get("model::type", "unknown")), build, task, seed=seed)

    params_columns = {col: key for key, col in MODELZOOS_PARAMS.items() if col != "arch"}

    def convert(trial: Path) -> list[dict[str, Any]]:
        hp = _columns_from(_flatten(json.loads((trial / "params.json").read_text())), params_columns)
        results = _read_result_lines(trial / "result.json")
        ckpts = []
        for d in trial.iterdir():
            m = _CKPT_DIR.match(d.name)
            if d.is_dir() and m and (d / checkpoint_file).exists():
                ckpts.append((int(m.group(1)), d / checkpoint_file))
        out = [
            {**hp, "epoch": epoch, **_columns_from(results.get(epoch, {}), _RESULT_KEYS),
             "state_dict": load_checkpoint_file(path)}
            for epoch, path in sorted(ckpts)
        ]  # fmt: skip
        if not out:
            warnings.warn(f"{trial}: no checkpoint_<epoch>/{checkpoint_file} found", stacklevel=3)
        return out

    return _run_import(
        "modelzoos", src, Path(out_dir), _units([(str(t.relative_to(src)), t) for t in trials], convert),
        options={"checkpoint_file": checkpoint_file},
        user=user, seed=seed, split_fractions=split_fractions, overwrite=overwrite, progress=progress,
        cache_dir=cache_dir,
    )
