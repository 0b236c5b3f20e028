"""`sane-hf probe` end to end on a tiny digits zoo with an untrained tiny SANE model."""

from __future__ import annotations

import json
import math

import pytest

from sane_hf.cli import main

TARGETS = ["test_acc", "epoch", "ggap", "activation", "optimizer", "init"]


def test_probe_cli_writes_metrics_and_plots(zoo_and_model, capsys):
    root = zoo_and_model
    out = root / "probe"
    assert main(["probe", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "property" in printed and "layer_stats" in printed and "test_acc" in printed
    for name in ("metrics.json", "pred_vs_true_test_acc.png", "embedding_pca.png", "embeddings.npz"):
        assert (out / name).stat().st_size > 0, name
    payload = json.loads((out / "metrics.json").read_text())
    metrics = payload["metrics"]
    assert set(metrics) == set(TARGETS)
    for method in ("sane", "layer_stats", "raw"):  # cnn-s on 8x8 digits: 1,096 weights, raw baseline included
        for target in ("test_acc", "epoch", "ggap"):
            assert math.isfinite(metrics[target][method]), (target, method)
    for target in ("activation", "optimizer", "init"):  # accuracy, or skipped (one class in train) with a note
        for value in metrics[target].values():
            assert value is None or 0.0 <= value <= 1.0
    assert payload["metric_names"]["test_acc"] == "r2" and payload["info"]["test_models"] == 3
    assert payload["split_by"] == "zoo"


def test_probe_cli_resplit_and_errors(zoo_and_model, capsys):
    root = zoo_and_model
    out = root / "probe-resplit"
    argv = ["probe", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(out), "--no-progress",
            "--split-by", "model", "--split-fractions", "0.34", "0.33", "0.33", "--targets", "test_acc",
            "--methods", "sane", "layer_stats", "--no-plots"]
    assert main(argv) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert set(payload["metrics"]["test_acc"]) == {"sane", "layer_stats"} and payload["split_by"] == "model"
    assert not (out / "embedding_pca.png").exists()
    with pytest.raises(SystemExit, match="holds no config.json"):
        main(["probe", "--model", str(root), "--zoo", str(root / "zoo")])
    with pytest.raises(SystemExit, match=r"properties \['nope'\] are missing"):
        main(["probe", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--targets", "nope",
              "--out", str(out)])
    with pytest.raises(SystemExit, match="probing needs at least 3 models per split"):
        main(["probe", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--split-by", "model",
              "--split-fractions", "0.8", "0.1", "0.1", "--out", str(out)])
