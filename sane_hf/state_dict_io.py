"""A state_dict as safetensors bytes and back, keeping its key order (no pickle).

Zoo rows store each checkpoint's weights this way (the ``weights`` column). safetensors sorts the
keys of what it writes, so :func:`state_dict_to_bytes` records the original order in the header
metadata and :func:`state_dict_from_bytes` restores it: a model's ``state_dict()`` order comes
back, which the :class:`~sane_hf.tokenization_sane.WeightTokenizer` relies on.

This module travels to the Hub as remote code with ``embedding.py`` and ``sampling.py`` (they
import it relatively), so it imports only the standard library, torch and safetensors.

>>> import torch
>>> sd = {"b": torch.zeros(2), "a": torch.ones(3)}
>>> list(state_dict_from_bytes(state_dict_to_bytes(sd)))
['b', 'a']
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping

import torch

__all__ = ["KEY_ORDER_METADATA", "state_dict_to_bytes", "state_dict_from_bytes", "safetensors_metadata"]

#: the header metadata entry holding the original key order (a JSON list)
KEY_ORDER_METADATA = "sane_hf.key_order"


def state_dict_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state_dict with safetensors (no pickle); the key order is kept in the metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a torch.Tensor")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    return save(tensors, metadata={KEY_ORDER_METADATA: json.dumps(list(tensors))})


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (``{}`` when there is none)."""
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, then the JSON header
    return json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}


def state_dict_from_bytes(data: bytes) -> OrderedDict[str, torch.Tensor]:
    """Inverse of :func:`state_dict_to_bytes` (plain safetensors bytes work too, in safetensors' own key order)."""
    from safetensors.torch import load

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected safetensors bytes, got {type(data).__name__}")
    data = bytes(data)
    tensors = load(data)  # validates the header
    meta = safetensors_metadata(data)
    order = json.loads(meta[KEY_ORDER_METADATA]) if KEY_ORDER_METADATA in meta else list(tensors)
    return OrderedDict((k, tensors[k]) for k in order)
