"""``sane-hf push``: argument checks, --dry-run (no network), the token, and errors.

The model folder here is what ``sane-hf train`` writes (``save_pretrained`` of the model and the
tokenizer, no pipeline code): staging must add the pipeline code, ``custom_pipelines`` and the card.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi

from sane_hf import SaneConfig, SaneModel, WeightTokenizer
from sane_hf.cards import NOT_MEASURED
from sane_hf.cli import build_parser, main
from sane_hf.zoo.architectures import create_model

SECRET = "hf_secretCLI0123456789abcdefgh"


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    """A folder as train_sane leaves it: model + tokenizer + metrics.json + probe_metrics.json."""
    torch.manual_seed(0)
    reference = create_model("mlp", image_size=8, seed=0).state_dict()
    tokenizer = WeightTokenizer.from_reference(reference, token_size=16).fit([reference])
    model = SaneModel(SaneConfig(token_size=16, d_model=32, num_encoder_layers=2, num_decoder_layers=2,
                                 num_heads=4, latent_dim=8, window_size=32, halo_size=4))
    folder = tmp_path_factory.mktemp("runs") / "sane-cli"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"steps": 12, "train_loss": 0.5, "val_reconstruction_r2": 0.4321}))
    (folder / "probe_metrics.json").write_text(json.dumps(
        {"metrics": {"test_acc": {"sane": 0.3141, "layer_stats": 0.2718}}, "metric_names": {"test_acc": "r2"}}
    ))
    return folder


@pytest.fixture(scope="module")
def zoo_folder(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from sane_hf.zoo.importers import import_folder

    base = tmp_path_factory.mktemp("zoo")
    (base / "src").mkdir()
    for i in range(4):
        save_file(create_model("mlp", image_size=8, seed=i).state_dict(), base / "src" / f"m{i}.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_folder(base / "src", base / "zoo", arch="mlp", task="digits", progress=False,
                      cache_dir=str(base / "cache"))
    return base / "zoo"


def _no_network():
    def forbidden(self, *args, **kwargs):
        raise AssertionError("a dry run must not call the Hub")

    patches = [mock.patch.object(HfApi, name, autospec=True, side_effect=forbidden)
               for name in ("create_repo", "create_commit", "upload_folder", "upload_file", "preupload_lfs_files")]
    return patches


def test_push_is_registered_with_help(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["push", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--repo-id", "--zoo", "--dataset-repo-id", "--private", "--token", "--dry-run"):
        assert flag in text


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to push"),
        (["--model", "x"], "--model needs --repo-id"),
        (["--zoo", "x"], "--zoo needs --dataset-repo-id"),
        (["--model", "/nonexistent/run", "--repo-id", "org/x", "--dry-run"], "is not a SANE model folder"),
        (["--zoo", "/nonexistent/zoo", "--dataset-repo-id", "org/z", "--dry-run"], "not a complete zoo folder"),
    ],
)
def test_push_argument_errors(argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["push", *argv])
    assert message in str(exc.value.code)


def test_dry_run_stages_and_lists_without_network(train_folder, zoo_folder, tmp_path, capsys):
    staging, manifest = tmp_path / "staged", tmp_path / "manifest.json"
    patches = _no_network()
    for p in patches:
        p.start()
    try:
        code = main(["push", "--model", str(train_folder), "--repo-id", "org/sane-cli", "--zoo", str(zoo_folder),
                     "--dataset-repo-id", "org/cli-zoo", "--dry-run", "--staging-dir", str(staging),
                     "--manifest", str(manifest), "--token", SECRET])
    finally:
        for p in patches:
            p.stop()
    assert code == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "would push 6 files to the dataset repo org/cli-zoo" in out
    assert "files to the model repo org/sane-cli" in out and "dry run: nothing was sent" in out
    staged = {p.name for p in staging.iterdir()}
    for name in ("README.md", "config.json", "model.safetensors", "weight_tokenizer.json", "configuration_sane.py",
                 "modeling_sane.py", "pipeline_sane.py", "metrics.json", "probe_metrics.json"):
        assert name in staged and f"  {name}" in out
    assert "training_config.json" not in staged and "zoo_config.json" not in staged  # not in the run folder
    config = json.loads((staging / "config.json").read_text())
    assert "weight-sampling" in config["custom_pipelines"] and "AutoModel" in config["auto_map"]
    card = (staging / "README.md").read_text()
    assert "0.4321" in card and f"| test accuracy (`test_acc`) | R² | 0.3141 | 0.2718 | {NOT_MEASURED} |" in card and "org/cli-zoo" in card
    pushes = json.loads(manifest.read_text())["pushes"]
    assert [p["repo_type"] for p in pushes] == ["dataset", "model"] and all(p["url"] is None for p in pushes)
    assert set(pushes[1]["files"]) == staged
    # the staging folder is kept, so a second run into it is refused rather than mixed
    with pytest.raises(SystemExit, match="not empty"):
        main(["push", "--model", str(train_folder), "--repo-id", "org/sane-cli", "--dry-run",
              "--staging-dir", str(staging)])


def test_hub_errors_are_reported_without_the_token(zoo_folder, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    seen = {}

    def create_repo(self, repo_id, **kwargs):
        seen["token"] = self.token
        raise RuntimeError(f"401 Unauthorized for token {self.token}")

    with mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=create_repo):
        with pytest.raises(SystemExit) as exc:
            main(["push", "--zoo", str(zoo_folder), "--dataset-repo-id", "org/cli-zoo"])
    assert seen["token"] == SECRET  # HF_TOKEN reached the API...
    message = str(exc.value.code)
    assert "RuntimeError: 401 Unauthorized" in message and SECRET not in message  # ...and is not shown
    assert SECRET not in capsys.readouterr().out
