"""Model embeddings: haloed windows vs full sequences, invariances, input forms, pooling, bad inputs.

Windowing changes a token's attention context once a model is longer than ``window + 2·halo``,
so embeddings are compared across window choices only while one context covers the whole model;
across ``batch_size`` they are compared on long, many-window models (tolerance: float round-off
of differently shaped matmuls).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, DatasetDict
from torch import nn

from sane_hf.configuration_sane import SaneConfig
from sane_hf.embedding import (
    DEFAULT_POOLING,
    EmbeddingOutput,
    embed_models,
    encode_haloed,
    layer_pool,
    resolve_window,
    window_plan,
)
from sane_hf.modeling_sane import SaneModel
from sane_hf.tokenization_sane import WeightTokenizer
from sane_hf.zoo.dataset import state_dict_to_bytes, tokenize_zoo

ATOL = 1e-5


def tiny_sane(token_size: int = 8, window_size: int = 16, halo_size: int = 2, seed: int = 0) -> SaneModel:
    torch.manual_seed(seed)
    config = SaneConfig(
        token_size=token_size, d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=1, latent_dim=4,
        projection_dim=8, window_size=window_size, halo_size=halo_size, dropout=0.0,
    )
    return SaneModel(config).eval()


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # 12 tokens of 8


def long_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 10))  # 24·3 + 10·4 = 112 tokens of 8


@pytest.fixture(scope="module")
def sane() -> SaneModel:
    return tiny_sane()


@pytest.fixture(scope="module")
def nets() -> list[nn.Module]:
    return [small_net(s) for s in range(4)]


@pytest.fixture(scope="module")
def tok(nets) -> WeightTokenizer:
    return WeightTokenizer.from_reference(nets[0], token_size=8).fit(nets)


@pytest.fixture(scope="module")
def long_nets() -> list[nn.Module]:
    return [long_net(s) for s in range(3)]


@pytest.fixture(scope="module")
def long_tok(long_nets) -> WeightTokenizer:
    return WeightTokenizer.from_reference(long_nets[0], token_size=8).fit(long_nets)


def full_latents(model: SaneModel, tok: WeightTokenizer, net: nn.Module) -> torch.Tensor:
    wt = tok.encode(net, normalize=True)
    with torch.no_grad():
        return model.encode(wt.tokens[None], wt.positions[None]).latents[0]  # (N, latent)


# --- haloed windows vs the full sequence ----------------------------------------------------------


def test_one_window_equals_full_sequence(sane, tok, nets):
    assert tok.num_tokens == 12 and resolve_window(sane.config) == (12, 2)
    out = embed_models(sane, tok, nets, return_token_latents=True, pooling="mean")
    assert isinstance(out, EmbeddingOutput)
    assert out.embeddings.shape == (4, 4) and out.token_latents.shape == (4, 12, 4)
    for i, net in enumerate(nets):
        full = full_latents(sane, tok, net)
        torch.testing.assert_close(out.token_latents[i], full, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.embeddings[i], full.mean(0), atol=ATOL, rtol=0)
        wt = tok.encode(net, normalize=True)
        with torch.no_grad():  # the model's own pooled embedding of one window agrees
            torch.testing.assert_close(out.embeddings[i], sane.embed(wt.tokens[None], wt.positions[None])[0], atol=ATOL,
                                       rtol=0)


@pytest.mark.parametrize("window,halo", [(12, 0), (4, 4), (5, 5), (1, 6), (3, 9), (100, 0)])
def test_window_choice_is_invariant_while_context_covers_model(sane, tok, nets, window, halo):
    assert tok.num_tokens <= window + 2 * halo  # every forward pass sees the whole model
    out = embed_models(sane, tok, nets[:2], window=window, halo=halo, return_token_latents=True)
    for i in range(2):
        torch.testing.assert_close(out.token_latents[i], full_latents(sane, tok, nets[i]), atol=ATOL, rtol=0)


def test_long_model_matches_encode_haloed_and_is_batch_size_invariant(sane, long_tok, long_nets):
    window, halo = 10, 3
    assert len(window_plan(long_tok.num_tokens, window, halo)) == 12  # many windows per model
    ref = None
    for batch_size in (1, 5, 64):
        out = embed_models(sane, long_tok, long_nets, window=window, halo=halo, batch_size=batch_size,
                           return_token_latents=True)
        if ref is None:
            ref = out
            for i, net in enumerate(long_nets):  # windows of several models batched together = one model at a time
                wt = long_tok.encode(net, normalize=True)
                expected = encode_haloed(sane, wt.tokens, wt.positions, window=window, halo=halo)
                torch.testing.assert_close(out.token_latents[i], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.token_latents, ref.token_latents, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.embeddings, ref.embeddings, atol=ATOL, rtol=0)
    # windowing with a short context differs from the full sequence: that is why it is documented
    full = full_latents(sane, long_tok, long_nets[0])
    assert not torch.allclose(ref.token_latents[0], full, atol=ATOL)


def test_default_window_keeps_forward_passes_at_window_size(long_tok, long_nets):
    model = tiny_sane(window_size=16, halo_size=4)
    seen = []
    original = model.encode

    def spy(tokens, positions, attention_mask=None):
        seen.append(tokens.shape[1])
        return original(tokens, positions, attention_mask=attention_mask)

    model.encode = spy
    embed_models(model, long_tok, long_nets[:1])
    assert set(seen) == {16}  # content 8 + halo 4 on each side = the training window length


# --- inputs, pooling, streaming ---------------------------------------------------------------------


def test_all_input_forms_agree(sane, tok, nets):
    ref = embed_models(sane, tok, nets).embeddings
    raw = tok.encode_batch(nets)  # raw tokens are normalised by embed_models
    normed = tok.encode_batch(nets, normalize=True)
    rows = [{"model_id": i, "weights": state_dict_to_bytes(n.state_dict())} for i, n in enumerate(nets)]
    ds = Dataset.from_list(rows)
    tokenized = tokenize_zoo(ds, tok, normalize=True, keep_weights=False)
    forms = {
        "state_dicts": [n.state_dict() for n in nets],
        "generator": (n for n in nets),
        "raw WeightTokens batch": raw,
        "normalised WeightTokens list": normed.unbind(),
        "zoo rows": rows,
        "raw zoo split": ds,
        "tokenized zoo split": tokenized,
    }
    for name, inputs in forms.items():
        got = embed_models(sane, tok, inputs, batch_size=3).embeddings
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(embed_models(sane, None, normed).embeddings, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(embed_models(sane, tok, nets[1]).embeddings, ref[1:2], atol=ATOL, rtol=0)


def test_pooling_modes(sane, tok, nets):
    out = embed_models(sane, tok, nets, return_token_latents=True)
    lat = out.token_latents
    assert torch.allclose(embed_models(sane, tok, nets, pooling="max").embeddings, lat.amax(1), atol=ATOL)
    flat = embed_models(sane, tok, nets, pooling="flatten").embeddings
    assert flat.shape == (4, 12 * 4) and torch.allclose(flat, lat.reshape(4, -1), atol=ATOL)
    assert torch.equal(embed_models(sane, tok, nets, pooling="none").embeddings, flat)
    assert out["embeddings"] is out.embeddings  # a transformers ModelOutput


def test_layer_pool_hand_computed():
    # two models, 4 tokens in layers [0, 0, 1, 2], latents of size 2
    latents = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [5.0, -1.0], [0.0, 0.0]],
                            [[0.0, 0.0], [2.0, 2.0], [1.0, 1.0], [4.0, 8.0]]])
    layer_ids = torch.tensor([0, 0, 1, 2])
    expected = torch.tensor([
        # layer 0: mean, std (population)     layer 1 (one token): mean, std 0      layer 2
        [2.0, 4.0, 1.0, 2.0, 5.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 4.0, 8.0, 0.0, 0.0],
    ])
    torch.testing.assert_close(layer_pool(latents, layer_ids), expected)
    # padding tokens are left out: masking token 1 leaves layer 0 with token 0 alone
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]])
    got = layer_pool(latents, layer_ids, mask)
    torch.testing.assert_close(got[0, :4], torch.tensor([1.0, 2.0, 0.0, 0.0]))
    torch.testing.assert_close(got[1], expected[1])


def test_layer_pooling_is_the_default_and_invariant_to_token_order_within_a_layer(sane, tok, nets):
    assert DEFAULT_POOLING == "layer"
    out = embed_models(sane, tok, nets, return_token_latents=True)
    layer_ids = tok.encode(nets[0]).positions[:, 1]
    num_layers = int(layer_ids.max()) + 1
    assert out.embeddings.shape == (len(nets), 2 * num_layers * sane.config.latent_dim)
    torch.testing.assert_close(out.embeddings, layer_pool(out.token_latents, layer_ids), atol=ATOL, rtol=0)
    # shuffling the tokens of each layer (as a neuron permutation does) leaves the readout unchanged
    lat = out.token_latents.clone()
    for layer in range(num_layers):
        idx = torch.nonzero(layer_ids == layer).flatten()
        lat[:, idx] = lat[:, idx.flip(0)]
    torch.testing.assert_close(layer_pool(lat, layer_ids), out.embeddings, atol=ATOL, rtol=0)


def test_streams_without_token_latents_and_restores_training_mode(tok, nets):
    model = tiny_sane()
    model.train()
    out = embed_models(model, tok, iter(nets), pooling="mean")
    assert out.token_latents is None and out.embeddings.shape == (4, 4)
    assert model.training  # restored; eval mode inside (no dropout noise)
    assert torch.equal(embed_models(model, tok, nets, pooling="mean").embeddings, out.embeddings)


@pytest.mark.parametrize("family", ["cnn_bn", "bert", "resnet18"])
def test_tiny_model_families(family, request):
    net = request.getfixturevalue(family)  # conftest: BatchNorm CNN, BERT encoder, ResNet-18 (width 8)
    tok = WeightTokenizer.from_reference(net, token_size=64)
    model = tiny_sane(token_size=64, window_size=32, halo_size=4)
    out = embed_models(model, tok, [net], normalize=False, batch_size=16, return_token_latents=True)
    assert out.token_latents.shape == (1, tok.num_tokens, 4)
    assert torch.isfinite(out.embeddings).all()


# --- bad inputs -----------------------------------------------------------------------------------


def test_state_dict_not_matching_tokenizer_is_a_clear_error(sane, tok, nets):
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"inputs\[1\]\['2.weight'\] has shape \(3, 8\) but the tokenizer expects \(2, 8\)"):
        embed_models(sane, tok, [nets[0], other])
    missing = {k: v for k, v in nets[0].state_dict().items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"inputs\[0\] does not match the tokenizer's architecture \(missing keys: '2.bias'\)"):
        embed_models(sane, tok, missing)


def test_wrong_token_size_is_a_value_error(sane, tok, nets):
    tok16 = WeightTokenizer.from_reference(nets[0], token_size=16)
    with pytest.raises(ValueError, match="tokens of size 16 but the SANE model expects token_size=8"):
        embed_models(sane, None, tok16.encode_batch(nets), normalize=False)
    with pytest.raises(ValueError, match="makes tokens of size 16"):
        embed_models(sane, tok16, nets)


def test_other_bad_inputs(sane, tok, nets):
    with pytest.raises(TypeError, match="one split at a time"):
        embed_models(sane, tok, DatasetDict({"train": Dataset.from_dict({"x": [1]})}))
    with pytest.raises(ValueError, match="pooling must be one of"):
        embed_models(sane, tok, nets, pooling="cls")
    with pytest.raises(ValueError, match="needs the model's WeightTokenizer"):
        embed_models(sane, None, nets)
    with pytest.raises(ValueError, match="fitted tokenizer"):
        embed_models(sane, WeightTokenizer.from_reference(nets[0], token_size=8), nets)
    with pytest.raises(ValueError, match="no models"):
        embed_models(sane, tok, [])
    with pytest.raises(TypeError, match="cannot embed"):
        embed_models(sane, tok, 3)


def test_positions_beyond_the_model_are_rejected_before_any_window(nets, tok):
    torch.manual_seed(0)
    config = SaneConfig(token_size=8, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                        latent_dim=4, projection_dim=8, window_size=8, halo_size=1, max_positions=(10_000, 1, 64),
                        position_encoding="learned-tables")  # fmt: skip
    model = SaneModel(config).eval()  # a legacy checkpoint's layer table of 1 entry; the nets have 2 layers
    calls = []
    model.encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"cannot be embedded with this SANE model: Position index 1 on axis l \(layer index\)"):
        embed_models(model, tok, nets)  # checked on the tokenizer's positions
    with pytest.raises(ValueError, match=r"axis l \(layer index\)"):
        embed_models(model, None, tok.encode_batch(nets, normalize=True))  # tokens only: checked per group
    assert calls == []  # no window was encoded


# --- a row axis beyond any table: a BERT-size vocabulary --------------------------------------------


def tiny_bert(vocab_size: int, seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, type_vocab_size=2)  # fmt: skip
    return BertModel(config, add_pooling_layer=False).eval()


def rows_are_uncapped(model: SaneModel) -> bool:
    """True when the model embeds any row index k (no learned table with a hard cap on that axis)."""
    from sane_hf.embedding import check_positions

    try:
        check_positions(model, torch.tensor([[0, 0, 10**6]]))
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def sane_trained_on_small_berts() -> tuple[SaneModel, WeightTokenizer]:
    """A tiny SANE trained in-process (a few dozen steps) on BERTs with a 64-entry vocabulary, and their tokenizer."""
    nets = [tiny_bert(64, seed) for seed in range(3)]
    tok = WeightTokenizer.from_reference(nets[0], token_size=16).fit(nets)
    torch.manual_seed(0)
    model = SaneModel(SaneConfig(token_size=16, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                 latent_dim=4, projection_dim=4, window_size=32, halo_size=4, dropout=0.0))  # fmt: skip
    batch = tok.encode_batch(nets, normalize=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        start = int(torch.randint(0, tok.num_tokens - 32, (1,), generator=generator))
        window = batch.window(start, start + 32)
        loss = model(window.tokens, window.positions, mask=window.mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tok


def test_a_30000_row_layer_embeds_with_a_small_trained_sane(sane_trained_on_small_berts):
    model, small_tok = sane_trained_on_small_berts
    assert rows_are_uncapped(model)  # the default position code has no table on the row axis
    big = [tiny_bert(30_000, seed) for seed in (1, 2)]
    tok = WeightTokenizer.from_reference(big[0], token_size=16).fit(big)
    assert int(tok.positions[:, 2].max()) == 29_999  # the word embedding: one row per vocabulary entry
    out = embed_models(model, tok, big, batch_size=64, pooling="mean", return_token_latents=True)
    assert out.embeddings.shape == (2, 4) and out.token_latents.shape == (2, tok.num_tokens, 4)
    assert torch.isfinite(out.token_latents).all()
    assert not torch.equal(out.embeddings[0], out.embeddings[1])
    assert small_tok.num_tokens < tok.num_tokens


def test_a_capped_row_table_is_rejected_up_front():
    torch.manual_seed(0)
    model = SaneModel(SaneConfig(token_size=16, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                 latent_dim=4, projection_dim=4, window_size=32, halo_size=4,
                                 position_encoding="learned-tables")).eval()  # a legacy checkpoint: k table of 4096
    assert not rows_are_uncapped(model)
    big = tiny_bert(30_000, 1)
    tok = WeightTokenizer.from_reference(big, token_size=16).fit([big])
    calls = []
    model.encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"Position index 29999 on axis k \(row index within the layer\)"):
        embed_models(model, tok, [big])
    assert calls == []
