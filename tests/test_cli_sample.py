"""`sane-hf sample` end to end on a tiny digits zoo with an untrained tiny SANE model."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from sane_hf.cli import main
from sane_hf.evaluation import SamplingEvalConfig
from sane_hf.zoo.architectures import create_model

GROUPS = {"sampled", "random_init", "noise", "noise_matched_accuracy", "aligned_average", "prompts"}


def finite(summary) -> bool:
    return summary["n"] > 0 and all(math.isfinite(v) for v in summary["values"])


def test_sample_evaluate_writes_metrics_png_and_samples(zoo_and_model, capsys):
    root = zoo_and_model
    out = root / "eval"
    args = ["sample", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(out),
            "--num-samples", "2", "--evaluate", "--finetune-epochs", "0,1", "--max-neighbours", "4",
            "--transfer-train-subset", "128", "--bn-samples", "64", "--candidates", "3", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "random_init" in printed and "nearest training checkpoint" in printed
    assert (out / "accuracy_vs_epoch.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == GROUPS
    for curve in metrics["accuracy"].values():
        assert set(curve) == {"0", "1"} and all(finite(s) for s in curve.values())
    assert metrics["accuracy"]["sampled"]["0"]["n"] == 2 and metrics["accuracy"]["aligned_average"]["0"]["n"] == 1
    assert all(math.isfinite(v) for v in metrics["gain_over_random_init"].values())
    novelty = metrics["novelty"]
    assert novelty["num_neighbours"] == 4
    for group in ("sampled", "noise", "noise_matched_accuracy", "prompts"):
        assert finite(novelty[group]["nearest_distance"]) and finite(novelty[group]["agreement"])
    # the noise baseline sits exactly as far from its prompt as the sample from its nearest prompt
    assert novelty["noise"]["prompt_distance"] == novelty["sampled"]["prompt_distance"]
    transfer = metrics["transfer"]
    assert transfer is not None and transfer["epochs"] == 1 and math.isfinite(transfer["gain_over_random_init"])
    assert set(transfer["accuracy"]) == {"sampled", "random_init", "prompts"}
    scores = metrics["sampling"]["scores"]
    assert len(scores) == 2 and scores[0] >= scores[1]

    samples = sorted(out.glob("sample_*.safetensors"))
    assert [p.name for p in samples] == ["sample_000.safetensors", "sample_001.safetensors"]
    with safe_open(str(samples[0]), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "cnn-s" and float(meta["score"]) == scores[0]
    net = create_model("cnn-s", image_size=8, activation=metrics["activation"])
    net.load_state_dict(load_file(str(samples[0])), strict=True)


def test_sample_without_evaluate_and_errors(zoo_and_model, capsys):
    root = zoo_and_model
    out = root / "plain"
    assert main(["sample", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(out),
                 "--num-samples", "2", "--score", "none", "--mode", "token", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["samples"]) == 2 and all(0.0 <= r["test_acc"] <= 1.0 for r in metrics["samples"])
    assert metrics["samples"][0]["score"] is None and len(list(out.glob("sample_*.safetensors"))) == 2
    capsys.readouterr()

    with pytest.raises(SystemExit, match="no config.json"):
        main(["sample", "--model", str(root / "zoo"), "--zoo", str(root / "zoo"), "--out", str(out)])
    with pytest.raises(SystemExit, match="activation"):
        main(["sample", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(out),
              "--activation", "softplus", "--no-progress"])
    with pytest.raises(SystemExit):  # argparse: bad epochs list
        main(["sample", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(out),
              "--finetune-epochs", "a,b"])
    with pytest.raises(ValueError, match="mode"):
        SamplingEvalConfig(mode="individual")
