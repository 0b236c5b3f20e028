"""The sampling evaluation protocol's parts (sane_hf.evaluation), each on its own; the whole protocol
runs end to end in tests/test_cli_sample.py (``sane-hf sample --evaluate``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file

from sane_hf.alignment import random_permutation
from sane_hf.evaluation import (
    SamplingEvalConfig,
    aligned_average,
    calibrate_noise,
    choose_prompts,
    nearest_neighbours,
    noise_like,
    prediction_agreement,
    save_samples,
)
from sane_hf.sampling import SampledModel
from sane_hf.zoo.architectures import create_model, permutation_spec_for_arch


def _distance(a, b, keys) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys))


@pytest.fixture(scope="module")
def cnn():
    spec = permutation_spec_for_arch("cnn-s", image_size=8)
    return spec, [create_model("cnn-s", image_size=8, seed=s).state_dict() for s in range(3)]


def test_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="mode"):
        SamplingEvalConfig(mode="individual")


def test_prompt_selection_relaxes_the_activation_filter_and_says_why():
    split = Dataset.from_dict({
        "model_id": [0, 1, 2, 3, 4, 5], "epoch": [2, 2, 2, 2, 2, 1], "test_acc": [0.9, 0.8, 0.7, 0.6, 0.3, 0.95],
        "activation": ["tanh", "relu", "relu", "relu", "tanh", "tanh"],
    })  # fmt: skip
    # the best model (0) is tanh, but only 2 tanh models have epoch 2 (sum 1.2): relu's 3 sum to 2.1
    sel = choose_prompts(split, num_prompts=3, epoch=None)
    assert [r["model_id"] for r in sel.rows] == [1, 2, 3] and sel.activation == "relu" and sel.epoch == 2
    assert sel.removed == {"epoch": [5], "activation": [0, 4]}
    assert "activation 'tanh' has 2 test model(s) at epoch 2, fewer than the 3 asked; took 'relu'" in sel.notes[0]
    # enough models with the best model's activation: it is kept
    sel = choose_prompts(split, num_prompts=2, epoch=None)
    assert [r["model_id"] for r in sel.rows] == [0, 4] and sel.activation == "tanh"
    # a named activation is kept as asked, and the shortfall is explained
    sel = choose_prompts(split, num_prompts=4, epoch=None, activation="tanh")
    assert len(sel.rows) == 2 and "4" in sel.explain() and "filter activation removed model(s) [1, 2, 3]" in sel.explain()
    # your own architecture: the activation column does not filter
    sel = choose_prompts(split, num_prompts=3, epoch=None, uses_activation=False)
    assert [r["model_id"] for r in sel.rows] == [0, 1, 2] and sel.activation == "any"


def test_prompt_relaxation_prefers_the_activation_whose_models_trained():
    # the digits zoo's test split at epoch 10: ten sigmoid models that mostly never trained,
    # nine tanh models (six trained), a lone gelu model that is best of all
    accs = {"sigmoid": [0.48, 0.11] + [0.075] * 8, "tanh": [0.956, 0.95, 0.94, 0.92, 0.91, 0.78] + [0.075] * 3,
            "gelu": [0.97]}  # fmt: skip
    rows = [(a, x) for a, xs in accs.items() for x in xs]
    split = Dataset.from_dict({
        "model_id": list(range(len(rows))), "epoch": [10] * len(rows), "test_acc": [x for _, x in rows],
        "activation": [a for a, _ in rows],
    })  # fmt: skip
    sel = choose_prompts(split, num_prompts=10, epoch=None)
    # gelu has the best model but only one; tanh's 9 sum to 5.681, sigmoid's 10 to 1.19, gelu's to 0.97
    assert sel.activation == "tanh" and len(sel.rows) == 9
    assert [r["test_acc"] for r in sel.rows][:2] == [0.956, 0.95]
    assert "took 'tanh' (9 models, the largest summed test accuracy of its top 9)" in sel.notes[0]
    # asked for 2: tanh's top two (1.906) beat the lone gelu model (0.97) and sigmoid's two (0.59)
    sel = choose_prompts(split, num_prompts=2, epoch=None)
    assert sel.activation == "tanh" and [r["model_id"] for r in sel.rows] == [10, 11]
    # asked for 1: the best model's activation has enough
    assert choose_prompts(split, num_prompts=1, epoch=None).activation == "gelu"


def test_noise_has_exactly_the_asked_norm_on_the_asked_keys(cnn):
    _, (sd, *_) = cnn
    keys = ["conv1.weight", "fc2.bias"]
    noisy = noise_like(sd, keys, 0.5, torch.Generator().manual_seed(0))
    assert _distance(noisy, sd, keys) == pytest.approx(0.5, rel=1e-5)
    assert all(torch.equal(noisy[k], sd[k]) for k in sd if k not in keys)
    again = noise_like(sd, keys, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(noisy[k], again[k]) for k in sd)  # seeded


def test_noise_calibration_finds_the_norm_that_meets_the_target(cnn):
    _, bases = cnn
    keys = list(bases[0])

    def accuracy(sd) -> float:  # falls linearly with the distance from the nearest base
        return max(0.0, 0.9 - min(_distance(sd, b, keys) for b in bases))

    r, models = calibrate_noise(bases, keys, accuracy, 0.4, torch.Generator().manual_seed(0))
    assert r == pytest.approx(0.5, abs=2e-3) and len(models) == len(bases)
    assert [_distance(m, b, keys) for m, b in zip(models, bases)] == pytest.approx([r] * 3, rel=1e-4)
    r, models = calibrate_noise(bases, keys, accuracy, 0.95, torch.Generator().manual_seed(0))
    assert r == 0.0 and all(torch.equal(m[k], b[k]) for m, b in zip(models, bases) for k in keys)  # never better


def test_alignment_sees_through_permutations(cnn):
    spec, (sd, other, _) = cnn
    g = torch.Generator().manual_seed(1)
    copies = [random_permutation(sd, spec, g) for _ in range(2)]
    assert _distance(copies[0], sd, list(sd)) > 1.0  # permuted: far apart as weights, the same function
    average = aligned_average([sd, *copies], spec)
    for key in sd:
        torch.testing.assert_close(average[key], sd[key], rtol=0, atol=1e-6)
    distances, index = nearest_neighbours([copies[1], other], [other, sd], spec, list(sd))
    assert index == [1, 0] and distances[0] == pytest.approx(0.0, abs=1e-5) and distances[1] == 0.0


def test_prediction_agreement_counts_equal_predictions_and_keeps_modes():
    torch.manual_seed(0)
    x = torch.randn(50, 1, 8, 8)
    a, b = create_model("cnn-s", image_size=8, seed=0), create_model("cnn-s", image_size=8, seed=1)
    a.train()
    with torch.no_grad():
        expected = float((a.eval()(x).argmax(-1) == b.eval()(x).argmax(-1)).float().mean())
    a.train()
    assert prediction_agreement(a, a, x) == 1.0
    assert prediction_agreement(a, b, x, batch_size=7) == pytest.approx(expected)
    assert a.training and not b.training


def test_samples_are_saved_best_first_with_their_provenance(tmp_path, cnn):
    _, (sd, other, _) = cnn
    samples = [SampledModel(state_dict=sd, score=0.9, anchor_index=2, round=1, candidate=0),
               SampledModel(state_dict=other, score=None, anchor_index=0, round=0, candidate=3)]
    names = save_samples(samples, tmp_path, {"arch": "cnn-s"})
    assert names == ["sample_000.safetensors", "sample_001.safetensors"]
    for name, sample in zip(names, samples):
        loaded = load_file(str(tmp_path / name))
        with safe_open(str(tmp_path / name), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["key_order"]) == list(sample.state_dict)
        assert all(torch.equal(loaded[k], v) for k, v in sample.state_dict.items())
        assert meta["arch"] == "cnn-s" and meta["anchor_index"] == str(sample.anchor_index)
    assert float(safe_open(str(tmp_path / names[0]), "pt").metadata()["score"]) == 0.9
    assert safe_open(str(tmp_path / names[1]), "pt").metadata()["score"] == "none"
