"""Reading checkpoint files as tensors (never a full unpickle), and comparing their keys and shapes."""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sane_hf.serialization import check_safetensors_header
from sane_hf.state_dict_io import state_dict_from_bytes

__all__ = ["CHECKPOINT_SUFFIXES", "load_checkpoint_file"]

#: The checkpoint files an importer reads.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


def _extract_state_dict(obj: Any, where: str) -> OrderedDict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return OrderedDict((str(k), v) for k, v in obj.items())
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return OrderedDict((str(k), v) for k, v in inner.items())
    raise ValueError(
        f"{where} does not hold a state_dict (a mapping of names to tensors, or one under "
        "'state_dict' / 'model_state_dict' / 'model')"
    )


def load_checkpoint_file(path: str | os.PathLike) -> OrderedDict[str, torch.Tensor]:
    """A state_dict from ``*.safetensors`` or a torch file read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors_header(path)
        # key order: as recorded by state_dict_to_bytes, else the file's (safetensors sorts keys)
        try:
            return state_dict_from_bytes(path.read_bytes())
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot read {path} ({err}); it is truncated or not a safetensors file") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle errors come in many types
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True) ({err}); only tensors and plain "
            "containers are loaded, never arbitrary pickled objects — re-save it as a state_dict or safetensors"
        ) from err
    return _extract_state_dict(obj, str(path))


def _signature_of_file(path: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Keys and shapes (sorted by key) of a checkpoint file; safetensors: header only."""
    if path.suffix == ".safetensors":
        check_safetensors_header(path)  # a header claiming 2**62 bytes would otherwise be read into memory
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        return tuple(sorted((k, tuple(v["shape"])) for k, v in header.items()))
    sd = load_checkpoint_file(path)
    return tuple(sorted((k, tuple(v.shape)) for k, v in sd.items()))


def _describe_difference(a: Sequence[tuple[str, tuple[int, ...]]], b: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    da, db = dict(a), dict(b)
    parts = []
    only_a = sorted(set(da) - set(db))
    only_b = sorted(set(db) - set(da))
    if only_a:
        parts.append(f"missing keys {only_a[:3]}")
    if only_b:
        parts.append(f"extra keys {only_b[:3]}")
    shapes = [f"{k}: {db[k]} vs {da[k]}" for k in sorted(set(da) & set(db)) if da[k] != db[k]]
    if shapes:
        parts.append("shapes " + "; ".join(shapes[:3]))
    return ", ".join(parts)
