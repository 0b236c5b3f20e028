"""``sane-hf train`` on a tiny zoo: raw zoo, tokenized zoo with its tokenizer, resume, bad input."""

from __future__ import annotations

import json

import pytest
from helpers import run_python

from sane_hf.cli import main
from sane_hf.modeling_sane import SaneModel
from sane_hf.tokenization_sane import WeightTokenizer
from sane_hf.zoo.dataset import fit_tokenizer_on_zoo, load_zoo, tokenize_zoo

FAST = ["--token-size", "16", "--config", "small", "--batch-size", "8", "--num-threads", "1", "--no-progress"]


def test_train_command_writes_a_loadable_folder(zoo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--zoo", str(zoo_dir), "--out", str(out), "--max-steps", "5", "--save-steps", "5", *FAST]) == 0
    summary = capsys.readouterr().out
    assert "SANE trained: 5 steps" in summary and str(out) in summary and "checkpoint_5" in summary
    for name in ("config.json", "model.safetensors", "weight_tokenizer.json", "configuration_sane.py",
                 "modeling_sane.py", "training_config.json", "metrics.json", "zoo_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    model = SaneModel.from_pretrained(out)
    tokenizer = WeightTokenizer.from_pretrained(out)
    assert model.config.d_model == 64 and model.config.token_size == tokenizer.token_size == 16  # the small preset
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["val_loss"] is not None

    # --resume on a finished run: nothing left to train, the folder is rewritten from the last checkpoint
    assert main(["train", "--zoo", str(zoo_dir), "--out", str(out), "--max-steps", "5", "--save-steps", "5",
                 "--resume", *FAST]) == 0  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["train_loss"] == metrics["train_loss"]
    # a second fresh run into the same folder is refused
    with pytest.raises(SystemExit, match="already holds a training run"):
        main(["train", "--zoo", str(zoo_dir), "--out", str(out), "--max-steps", "5", *FAST])


def test_preset_window_shrinks_to_short_models(zoo_dir, tmp_path, capsys):
    # digits cnn-s is 54 tokens at token size 64: the default preset (window 64) trains on whole models, no halo
    out = tmp_path / "run"
    args = ["train", "--zoo", str(zoo_dir), "--out", str(out), "--max-steps", "1", "--save-steps", "0",
            "--batch-size", "4", "--num-threads", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "training on whole-model windows (window_size=54, halo_size=0)" in capsys.readouterr().out
    config = SaneModel.from_pretrained(out).config
    assert (config.window_size, config.halo_size, config.token_size) == (54, 0, 64)
    # an explicit window that is too long is still an error
    with pytest.raises(SystemExit, match=r"window_size \(64\) is larger than the sequences"):
        main(["train", "--zoo", str(zoo_dir), "--out", str(tmp_path / "x"), "--window-size", "64", *args[5:]])


def test_train_command_on_a_tokenized_zoo_with_its_tokenizer(zoo_dir, tmp_path, capsys):
    zoo = load_zoo(zoo_dir, cache_dir=str(tmp_path / "cache"))
    tokenizer = fit_tokenizer_on_zoo(zoo, token_size=8)
    tokenized_dir = tmp_path / "tokenized"
    tokenize_zoo(zoo, tokenizer, keep_weights=False).save_to_disk(str(tokenized_dir))
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    args = ["train", "--zoo", str(tokenized_dir), "--tokenizer", str(tmp_path / "tok"), "--out", str(out),
            "--max-steps", "2", "--save-steps", "0", "--window-size", "32", "--config", "small", "--batch-size", "4",
            "--num-threads", "1", "--no-progress"]  # fmt: skip
    with pytest.warns(UserWarning, match="permutation views are off"):
        assert main(args) == 0
    assert "SANE trained: 2 steps" in capsys.readouterr().out
    assert SaneModel.from_pretrained(out).config.token_size == 8
    assert WeightTokenizer.from_pretrained(out).to_dict() == tokenizer.to_dict()


def test_train_command_reports_bad_input(zoo_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"sane-hf train: .*window_size \(500\) is larger"):
        main(["train", "--zoo", str(zoo_dir), "--out", str(tmp_path / "x"), "--window-size", "500", *FAST])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", "--zoo", str(tmp_path / "nope"), "--out", str(tmp_path / "y"), *FAST])


_PIPELINE_SCRIPT = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file
from transformers import pipeline

run, prompts = sys.argv[1], [load_file(p) for p in sys.argv[2:]]
sampler = pipeline("weight-sampling", model=run, trust_remote_code=True, device="cpu")
samples = sampler(prompts, num_samples=2, seed=0, bandwidth=0.1)
embedder = pipeline("weight-embedding", model=run, trust_remote_code=True, device="cpu")
embeddings = embedder(prompts)
print(json.dumps({
    "sampler": type(sampler).__module__, "samples": len(samples),
    "keys_match": sorted(samples[0]["state_dict"]) == sorted(prompts[0]),
    "embedding_rows": len(embeddings), "embedding_dim": len(embeddings[0]["embedding"]),
}))
"""


def test_trained_folder_loads_with_pipeline_in_a_fresh_process(zoo_dir, tmp_path):
    """`sane-hf train` output is pipeline-ready: remote code, custom_pipelines for both tasks, a model card."""
    from safetensors.torch import save_file

    from sane_hf.zoo.dataset import state_dict_from_bytes

    out = tmp_path / "run"
    assert main(["train", "--zoo", str(zoo_dir), "--out", str(out), "--max-steps", "2", "--save-steps", "0", *FAST]) == 0
    config = json.loads((out / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"weight-sampling", "weight-embedding"}
    for name in ("pipeline_sane.py", "sampling.py", "embedding.py", "tokenization_sane.py", "tokenization_layout.py", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "DESIGN.md" not in card and "# run" in card and "Not measured" in card
    rows = load_zoo(zoo_dir)["test"]
    prompts = []
    for i in range(2):
        path = tmp_path / f"prompt_{i}.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict_from_bytes(rows[i]["weights"]).items()}, str(path))
        prompts.append(str(path))
    # a fresh interpreter without sane_hf: only the folder's own remote code is there to run
    done = run_python(_PIPELINE_SCRIPT, out, *prompts, cwd=tmp_path, without_sane_hf=True, timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["samples"] == 2 and result["keys_match"] and result["embedding_rows"] == 2
    assert result["sampler"].startswith("transformers_modules")  # the folder's code, not an installed sane_hf


def test_resume_refuses_model_flags_that_differ_and_says_which_config_it_uses(zoo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--zoo", str(zoo_dir), "--out", str(out), "--max-steps", "2", "--save-steps", "1",
            "--token-size", "16", "--batch-size", "8", "--num-threads", "1", "--no-progress"]  # fmt: skip
    assert main([*base, "--config", "small"]) == 0
    capsys.readouterr()
    for flags, named in ((["--config", "defaults"], "--config"), (["--window-size", "24"], "--window-size")):
        with pytest.raises(SystemExit, match=rf"--resume continues the run's own model .*{named} ask for another"):
            main([*base, "--resume", *flags])
    assert main([*base, "--resume"]) == 0  # no model flags: the run's own config, and it says so
    assert "with the run's model config" in capsys.readouterr().out
    assert main([*base, "--resume", "--config", "small"]) == 0  # flags that describe the same model are fine


def test_train_never_overwrites_a_folder_it_did_not_make(zoo_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own config"}\n')
    (out / "model.safetensors").write_bytes(b"my own weights")
    with pytest.raises(SystemExit, match=r"mine is not empty \(config\.json, model\.safetensors\).*--overwrite"):
        main(["train", "--zoo", str(zoo_dir), "--out", str(out), *FAST, "--max-steps", "1"])
    assert (out / "config.json").read_text() == '{"my": "own config"}\n'
    assert (out / "model.safetensors").read_bytes() == b"my own weights"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json", "model.safetensors"]
    # --overwrite is the explicit way to write there anyway
    assert main(["train", "--zoo", str(zoo_dir), "--out", str(out), *FAST, "--max-steps", "1", "--save-steps", "0",
                 "--overwrite"]) == 0  # fmt: skip
    assert SaneModel.from_pretrained(out).config.token_size == 16
    # and the usual file modes (umask), the weights included
    import os

    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "weight_tokenizer.json", "config.json", "metrics.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
