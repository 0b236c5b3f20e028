"""Sampling: determinism, strict loading, subsampling/bootstrapping, KDE modes, BN conditioning, heads, bad inputs.

A tiny untrained SANE is enough for everything checked here: the properties are about the
sampler's bookkeeping (seeds, anchors, ranking, shapes), not about sample quality.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_cnn_bn
from torch import nn

from sane_hf.configuration_sane import SaneConfig
from sane_hf.embedding import decode_haloed
from sane_hf.modeling_sane import SaneModel
from sane_hf.sampling import (
    LatentKDE,
    SampledModel,
    condition_batchnorm,
    decode_latents,
    encode_prompts,
    map_token_positions,
    reset_head,
    sample_models,
    select_bandwidth,
)
from sane_hf.tokenization_sane import WeightTokenizer
from sane_hf.zoo.architectures import create_model


def cnn(seed: int, **kwargs) -> nn.Module:
    return create_model("cnn-s", image_size=8, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def prompts() -> list[nn.Module]:
    return [cnn(s) for s in range(4)]


@pytest.fixture(scope="module")
def tok(prompts) -> WeightTokenizer:
    return WeightTokenizer.from_reference(prompts[0], token_size=16).fit(prompts)


@pytest.fixture(scope="module")
def sane() -> SaneModel:
    torch.manual_seed(0)
    config = SaneConfig(token_size=16, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                        latent_dim=4, projection_dim=8, window_size=32, halo_size=4, dropout=0.0)
    return SaneModel(config).eval()


def same(a: SampledModel, b: SampledModel) -> bool:
    return a.state_dict.keys() == b.state_dict.keys() and all(
        torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict
    )


# ----------------------------------------------------------------------------------------------
# determinism, loading
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "token"])
def test_same_seed_same_samples_different_seed_differs(sane, tok, prompts, mode):
    a = sample_models(sane, tok, prompts, 3, mode=mode, seed=7)
    b = sample_models(sane, tok, prompts, 3, mode=mode, seed=7, batch_size=3)  # batching changes nothing
    c = sample_models(sane, tok, prompts, 3, mode=mode, seed=8)
    assert len(a) == 3 and all(same(x, y) for x, y in zip(a, b))
    assert not any(same(x, y) for x, y in zip(a, c))
    assert not same(a[0], a[1])  # samples of one call differ too


def test_samples_load_strictly_and_run(sane, tok, prompts):
    out = sample_models(sane, tok, [p.state_dict() for p in prompts], 2, seed=0, bandwidth=0.05)
    x = torch.randn(5, 1, 8, 8)
    for s in out:
        assert s.score is None and 0 <= s.anchor_index < len(prompts) and s.anchor_share == 1.0
        net = cnn(99)
        assert not net.load_state_dict(s.state_dict, strict=True).missing_keys
        assert all(v.dtype == prompts[0].state_dict()[k].dtype for k, v in s.state_dict.items())
        y = net(x)
        assert y.shape == (5, 10) and torch.isfinite(y).all()


def test_decode_latents_equals_decode_haloed(sane, tok, prompts):
    latents = encode_prompts(sane, tok, prompts[:2])  # (2, N, latent)
    positions = tok.encode(prompts[0]).positions
    batched = decode_latents(sane, latents, positions, batch_size=3)
    for i in range(2):
        single = decode_haloed(sane, latents[i], positions)
        torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# subsampling and bootstrapping
# ----------------------------------------------------------------------------------------------


def test_subsampling_keeps_the_best_candidates(sane, tok, prompts):
    seen: list[float] = []

    def score_fn(sd):
        value = float(sd["fc2.bias"].sum())
        seen.append(value)
        return value

    out = sample_models(sane, tok, prompts, 3, candidates=10, score_fn=score_fn, seed=1, spread_anchors=False)
    assert len(seen) == 10
    assert [s.score for s in out] == sorted(seen, reverse=True)[:3]


def test_subsampling_spreads_samples_over_the_prompts(sane, tok, prompts):
    """Default: each prompt's best candidate before any prompt's second best; draws balanced over anchors."""
    by_anchor: dict[int, list[float]] = {}

    def score_fn(sd):  # favours one prompt's neighbourhood heavily: the global top 4 would all share it
        return float(sd["fc2.bias"].sum())

    out = sample_models(sane, tok, prompts, 4, candidates=12, score_fn=score_fn, seed=1, return_latents=True)
    assert sorted(s.anchor_index for s in out) == [0, 1, 2, 3]  # one sample per prompt
    assert [s.score for s in out] == sorted((s.score for s in out), reverse=True)
    # the draws: 12 candidates over 4 anchors = 3 each (balanced), and each kept sample is its anchor's best
    kde = LatentKDE(np.zeros((4, 2, 2)), "joint", bandwidth=1.0)
    idx = kde.sample_indices(10, np.random.default_rng(0))
    assert sorted(np.bincount(idx, minlength=4).tolist()) == [2, 2, 3, 3]
    allc = sample_models(sane, tok, prompts, 12, candidates=12, score_fn=score_fn, seed=1, spread_anchors=False)
    for s in allc:
        by_anchor.setdefault(s.anchor_index, []).append(s.score)
    assert sorted(len(v) for v in by_anchor.values()) == [3, 3, 3, 3]
    assert {s.anchor_index: s.score for s in out} == {a: max(v) for a, v in by_anchor.items()}


def test_sample_diversity_reports_distances_and_anchor_histogram(sane, tok, prompts):
    from sane_hf.sampling import sample_diversity

    a = {"w": torch.zeros(2, 2)}
    b = {"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]])}  # distance 5 from a
    c = {"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]]) * 2}  # 10 from a, 5 from b
    div = sample_diversity([a, b], [a, b, c])
    assert div["samples_mean_pairwise_distance"] == pytest.approx(5.0)
    assert div["prompts_mean_pairwise_distance"] == pytest.approx(20.0 / 3)
    assert div["ratio"] == pytest.approx(0.75) and div["anchor_histogram"] is None
    # an untrained SANE decodes every latent to about the same weights: plain decoding collapses (ratio ~1e-4
    # here) although the draws are balanced over the 4 prompts; residual decoding keeps each prompt's weights,
    # so 8 samples, 2 per prompt, keep 24 of their 28 pairs about as far apart as the prompts (ratio ~0.86)
    out = sample_models(sane, tok, prompts, 8, seed=0)
    div = sample_diversity(out, prompts)
    assert div["anchor_histogram"] == [2, 2, 2, 2] and div["anchors_used"] == 4
    assert div["ratio"] < 0.01
    out = sample_models(sane, tok, prompts, 8, seed=0, residual=True)
    div = sample_diversity(out, prompts)
    assert div["anchor_histogram"] == [2, 2, 2, 2] and div["ratio"] > 0.5  # the floor
    for s in out:  # still strict state_dicts of the prompts' architecture
        cnn(0).load_state_dict(s.state_dict, strict=True)


def test_bootstrap_returns_best_of_all_rounds(sane, tok, prompts):
    scores: list[tuple[int, float]] = []

    def score_fn(sd):
        value = -float(sd["fc2.weight"].pow(2).sum())
        scores.append(value)
        return value

    round0 = sample_models(sane, tok, prompts, 3, candidates=6, score_fn=score_fn, seed=3, spread_anchors=False)
    scores.clear()
    boot = sample_models(sane, tok, prompts, 3, candidates=6, score_fn=score_fn, seed=3, bootstrap_rounds=2,
                         keep_top=2, spread_anchors=False)
    assert len(scores) == 18
    got = [s.score for s in boot]
    assert got == sorted(got, reverse=True) == sorted(scores, reverse=True)[:3]
    assert boot[0].score >= round0[0].score
    assert max(scores[:6]) == round0[0].score
    assert {s.round for s in boot} <= {0, 1, 2}


# ----------------------------------------------------------------------------------------------
# KDE modes on a synthetic 2-D latent set
# ----------------------------------------------------------------------------------------------

ANCHORS = np.array(
    [[[0.0, 0.0]] * 6, [[10.0, 0.0]] * 6, [[0.0, 10.0]] * 6], dtype=np.float64
)  # (P=3, N=6, D=2): anchor p sits at the same point at every position


def nearest_anchor(latents: np.ndarray) -> np.ndarray:
    """(n, N, 2) -> (n, N) index of the nearest anchor point per position."""
    points = ANCHORS[:, 0]  # (3, 2)
    return np.linalg.norm(latents[:, :, None, :] - points[None, None], axis=-1).argmin(-1)


def test_joint_mode_keeps_one_anchor_per_sample():
    kde = LatentKDE(ANCHORS, "joint", bandwidth=0.5)
    z, idx = kde.sample(200, np.random.default_rng(0))
    assert z.shape == (200, 6, 2) and idx.shape == (200,)
    near = nearest_anchor(z)
    assert (near == idx[:, None]).all()  # every position next to the sample's one anchor
    assert set(idx.tolist()) == {0, 1, 2}  # all anchors are used


def test_token_mode_mixes_anchors_across_positions():
    kde = LatentKDE(ANCHORS, "token", bandwidth=0.5)
    z, idx = kde.sample(200, np.random.default_rng(0))
    assert idx.shape == (200, 6)
    near = nearest_anchor(z)
    assert (near == idx).all()
    mixed = np.array([len(set(row)) > 1 for row in idx.tolist()])
    assert mixed.mean() > 0.9  # with 3 anchors and 6 positions, almost every sample mixes


def test_samples_concentrate_near_anchors_as_bandwidth_shrinks():
    rng = np.random.default_rng(1)
    dists = []
    for h in (1.0, 0.1, 1e-3):
        z, idx = LatentKDE(ANCHORS, "joint", bandwidth=h).sample(300, rng)
        dists.append(np.abs(z - ANCHORS[idx]).max())
    assert dists[0] > dists[1] > dists[2] and dists[2] < 0.01
    z, idx = LatentKDE(ANCHORS[:1], "joint", bandwidth=0.5).sample(4000, np.random.default_rng(2))
    assert abs(z.std() - 0.5) < 0.02  # noise std is the bandwidth


def test_bandwidth_rules_and_density():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3)) * 2.0
    n, d = 50, 3
    sigma = np.sqrt(points.var(axis=0, ddof=1).mean())
    assert math.isclose(select_bandwidth(points, "scott"), sigma * n ** (-1 / (d + 4)))
    assert math.isclose(select_bandwidth(points, "silverman"), sigma * (n * (d + 2) / 4) ** (-1 / (d + 4)))
    assert select_bandwidth(points, 0.3) == 0.3
    with pytest.raises(ValueError, match="at least 2 anchors"):
        select_bandwidth(points[:1], "scott")
    with pytest.raises(ValueError, match="bandwidth"):
        select_bandwidth(points, -1.0)
    kde = LatentKDE(ANCHORS, "token", bandwidth=0.5)
    assert kde.score_samples(ANCHORS[:1])[0] > kde.score_samples(ANCHORS[:1] + 3.0)[0]


def test_token_mode_samples_mix_prompts(sane, tok, prompts):
    out = sample_models(sane, tok, prompts, 4, mode="token", seed=0)
    assert any(s.anchor_share < 1.0 for s in out)
    out = sample_models(sane, tok, prompts, 4, mode="joint", seed=0)
    assert all(s.anchor_share == 1.0 for s in out)


# ----------------------------------------------------------------------------------------------
# batch-norm conditioning and heads
# ----------------------------------------------------------------------------------------------


def test_condition_batchnorm_changes_only_running_stats():
    model = make_cnn_bn()
    model.bn1.momentum = 0.3
    model.conv1.train()  # a mixed mode that must survive
    flags = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randn(64, 1, 8, 8)
    condition_batchnorm(model, data, steps=2, batch_size=16)
    after = model.state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for key in before:
        if key.endswith(stats):
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key
    assert int(model.bn1.num_batches_tracked) == 2
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model.bn1.momentum == 0.3
    # cumulative average over exactly the first two batches: the batch mean of conv1's output
    with torch.no_grad():
        h = model.conv1(data[:32])
    torch.testing.assert_close(model.bn1.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no batches"):
        condition_batchnorm(model, [])
    plain = cnn(0)
    assert condition_batchnorm(plain, data) is plain  # no BatchNorm: nothing to do


def test_reset_head_state_dict_and_module():
    net = cnn(0)
    sd = net.state_dict()
    new = reset_head(sd, seed=1)
    assert list(new) == list(sd)
    changed = {k for k in sd if not torch.equal(sd[k], new[k])}
    assert changed == {"fc2.weight", "fc2.bias"}
    assert torch.equal(reset_head(sd, seed=1)["fc2.weight"], new["fc2.weight"])  # seeded
    assert not torch.equal(reset_head(sd, seed=2)["fc2.weight"], new["fc2.weight"])
    bound = 1 / math.sqrt(20)
    assert new["fc2.weight"].abs().max() <= bound and new["fc2.bias"].abs().max() <= bound

    resized = reset_head(sd, num_classes=3, seed=1)
    assert resized["fc2.weight"].shape == (3, 20) and resized["fc2.bias"].shape == (3,)
    target = cnn(5, num_classes=3)
    target.load_state_dict(resized, strict=True)
    assert reset_head(sd, head_key="fc1", seed=0)["fc1.weight"].shape == (20, sd["fc1.weight"].shape[1])

    module = cnn(0)
    state = torch.random.get_rng_state()
    module = reset_head(module, num_classes=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert module(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert torch.equal(module.fc2.weight, resized["fc2.weight"])  # same draw for module and state_dict
    with pytest.raises(KeyError, match="head_key"):
        reset_head(sd, head_key="nope")


# ----------------------------------------------------------------------------------------------
# new architectures
# ----------------------------------------------------------------------------------------------


def test_sampling_for_a_wider_target_architecture(sane, tok, prompts):
    wide = create_model("cnn-m", image_size=8, seed=0)
    target = WeightTokenizer.from_reference(wide, token_size=16)
    index, layers = map_token_positions(tok, target)
    assert index.shape == (target.num_tokens,)
    assert int(index.min()) >= 0 and int(index.max()) < tok.num_tokens
    assert layers[0] == 0 and layers[-1] == tok.num_layers - 1  # first <-> first, head <-> head
    out = sample_models(sane, tok, prompts, 2, seed=0, target_tokenizer=target)
    for s in out:
        net = create_model("cnn-m", image_size=8)
        net.load_state_dict(s.state_dict, strict=True)
        assert torch.isfinite(net(torch.randn(2, 1, 8, 8))).all()


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(sane, tok, prompts):
    mlp = create_model("mlp", image_size=8, seed=0)
    with pytest.raises(ValueError, match="prompt models do not fit the model's tokenizer.*prompts\\[1\\]"):
        sample_models(sane, tok, [prompts[0], mlp], 2)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sample_models(sane, tok, prompts, 0)
    with pytest.raises(ValueError, match="no prompt models"):
        sample_models(sane, tok, [], 1)

    def broken(sd):
        raise ZeroDivisionError("boom")

    with pytest.raises(RuntimeError, match="score_fn raised ZeroDivisionError.*boom"):
        sample_models(sane, tok, prompts, 1, score_fn=broken)
    with pytest.raises(ValueError, match="bootstrap_rounds > 0 needs a score_fn"):
        sample_models(sane, tok, prompts, 1, bootstrap_rounds=1)
    with pytest.raises(ValueError, match="candidates"):
        sample_models(sane, tok, prompts, 2, candidates=5)
    with pytest.raises(ValueError, match="mode"):
        sample_models(sane, tok, prompts, 1, mode="individual")
    with pytest.raises(ValueError, match="at least 2 anchors"):
        sample_models(sane, tok, prompts[:1], 1)
    assert len(sample_models(sane, tok, prompts[:1], 1, bandwidth=0.1)) == 1  # one prompt, explicit bandwidth
    with pytest.raises(ValueError, match="fitted tokenizer"):
        sample_models(sane, WeightTokenizer.from_reference(prompts[0], token_size=16), prompts, 1)
    with pytest.raises(ValueError, match="token_size=16"):
        sample_models(sane, WeightTokenizer.from_reference(prompts[0], token_size=8).fit(prompts), prompts, 1)


# ----------------------------------------------------------------------------------------------
# token mode over aligned anchors on a tiny ResNet zoo
# ----------------------------------------------------------------------------------------------


def test_token_mode_on_aligned_resnet_anchors_loads_strictly():
    from sklearn.datasets import load_digits

    from sane_hf.alignment import align_to, state_dict_distance
    from sane_hf.zoo.architectures import permutation_spec_for_arch

    kwargs = dict(in_channels=1, image_size=8, width=4)
    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32).unsqueeze(1) / 16.0  # (256, 1, 8, 8)
    y = torch.tensor(digits.target[:256])
    zoo = []
    for seed in range(4):  # a tiny zoo: 4 ResNet-18s (width 4, BatchNorm), a few SGD steps each
        net = create_model("resnet18", seed=seed, **kwargs)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(5):
            batch = slice(64 * (step % 4), 64 * (step % 4 + 1))
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        zoo.append({k: v.detach().clone() for k, v in net.eval().state_dict().items()})
    spec = permutation_spec_for_arch("resnet18", **kwargs)
    anchors = [zoo[0]] + [align_to(sd, zoo[0], spec)[0] for sd in zoo[1:]]
    for sd, aligned in zip(zoo[1:], anchors[1:]):
        assert state_dict_distance(aligned, zoo[0]) <= state_dict_distance(sd, zoo[0])

    tok = WeightTokenizer.from_reference(create_model("resnet18", **kwargs), token_size=16).fit(anchors)
    assert any(layer.is_packed for layer in tok.layers)  # BatchNorm parameters and statistics packed
    torch.manual_seed(0)
    sane = SaneModel(SaneConfig(token_size=16, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                latent_dim=4, projection_dim=4, window_size=32, halo_size=4, dropout=0.0)).eval()

    def accuracy(sd) -> float:
        net = create_model("resnet18", **kwargs)
        net.load_state_dict(sd, strict=True)
        with torch.no_grad():
            return float((net.eval()(x[:64]).argmax(-1) == y[:64]).float().mean())

    out = sample_models(sane, tok, anchors, 2, mode="token", score_fn=accuracy, candidates=4, seed=0, bandwidth=0.05)
    assert len(out) == 2 and out[0].score >= out[1].score
    assert any(s.anchor_share < 1.0 for s in out)  # positions drawn from different aligned anchors
    for s in out:
        net = create_model("resnet18", seed=99, **kwargs)
        result = net.load_state_dict(s.state_dict, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert all(v.dtype == zoo[0][k].dtype and v.shape == zoo[0][k].shape for k, v in s.state_dict.items())
        condition_batchnorm(net, x, batch_size=64)
        with torch.no_grad():
            assert torch.isfinite(net.eval()(x[:8])).all()
