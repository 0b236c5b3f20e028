"""Training data: windows (absolute positions, per-sample offsets), augmentations, permutation views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sane_hf.alignment import permutation_spec
from sane_hf.data import (
    Augmentation,
    EpochSampler,
    PermutationBank,
    ZooWindowDataset,
    collate_windows,
    token_shape,
)
from sane_hf.tokenization_sane import WeightTokenizer, WeightTokens
from sane_hf.zoo.architectures import permutation_spec_for_arch
from sane_hf.zoo.dataset import (
    fit_tokenizer_on_zoo,
    load_zoo_config,
    state_dict_from_bytes,
    tokenize_zoo,
    zoo_model,
)

TOKEN_SIZE = 16


@pytest.fixture(scope="module")
def prepared(zoo_dir, tmp_path_factory):
    from sane_hf.zoo.dataset import load_zoo

    zoo = load_zoo(zoo_dir, cache_dir=str(tmp_path_factory.getbasetemp() / "hf-cache"))
    tokenizer = fit_tokenizer_on_zoo(zoo, token_size=TOKEN_SIZE)
    tokenized = tokenize_zoo(zoo, tokenizer)
    config = load_zoo_config(zoo_dir)
    spec = permutation_spec_for_arch(config.arch, **config.model_kwargs())
    bank = PermutationBank.build(tokenizer, spec, num_permutations=4, seed=0)
    return zoo, tokenized, tokenizer, config, bank


def _outputs(config, row, state_dict, x):
    module = zoo_model(config, row)
    module.load_state_dict(state_dict)
    with torch.no_grad():
        return module.eval()(x)


def test_bank_permutations_preserve_function(prepared):
    zoo, _, tokenizer, config, bank = prepared
    row = zoo["train"][len(zoo["train"]) - 1]
    tokens = tokenizer.encode(state_dict_from_bytes(row["weights"]), normalize=True)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = _outputs(config, row, tokenizer.decode(tokens), x)
    assert len(bank) == 4 and bank.index_maps.dtype == np.int32
    for which in range(len(bank)):
        permuted = bank.permute(tokens.tokens, which)
        assert not torch.equal(permuted, tokens.tokens)  # the weights moved...
        assert torch.equal(permuted.flatten().sort().values, tokens.tokens.flatten().sort().values)  # same values
        decoded = tokenizer.decode(WeightTokens(permuted, tokens.positions, tokens.mask, normalized=True))
        torch.testing.assert_close(_outputs(config, row, decoded, x), reference, atol=1e-5, rtol=1e-5)  # ...same function


def test_bank_index_split_for_large_models(prepared, monkeypatch):
    """Models beyond 2^24 parameters encode indices in two exact float32 parts: same maps."""
    import sane_hf.data as data_module

    _, _, tokenizer, config, bank = prepared
    spec = permutation_spec_for_arch(config.arch, **config.model_kwargs())
    monkeypatch.setattr(data_module, "_EXACT_FLOAT_IDS", 16)
    split = PermutationBank.build(tokenizer, spec, num_permutations=4, seed=0)
    assert np.array_equal(split.index_maps, bank.index_maps)


def test_bank_on_a_resnet_with_batchnorm(resnet18):
    tokenizer = WeightTokenizer.from_reference(resnet18, token_size=32)
    spec = permutation_spec(resnet18, torch.zeros(2, 3, 16, 16))
    bank = PermutationBank.build(tokenizer, spec, num_permutations=2, seed=1)
    tokens = tokenizer.encode(resnet18.state_dict())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = resnet18(x)
        for which in range(2):
            permuted = bank.permute(tokens.tokens, which)
            assert not torch.equal(permuted, tokens.tokens)
            resnet18.load_state_dict(tokenizer.decode(WeightTokens(permuted, tokens.positions, tokens.mask)))
            torch.testing.assert_close(resnet18(x), reference, atol=1e-5, rtol=1e-4)


def test_permuted_view_of_a_sample_decodes_to_the_same_function(prepared):
    """A dataset item's second view (a full-length window) is a function-preserving permutation."""
    zoo, tokenized, tokenizer, config, bank = prepared
    n, d = token_shape(tokenized["train"])
    ds = ZooWindowDataset(tokenized["train"], window_size=n, windows_per_sample=2,
                          augmentation=Augmentation(noise_std=0.0, erase_prob=0.0), bank=bank, seed=3)  # fmt: skip
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    rows = tokenized["train"].with_format("torch", columns=["tokens"])
    permuted_seen = 0
    for index in range(4):
        item = ds[index]
        row = zoo["train"][item["sample_index"]]
        assert item["window_start"] == 0
        reference = _outputs(config, row, state_dict_from_bytes(row["weights"]), x)
        for view in ("tokens", "tokens_2"):
            label = "labels" if view == "tokens" else "labels_2"
            assert torch.equal(item[view], item[label])  # no noise/erasing: the view is its own target
            decoded = tokenizer.decode(WeightTokens(item[view], item["positions"].int(), item["mask"], normalized=True))
            torch.testing.assert_close(_outputs(config, row, decoded, x), reference, atol=1e-5, rtol=1e-5)
            clean = rows[item["sample_index"]]["tokens"]
            permuted_seen += not torch.equal(item[view], clean)
    assert permuted_seen >= 6  # views are permuted (the identity is never drawn with permutation_prob=1)


def test_windows_have_absolute_positions_and_their_own_offsets(prepared):
    _, tokenized, _, _, _ = prepared
    split = tokenized["train"]
    n, d = token_shape(split)
    window, per_sample = 16, 8
    ds = ZooWindowDataset(split, window, per_sample, Augmentation.none(), bank=None, two_views=False, seed=0)
    assert len(ds) == len(split) * per_sample
    rows = split.with_format("torch", columns=["tokens", "positions", "mask"])
    starts: dict[int, set[int]] = {}
    for index in range(3 * per_sample):
        item = ds[index]
        row, start = item["sample_index"], item["window_start"]
        assert row == index // per_sample and 0 <= start <= n - window
        full = rows[row]
        assert torch.equal(item["positions"], full["positions"][start : start + window].long())
        assert torch.equal(item["positions"][:, 0], torch.arange(start, start + window))  # n is the global index
        assert torch.equal(item["tokens"], full["tokens"][start : start + window])
        assert torch.equal(item["mask"], full["mask"][start : start + window])
        assert "tokens_2" not in item
        starts.setdefault(row, set()).add(start)
    assert all(len(s) > 1 for s in starts.values())  # each window draws its own offset
    # a pure function of (seed, epoch, index): reproducible, and new windows each epoch
    again = ZooWindowDataset(split, window, per_sample, Augmentation.none(), two_views=False, seed=0)
    assert all(again[i]["window_start"] == ds[i]["window_start"] for i in range(8))
    before = [ds[i]["window_start"] for i in range(16)]
    ds.set_epoch(1)
    assert [ds[i]["window_start"] for i in range(16)] != before


def test_noise_and_erasing(prepared):
    _, tokenized, _, _, bank = prepared
    split = tokenized["train"]
    ds = ZooWindowDataset(split, 32, 4, Augmentation(noise_std=0.1, erase_prob=1.0), bank=bank, seed=0)
    for index in range(6):
        item = ds[index]
        for view, label in (("tokens", "labels"), ("tokens_2", "labels_2")):
            v, target = item[view], item[label]
            assert torch.all(v[~item["mask"]] == 0) and torch.all(target[~item["mask"]] == 0)  # padding stays 0
            erased = (v == 0) & (target != 0)
            assert erased.any()  # a rectangle was erased (erase_prob=1)
            ratio = v[~erased & (target != 0)] / target[~erased & (target != 0)]
            assert 0.0 < (ratio - 1).abs().mean() < 0.5  # multiplicative noise, ~N(1, 0.1)
    # clean_first_view: view 1 is the untouched window (validation)
    clean = ZooWindowDataset(split, 32, 4, Augmentation(noise_std=0.1, erase_prob=1.0), bank=bank, clean_first_view=True)
    item = clean[0]
    full = split.with_format("torch", columns=["tokens"])[item["sample_index"]]["tokens"]
    assert torch.equal(item["tokens"], full[item["window_start"] : item["window_start"] + 32])
    assert not torch.equal(item["tokens_2"], item["tokens"])


def test_collate_stacks_and_pads():
    def item(length: int) -> dict:
        return {"tokens": torch.ones(length, 4), "positions": torch.zeros(length, 3, dtype=torch.long),
                "mask": torch.ones(length, 4, dtype=torch.bool), "sample_index": 0, "window_start": 0}  # fmt: skip

    batch = collate_windows([item(5), item(5)])
    assert batch["tokens"].shape == (2, 5, 4) and "attention_mask" not in batch
    padded = collate_windows([item(5), item(3)])
    assert padded["tokens"].shape == (2, 5, 4)
    assert padded["attention_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert not padded["mask"][1, 3:].any() and padded["sample_index"].tolist() == [0, 0]


def test_epoch_sampler_is_reproducible():
    s = EpochSampler(10, seed=1)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(EpochSampler(10, seed=1)) == first
    s.set_epoch(1)
    assert list(s) != first
    assert list(EpochSampler(4, shuffle=False)) == [0, 1, 2, 3]


def test_reads_memory_mapped_rows_without_copies(prepared):
    _, tokenized, _, _, _ = prepared
    split = tokenized["train"]
    assert split.cache_files  # on disk, memory-mapped
    ds = ZooWindowDataset(split, 16, 1, Augmentation.none(), two_views=False)
    flat = ds._tokens.flat(0)
    assert not flat.flags.owndata and flat.shape == (split.features["tokens"].shape[0] * TOKEN_SIZE,)


def test_in_memory_multi_chunk_and_shuffled_splits_give_the_same_windows(prepared):
    import datasets

    _, tokenized, _, _, _ = prepared
    split = tokenized["train"].select_columns(["tokens", "positions", "mask"])
    parts = datasets.concatenate_datasets([split.select(range(5)), split.select(range(5, len(split)))])
    in_memory = datasets.Dataset.from_dict(split.to_dict(), features=split.features)
    order = list(range(len(split)))[::-1]
    shuffled = split.select(order)  # an indices mapping
    make = lambda ds: ZooWindowDataset(ds, 16, 2, Augmentation.none(), two_views=False, seed=0)  # noqa: E731
    reference = make(split)
    for other in (make(parts), make(in_memory)):
        for i in range(len(reference)):
            assert torch.equal(other[i]["tokens"], reference[i]["tokens"])
    flipped = make(shuffled)
    for i in range(4):
        row = order[flipped[i]["sample_index"]]
        full = split.with_format("torch")[row]["tokens"]
        start = flipped[i]["window_start"]
        assert torch.equal(flipped[i]["tokens"], full[start : start + 16])


def test_bad_inputs(prepared):
    zoo, tokenized, tokenizer, config, _ = prepared
    n, _ = token_shape(tokenized["train"])
    with pytest.raises(ValueError, match=rf"window_size {n + 1} is larger than the sequences.*{n} tokens"):
        ZooWindowDataset(tokenized["train"], n + 1)
    with pytest.raises(ValueError, match="empty"):
        ZooWindowDataset(tokenized["train"].select([]), 8)
    with pytest.raises(ValueError, match="not tokenized.*tokenize_zoo"):
        ZooWindowDataset(zoo["train"], 8)
    other = WeightTokenizer.from_reference(state_dict_from_bytes(zoo["train"][0]["weights"]), token_size=8)
    spec = permutation_spec_for_arch(config.arch, **config.model_kwargs())
    with pytest.raises(ValueError, match="permutation bank"):
        ZooWindowDataset(tokenized["train"], 8, bank=PermutationBank.build(other, spec, 1))
    mlp_spec = permutation_spec_for_arch("mlp", **config.model_kwargs())
    with pytest.raises(ValueError, match="spec does not fit"):
        PermutationBank.build(tokenizer, mlp_spec, 1)
    with pytest.raises(ValueError, match="noise_std"):
        Augmentation(noise_std=-1)
