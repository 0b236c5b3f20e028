"""`sane-hf zoo build` / `sane-hf zoo import` through sane_hf.cli.main."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from sane_hf.cli import main
from sane_hf.zoo.architectures import create_model
from sane_hf.zoo.dataset import SPLITS, load_zoo, load_zoo_config


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_zoo_build_tiny(tmp_path, capsys):
    out = tmp_path / "zoo"
    argv = ["zoo", "build", "--task", "digits", "--arch", "mlp", "--num-models", "3", "--epochs", "1",
            "--train-subset", "64", "--eval-subset", "32", "--checkpoint-epochs", "0", "1", "--seed", "1",
            "--grid", '{"optimizers": ["adam"]}', "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"zoo written to {out}" in printed and "models: 3" in printed and "checkpoints: 6" in printed
    assert "test_acc at each model's final epoch" in printed
    cfg = load_zoo_config(out)
    assert (cfg.arch, cfg.num_models, cfg.epochs, cfg.seed, cfg.grid) == ("mlp", 3, 1, 1, {"optimizers": ["adam"]})
    assert json.loads((out / "zoo_summary.json").read_text())["num_checkpoints"] == 6
    zoo = load_zoo(out)
    assert sum(len(zoo[s]) for s in SPLITS) == 6 and set(zoo["train"]["optimizer"]) == {"adam"}
    # rerun with the same arguments: nothing to do, same summary
    assert main(argv) == 0
    assert "checkpoints: 6" in capsys.readouterr().out


def test_zoo_build_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"unknown architecture 'nope'.*cnn-s"):
        main(["zoo", "build", "--arch", "nope", "--out", str(tmp_path / "z")])
    with pytest.raises(SystemExit):
        main(["zoo", "build", "--arch-kwargs", "[1]", "--out", str(tmp_path / "z")])
    assert "expected a JSON object" in capsys.readouterr().err


def test_zoo_import_folder(tmp_path, capsys):
    src = tmp_path / "ckpts"
    src.mkdir()
    for i in range(3):
        save_file(create_model("mlp", image_size=8, seed=i).state_dict(), src / f"m{i}.safetensors")
    (src / "properties.json").write_text(json.dumps({f"m{i}": {"test_acc": i / 10} for i in range(3)}))
    out = tmp_path / "zoo"
    with pytest.warns(UserWarning, match="properties missing"):
        assert main(["zoo", "import", "--format", "folder", str(src), "--out", str(out), "--arch", "mlp",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "models: 3" in printed and "missing properties" in printed
    assert load_zoo_config(out).source == "import:folder"
    with pytest.raises(SystemExit, match="does not exist"):
        main(["zoo", "import", "--format", "modelzoos", str(tmp_path / "missing"), "--out", str(tmp_path / "z2")])


@pytest.mark.parametrize("argv", [["zoo", "--help"], ["zoo", "build", "--help"], ["zoo", "import", "--help"]])
def test_zoo_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: sane-hf zoo" in capsys.readouterr().out


def test_small_split_warning_names_the_fix():
    from sane_hf.cli.zoo import small_split_warning

    text = small_split_warning(6, (0.7, 0.15, 0.15))
    assert text.startswith("6 models split 0.7/0.15/0.15 give train 4, validation 1, test 1 model(s) per split")
    assert "build at least 17 models" in text and "--split-by model" in text
    assert small_split_warning(20, (0.7, 0.15, 0.15)) is None


def test_missing_optional_dataset_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    from sane_hf.zoo import tasks

    monkeypatch.setenv(tasks.FASHION_MNIST_ENV, str(tmp_path / "empty"))
    tasks._fashion_raw.cache_clear()
    with pytest.raises(SystemExit) as info:
        main(["zoo", "build", "--task", "fashion-mnist", "--num-models", "4", "--out", str(tmp_path / "z"),
              "--no-progress"])
    tasks._fashion_raw.cache_clear()
    message = str(info.value)
    assert message.startswith("sane-hf zoo build: task 'fashion-mnist' is not installed")
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "warning: 4 models split" in capsys.readouterr().out


def test_help_texts_are_consistent(capsys):
    for argv in (["zoo", "build", "--help"], ["zoo", "import", "--help"], ["probe", "--help"], ["sample", "--help"],
                 ["train", "--help"], ["quickstart", "--help"], ["push", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "--no-progress" in text and "--num-threads" in text, argv
        assert text.count("(default: from the source, else 'unknown') (default") == 0
        assert "(default: 0) (default" not in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no_progress, --no-progress turn --progress off" in text
    assert "--no_permutation, --no-permutation turn --permutation off" in text
