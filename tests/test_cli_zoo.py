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
