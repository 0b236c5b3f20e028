"""State_dicts as safetensors bytes (zoo rows' ``weights``): exact round trip, key order kept everywhere they are read."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save
from torch import nn

from sane_hf.sampling import as_state_dicts
from sane_hf.state_dict_io import safetensors_metadata, state_dict_from_bytes, state_dict_to_bytes


def _unsorted_state_dict() -> dict[str, torch.Tensor]:
    lin = nn.Linear(3, 2)
    sd = {"b.weight": lin.weight, "a.bias": torch.zeros(2), "tied": lin.weight, "count": torch.tensor(7)}
    assert list(sd) != sorted(sd)  # safetensors would sort these keys
    return sd


def test_state_dict_bytes_round_trip():
    sd = _unsorted_state_dict()
    sd["a.bias"][-1] = 0.0  # trailing zero bytes at the end of the blob
    back = state_dict_from_bytes(state_dict_to_bytes(sd))
    assert list(back) == list(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype
    with pytest.raises(TypeError):
        state_dict_from_bytes("not bytes")
    with pytest.raises(TypeError, match="count"):
        state_dict_to_bytes({"count": 7})


def test_plain_safetensors_bytes_load():
    blob = save({"z": torch.ones(1), "a": torch.zeros(1)})
    assert safetensors_metadata(blob) == {}
    back = state_dict_from_bytes(memoryview(blob))
    assert sorted(back) == ["a", "z"]  # no recorded order: safetensors' own
    assert torch.equal(back["z"], torch.ones(1))


def test_sampling_prompts_from_zoo_rows_keep_key_order():
    sd = _unsorted_state_dict()
    blob = state_dict_to_bytes(sd)
    split = Dataset.from_dict({"weights": [blob, blob]})
    for prompts in (as_state_dicts({"weights": blob}), as_state_dicts(split)):
        assert [list(p) for p in prompts] == [list(sd)] * len(prompts)
