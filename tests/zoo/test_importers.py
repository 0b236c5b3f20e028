"""Importers: every layout round-trips a tiny fixture into the zoo dataset layout."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sane_hf.zoo.architectures import create_model
from sane_hf.zoo.dataset import SPLITS, ZOO_FEATURES, load_zoo_config, load_zoo_summary, state_dict_from_bytes
from sane_hf.zoo.importers import import_folder, import_modelzoos, import_unterthiner, import_zoo


def _cnn_sd(seed: int) -> dict[str, torch.Tensor]:
    return create_model("cnn-s", image_size=8, seed=seed).state_dict()


def _rows_by_key(zoo) -> dict[tuple[int, int], dict]:
    out = {}
    for split in SPLITS:
        for row in zoo[split]:
            out[(row["model_id"], row["epoch"])] = row
    return out


def _assert_splits_by_model(zoo, num_models: int) -> None:
    ids = {s: set(zoo[s]["model_id"]) for s in SPLITS}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert not (ids["validation"] & ids["test"])
    assert set().union(*ids.values()) == set(range(num_models))


def _assert_equal_sd(a, b, ordered: bool = True) -> None:
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- folder ---------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_folder(tmp_path):
    src = tmp_path / "ckpts"
    src.mkdir()
    sds = {}
    for i in range(4):
        sd = _cnn_sd(i)
        sds[f"net{i}"] = sd
        if i % 2:
            torch.save(sd, src / f"net{i}.pt")
        else:
            save_file(sd, src / f"net{i}.safetensors")
    with open(src / "properties.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["file", "test_acc", "train_acc", "lr", "epoch", "extra"])
        w.writeheader()
        for i in range(3):  # net3 has no entry
            w.writerow({"file": f"net{i}.pt", "test_acc": 0.5 + i / 10, "train_acc": 0.9, "lr": 0.01, "epoch": 5, "extra": "x"})
    return src, sds


def test_import_folder_round_trip(checkpoint_folder, tmp_path):
    src, sds = checkpoint_folder
    out = tmp_path / "zoo"
    with pytest.warns(UserWarning, match="no entry in properties.csv"):
        zoo = import_folder(src, out, arch="cnn-s", task="digits", progress=False, cache_dir=str(tmp_path / "cache"))
    assert list(zoo) == list(SPLITS)
    assert zoo["train"].features == ZOO_FEATURES
    _assert_splits_by_model(zoo, 4)
    rows = _rows_by_key(zoo)
    summary = load_zoo_summary(out)
    stems = summary["sources"]
    assert stems == ["net0.safetensors", "net1.pt", "net2.safetensors", "net3.pt"]
    for model_id, name in enumerate(stems):
        stem = name.split(".")[0]
        epoch = -1 if stem == "net3" else 5
        row = rows[(model_id, epoch)]
        # safetensors files store keys sorted; torch files keep the state_dict order
        _assert_equal_sd(state_dict_from_bytes(row["weights"]), sds[stem], ordered=name.endswith(".pt"))
        assert row["arch"] == "cnn-s" and row["task"] == "digits"
        if stem == "net3":
            assert math.isnan(row["test_acc"]) and row["seed"] == -1 and row["optimizer"] == "unknown"
        else:
            assert row["test_acc"] == pytest.approx(0.5 + int(stem[-1]) / 10)
            assert row["ggap"] == pytest.approx(0.9 - row["test_acc"])
            assert row["lr"] == pytest.approx(0.01)
    # missing properties are reported (summary + card)
    assert summary["missing_properties"]["test_acc"] == 1
    assert summary["missing_properties"]["val_acc"] == 4
    assert "missing" in (out / "README.md").read_text()
    assert load_zoo_config(out).source == "import:folder"
    # resumable / idempotent: a rerun returns the same zoo without converting again
    again = import_folder(src, out, arch="cnn-s", task="digits", progress=False, cache_dir=str(tmp_path / "cache"))
    assert again["train"]["model_id"] == zoo["train"]["model_id"]


def test_import_folder_mismatched_architectures(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    save_file(_cnn_sd(0), src / "a.safetensors")
    save_file(_cnn_sd(1), src / "b.safetensors")
    torch.save(create_model("mlp", image_size=8, seed=0).state_dict(), src / "odd.pt")
    with pytest.raises(ValueError, match=r"mixes 2 architectures(.|\n)*odd\.pt"):
        import_folder(src, tmp_path / "zoo", progress=False)


def test_import_folder_drops_nan_and_resumes(tmp_path):
    src = tmp_path / "ckpts"
    src.mkdir()
    for i in range(4):
        sd = _cnn_sd(i)
        if i == 2:
            sd["fc1.weight"][0, 0] = float("nan")
        save_file(sd, src / f"m{i}.safetensors")
    out = tmp_path / "zoo"
    # interrupt after two models: the part files of finished models stay, the rerun skips them
    # (patched where import_folder looks it up)
    import sane_hf.zoo.importers.folder as imp

    calls = []
    real = imp.load_checkpoint_file

    def flaky(path):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)

    imp.load_checkpoint_file = flaky
    try:
        with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import_folder(src, out, progress=False, cache_dir=str(tmp_path / "cache"))
    finally:
        imp.load_checkpoint_file = real
    assert sorted(p.name for p in (out / ".partial").glob("model-*.json")) == ["model-000000.json", "model-000001.json"]
    with pytest.warns(UserWarning, match="dropped 1 checkpoint"):
        zoo = import_folder(src, out, progress=False, cache_dir=str(tmp_path / "cache"))
    assert sum(len(zoo[s]) for s in SPLITS) == 3
    assert load_zoo_summary(out)["dropped_checkpoints"] == 1
    assert not (out / ".partial").exists()


# --- Model Zoos -------------------------------------------------------------------------------


@pytest.fixture
def modelzoos_folder(tmp_path):
    src = tmp_path / "modelzoo"
    sds = {}
    for i in range(5):
        trial = src / f"NN_tune_trainable_{i:05d}_seed={i}"
        trial.mkdir(parents=True)
        params = {
            "seed": i, "optim::lr": 1e-3 * (i + 1), "optim::wd": 0.0, "optim::optimizer": "adam",
            "model::nlin": "tanh", "model::init_type": "kaiming_uniform", "model::dropout": 0.1,
            "training::batchsize": 32, "model::type": "CNN",
        }
        (trial / "params.json").write_text(json.dumps(params))
        lines = [
            {"training_iteration": e, "train_acc": 0.1 * e + i / 100, "test_acc": 0.1 * e, "train_loss": 2.0 - e / 2,
             "test_loss": 2.1 - e / 2}
            for e in (1, 2)
        ]
        (trial / "result.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        for e in (0, 1, 2):
            sd = _cnn_sd(100 * i + e)
            sds[(i, e)] = sd
            (trial / f"checkpoint_{e:06d}").mkdir()
            torch.save(sd, trial / f"checkpoint_{e:06d}" / "checkpoints")
    return src, sds


def test_import_modelzoos_round_trip(modelzoos_folder, tmp_path):
    src, sds = modelzoos_folder
    out = tmp_path / "zoo"
    with pytest.warns(UserWarning, match="properties missing"):
        zoo = import_modelzoos(src, out, task="mnist", progress=False, cache_dir=str(tmp_path / "cache"))
    _assert_splits_by_model(zoo, 5)
    rows = _rows_by_key(zoo)
    assert len(rows) == 15
    for (i, e), sd in sds.items():
        row = rows[(i, e)]
        _assert_equal_sd(state_dict_from_bytes(row["weights"]), sd)
        assert (row["seed"], row["optimizer"], row["activation"], row["init"]) == (i, "adam", "tanh", "kaiming_uniform")
        assert row["lr"] == pytest.approx(1e-3 * (i + 1)) and row["batch_size"] == 32
        assert row["dropout"] == pytest.approx(0.1) and row["arch"] == "CNN" and row["task"] == "mnist"
        if e == 0:  # no result line for the initial checkpoint
            assert math.isnan(row["test_acc"])
        else:
            assert row["test_acc"] == pytest.approx(0.1 * e)
            assert row["ggap"] == pytest.approx(i / 100, abs=1e-6)
    assert load_zoo_summary(out)["missing_properties"]["test_acc"] == 5


def test_import_zoo_dispatch_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown import format"):
        import_zoo("nope", tmp_path, tmp_path / "zoo")


# --- Unterthiner et al. 2020 ---------------------------------------------------------------------


def test_import_unterthiner_round_trip(tmp_path):
    src = tmp_path / "unterthiner"
    src.mkdir()
    # a tiny TF-style CNN: conv (3, 3, 1, 4) + bias, dense (4, 10) + bias
    layout = [
        ("sequential/conv2d/kernel:0", (3, 3, 1, 4)),
        ("sequential/conv2d/bias:0", (4,)),
        ("sequential/dense/kernel:0", (4, 10)),
        ("sequential/dense/bias:0", (10,)),
    ]
    records, start = [], 0
    for name, shape in layout:
        n = int(np.prod(shape))
        records.append({"varname": name, "start_idx": start, "end_idx": start + n, "shape": str(shape)})
        start += n
    with open(src / "layout.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["varname", "start_idx", "end_idx", "shape"])
        w.writeheader()
        w.writerows(records)
    rng = np.random.default_rng(0)
    n_models, steps = 4, (0, 10)
    weights = rng.normal(size=(n_models * len(steps), start)).astype(np.float32)
    weights[5, 3] = np.inf  # model 2, step 10 diverged
    np.save(src / "weights.npy", weights)
    cols = ["modeldir", "step", "test_accuracy", "train_accuracy", "config.optimizer", "config.learning_rate",
            "config.activation", "config.w_init", "config.dropout", "config.l2reg", "config.dataset"]
    with open(src / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for m in range(n_models):
            for s in steps:
                w.writerow([f"run/{m}", s, 0.3 + m / 10, 0.4 + m / 10, "adam", 0.01, "relu", "he_normal", 0.05,
                            1e-4, "mnist"])
    out = tmp_path / "zoo"
    with pytest.warns(UserWarning, match="dropped 1 checkpoint"):
        zoo = import_unterthiner(src, out, progress=False, cache_dir=str(tmp_path / "cache"))
    _assert_splits_by_model(zoo, n_models)
    rows = _rows_by_key(zoo)
    assert len(rows) == 7 and (2, 10) not in rows
    row = rows[(1, 10)]
    sd = state_dict_from_bytes(row["weights"])
    assert list(sd) == ["conv2d.weight", "conv2d.bias", "dense.weight", "dense.bias"]
    flat = weights[3]
    np.testing.assert_array_equal(sd["conv2d.weight"].numpy(), flat[:36].reshape(3, 3, 1, 4).transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd["dense.weight"].numpy(), flat[40:80].reshape(4, 10).T)
    np.testing.assert_array_equal(sd["dense.bias"].numpy(), flat[80:90])
    assert row["test_acc"] == pytest.approx(0.4) and row["train_acc"] == pytest.approx(0.5)
    assert (row["optimizer"], row["activation"], row["init"], row["task"]) == ("adam", "relu", "he_normal", "mnist")
    assert row["weight_decay"] == pytest.approx(1e-4) and row["lr"] == pytest.approx(0.01)
    assert row["arch"] == "unterthiner-cnn" and row["seed"] == -1
    # the converted state_dict runs in the matching torch module
    conv = torch.nn.Conv2d(1, 4, 3)
    conv.load_state_dict({"weight": sd["conv2d.weight"], "bias": sd["conv2d.bias"]})
    dense = torch.nn.Linear(4, 10)
    dense.load_state_dict({"weight": sd["dense.weight"], "bias": sd["dense.bias"]})


# --- folder: nested layouts, path keys, your own architecture ---------------------------------


def _mlp_sd(seed: int) -> dict[str, torch.Tensor]:
    return create_model("mlp", image_size=8, seed=seed).state_dict()


def test_import_folder_nested_layout_model_and_epoch_from_paths(tmp_path):
    src = tmp_path / "runs"
    files = {  # relative path -> (model key, epoch) the layout implies
        "model_002/epoch_00.safetensors": ("model_002", 0),
        "model_002/epoch_03.safetensors": ("model_002", 3),
        "model_010/epoch_00.safetensors": ("model_010", 0),
        "net7_ep2.pt": ("net7", 2),
        "sweep/a/final.pt": ("sweep/a/final", -1),
    }
    for i, rel in enumerate(files):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (torch.save if rel.endswith(".pt") else save_file)(_mlp_sd(i), src / rel)
    # keyed by path relative to the folder (suffix optional); the epoch column wins over the layout
    (src / "properties.json").write_text(json.dumps({
        "model_002/epoch_03": {"test_acc": 0.8}, "net7_ep2.pt": {"test_acc": 0.3, "epoch": 5},
    }))
    with pytest.warns(UserWarning, match="have no entry"):
        zoo = import_folder(src, tmp_path / "zoo", progress=False, cache_dir=str(tmp_path / "cache"))
    rows = _rows_by_key(zoo)
    sources = load_zoo_summary(tmp_path / "zoo")["sources"]
    # models in natural order of their names: model_002 < model_010 < net7 < sweep/a/final
    assert sources == ["model_002/epoch_00.safetensors,model_002/epoch_03.safetensors",
                       "model_010/epoch_00.safetensors", "net7_ep2.pt", "sweep/a/final.pt"]
    assert set(rows) == {(0, 0), (0, 3), (1, 0), (2, 5), (3, -1)}
    assert rows[(0, 3)]["test_acc"] == pytest.approx(0.8) and rows[(2, 5)]["test_acc"] == pytest.approx(0.3)
    # top level only: nothing there, and the message says where the checkpoints are
    with pytest.raises(ValueError, match="subfolders hold"):
        import_folder(src / "sweep", tmp_path / "zoo2", recursive=False, progress=False)


def test_import_folder_names_bad_properties_and_clashes(tmp_path):
    src = tmp_path / "runs"
    for rel in ("a/epoch_1.safetensors", "b/epoch_1.safetensors"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(_mlp_sd(0), src / rel)
    props = src / "properties.csv"
    props.write_text("file,test_acc\nepoch_1.safetensors,0.5\n")  # a file name that two folders share
    with pytest.raises(ValueError, match=r"match several checkpoints.*a/epoch_1.safetensors.*'path' column"):
        import_folder(src, tmp_path / "z", progress=False)
    props.write_text("path,test_acc\na/epoch_1.safetensors,0.5\na/epoch_1,0.6\n")
    with pytest.raises(ValueError, match=r"several rows name the same checkpoint.*a/epoch_1"):
        import_folder(src, tmp_path / "z", progress=False)
    props.write_text("path,test_acc\na/epoch_1.safetensors,0.5\nc/epoch_1.safetensors,0.6\n")
    with pytest.raises(ValueError, match=r"1 row\(s\) name no checkpoint file: \['c/epoch_1.safetensors'\]"):
        import_folder(src, tmp_path / "z", progress=False)
    props.write_text("path,model_id,epoch\na/epoch_1.safetensors,0,1\nb/epoch_1.safetensors,0,1\n")
    with pytest.raises(ValueError, match=r"two checkpoints for the same model and epoch.*a/epoch_1.*b/epoch_1"):
        import_folder(src, tmp_path / "z", progress=False)
    props.write_text("stem,test_acc\nx,1\n")
    with pytest.raises(ValueError, match=r"name no checkpoint file: \['x'\]"):
        import_folder(src, tmp_path / "z", progress=False)
    assert not (tmp_path / "z").exists()


def make_wide_mlp():
    """An architecture for the build= tests (importable by its path: test_importers:make_wide_mlp)."""
    return create_model("mlp", image_size=8, hidden=(40, 16))


def test_import_folder_checks_every_checkpoint_against_the_architecture(tmp_path):
    src = tmp_path / "runs"
    src.mkdir()
    for i in range(3):
        save_file(_mlp_sd(i), src / f"m{i}.safetensors")
    # a registered architecture with a known task is checked too (the mlp on digits is fc1 64 -> 32)
    with pytest.raises(ValueError, match=r"do not fit --arch 'cnn-s'.*missing keys \['conv1.bias'"):
        import_folder(src, tmp_path / "z1", arch="cnn-s", task="digits", progress=False)
    with pytest.raises(ValueError, match=r"do not fit --arch 'cnn-s'.*missing keys"):  # no task: keys still checked
        import_folder(src, tmp_path / "z1", arch="cnn-s", progress=False)
    with pytest.raises(ValueError, match=r"do not fit --arch '[^']*make_wide_mlp'.*shapes fc1.bias: \(32,\) vs \(40,\)"):
        import_folder(src, tmp_path / "z2", build=make_wide_mlp, progress=False)
    # objects: build= and task= callables; a lambda has no import path, so it is not recorded (warned)
    data = (torch.randn(10, 1, 8, 8), torch.arange(10) % 10, torch.randn(4, 1, 8, 8), torch.arange(4))
    with pytest.warns(UserWarning, match="has no import path"):
        import_folder(src, tmp_path / "z3", build=lambda: create_model("mlp", image_size=8), task=lambda: data,
                      progress=False, cache_dir=str(tmp_path / "cache"))
    config = load_zoo_config(tmp_path / "z3")
    assert config.arch_entrypoint is None and config.task_entrypoint is None and config.arch == "<lambda>"


def test_columns_from_a_source_record():
    """Every importer reads a checkpoint's zoo columns from its source's record the same way: the first source
    key present wins, values take the column's type, and missing or unreadable values are left out (unknown)."""
    from sane_hf.zoo.importers.common import _columns_from

    record = {"val_accuracy": "0.5", "validation_accuracy": "", "epochs_seen": "3", "config.seed": 7.0,
              "optimizer": "adam", "lr": "n/a"}  # fmt: skip
    sources = {"val_acc": ("validation_accuracy", "val_accuracy"), "epoch": "epochs_seen", "seed": "config.seed",
               "optimizer": ("optim", "optimizer"), "lr": "lr", "test_acc": "test_accuracy"}  # fmt: skip
    values = _columns_from(record, sources)
    assert values == {"epoch": 3, "seed": 7, "optimizer": "adam"}  # "" (first present) and "n/a" are unknown
    assert isinstance(values["epoch"], int) and isinstance(values["seed"], int)
    assert _columns_from({"val_accuracy": "0.5"}, sources) == {"val_acc": 0.5}
