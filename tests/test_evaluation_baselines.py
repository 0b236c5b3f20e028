"""The "prompts + noise at matched distance" baseline: anchored at each sample's own nearest prompt."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sane_hf.alignment import permutation_spec
from sane_hf.evaluation import matched_noise


def _mlp(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).state_dict().items()}


def test_noise_is_anchored_at_each_samples_nearest_prompt_at_its_distance():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    spec = permutation_spec(net, torch.zeros(2, 4))
    keys = list(net.state_dict())
    prompts = [_mlp(0), {k: v + 5.0 for k, v in _mlp(1).items()}, {k: v - 5.0 for k, v in _mlp(2).items()}]
    # samples pile up near prompt 2 (as a sampler that keeps the best candidates does), one near prompt 0
    near = [2, 2, 0, 2]
    gen = torch.Generator().manual_seed(0)
    samples = [{k: v + 0.05 * (i + 1) * torch.randn(v.shape, generator=gen) for k, v in prompts[j].items()}
               for i, j in enumerate(near)]
    noisy, index, dists = matched_noise(samples, prompts, spec, keys, torch.Generator().manual_seed(1))
    assert index == near
    for sample, noise, j, d in zip(samples, noisy, index, dists):
        to_sample = math.sqrt(sum(float((sample[k] - prompts[j][k]).double().pow(2).sum()) for k in keys))
        to_noise = math.sqrt(sum(float((noise[k] - prompts[j][k]).double().pow(2).sum()) for k in keys))
        assert d <= to_sample + 1e-6  # aligned distance: never more than the unaligned one
        assert math.isclose(to_noise, d, rel_tol=1e-5)  # noise exactly as far from the same prompt
    assert len({id(n) for n in noisy}) == len(samples) and noisy[0][keys[0]].shape == prompts[0][keys[0]].shape


def test_nearest_mean_loo_accuracy_by_hand():
    from sane_hf.evaluation import nearest_mean_loo_accuracy

    x = torch.tensor([[0.0], [0.1], [1.0], [1.1], [0.05]])
    y = torch.tensor([0, 0, 1, 1, 1])
    # without itself, image 4 (class 1 at 0.05) is nearer class 0's mean (0.05) than class 1's (1.05): 4 of 5
    assert nearest_mean_loo_accuracy(x, y) == 0.8
    assert nearest_mean_loo_accuracy(x[:4], y[:4]) == 1.0
    # a class with a single image cannot be predicted for that image
    assert nearest_mean_loo_accuracy(torch.tensor([[0.0], [0.1], [5.0]]), torch.tensor([0, 0, 1])) == 2 / 3


def test_target_score_reads_the_features_the_head_receives():
    from sane_hf.evaluation import nearest_mean_loo_accuracy, target_score_fn

    def build():
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    sd = _mlp(3)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=gen), torch.arange(30) % 5  # a new task with 5 classes; the head has 3
    net = build()
    net.load_state_dict(sd)
    features = torch.relu(net[0](x)).detach()
    assert target_score_fn(build, x, y)(sd) == nearest_mean_loo_accuracy(features, y)
    # ranking follows the features: a network whose hidden units carry the labels scores 1.0
    good = {k: v.clone() for k, v in sd.items()}
    good["0.weight"] = torch.zeros(6, 4)
    good["0.bias"] = torch.zeros(6)
    x2 = torch.zeros(30, 4)
    x2[:, 0] = y.float()  # the label is the first input
    good["0.weight"][0, 0] = 1.0
    assert target_score_fn(build, x2, y)(good) == 1.0


def test_evaluation_spec_tolerates_operations_the_walker_does_not_know():
    """A user's module with ``x.unsqueeze(1)`` (a 1-D CNN on raw signals) still gets aligned distances."""
    from sane_hf.alignment import UnsupportedOperationError
    from sane_hf.evaluation import evaluation_spec, nearest_neighbours

    class SignalCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x.unsqueeze(1))).mean(-1))

    x = torch.randn(2, 8)
    with pytest.raises(UnsupportedOperationError, match="unsqueeze"):
        permutation_spec(SignalCNN(), x)  # strict: the walker refuses
    spec = evaluation_spec(SignalCNN, x)
    torch.manual_seed(0)
    a, b = SignalCNN().state_dict(), SignalCNN().state_dict()
    keys = list(a)
    dists, index = nearest_neighbours([a], [b, a], spec, keys)
    assert index == [1] and dists[0] == 0.0  # itself is its nearest neighbour, at distance 0
    direct = math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in keys))
    assert nearest_neighbours([a], [b], spec, keys)[0][0] <= direct + 1e-9  # alignment never adds distance


def test_noise_gets_the_samples_selection_best_of_draws_by_the_score():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    spec = permutation_spec(net, torch.zeros(2, 4))
    keys = list(net.state_dict())
    prompts = [_mlp(0), _mlp(1)]
    gen = torch.Generator().manual_seed(0)
    samples = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in prompts[j].items()} for j in (0, 1, 1)]

    def score(sd):  # any deterministic score of a state_dict: here the last bias's first entry
        return float(sd[keys[-1]][0])

    plain, index, dists = matched_noise(samples, prompts, spec, keys, torch.Generator().manual_seed(3))
    chosen, index2, dists2 = matched_noise(samples, prompts, spec, keys, torch.Generator().manual_seed(3),
                                           score_fn=score, draws=5)
    assert (index2, dists2) == (index, dists)
    # the same generator draws the same 5 candidates per sample, in order: rebuild them by hand
    from sane_hf.evaluation import noise_like

    gen = torch.Generator().manual_seed(3)
    for noise, j, d in zip(chosen, index, dists):
        candidates = [noise_like(prompts[j], keys, d, gen) for _ in range(5)]
        best = max(candidates, key=score)
        assert all(torch.equal(noise[k], best[k]) for k in keys)
        assert score(noise) == max(score(c) for c in candidates)
        to_noise = math.sqrt(sum(float((noise[k] - prompts[j][k]).double().pow(2).sum()) for k in keys))
        assert math.isclose(to_noise, d, rel_tol=1e-5)  # selection keeps the matched distance
    # the first draw of each sample's first candidate is the unselected baseline's noise model
    assert all(torch.equal(plain[0][k], noise_like(prompts[index[0]], keys, dists[0],
                                                   torch.Generator().manual_seed(3))[k]) for k in keys)
    with pytest.raises(ValueError, match="need a score_fn"):
        matched_noise(samples, prompts, spec, keys, torch.Generator(), draws=2)
    with pytest.raises(ValueError, match="draws must be >= 1"):
        matched_noise(samples, prompts, spec, keys, torch.Generator(), score_fn=score, draws=0)


def test_selection_draws_follow_the_samplers_budget():
    from sane_hf.evaluation import SamplingEvalConfig, selection_draws

    assert selection_draws(SamplingEvalConfig(num_samples=8)) == 4  # 4 x num_samples candidates by default
    assert selection_draws(SamplingEvalConfig(num_samples=8, candidates=16)) == 2
    assert selection_draws(SamplingEvalConfig(num_samples=8, candidates=16, bootstrap_rounds=2)) == 6
    assert selection_draws(SamplingEvalConfig(num_samples=8, candidates=32), bootstrap_rounds=1) == 8
    assert selection_draws(SamplingEvalConfig(num_samples=8, candidates=8)) == 1
