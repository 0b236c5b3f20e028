"""The zoo's schema: columns (:data:`ZOO_FEATURES`) and the weights as safetensors bytes, with
:class:`ZooConfig` re-exported from :mod:`sane_hf.zoo.config`. Imported by the build, load and card
code of :mod:`sane_hf.zoo`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from datasets import Features, Value

from sane_hf._version import __version__
from sane_hf.state_dict_io import state_dict_from_bytes, state_dict_to_bytes
from sane_hf.zoo.config import ZooConfig, load_zoo_config, load_zoo_summary

__all__ = [
    "SPLITS",
    "ZOO_FEATURES",
    "HPARAM_COLUMNS",
    "PROPERTY_COLUMNS",
    "NUMERIC_COLUMNS",
    "ZooConfig",
    "load_zoo_config",
    "load_zoo_summary",
    "state_dict_to_bytes",
    "state_dict_from_bytes",
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


# ---------------------------------------------------------------------------------------------
# weights <-> bytes
# ---------------------------------------------------------------------------------------------


def _is_finite_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state_dict.values() if v.is_floating_point())


def _is_finite_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def _is_unknown_value(col: str, value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return value == "unknown" or (value == -1 and ZOO_FEATURES[col].dtype.startswith("int"))


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


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
