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
    assert "--no-progress, --no_progress turn --progress off" in text
    assert "--no-permutation, --no_permutation turn --permutation off" in text


@pytest.mark.slow  # three small builds, one in a subprocess: ~1-2 min on 2 busy cores
def test_ctrl_c_during_a_build_then_rerun_gives_the_same_zoo(tmp_path):
    """SIGINT mid-build: one line "interrupted; rerun the same command to resume", exit 130, no traceback;
    the rerun finishes the zoo, and its data equal an uninterrupted build's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pyarrow.parquet as pq

    argv = ["zoo", "build", "--task", "digits", "--arch", "cnn-s", "--num-models", "4", "--epochs", "2",
            "--train-subset", "128", "--eval-subset", "64", "--models-per-chunk", "1", "--num-workers", "1",
            "--no-progress"]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "sane_hf.cli", *argv, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not (out / ".partial" / "chunk-00001.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "zoo_config.json").exists() and (out / ".partial").is_dir()

    assert main([*argv, "--out", str(out)]) == 0
    full = tmp_path / "full"
    assert main([*argv, "--out", str(full)]) == 0
    for split in SPLITS:
        files = sorted((full / "data").glob(f"{split}-*.parquet"))
        assert [f.name for f in files] == sorted(f.name for f in (out / "data").glob(f"{split}-*.parquet"))
        for f in files:
            assert pq.read_table(f).equals(pq.read_table(out / "data" / f.name)), f.name
    assert not [p.name for p in out.iterdir() if p.name.startswith((".data-", ".partial"))]


def test_a_second_writer_is_refused_naming_the_first(tmp_path, capsys):
    """Two writers of one zoo folder: the second gets one line naming the holder (pid, host), and nothing
    of the first writer's folder changes."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "zoo"
    code = ("import sys, time; from sane_hf.serialization import folder_lock\n"
            "with folder_lock(sys.argv[1], 'sane-hf zoo build'):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in out.iterdir())
        assert main(["zoo", "build", "--task", "digits", "--arch", "mlp", "--num-models", "2", "--epochs", "0",
                     "--out", str(out), "--no-progress"]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert f"is being written by pid {holder.pid} on host" in err and "(sane-hf zoo build, since" in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["zoo", "build", "--task", "digits", "--arch", "mlp", "--num-models", "2", "--epochs", "0",
                 "--train-subset", "64", "--eval-subset", "32", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
