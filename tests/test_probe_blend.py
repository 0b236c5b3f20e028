"""The blended probe (SANE + layer statistics) against hand-computed blends."""

from __future__ import annotations

import numpy as np
import pytest

from sane_hf.probe_blend import SANE_WEIGHTS, blend_probe, blend_probe_results
from sane_hf.probing import ProbeResult, probe_properties


def _splits(x, y, parts=((0, 60), (60, 80), (80, 100))):
    return [(x[a:b], {k: v[a:b] for k, v in y.items()}) for a, b in parts]


@pytest.fixture(scope="module")
def two_halves():
    """Two feature sets, each seeing one half of a regression target and a noisy class label."""
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(100, 2))
    a = np.c_[signal[:, :1] + 0.1 * rng.normal(size=(100, 1)), rng.normal(size=(100, 3))]
    b = np.c_[signal[:, 1:] + 0.1 * rng.normal(size=(100, 1)), rng.normal(size=(100, 3))]
    y = {"y": signal.sum(1), "c": np.where(signal.sum(1) > 0, "up", "down")}
    ra = probe_properties(*_splits(a, y), targets=["y", "c"])
    rb = probe_properties(*_splits(b, y), targets=["y", "c"])
    return ra, rb, y


def test_regression_blend_is_the_validation_best_convex_combination(two_halves):
    ra, rb, y = two_halves
    out = blend_probe(ra["y"], rb["y"])
    val_a, val_b = ra["y"].blend_inputs["val_predictions"], rb["y"].blend_inputs["val_predictions"]
    y_val, y_test = y["y"][60:80], y["y"][80:]
    losses = [((w * val_a + (1 - w) * val_b - y_val) ** 2).mean() for w in SANE_WEIGHTS]
    w = SANE_WEIGHTS[int(np.argmin(losses))]
    assert out.alpha == w and 0.0 < w < 1.0  # each half carries signal: both get weight
    pred = w * ra["y"].predictions + (1 - w) * rb["y"].predictions
    np.testing.assert_allclose(out.predictions, pred)
    r2 = 1 - ((y_test - pred) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum()
    assert out.value == pytest.approx(r2)
    assert out.value > max(ra["y"].value, rb["y"].value) + 0.1  # two halves beat either one (ideal blend: R² 0.75)
    assert out.to_dict()["sane_weight"] == w and out.n_features == ra["y"].n_features + rb["y"].n_features


def test_blend_with_a_useless_embedding_is_the_statistics_probe(two_halves):
    ra, _, y = two_halves
    noise = np.random.default_rng(1).normal(size=(100, 4))
    useless = probe_properties(*_splits(noise, y), targets=["y"])
    stats = probe_properties(*_splits(np.c_[y["y"], noise[:, :1]], y), targets=["y"])
    out = blend_probe(useless["y"], stats["y"])
    assert out.alpha == 0.0 and out.value == pytest.approx(stats["y"].value)


def test_classification_blend_mixes_probabilities(two_halves):
    ra, rb, y = two_halves
    out = blend_probe(ra["c"], rb["c"])
    w = out.alpha
    ia, ib = ra["c"].blend_inputs, rb["c"].blend_inputs
    assert ia["test_classes"] == ib["test_classes"] == ["down", "up"]
    proba = w * ia["test_proba"] + (1 - w) * ib["test_proba"]
    expected = np.array(["down", "up"], dtype=object)[proba.argmax(1)]
    assert list(out.predictions) == list(expected)
    assert out.value == pytest.approx(float((expected == y["c"][80:]).mean()))
    assert out.metric == "accuracy" and out.value >= max(ra["c"].value, rb["c"].value) - 0.05


def test_blend_errors_and_skips(two_halves):
    ra, rb, _ = two_halves
    with pytest.raises(ValueError, match="cannot blend a probe of 'y'"):
        blend_probe(ra["y"], rb["c"])
    skipped = ProbeResult("y", "regression", "r2", note="fewer than 3 rows")
    out = blend_probe(skipped, rb["y"])
    assert out.skipped and "SANE probe was skipped" in out.note
    other = probe_properties(*_splits(np.random.default_rng(2).normal(size=(100, 2)), {"y": np.arange(100.0)}),
                             targets=["y"])
    with pytest.raises(ValueError, match="scored on different rows"):
        blend_probe(ra["y"], other["y"])
    with pytest.raises(ValueError, match="needs results of probe_properties"):
        blend_probe(ProbeResult("y", "regression", "r2", value=0.5), rb["y"])
    assert set(blend_probe_results(ra, rb)) == {"y", "c"}
