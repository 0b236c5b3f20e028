"""Zoo datasets: schema, loading, splits by model, resume, tokenization, alignment, bad inputs."""

from __future__ import annotations

import json
import math
import shutil

import datasets
import pytest
import torch
from torch import nn

import sane_hf.zoo.train as train_mod
from sane_hf.zoo.dataset import (
    NUMERIC_COLUMNS,
    SPLITS,
    ZOO_FEATURES,
    ZooConfig,
    build_zoo,
    fit_tokenizer_on_zoo,
    iter_state_dicts,
    load_zoo,
    load_zoo_config,
    load_zoo_summary,
    split_model_ids,
    state_dict_from_bytes,
    tokenize_zoo,
    with_numeric_format,
    zoo_model,
)

TINY = dict(task="digits", arch="cnn-s", num_models=4, epochs=2, train_subset=128, eval_subset=64, models_per_chunk=2)


def _rows(zoo) -> list[dict]:
    return [row for split in SPLITS for row in zoo[split]]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("zoo") / "digits-cnn"
    zoo = build_zoo(ZooConfig(**TINY), out, progress=False, cache_dir=cache_dir)
    return out, zoo


# --- config and bytes ---------------------------------------------------------------------------


def test_config_round_trip_and_validation():
    cfg = ZooConfig(**TINY, checkpoint_epochs=[2, 0], arch_kwargs={}, grid={"lr_range": [1e-3, 1e-2]})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ZooConfig.from_dict(data) == cfg and cfg.checkpoint_epochs == [0, 2]
    assert cfg.stored_epochs == [0, 2] and ZooConfig(**TINY).stored_epochs == [0, 1, 2]
    with pytest.raises(ValueError, match=r"unknown architecture 'nope'.*cnn-s"):
        ZooConfig(arch="nope")
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*digits"):
        ZooConfig(task="nope")
    with pytest.raises(ValueError, match="checkpoint_epochs"):
        ZooConfig(epochs=2, checkpoint_epochs=[3])
    with pytest.raises(ValueError, match="sum to 1"):
        ZooConfig(split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match=r"unknown grid options \['lr'\].*lr_range"):
        ZooConfig(grid={"lr": 0.1})
    with pytest.raises(ValueError, match="unknown ZooConfig fields"):
        ZooConfig.from_dict({"tsak": "digits"})
    assert all("help" in f.metadata for f in ZooConfig.__dataclass_fields__.values())


def test_split_model_ids_disjoint_and_covering():
    for n in (1, 2, 3, 4, 10, 101):
        splits = split_model_ids(range(n), (0.7, 0.15, 0.15), seed=3)
        ids = [i for s in SPLITS for i in splits[s]]
        assert sorted(ids) == list(range(n))
        if n >= 3:
            assert all(splits[s] for s in SPLITS)
    assert split_model_ids(range(10), seed=1) == split_model_ids(range(10), seed=1)


# --- the built zoo ------------------------------------------------------------------------------


def test_build_schema_files_and_card(tiny_zoo, cache_dir):
    out, zoo = tiny_zoo
    assert list(zoo) == list(SPLITS)
    for split in SPLITS:
        assert zoo[split].features == ZOO_FEATURES
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"
    ]
    assert not (out / ".partial").exists()
    # plain datasets.load_dataset on the folder (card YAML configs)
    plain = datasets.load_dataset(str(out), cache_dir=cache_dir)
    assert {s: len(plain[s]) for s in plain} == {s: len(zoo[s]) for s in SPLITS}
    card = (out / "README.md").read_text()
    for needle in ("weight-space-learning", "model-zoo", "sane", "configs:", "dataset_info:", "Schürholt",
                   "conv1.weight", "| `test_acc` | 2 |", "## Schema"):
        assert needle in card or needle.replace("ü", '{\\"u}') in card, needle
    cfg = load_zoo_config(out)
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes) == (8, 1, 10)
    summary = load_zoo_summary(out)
    assert summary["num_models"] == 4 and summary["num_checkpoints"] == 12


def _card(folder):
    from huggingface_hub import DatasetCard

    return DatasetCard.load(folder / "README.md")


def test_built_card_license_properties_training_and_rebuild(tiny_zoo, cache_dir, monkeypatch):
    import shlex

    from sane_hf.cli import build_parser

    out, _ = tiny_zoo
    card = _card(out)
    meta, text = card.data.to_dict(), card.text
    # metadata: license of the task data, categories, sources, real split sizes
    assert meta["license"] == "cc-by-4.0" and meta["task_categories"] == ["other"]
    assert meta["source_datasets"] and meta["size_categories"] == "n<1K"
    splits = meta["dataset_info"]["splits"]
    assert {s["name"] for s in splits} == set(SPLITS) and all(s["num_bytes"] > 0 for s in splits)
    assert meta["dataset_info"]["download_size"] == sum(p.stat().st_size for p in (out / "data").glob("*.parquet"))
    assert "## License" in text and "CC BY 4.0" in text and "## Limitations" in text
    assert "not comparable to MNIST" in text
    # every property, every epoch: a row of the distribution table
    for prop in ("train_acc", "val_acc", "test_acc", "train_loss", "test_loss", "ggap"):
        for epoch in range(3):
            assert f"| `{prop}` | {epoch} | 4 |" in text, (prop, epoch)
    assert "| `optimizer` |" in text and "(4)" in text  # value counts per model (batch_size 32 for all 4)
    # training details
    for needle in ("cross-entropy", "`eval_subset` = 64", "estimates", "momentum 0.9", "sane-hf ", "torch ",
                   "datasets ", "2406.09997", "2209.14764", "Alpaydin", "fit_tokenizer_on_zoo(zoo, token_size=64)",
                   'load_dataset("digits-cnn")'):
        assert needle in text, needle
    assert "tokenizer.fit(...)" not in text and "<this folder or repo id>" not in text
    assert " 1 epochs" not in text and "1 channel," in text
    # the rebuild command parses with the real CLI and gives the same zoo identity
    line = next(ln for ln in text.splitlines() if ln.startswith("sane-hf zoo build --task"))
    assert line.endswith("--out digits-cnn")
    for flag in ("--task digits", "--arch cnn-s", "--num-models 4", "--epochs 2", "--seed 0", "--eval-subset 64"):
        assert flag in line, flag
    seen = {}

    class Captured(Exception):
        pass

    def fake_build(config, *args, **kwargs):
        seen["config"] = config
        raise Captured

    monkeypatch.setattr("sane_hf.zoo.dataset.build_zoo", fake_build)
    args = build_parser().parse_args(shlex.split(line)[1:])
    with pytest.raises(Captured):
        args.func(args)
    assert seen["config"]._identity() == load_zoo_config(out)._identity()
    # the card, summary and config stay loadable by plain datasets
    assert "versions" in load_zoo_summary(out) and "properties_per_epoch" in load_zoo_summary(out)
    plain = datasets.load_dataset(str(out), cache_dir=cache_dir)
    assert sum(len(plain[s]) for s in plain) == 12


def test_imported_card_has_source_section_and_no_local_paths(tmp_path, cache_dir):
    import csv
    import warnings

    from safetensors.torch import save_file

    from sane_hf.zoo.architectures import create_model
    from sane_hf.zoo.importers import import_folder

    src = tmp_path / "private-home" / "my-zoo"
    src.mkdir(parents=True)
    for i in range(3):
        save_file(create_model("mlp", image_size=8, seed=i).state_dict(), src / f"m{i}.safetensors")
    with open(src / "properties.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "test_acc", "lr"])
        writer.writerows([[f"m{i}.safetensors", 0.5 + i / 10, 1e-3] for i in range(3)])
    out = tmp_path / "imported"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # properties missing in the source: NaN, by design
        import_folder(src.resolve(), out, arch="mlp", task="digits", progress=False, cache_dir=cache_dir)
        # the finished zoo is recognised again (its config stores the public options only)
        zoo = import_folder(src.resolve(), out, arch="mlp", task="digits", progress=False, cache_dir=cache_dir)
    assert sum(len(zoo[s]) for s in SPLITS) == 3
    for name in ("README.md", "zoo_config.json", "zoo_summary.json"):
        content = (out / name).read_text()
        assert str(tmp_path) not in content and "private-home" not in content, name
    options = load_zoo_config(out).import_options
    assert options["src"] == "my-zoo" and options["properties"] == "properties.csv"
    card = _card(out)
    meta, text = card.data.to_dict(), card.text
    assert meta["license"] == "other" and meta["license_name"]
    assert "## Source (imported)" in text and "`my-zoo`" in text and "## License" in text
    mapped = next(ln for ln in text.splitlines() if ln.startswith("- mapped from the source"))
    assert "`test_acc`" in mapped and "`lr`" in mapped
    unknown = next(ln for ln in text.splitlines() if ln.startswith("- unknown"))
    assert "`train_acc`" in unknown and "`optimizer`" in unknown
    assert "sane-hf zoo import --format folder my-zoo --out imported" in text
    assert "| `test_acc` | unknown | 3 | 0.5 | 0.6 | 0.7 |" in text  # a folder import knows no epochs
    plain = datasets.load_dataset(str(out), cache_dir=cache_dir)
    assert sum(len(plain[s]) for s in plain) == 3


def test_build_rows_and_splits_by_model(tiny_zoo):
    _, zoo = tiny_zoo
    rows = _rows(zoo)
    assert sorted((r["model_id"], r["epoch"]) for r in rows) == [(m, e) for m in range(4) for e in range(3)]
    ids = {s: set(zoo[s]["model_id"]) for s in SPLITS}
    assert all(ids[s] for s in SPLITS)
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    grid = train_mod.sample_grid(4, 0)
    for r in rows:
        hp = grid[r["model_id"]]
        assert (r["seed"], r["optimizer"], r["activation"], r["init"]) == (hp.seed, hp.optimizer, hp.activation, hp.init)
        assert r["lr"] == pytest.approx(hp.lr) and r["batch_size"] == hp.batch_size
        assert (r["arch"], r["task"]) == ("cnn-s", "digits")
        assert r["ggap"] == pytest.approx(r["train_acc"] - r["test_acc"], abs=1e-6)
        assert 0.0 <= r["test_acc"] <= 1.0


def test_zoo_model_and_iter_state_dicts(tiny_zoo):
    out, zoo = tiny_zoo
    cfg = load_zoo_config(out)
    row = zoo["train"][0]
    model = zoo_model(cfg, row)
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 10)
    sds = list(iter_state_dicts(zoo["train"]))
    assert len(sds) == len(zoo["train"])
    assert all(torch.equal(model.state_dict()[k], sds[0][k]) for k in sds[0])


def test_weights_survive_numeric_formatting(tiny_zoo):
    _, zoo = tiny_zoo
    split = zoo["train"]
    formatted = with_numeric_format(split, "torch")
    for i in range(len(split)):
        row = formatted[i]
        assert isinstance(row["test_acc"], torch.Tensor) and isinstance(row["weights"], bytes)
        assert row["weights"] == split[i]["weights"]
        state_dict_from_bytes(row["weights"])
    batch = with_numeric_format(split, "numpy")[:3]
    assert batch["epoch"].dtype.kind == "i" and batch["weights"][0] == split[0]["weights"]
    assert "weights" not in NUMERIC_COLUMNS and "epoch" in NUMERIC_COLUMNS


def test_tokenize_zoo_shapes_and_round_trip(tiny_zoo):
    from sane_hf.tokenization_sane import WeightTokenizer, WeightTokens

    _, zoo = tiny_zoo
    tok = fit_tokenizer_on_zoo(zoo, token_size=16)
    n, d = tok.num_tokens, 16
    tokenized = tokenize_zoo(zoo, tok, normalize=True, batch_size=4)
    assert tokenized["train"].features["tokens"] == datasets.Array2D((n, d), "float32")
    assert tokenized["train"].features["positions"] == datasets.Array2D((n, 3), "int32")
    assert tokenized["train"].features["mask"] == datasets.Array2D((n, d), "bool")
    row = with_numeric_format(tokenized["test"], "torch")[0]
    assert row["tokens"].shape == (n, d) and row["positions"].shape == (n, 3) and row["mask"].dtype == torch.bool
    decoded = tok.decode(WeightTokens(row["tokens"], row["positions"], row["mask"], normalized=True))
    original = state_dict_from_bytes(row["weights"])
    for k in original:
        torch.testing.assert_close(decoded[k], original[k], rtol=1e-5, atol=1e-6)
    raw = tokenize_zoo(zoo["validation"], tok, normalize=False, keep_weights=False)
    assert "weights" not in raw.column_names
    r = raw.with_format("torch")[0]
    exact = tok.decode(WeightTokens(r["tokens"], r["positions"], r["mask"]))
    ref = state_dict_from_bytes(zoo["validation"][0]["weights"])
    assert all(torch.equal(exact[k], ref[k]) for k in ref)
    # a tokenizer for another architecture: clear error
    other = WeightTokenizer.from_reference(nn.Linear(4, 3), token_size=16)
    with pytest.raises(ValueError, match="do not fit the tokenizer's architecture"):
        tokenize_zoo(zoo["train"], other, normalize=False)
    with pytest.raises(ValueError, match="fitted tokenizer"):
        tokenize_zoo(zoo, WeightTokenizer.from_reference(original, token_size=16), normalize=True)


# --- resume, drops, alignment, reruns ------------------------------------------------------------


def test_resume_after_interruption_equals_uninterrupted(tiny_zoo, tmp_path, monkeypatch, cache_dir):
    _, reference = tiny_zoo
    real = train_mod.train_population
    calls: list[list[int]] = []

    def interrupted(*args, model_ids, **kwargs):
        calls.append(list(model_ids))
        for i, rec in enumerate(real(*args, model_ids=model_ids, **kwargs)):
            if len(calls) == 2 and i == 2:
                raise KeyboardInterrupt("killed mid-chunk")
            yield rec

    monkeypatch.setattr(train_mod, "train_population", interrupted)
    out = tmp_path / "zoo"
    with pytest.raises(KeyboardInterrupt):
        build_zoo(ZooConfig(**TINY), out, progress=False, cache_dir=cache_dir)
    assert sorted(p.name for p in (out / ".partial").glob("chunk-*.json")) == ["chunk-00000.json"]
    assert not (out / "zoo_config.json").exists()
    # a different config does not silently mix with the partial build
    with pytest.raises(ValueError, match="different settings"):
        build_zoo(ZooConfig(**{**TINY, "seed": 1}), out, progress=False, cache_dir=cache_dir)
    calls.clear()
    monkeypatch.setattr(train_mod, "train_population", lambda *a, **k: (calls.append(k["model_ids"]), real(*a, **k))[1])
    resumed = build_zoo(ZooConfig(**TINY), out, progress=False, cache_dir=cache_dir)
    assert calls == [[2, 3]]  # the finished chunk is not retrained
    for split in SPLITS:
        assert resumed[split].to_list() == reference[split].to_list()
    # a complete zoo with the same config is returned as is; another config needs overwrite
    calls.clear()
    build_zoo(ZooConfig(**TINY), out, progress=False, cache_dir=cache_dir)
    assert calls == []
    with pytest.raises(ValueError, match="already holds a different zoo"):
        build_zoo(ZooConfig(**{**TINY, "epochs": 1}), out, progress=False, cache_dir=cache_dir)


def test_nan_checkpoints_dropped_with_count(tmp_path, monkeypatch, cache_dir):
    real = train_mod.train_population

    def diverging(*args, **kwargs):
        for rec in real(*args, **kwargs):
            if rec.model_id == 1 and rec.epoch >= 1:
                rec.state_dict["fc1.weight"][0, 0] = float("nan")
            if rec.model_id == 2 and rec.epoch == 2:
                rec.metrics = type(rec.metrics)(**{**rec.metrics.__dict__, "test_loss": math.inf})
            yield rec

    monkeypatch.setattr(train_mod, "train_population", diverging)
    out = tmp_path / "zoo"
    with pytest.warns(UserWarning, match=r"dropped 3 checkpoint"):
        zoo = build_zoo(ZooConfig(**TINY), out, progress=False, cache_dir=cache_dir)
    keys = {(r["model_id"], r["epoch"]) for r in _rows(zoo)}
    assert len(keys) == 9 and (1, 1) not in keys and (1, 2) not in keys and (2, 2) not in keys
    assert load_zoo_summary(out)["dropped_checkpoints"] == 3
    assert "dropped 3 checkpoint" in (out / "README.md").read_text()


def test_align_preserves_function_and_moves_towards_reference(tiny_zoo, tmp_path, cache_dir):
    from sane_hf.alignment import state_dict_distance

    out_plain, plain = tiny_zoo
    out = tmp_path / "aligned"
    aligned = build_zoo(ZooConfig(**TINY, align=True), out, progress=False, cache_dir=cache_dir)
    cfg = load_zoo_config(out)
    plain_rows = {(r["model_id"], r["epoch"]): r for r in _rows(plain)}
    aligned_rows = {(r["model_id"], r["epoch"]): r for r in _rows(aligned)}
    assert plain_rows.keys() == aligned_rows.keys()
    ref = state_dict_from_bytes(aligned_rows[(0, 2)]["weights"])
    assert aligned_rows[(0, 2)]["weights"] == plain_rows[(0, 2)]["weights"]
    x = torch.randn(5, 1, 8, 8)
    for key, row in aligned_rows.items():
        with torch.no_grad():
            torch.testing.assert_close(zoo_model(cfg, row)(x), zoo_model(cfg, plain_rows[key])(x), rtol=1e-4, atol=1e-5)
        if key[1] == 2:
            d_aligned = state_dict_distance(state_dict_from_bytes(row["weights"]), ref)
            d_plain = state_dict_distance(state_dict_from_bytes(plain_rows[key]["weights"]), ref)
            assert d_aligned <= d_plain + 1e-6
    moved = [k for k in aligned_rows if aligned_rows[k]["weights"] != plain_rows[k]["weights"]]
    assert moved and all(k[0] != 0 for k in moved)  # some models were permuted, the reference never
    assert "aligned" in (out / "README.md").read_text()


def test_load_zoo_adds_empty_splits(tmp_path, cache_dir):
    from safetensors.torch import save_file

    from sane_hf.zoo.architectures import create_model
    from sane_hf.zoo.importers import import_folder

    src = tmp_path / "two"
    src.mkdir()
    for i in range(2):
        save_file(create_model("mlp", image_size=8, seed=i).state_dict(), src / f"m{i}.safetensors")
    out = tmp_path / "zoo"
    zoo = import_folder(src, out, progress=False, cache_dir=cache_dir)
    assert [len(zoo[s]) for s in SPLITS] == [2, 0, 0]
    assert zoo["test"].features == ZOO_FEATURES
    # also without the card: the parquet files alone
    (out / "README.md").unlink()
    assert len(load_zoo(out, cache_dir=cache_dir)["train"]) == 2
    shutil.rmtree(out / "data")
    with pytest.raises(FileNotFoundError, match="not a zoo folder"):
        load_zoo(out, cache_dir=cache_dir)


_MULTI_PROCESS_SCRIPT = """
import sys
import sane_hf.zoo.train as T
from sane_hf.zoo.dataset import ZooConfig, _distributed_state, build_zoo
real = T.train_population
def logged(*a, **k):
    print("rank", _distributed_state().process_index, "trains", list(k["model_ids"]), flush=True)
    return real(*a, **k)
T.train_population = logged
build_zoo(ZooConfig(**{tiny}), sys.argv[1], progress=False, cache_dir=sys.argv[2])
"""


@pytest.mark.slow
def test_multi_process_build_equals_single_process(tiny_zoo, tmp_path, cache_dir):
    """Two processes (torchrun, gloo on CPU) share the chunks; the main process assembles the same zoo."""
    import subprocess
    import sys
    from pathlib import Path

    _, reference = tiny_zoo
    script = tmp_path / "build.py"
    script.write_text(_MULTI_PROCESS_SCRIPT.replace("{tiny}", repr(TINY)))
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "zoo"
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script), str(out), cache_dir],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 trains [0, 1]" in proc.stdout and "rank 1 trains [2, 3]" in proc.stdout
    zoo = load_zoo(out, cache_dir=cache_dir)
    for split in SPLITS:
        assert zoo[split].to_list() == reference[split].to_list()


def test_check_single_architecture_names_the_mixed_architectures():
    import datasets

    from sane_hf.zoo.loading import check_single_architecture

    one = datasets.Dataset.from_dict({"arch": ["cnn-s", "cnn-s"], "model_id": [0, 1]})
    other = datasets.Dataset.from_dict({"arch": ["mlp"], "model_id": [2]})
    check_single_architecture(one)  # one split, one architecture
    check_single_architecture(datasets.DatasetDict({"train": one, "test": one}))
    check_single_architecture(datasets.DatasetDict({"train": one, "test": other.select([])}))  # empty split: ignored
    with pytest.raises(ValueError, match=r"mixes architectures \['cnn-s', 'mlp'\]; a WeightTokenizer covers one"):
        check_single_architecture(datasets.DatasetDict({"train": one, "test": other}))
    with pytest.raises(ValueError, match="SANE trains on one architecture per tokenizer: filter the zoo first"):
        check_single_architecture({"train": one, "validation": other}, "SANE trains on one architecture per tokenizer")
