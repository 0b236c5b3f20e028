"""The evaluate metric modules: compute() against hand-computed values, loaded offline from their folders."""

from __future__ import annotations

import math
import os

import pytest
from helpers import run_python

from sane_hf.metrics import METRICS, PropertyProbe, SampledAccuracyGain, load_metric, metric_path


def test_property_probe_r2_and_accuracy_by_hand():
    probe = load_metric("property_probe")
    # references 1, 2, 4 (mean 7/3): SS_tot = 16/9 + 1/9 + 25/9 = 42/9; SS_res = 0 + 0 + 1 = 1
    assert probe.compute(predictions=[1.0, 2.0, 3.0], references=[1.0, 2.0, 4.0])["r2"] == pytest.approx(1 - 9 / 42)
    assert probe.compute(predictions=[0.5, 0.5], references=[0.2, 0.8])["r2"] == pytest.approx(0.0)
    assert math.isnan(probe.compute(predictions=[1.0, 2.0], references=[3.0, 3.0])["r2"])  # constant target
    assert probe.compute(predictions=["relu", "tanh", "gelu"], references=["relu", "relu", "gelu"]) == {
        "accuracy": pytest.approx(2 / 3), "n": 3}
    assert probe.compute(predictions=[1.0, 0.0], references=[1.0, 1.0], kind="classification")["accuracy"] == 0.5
    with pytest.raises(ValueError, match="kind must be one of"):
        probe.compute(predictions=[1.0], references=[1.0], kind="ranking")


def test_sampled_accuracy_gain_by_hand():
    gain = SampledAccuracyGain(keep_in_memory=True)
    out = gain.compute(predictions=[0.5, 1.0, 0.25], references=[0.25, 0.75, 0.5])
    assert out["gain"] == pytest.approx((1.75 - 1.5) / 3)
    assert out["sampled_mean"] == pytest.approx(1.75 / 3) and out["baseline_mean"] == pytest.approx(0.5)
    assert out["win_rate"] == pytest.approx(2 / 3) and out["n"] == 3


def test_metric_path_names_every_module_and_rejects_others():
    for name, cls in METRICS.items():
        assert os.path.isfile(os.path.join(metric_path(name), f"{name}.py")), name
        assert issubclass(cls, __import__("evaluate").Metric)
    assert isinstance(load_metric("property_probe"), PropertyProbe)
    with pytest.raises(ValueError, match="unknown sane-hf metric 'bleu'"):
        metric_path("bleu")


_LOAD_SCRIPT = """
import sys
import evaluate
probe = evaluate.load(sys.argv[1])
gain = evaluate.load(sys.argv[2])
print(round(probe.compute(predictions=[1.0, 2.0, 3.0], references=[1.0, 2.0, 4.0])["r2"], 6),
      gain.compute(predictions=[0.5, 1.0], references=[0.25, 0.75])["gain"], type(probe).__name__)
"""


def test_modules_load_offline_from_their_folders(tmp_path):
    """``evaluate.load(<folder>)`` in a fresh process with no network and no sane_hf on the path."""
    done = run_python(_LOAD_SCRIPT, metric_path("property_probe"), metric_path("sampled_accuracy_gain"), cwd=tmp_path,
                      env={"HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, without_sane_hf=True, timeout=600)
    assert done.stdout.split() == [str(round(1 - 9 / 42, 6)), "0.25", "PropertyProbe"]
