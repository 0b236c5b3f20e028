"""SaneConfig / SaneModel: shapes, losses, attention paths, save/load, remote code, checkpointing."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from helpers import run_python
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel

from sane_hf.configuration_sane import SaneConfig
from sane_hf.modeling_sane import (
    SaneDecoderOutput,
    SaneEncoderOutput,
    SaneModel,
    SaneOutput,
    masked_mse,
    nt_xent,
)

TOKEN_SIZE, LATENT_DIM, PROJECTION_DIM = 8, 8, 16


def tiny_config(**overrides) -> SaneConfig:
    kwargs = dict(
        token_size=TOKEN_SIZE, d_model=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
        latent_dim=LATENT_DIM, projection_dim=PROJECTION_DIM, dropout=0.0, max_positions=(1000, 16, 32),
        window_size=16, halo_size=2,
    )
    kwargs.update(overrides)
    return SaneConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> SaneModel:
    torch.manual_seed(seed)
    return SaneModel(tiny_config(**overrides)).eval()


def make_inputs(batch: int = 3, tokens: int = 10, pad_tokens: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch: the last `pad_tokens` tokens of item 0 are window padding; every token has 2 padded values."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, TOKEN_SIZE, dtype=torch.bool)
    mask[:, :, -2:] = False  # rows shorter than the token size
    attention_mask = torch.ones(batch, tokens, dtype=torch.bool)
    if pad_tokens:
        attention_mask[0, -pad_tokens:] = False
        mask[0, -pad_tokens:] = False
    values = torch.randn(batch, tokens, TOKEN_SIZE, generator=g) * mask
    n = torch.arange(tokens) + 5
    positions = torch.stack([n, n // 4, n % 4], dim=-1).expand(batch, tokens, 3).to(torch.int32)
    return {"tokens": values, "positions": positions, "mask": mask, "attention_mask": attention_mask}


# ------------------------------------------------------------------------------------- config


def test_config_defaults_and_docstring_example():
    config = SaneConfig(token_size=16, d_model=32, latent_dim=8)
    assert config.model_type == "sane" and config.max_positions == (100_000, 512, 4096)
    default = SaneConfig()
    assert default.d_model % default.num_heads == 0 and 2 * default.halo_size < default.window_size
    for field in ("token_size", "d_model", "num_encoder_layers", "num_decoder_layers", "num_heads", "mlp_ratio",
                  "latent_dim", "dropout", "max_positions", "position_encoding", "projection_dim", "gamma",
                  "temperature", "window_size", "halo_size"):
        assert f"{field} (`" in SaneConfig.__doc__, field


@pytest.mark.parametrize(
    "overrides",
    [
        {"d_model": 30},                     # not divisible by num_heads
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"gamma": 1.5},
        {"gamma": -0.1},
        {"temperature": 0.0},
        {"d_model": "32"},                   # wrong type
        {"num_heads": 4.0},                  # wrong type
        {"max_positions": (1000, 16)},       # one size per axis
        {"max_positions": (1000, 16, 32, 8)},
        {"max_positions": (1000, 0, 32)},
        {"halo_size": 8, "window_size": 16},  # window keeps no token
        {"latent_dim": 0},
        {"position_encoding": "rope"},
    ],
)
def test_invalid_config_raises(overrides):
    with pytest.raises(StrictDataclassError):
        tiny_config(**overrides)


def test_docstring_examples_run():
    import doctest

    import sane_hf.configuration_sane
    import sane_hf.modeling_sane

    for module in (sane_hf.configuration_sane, sane_hf.modeling_sane):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_config_json_roundtrip(tmp_path):
    config = tiny_config(gamma=0.2)
    config.save_pretrained(tmp_path)
    loaded = SaneConfig.from_pretrained(tmp_path)
    assert loaded.max_positions == (1000, 16, 32) and loaded.gamma == 0.2
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoConfig"] == "configuration_sane.SaneConfig"


# -------------------------------------------------------------------------------------- shapes


def test_output_shapes():
    model = tiny_model()
    x = make_inputs()
    b, t = x["tokens"].shape[:2]
    enc = model.encode(x["tokens"], x["positions"], x["attention_mask"])
    assert isinstance(enc, SaneEncoderOutput) and enc.latents.shape == (b, t, LATENT_DIM)
    assert enc.last_hidden_state.shape == (b, t, 32)
    dec = model.decode(enc.latents, x["positions"], x["attention_mask"])
    assert isinstance(dec, SaneDecoderOutput) and dec.reconstruction.shape == (b, t, TOKEN_SIZE)
    assert model.embed(**x).shape == (b, LATENT_DIM)

    single = model(**x)
    assert isinstance(single, SaneOutput) and single.contrastive_loss is None
    assert single.loss.shape == () and torch.equal(single.loss, single.reconstruction_loss)
    assert single.latents.shape == (b, t, LATENT_DIM) and single.reconstruction.shape == (b, t, TOKEN_SIZE)
    assert single.projections.shape == (b, PROJECTION_DIM) and single.latents_2 is None

    double = model(**x, tokens_2=x["tokens"] * 1.1)
    assert double.contrastive_loss.shape == () and double.projections_2.shape == (b, PROJECTION_DIM)
    assert double.latents_2.shape == (b, t, LATENT_DIM) and double.reconstruction_2.shape == (b, t, TOKEN_SIZE)


def test_loss_composition_two_views():
    model = tiny_model(gamma=0.3)
    x = make_inputs()
    x2 = {"tokens_2": x["tokens"] + 0.1, "labels": x["tokens"], "labels_2": x["tokens"]}
    out = model(**x, **x2)
    value_mask = x["mask"] & x["attention_mask"][..., None]
    rec1 = masked_mse(out.reconstruction, x["tokens"], value_mask)
    rec2 = masked_mse(out.reconstruction_2, x["tokens"], value_mask)
    torch.testing.assert_close(out.reconstruction_loss, (rec1 + rec2) / 2)
    torch.testing.assert_close(out.contrastive_loss, nt_xent(out.projections, out.projections_2, 0.1))
    torch.testing.assert_close(out.loss, 0.3 * out.contrastive_loss + 0.7 * out.reconstruction_loss)
    # labels are the targets: a noisy input reconstructed against clean labels differs from the default target
    assert not torch.allclose(model(**x, labels=x["tokens"] + 1).loss, model(**x).loss)


def test_batch_of_one_skips_contrastive():
    model = tiny_model()
    x = {k: v[1:2] for k, v in make_inputs().items()}
    out = model(**x, tokens_2=x["tokens"] * 0.9)
    assert out.contrastive_loss is None and torch.equal(out.loss, out.reconstruction_loss)


# -------------------------------------------------------------------------------------- losses


def test_masked_mse_hand_computed():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[True, False], [True, True]]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((1 + 9 + 16) / 3)
    assert masked_mse(pred, target, None).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    empty = masked_mse(pred.requires_grad_(), target, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_reconstruction_loss_ignores_padding():
    model = tiny_model()
    x = make_inputs()
    base = model(**x).loss
    garbage = x["tokens"].clone()
    garbage[~x["mask"]] = 1e3  # padded values, including whole padded tokens (also masked from attention)
    assert torch.allclose(model(**{**x, "tokens": garbage, "labels": garbage}).loss, base, atol=1e-5)


def test_nt_xent_hand_computed():
    z1 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 1.0]])
    z2 = torch.tensor([[0.9, 0.1], [0.0, 1.0], [-0.5, 0.2]])
    temperature = 0.5
    z = [list(map(float, v)) for v in torch.cat([z1, z2])]
    z = [[c / math.sqrt(sum(e * e for e in v)) for c in v] for v in z]
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        positive = (i + b) % n
        sims = {k: sum(p * q for p, q in zip(z[i], z[k])) / temperature for k in range(n) if k != i}
        total += -sims[positive] + math.log(sum(math.exp(s) for s in sims.values()))
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(total / n, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(z1[:1], z2[:1], temperature)


# ------------------------------------------------------------------------------------ training


def test_loss_falls_when_overfitting_four_windows():
    torch.manual_seed(0)
    model = SaneModel(tiny_config(gamma=0.05)).train()
    x = make_inputs(batch=4, tokens=8, pad_tokens=2, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        out = model(**x, tokens_2=x["tokens"] + 0.01 * torch.randn_like(x["tokens"]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.reconstruction_loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::20]


def test_gradient_checkpointing_gives_same_gradients():
    x = make_inputs()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
        model(**x, tokens_2=x["tokens"] * 0.9).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------- attention


def test_eager_and_sdpa_agree_with_padding():
    x = make_inputs(pad_tokens=4)
    sdpa = tiny_model()
    eager = tiny_model()
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    out_s, out_e = sdpa(**x, tokens_2=x["tokens"] * 0.5), eager(**x, tokens_2=x["tokens"] * 0.5)
    for field in ("loss", "latents", "reconstruction", "projections", "reconstruction_2"):
        torch.testing.assert_close(out_s[field], out_e[field], atol=1e-5, rtol=1e-4, msg=field)
    # padded keys are really masked: changing padded tokens leaves the real tokens' latents unchanged
    moved = x["tokens"].clone()
    moved[0, -4:] = 5.0
    for model in (sdpa, eager):
        a = model.encode(x["tokens"], x["positions"], x["attention_mask"]).latents[0, :-4]
        b = model.encode(moved, x["positions"], x["attention_mask"]).latents[0, :-4]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_is_the_reference_computation_bit_for_bit(implementation):
    """eager: softmax(QK^T·d^-1/2 + mask)·V written out; sdpa: torch's kernel called directly; padded keys masked."""
    import torch.nn.functional as F

    model = tiny_model()
    model.set_attn_implementation(implementation)
    layer = model.encoder.layers[0].attention
    batch, tokens, heads, head_dim = 2, 6, layer.num_heads, layer.head_dim
    hidden = torch.randn(batch, tokens, heads * head_dim, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, -2:] = False
    with torch.no_grad():
        got = layer(hidden, mask)
        q, k, v = layer.qkv(hidden).view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        additive = torch.zeros(batch, 1, 1, tokens).masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
        if implementation == "eager":
            ref = torch.softmax(q @ k.transpose(-2, -1) * head_dim**-0.5 + additive, dim=-1) @ v
        else:
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=head_dim**-0.5)
        ref = layer.out_proj(ref.transpose(1, 2).reshape(batch, tokens, -1))
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------- positions


def test_no_position_axis_is_capped():
    # a BERT-size word embedding has 30,522 rows: row indices far beyond max_positions are encoded, not rejected
    model = tiny_model()
    x = make_inputs()
    far = x["positions"].clone()
    far[..., 1] += 600
    far[..., 2] += 30_000
    latents = model.encode(x["tokens"], far, x["attention_mask"]).latents
    assert torch.isfinite(latents).all()
    assert not torch.allclose(latents, model.encode(x["tokens"], x["positions"], x["attention_mask"]).latents)


def test_negative_positions_raise_naming_axis():
    model = tiny_model()
    x = make_inputs()
    for axis, name in ((0, "global token index"), (1, "layer index"), (2, "row index")):
        positions = x["positions"].clone()
        positions[0, 0, axis] = -1
        with pytest.raises(ValueError, match=name):
            model.encode(x["tokens"], positions)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_position_embedding_starts_at_the_scale_of_the_content(stack):
    # an unscaled sinusoid was measured at ~7x (encoder) and ~65x (decoder) the projected content at init;
    # with unit-variance inputs the position code must start within 2x of the content, either way
    torch.manual_seed(0)
    config = SaneConfig(token_size=64, d_model=64, latent_dim=16, num_encoder_layers=2, num_decoder_layers=2,
                        window_size=54, halo_size=0)
    model = SaneModel(config)
    module = getattr(model, stack)
    width = config.token_size if stack == "encoder" else config.latent_dim
    inputs = torch.randn(8, 54, width)
    n = torch.arange(54)
    positions = torch.stack([n, n // 11, n % 11], -1).expand(8, 54, 3)
    with torch.no_grad():
        content = module.input_proj(inputs).pow(2).mean().sqrt()
        position = module.embed_positions(positions).pow(2).mean().sqrt()
    assert 0.5 <= float(position / content) <= 2.0, (float(position), float(content))


def test_position_parameters_do_not_grow_with_the_zoo():
    # no per-index tables: the position code holds 3·d_model² weights per stack whatever max_positions says
    small = tiny_model(max_positions=(1000, 16, 32))
    large = tiny_model(max_positions=(100_000, 4096, 100_000))
    count = sum(p.numel() for p in small.encoder.embed_positions.parameters())
    assert count == 3 * 32 * 32
    assert count == sum(p.numel() for p in large.encoder.embed_positions.parameters())


def test_legacy_checkpoint_without_position_encoding_loads_with_learned_tables(tmp_path):
    # configs saved before `position_encoding` existed hold learned l/k tables: they load as "learned-tables"
    legacy = tiny_model(position_encoding="learned-tables")
    legacy.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    data = json.loads(config_file.read_text())
    del data["position_encoding"]
    config_file.write_text(json.dumps(data))
    loaded = SaneModel.from_pretrained(tmp_path).eval()
    assert loaded.config.position_encoding == "learned-tables"
    x = make_inputs()
    torch.testing.assert_close(loaded.encode(x["tokens"], x["positions"]).latents,
                               legacy.encode(x["tokens"], x["positions"]).latents)
    positions = x["positions"].clone()
    positions[0, 0, 2] = 32  # beyond the legacy row table: the error says to retrain
    with pytest.raises(ValueError, match=r"(?s)row index.*retrain"):
        loaded.encode(x["tokens"], positions)
    assert SaneConfig().position_encoding == "sinusoid-projection"  # new models never get tables


def test_unpadded_batch_gives_the_same_result_with_or_without_attention_mask():
    model = tiny_model()
    x = make_inputs(pad_tokens=0)
    all_real = torch.ones(x["tokens"].shape[:2], dtype=torch.bool)
    torch.testing.assert_close(model.encode(x["tokens"], x["positions"], all_real).latents,
                               model.encode(x["tokens"], x["positions"]).latents)


def test_global_index_is_unbounded():
    model = tiny_model()
    x = make_inputs()
    far = x["positions"].clone()
    far[..., 0] += 170_000  # a ResNet-50-sized model: beyond max_positions[0] is still encoded
    latents = model.encode(x["tokens"], far, x["attention_mask"]).latents
    assert torch.isfinite(latents).all()
    assert not torch.allclose(latents, model.encode(x["tokens"], x["positions"], x["attention_mask"]).latents)


# -------------------------------------------------------------------------------- save / load


def test_save_and_from_pretrained_identical(tmp_path):
    model = tiny_model()
    x = make_inputs()
    expected = model(**x, tokens_2=x["tokens"] * 0.5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_sane.py").exists() and (tmp_path / "configuration_sane.py").exists()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_sane.SaneConfig", "AutoModel": "modeling_sane.SaneModel"}
    for loaded in (SaneModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, SaneModel) and isinstance(AutoConfig.from_pretrained(tmp_path), SaneConfig)
        out = loaded.eval()(**x, tokens_2=x["tokens"] * 0.5)
        for field in ("loss", "latents", "reconstruction", "projections"):
            assert torch.equal(out[field], expected[field]), field


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModel

    folder = sys.argv[1]
    for kwargs in ({}, {"trust_remote_code": False}):
        try:
            AutoModel.from_pretrained(folder, **kwargs)
        except ValueError as err:
            assert "trust_remote_code" in str(err), err
        else:
            raise SystemExit("loaded custom code without trust_remote_code")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    saved = torch.load(folder + "/expected.pt", weights_only=True)
    with torch.no_grad():
        latents = model.encode(saved["tokens"], saved["positions"], saved["attention_mask"]).latents
    torch.testing.assert_close(latents, saved["latents"], atol=1e-6, rtol=1e-5)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "sane_hf" not in sys.modules, "sane_hf was imported"
    print("REMOTE-OK")
    """
)


def test_remote_code_loads_without_sane_hf(tmp_path):
    model = tiny_model()
    x = make_inputs()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    with torch.no_grad():
        latents = model.encode(x["tokens"], x["positions"], x["attention_mask"]).latents
    torch.save({**x, "latents": latents}, folder / "expected.pt")
    result = run_python(REMOTE_SCRIPT, folder, cwd=tmp_path, without_sane_hf=True, timeout=120)
    assert "REMOTE-OK" in result.stdout, result.stdout
