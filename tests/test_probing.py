"""Probes and baselines: known relations recovered, literal layer statistics, split checks, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset, DatasetDict
from torch import nn

from sane_hf.configuration_sane import SaneConfig
from sane_hf.modeling_sane import SaneModel
from sane_hf.probing import (
    DEFAULT_ALPHAS,
    ProbeResults,
    ZooProbeReport,
    check_model_splits,
    evaluate_zoo_probes,
    layer_statistics,
    layer_statistics_names,
    probe_properties,
    raw_weights,
)
from sane_hf.tokenization_sane import WeightTokenizer
from sane_hf.zoo.dataset import state_dict_to_bytes

# --- probes on synthetic data ---------------------------------------------------------------------


def synthetic_split(n: int, rng: np.random.Generator, noise: float = 0.0):
    x = rng.normal(size=(n, 6))
    # separable classes with a margin: the sign of x0 + x1, then x0 pushed away from the boundary
    kind = np.where(x[:, 0] + x[:, 1] > 0, "relu", "tanh")
    x[:, 0] += np.where(kind == "relu", 1.0, -1.0)
    props = {
        "linear": x @ np.array([1.5, -2.0, 0.5, 0.0, 0.0, 3.0]) + 0.7 + noise * rng.normal(size=n),
        "noise": rng.normal(size=n),
        "kind": kind,
    }
    return x, props


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    return synthetic_split(80, rng), synthetic_split(30, rng), synthetic_split(30, rng)


def test_linear_relation_recovered(splits):
    results = probe_properties(*splits, targets=["linear", "kind", "noise"])
    assert isinstance(results, ProbeResults) and list(results) == ["linear", "kind", "noise"]
    lin, kind, noise = results["linear"], results["kind"], results["noise"]
    assert lin.kind == "regression" and lin.metric == "r2" and lin.value > 0.999
    assert lin.alpha in DEFAULT_ALPHAS and lin.penalty_name == "alpha" and lin.predictions.shape == (30,)
    assert kind.kind == "classification" and kind.metric == "accuracy" and kind.value == 1.0
    assert kind.penalty_name == "C" and kind.classes == ["relu", "tanh"]
    assert noise.value < 0.3  # nothing to find
    assert results.metrics()["kind"] == 1.0
    json.dumps(results.to_dict(predictions=True))  # serialisable


def test_property_containers_agree(splits):
    ref = probe_properties(*splits, targets=["linear"])["linear"].value
    as_frames = [(x, pd.DataFrame(p)) for x, p in splits]
    as_datasets = [(torch.as_tensor(x), Dataset.from_dict({k: list(v) for k, v in p.items()})) for x, p in splits]
    assert probe_properties(*as_frames, targets=["linear"])["linear"].value == pytest.approx(ref)
    assert probe_properties(*as_datasets, targets=["linear"])["linear"].value == pytest.approx(ref)


def test_refit_on_train_and_val(splits):
    r = probe_properties(*splits, targets=["linear"], refit="train+val")["linear"]
    assert r.value > 0.999
    with pytest.raises(ValueError, match="refit"):
        probe_properties(*splits, targets=["linear"], refit="all")


def test_missing_values_dropped_and_single_class_skipped(splits):
    (xtr, ptr), val, test = splits
    ptr = dict(ptr, linear=ptr["linear"].copy(), kind=np.full(len(xtr), "relu"))
    ptr["linear"][:5] = np.nan
    results = probe_properties((xtr, ptr), val, test, targets=["linear", "kind"])
    assert results["linear"].n_train == len(xtr) - 5 and "5 train rows without a value dropped" in results["linear"].note
    assert results["linear"].value > 0.99
    assert results["kind"].skipped and "only one class" in results["kind"].note
    assert results["kind"].to_dict()["value"] is None


def test_probe_errors(splits):
    (xtr, ptr), val, test = splits
    with pytest.raises(ValueError, match="at least 3 models"):
        probe_properties((xtr[:2], {k: v[:2] for k, v in ptr.items()}), val, test, targets=["linear"])
    with pytest.raises(ValueError, match="property 'test_acc' is missing from the train properties"):
        probe_properties(*splits, targets=["test_acc"])
    with pytest.raises(ValueError, match="80 feature rows but 79 values"):
        probe_properties((xtr, {"linear": ptr["linear"][:-1]}), val, test, targets=["linear"])
    with pytest.raises(ValueError, match="different dimensions"):
        probe_properties((xtr[:, :3], ptr), val, test, targets=["linear"])
    with pytest.raises(ValueError, match="NaN or Inf"):
        probe_properties((np.full_like(xtr, np.nan), ptr), val, test, targets=["linear"])


# --- baselines, by hand -----------------------------------------------------------------------------


def two_layer() -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net[0].bias.copy_(torch.tensor([5.0, 6.0]))
        net[1].weight.copy_(torch.tensor([[0.0, 10.0]]))
        net[1].bias.copy_(torch.tensor([-1.0]))
    return net


# layer "0": values 1..6; layer "1": 0, 10, -1 (mean, var (ddof 0), quantiles 1/25/50/75/99 %, linear)
EXPECTED_LAYER_STATS = [
    [3.5, 35 / 12, 1.05, 2.25, 3.5, 4.75, 5.95],
    [3.0, 74 / 3, -0.98, -0.5, 0.0, 5.0, 9.8],
]


def test_layer_statistics_by_hand():
    net = two_layer()
    feats = layer_statistics([net])
    np.testing.assert_allclose(feats, np.array(EXPECTED_LAYER_STATS).reshape(1, -1), rtol=0, atol=1e-12)
    tok = WeightTokenizer.from_reference(net, token_size=4).fit([net, nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))])
    assert layer_statistics_names(tok)[:3] == ["0/mean", "0/var", "0/q01"] and len(layer_statistics_names(tok)) == 14
    # from normalised tokens (padding never counted) and from a zoo split: the same numbers
    from_tokens = layer_statistics(tok.encode_batch([net, net], normalize=True), tok)
    np.testing.assert_allclose(from_tokens, np.repeat(feats, 2, axis=0), atol=1e-5)
    ds = Dataset.from_dict({"weights": [state_dict_to_bytes(net.state_dict())]})
    np.testing.assert_allclose(layer_statistics(ds, tok), feats, atol=1e-12)
    # per tensor: "0.weight" = 1, 2, 3, 4
    per_tensor = layer_statistics(net.state_dict(), per="tensor")
    assert per_tensor.shape == (1, 4 * 7)
    np.testing.assert_allclose(per_tensor[0, :7], [2.5, 1.25, 1.03, 1.75, 2.5, 3.25, 3.97], atol=1e-12)


def test_raw_weights_by_hand():
    np.testing.assert_array_equal(raw_weights([two_layer()]), [[1, 2, 3, 4, 5, 6, 0, 10, -1]])
    with pytest.raises(ValueError, match="more than max_params=5"):
        raw_weights([two_layer()], max_params=5)


def test_baseline_bad_inputs():
    other = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="model 1: '0.weight' has shape"):
        layer_statistics([two_layer(), other])
    with pytest.raises(ValueError, match="model 0 has no '1.bias'"):
        raw_weights([{k: v for k, v in two_layer().state_dict().items() if k != "1.bias"}],
                    WeightTokenizer.from_reference(two_layer(), token_size=4))


# --- the zoo protocol -------------------------------------------------------------------------------


def synthetic_zoo(ids_per_split: dict[str, list[int]], epochs=(0, 1)) -> DatasetDict:
    """Zoo rows of a tiny MLP whose test_acc is a function of its weights (no training needed)."""
    out = {}
    for split, ids in ids_per_split.items():
        rows = []
        for m in ids:
            for e in epochs:
                torch.manual_seed(100 * m + e)
                net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
                with torch.no_grad():
                    net[0].weight.mul_(1 + e + m % 3)
                w = net[0].weight.detach()
                rows.append({
                    "model_id": m, "epoch": e, "test_acc": float(w.abs().mean()), "ggap": float(w.std()),
                    "activation": "relu" if m % 2 else "tanh", "optimizer": "adam",
                    "weights": state_dict_to_bytes(net.state_dict()),
                })
        out[split] = Dataset.from_list(rows)
    return DatasetDict(out)


@pytest.fixture(scope="module")
def zoo_and_model():
    zoo = synthetic_zoo({"train": list(range(12)), "validation": [12, 13, 14, 15], "test": [16, 17, 18, 19]})
    from sane_hf.zoo.dataset import fit_tokenizer_on_zoo

    tok = fit_tokenizer_on_zoo(zoo, token_size=8)
    torch.manual_seed(0)
    model = SaneModel(SaneConfig(token_size=8, d_model=32, num_encoder_layers=1, num_decoder_layers=1, latent_dim=4,
                                 window_size=8, halo_size=2, projection_dim=8)).eval()
    return zoo, tok, model


def test_evaluate_zoo_probes(zoo_and_model):
    zoo, tok, model = zoo_and_model
    report = evaluate_zoo_probes(model, tok, zoo, ["test_acc", "epoch", "ggap", "activation", "optimizer"],
                                 extra_columns=["epoch"])
    assert isinstance(report, ZooProbeReport)
    assert set(report) == {"test_acc", "epoch", "ggap", "activation", "optimizer"}
    for row in report.values():
        assert set(row) == {"sane", "layer_stats", "raw", "sane+stats"}
    assert report.metric_names["test_acc"] == "r2" and report.metric_names["activation"] == "accuracy"
    for method in ("sane", "layer_stats", "raw", "sane+stats"):
        assert math.isfinite(report["test_acc"][method])
    # the blend is w * SANE + (1 - w) * statistics with the w chosen on validation, applied to test
    blend, sane, stats = (report.results[m]["test_acc"] for m in ("sane+stats", "sane", "layer_stats"))
    w = blend.alpha
    assert 0.0 <= w <= 1.0 and blend.penalty_name == "sane_weight"
    np.testing.assert_allclose(blend.predictions, w * sane.predictions + (1 - w) * stats.predictions)
    assert report["optimizer"]["sane+stats"] is None  # skipped with its parts
    assert report["optimizer"]["sane"] is None and any("optimizer" in n and "one class" in n for n in report.notes)
    assert report["test_acc"]["layer_stats"] > 0.5  # |w| statistics predict a function of |w|
    num_layers = tok.num_layers  # the default readout: per-layer mean and std of the 4-d token latents
    assert report.embeddings["test"].shape == (8, 2 * num_layers * 4) and report.info["test_models"] == 4
    assert report.info["pooling"] == "layer"
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["metrics"]["test_acc"]["raw"] == pytest.approx(report["test_acc"]["raw"])
    assert "property" in report.table() and "layer_stats" in report.table()
    small = evaluate_zoo_probes(model, tok, zoo, ["test_acc"], methods=["sane", "raw"], raw_max_params=10)
    assert small["test_acc"]["raw"] is None and any("raw: skipped" in n for n in small.notes)
    # asked alone, the blend computes its two parts but reports only itself, with the same number
    alone = evaluate_zoo_probes(model, tok, zoo, ["test_acc"], methods=["sane+stats"])
    assert set(alone["test_acc"]) == {"sane+stats"} and set(alone.results) == {"sane+stats"}
    assert alone["test_acc"]["sane+stats"] == pytest.approx(report["test_acc"]["sane+stats"])


def test_zoo_split_errors(zoo_and_model):
    zoo, tok, model = zoo_and_model
    leaky = synthetic_zoo({"train": [0, 1, 2, 3], "validation": [3, 4, 5], "test": [6, 7, 8]})
    with pytest.raises(ValueError, match=r"1 model\(s\) appear in both the train and validation splits \(model_id 3\)"):
        evaluate_zoo_probes(model, tok, leaky, ["test_acc"])
    small = synthetic_zoo({"train": [0, 1, 2], "validation": [3, 4], "test": [6, 7, 8]})
    with pytest.raises(ValueError, match="the validation split holds 2 model"):
        check_model_splits(small)
    with pytest.raises(ValueError, match=r"properties \['init'\] are missing from the zoo's train split"):
        evaluate_zoo_probes(model, tok, zoo, ["test_acc", "init"])
    with pytest.raises(ValueError, match="no 'test' split"):
        evaluate_zoo_probes(model, tok, DatasetDict({"train": zoo["train"], "validation": zoo["validation"]}))
    wrong = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    bad = DatasetDict({**zoo, "test": zoo["test"].map(lambda r: {"weights": state_dict_to_bytes(wrong.state_dict())})})
    with pytest.raises(ValueError, match=r"inputs\[0\]\['0.weight'\] has shape \(5, 3\)"):
        evaluate_zoo_probes(model, tok, bad, ["test_acc"])


def test_r2_is_sklearns_and_nan_for_constant_targets():
    from sane_hf.probing import _r2

    y, pred = np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 3.0])
    assert _r2(y, pred) == pytest.approx(1 - 1 / np.sum((y - y.mean()) ** 2), rel=1e-12)  # 1 - SSE/SST
    assert _r2(y, y) == 1.0
    assert math.isnan(_r2(np.full(4, 0.5), np.array([0.5, 0.4, 0.6, 0.5])))  # sklearn alone would say 0.0
    assert math.isnan(_r2(np.full(4, 0.5), np.full(4, 0.5)))  # ... or 1.0
