"""`sane-hf sample` end to end on a tiny digits zoo with an untrained tiny SANE model."""

from __future__ import annotations

import json
import math
import re

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from sane_hf.cli import main
from sane_hf.zoo.architectures import create_model

GROUPS = {"sampled", "random_init", "noise", "noise_matched_accuracy", "aligned_average", "prompts"}


def finite(summary) -> bool:
    return summary["n"] > 0 and all(math.isfinite(v) for v in summary["values"])


def test_sample_evaluate_writes_metrics_png_and_samples(zoo_and_model, capsys):
    root = zoo_and_model
    out = root / "eval"
    args = ["sample", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(out),
            "--num-samples", "2", "--evaluate", "--finetune-epochs", "0,1", "--max-neighbours", "4",
            "--transfer-train-subset", "128", "--bn-samples", "64", "--candidates", "3", "--no-progress",
            "--transfer-score-samples", "40", "--transfer-bootstrap-rounds", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "random init" in printed and "nearest training checkpoint" in printed and "random_init" not in printed
    assert "SANE samples beat random init" in printed or "SANE samples trail random init" in printed
    assert re.search(r"prompts: \d of 5 requested, the best test models at epoch 2", printed)
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
    # and each noise model is the best of as many draws as each sample had candidates: 3 for 2 samples
    assert novelty["noise"]["draws_per_model"] == 2 and novelty["noise"]["selected_by"] == "train-acc"
    transfer = metrics["transfer"]
    assert transfer is not None and transfer["epochs"] == 1 and math.isfinite(transfer["gain_over_random_init"])
    assert set(transfer["accuracy"]) == {"sampled", "random_init", "prompts", "noise", "sampled_source_score"}
    # the transfer samples were drawn again and ranked on 40 labelled images of the new task, with one refit
    assert transfer["score"] == "target" and transfer["score_images"] == 40
    t_scores = transfer["scores"]
    assert len(t_scores) == 2 and t_scores[0] >= t_scores[1] and all(round(v * 40) == v * 40 for v in t_scores)
    assert set(transfer["rounds"]) <= {0, 1} and len(transfer["prompt_scores"]) == len(metrics["prompts"]["model_ids"])
    assert "ranked on the new task" in printed
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


def test_one_prompt_with_a_bandwidth_rule_is_explained_and_writes_nothing(zoo_and_model):
    root = zoo_and_model
    out = root / "one-prompt"
    with pytest.raises(SystemExit, match=r"1 prompt\(s\) \(asked 1\).*'scott' bandwidth rule needs at least 2 prompts"):
        main(["sample", "--model", str(root / "sane"), "--zoo", str(root / "zoo"), "--out", str(out),
              "--num-prompts", "1", "--no-progress"])
    assert not out.exists()


def test_sample_without_evaluate_for_a_zoo_of_unknown_task_and_architecture(zoo_and_model, tmp_path, capsys):
    import shutil

    root = zoo_and_model
    zoo = tmp_path / "zoo"
    shutil.copytree(root / "zoo", zoo)
    config = json.loads((zoo / "zoo_config.json").read_text())
    config.update(arch="someone-elses-net", task="their-data", source="import:folder")
    (zoo / "zoo_config.json").write_text(json.dumps(config))
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(root / "sane"), "--zoo", str(zoo), "--out", str(out), "--num-samples", "3",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "not evaluated" in printed and "score 'train-acc' skipped" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["score"] == "none" and all("test_acc" not in r for r in metrics["samples"])
    assert metrics["diversity"]["num_samples"] == 3
    net = create_model("cnn-s", image_size=8)
    net.load_state_dict(load_file(str(out / "sample_000.safetensors")), strict=True)
    # --evaluate needs the task: a one-line error, nothing written
    with pytest.raises(SystemExit, match=r"task 'their-data' is neither a registered task.*--task module:callable"):
        main(["sample", "--model", str(root / "sane"), "--zoo", str(zoo), "--out", str(tmp_path / "ev"),
              "--evaluate", "--no-progress"])
    assert not (tmp_path / "ev").exists()
