"""``sane-hf quickstart``: the --fast run end to end, its outputs, and resuming it."""

from __future__ import annotations

import json
import math

import pytest

from sane_hf.cli import main
from sane_hf.quickstart import METRICS_FILE, REPORT_FILE, STAGES, QuickstartConfig

MODEL_FILES = (
    "config.json", "model.safetensors", "weight_tokenizer.json", "README.md", "metrics.json", "probe_metrics.json",
    "sampling_metrics.json", "training_config.json", "zoo_config.json", "configuration_sane.py", "modeling_sane.py",
    "pipeline_sane.py", "sampling.py", "adaptation.py", "latent_kde.py", "embedding.py", "state_dict_io.py",
    "tokenization_layout.py", "tokenization_sane.py",
)  # fmt: skip


def _numbers(data, path=""):
    """Every int/float leaf of a JSON structure, with its path."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        yield path, data


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    assert main(["quickstart", "--fast", "--out", str(out), "--no-progress"]) == 0
    return out


def test_config_defaults_are_typed_and_fast_is_small():
    full, fast = QuickstartConfig(), QuickstartConfig.fast()
    assert full.zoo.num_models >= 100 and full.zoo.task == "digits" and full.zoo.arch == "cnn-s"
    assert len(full.zoo.stored_epochs) >= 3 and full.training.max_steps >= 1000
    assert fast.fast_mode and not full.fast_mode
    assert fast.zoo.num_models < full.zoo.num_models and fast.training.max_steps < full.training.max_steps
    assert full.sample.finetune_epochs == (0, 1, 5) == fast.sample.finetune_epochs
    seeded = full.with_seed(7)
    assert (seeded.zoo.seed, seeded.training.seed, seeded.sample.seed) == (7, 7, 7)
    assert full.zoo.seed == 0  # with_seed copies
    json.dumps(full.to_dict())  # serialisable
    with pytest.raises(ValueError, match="num_threads"):
        QuickstartConfig(num_threads=0)
    with pytest.raises(ValueError, match="token_size"):
        QuickstartConfig(token_size=32)


def test_fast_run_writes_every_output(fast_run):
    out = fast_run
    for name in ("README.md", "zoo_config.json", "zoo_summary.json"):
        assert (out / "zoo" / name).is_file(), name
    assert list((out / "zoo" / "data").glob("train-*.parquet"))
    for name in MODEL_FILES:
        assert (out / "model" / name).is_file(), name
    config = json.loads((out / "model" / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"weight-sampling", "weight-embedding"} and "AutoModel" in config["auto_map"]
    for name in ("metrics.json", "pred_vs_true_test_acc.png", "embedding_pca.png", "embeddings.npz"):
        assert (out / "probe" / name).is_file(), name
    assert (out / "samples" / "metrics.json").is_file() and (out / "samples" / "accuracy_vs_epoch.png").is_file()
    samples = sorted((out / "samples").glob("sample_*.safetensors"))
    assert len(samples) == QuickstartConfig.fast().sample.num_samples
    assert (out / REPORT_FILE).is_file() and (out / METRICS_FILE).is_file()


def test_fast_run_sampled_models_load_into_the_architecture(fast_run):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sane_hf.zoo.architectures import create_model

    out = fast_run
    path = sorted((out / "samples").glob("sample_*.safetensors"))[0]
    with safe_open(str(path), framework="pt") as f:
        activation = f.metadata()["activation"]
    net = create_model("cnn-s", image_size=8, activation=activation)
    net.load_state_dict(load_file(str(path)), strict=True)


def test_fast_run_metrics_are_finite(fast_run):
    out = fast_run
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert list(metrics["stages"]) == list(STAGES)
    assert all(not s["reused"] for s in metrics["stages"].values())
    numbers = list(_numbers({k: metrics[k] for k in ("total_seconds", "stages", "probe", "sampling", "training")}))
    assert len(numbers) > 30
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad
    probe = metrics["probe"]["metrics"]
    assert set(probe) == set(QuickstartConfig.fast().probe.targets)
    assert all(probe["test_acc"][m] is not None for m in ("sane", "layer_stats", "raw"))
    acc = metrics["sampling"]["accuracy"]
    for group in ("sampled", "random_init", "noise", "aligned_average", "prompts"):
        assert set(acc[group]) >= {"0", "1", "5"}
        assert all(0.0 <= acc[group][e]["mean"] <= 1.0 for e in ("0", "1", "5"))
    assert math.isfinite(metrics["sampling"]["nearest_distance"]["sampled"])
    # the probe and sampling files are those of sane-hf probe / sample --evaluate
    probe_file = json.loads((out / "probe" / "metrics.json").read_text())
    assert probe_file["metrics"] == probe and "metric_names" in probe_file
    assert json.loads((out / "model" / "sampling_metrics.json").read_text())["accuracy"] == acc


def test_fast_run_report_holds_the_tables(fast_run):
    out = fast_run
    report = (out / REPORT_FILE).read_text()
    assert "| property | metric | SANE | layer statistics | raw weights |" in report
    assert "| test accuracy (`test_acc`) | R² |" in report
    assert "## Verdict" in report and "SANE predicts test accuracy" in report and "noise_matched" not in report
    assert 'pipeline("weight-sampling", model="model", trust_remote_code=True)' in report
    assert "acc. epoch 0 | acc. epoch 1 | acc. epoch 5 | distance to nearest zoo checkpoint" in report
    assert "Diversity: mean pairwise distance of the samples" in report and "samples per prompt: model" in report
    for row in ("| SANE samples |", "| random init |", "| prompt models |", "| aligned prompt average |"):
        assert row in report, row
    row = next(line for line in report.splitlines() if line.startswith("| test accuracy (`test_acc`) | R² |"))
    values = [float(c) for c in row.strip("|").split("|")[2:]]
    assert len(values) == 4 and all(math.isfinite(v) for v in values)  # SANE, statistics, raw, SANE + statistics
    assert "Blended with layer statistics on validation, SANE adds" in report
    assert "| nan" not in report
    card = (out / "model" / "README.md").read_text()
    assert "probe_metrics.json" not in card.split("Not measured")[-1] or "Not measured" not in card
    assert "SANE samples" in card and "### Verdict" in card and "DESIGN.md" not in card
    assert "noise_matched_accuracy" not in card and "SANE predicts test accuracy" in card


def test_rerun_reuses_finished_stages(fast_run, capsys):
    out = fast_run
    before = json.loads((out / METRICS_FILE).read_text())
    # reused stages leave their files untouched (the zoo shards, the trained weights)
    kept = [*sorted((out / "zoo" / "data").glob("*.parquet")), out / "model" / "model.safetensors"]
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    assert main(["quickstart", "--fast", "--out", str(out), "--no-progress"]) == 0
    after = json.loads((out / METRICS_FILE).read_text())
    reused = {name: s["reused"] for name, s in after["stages"].items()}
    assert reused == {name: name not in ("card", "report") for name in STAGES}
    # the time a reused stage took is kept from the run that computed it
    assert after["stages"]["train"]["computed_seconds"] == before["stages"]["train"]["computed_seconds"]
    assert after["probe"] == before["probe"] and after["sampling"] == before["sampling"]
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps
    assert "reused" in capsys.readouterr().out

    # --overwrite recomputes probing and sampling, nothing else
    assert main(["quickstart", "--fast", "--out", str(out), "--no-progress", "--overwrite"]) == 0
    again = json.loads((out / METRICS_FILE).read_text())
    assert not again["stages"]["probe"]["reused"] and not again["stages"]["sample"]["reused"]
    assert again["stages"]["zoo"]["reused"] and again["stages"]["train"]["reused"]
    for target, row in before["probe"]["metrics"].items():  # deterministic (up to torch thread count)
        assert again["probe"]["metrics"][target] == pytest.approx(row, rel=1e-3, abs=1e-3)


def test_refuses_to_mix_fast_and_full_runs(tmp_path):
    out = tmp_path / "qs"
    out.mkdir()
    (out / METRICS_FILE).write_text(json.dumps({"config": {"fast_mode": False}}))
    with pytest.raises(SystemExit, match="full quickstart run"):
        main(["quickstart", "--fast", "--out", str(out), "--no-progress"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".sane-hf")) == [METRICS_FILE]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--seed", "--fast", "--overwrite", "--no-progress"):
        assert flag in text


def test_zoo_with_other_settings_is_refused(fast_run, tmp_path):
    import shutil

    out = tmp_path / "qs"
    shutil.copytree(fast_run / "zoo", out / "zoo")
    with pytest.raises(SystemExit, match="other settings"):
        main(["quickstart", "--fast", "--seed", "1", "--out", str(out), "--no-progress"])


def test_documented_layout_is_what_a_run_writes(fast_run):
    """The folder tree in the module docstring (what users read) lists exactly what the run leaves."""
    import re

    import sane_hf.quickstart as qs

    documented = set(re.findall(r"^\s*[├└]── (\S+)", qs.__doc__, flags=re.MULTILINE))
    written = {p.name + ("/" if p.is_dir() else "") for p in fast_run.iterdir() if not p.name.startswith(".")}
    assert documented == written
    assert {REPORT_FILE, METRICS_FILE, "model/"} <= documented
