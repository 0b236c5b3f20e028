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
    assert "property" in printed and "layer statistics" in printed and "test accuracy" in printed
    assert "layer_stats" not in printed and "SANE predicts test accuracy" in printed and "Verdict: SANE" in printed
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
            "--split-by", "model", "--folds", "1", "--split-fractions", "0.34", "0.33", "0.33", "--targets", "test_acc",
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
              "--folds", "1", "--split-fractions", "0.8", "0.1", "0.1", "--out", str(out)])


def test_probe_cli_kfold_on_a_ten_model_zoo(zoo_and_model, tmp_path, capsys):
    """A 10-model zoo split 70/15/15 is too small for fixed splits; --split-by model cross-validates instead."""
    from sane_hf.zoo.dataset import ZooConfig, build_zoo

    root = zoo_and_model
    zoo = tmp_path / "zoo10"
    build_zoo(ZooConfig(task="digits", arch="cnn-s", num_models=10, epochs=2, train_subset=128, eval_subset=64,
                        models_per_chunk=10), zoo, progress=False, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    base = ["probe", "--model", str(root / "sane"), "--zoo", str(zoo), "--no-progress", "--num-threads", "1",
            "--targets", "test_acc", "epoch", "activation"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"at least 3 models per split.*--split-by model \(k-fold"):
        main([*base, "--out", str(tmp_path / "fixed")])
    out = tmp_path / "cv"
    assert main([*base, "--out", str(out), "--split-by", "model", "--folds", "5"]) == 0
    printed = capsys.readouterr().out
    assert "5-fold cross-validation grouped by model" in printed and " ± " in printed
    payload = json.loads((out / "metrics.json").read_text())
    cv = payload["cv"]
    assert cv["folds"] == 5 and cv["models_per_fold"] == [2, 2, 2, 2, 2]
    for method in ("sane", "layer_stats", "raw", "sane+stats"):
        folds = [v for v in cv["per_fold"]["test_acc"][method] if v is not None]
        assert len(folds) == 5
        assert payload["metrics"]["test_acc"][method] == pytest.approx(sum(folds) / 5)
    assert payload["details"]["sane+stats"]["test_acc"]["n_test"] == 30  # out-of-fold: each of 10 x 3 checkpoints once
    assert (out / "pred_vs_true_test_acc.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="fewer than the 20 folds"):
        main([*base, "--out", str(tmp_path / "x"), "--split-by", "model", "--folds", "20"])


def test_cli_probe_and_quickstart_probe_give_identical_numbers(zoo_and_model, tmp_path):
    # one recipe: `sane-hf probe` and the quickstart's probe stage use the same readout and give the same numbers
    from sane_hf import load_zoo
    from sane_hf.embedding import DEFAULT_POOLING
    from sane_hf.quickstart import QuickstartConfig
    from sane_hf.quickstart.runner import _stage_probe

    root = zoo_and_model
    assert main(["probe", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(tmp_path / "cli"),
                 "--no-progress", "--no-plots"]) == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    config = QuickstartConfig.fast()
    assert config.probe.pooling == DEFAULT_POOLING == cli["info"]["pooling"]
    _stage_probe(config, root / "sane", load_zoo(root / "zoo"), root / "zoo", tmp_path / "qs", progress=False)
    quick = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    for target in config.probe.targets:
        for method in config.probe.methods:
            assert quick["metrics"][target][method] == cli["metrics"][target][method], (target, method)
