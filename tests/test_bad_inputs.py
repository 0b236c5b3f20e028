"""Bad inputs, table-driven: every case raises a known error class whose message names the offending
key, file or flag; on the command line it is one line (``sane-hf ...: error: ...``), exit code != 0,
and no traceback. Cases are cheap: they fail before any training, on the session's tiny zoos."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sane_hf.cli import main
from sane_hf.configuration_sane import SaneConfig
from sane_hf.modeling_sane import SaneModel
from sane_hf.serialization import (
    FolderLockedError,
    check_output_folder,
    load_safetensors_bytes,
    load_safetensors_file,
)
from sane_hf.tokenization_sane import WeightTokenizer
from sane_hf.training import SaneTrainingConfig
from sane_hf.zoo.architectures import create_model
from sane_hf.zoo.dataset import ZooConfig, load_zoo
from sane_hf.zoo.importers import import_folder, load_checkpoint_file

PAYLOAD_MARKER_NAME = "PAYLOAD_RAN"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cnn_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    return create_model("cnn-s", image_size=8, seed=seed).state_dict()


def _tiny_sane_config(**overrides) -> SaneConfig:
    kwargs = dict(token_size=16, d_model=32, num_encoder_layers=1, num_decoder_layers=1, latent_dim=8,
                  projection_dim=8, window_size=32, halo_size=4)  # fmt: skip
    return SaneConfig(**{**kwargs, **overrides})


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _corrupt_shard(zoo: Path, truncate: bool) -> Path:
    shard = sorted((zoo / "data").glob("train-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    if truncate:
        data = data[: len(data) // 2]
    else:  # garbage inside the first snappy-compressed pages (model_id, epoch, seed), footer intact
        for offset in (70, 170, 280):
            data[offset : offset + 24] = b"\x00\x11\x22\x33" * 6
    shard.write_bytes(bytes(data))
    return shard


@pytest.fixture(scope="module")
def env(zoo_dir, zoo_and_model, tmp_path_factory) -> dict[str, Path]:
    """Broken copies of the session zoos and model, and bad import sources (made once)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    e: dict[str, Path] = {"root": root, "zoo": zoo_dir, "zoo9": zoo_and_model / "zoo", "sane": zoo_and_model / "sane"}
    e["marker"] = root / PAYLOAD_MARKER_NAME
    e["file"] = root / "a-file.txt"
    e["file"].write_text("not a folder\n")
    e["foreign"] = root / "foreign"
    e["foreign"].mkdir()
    (e["foreign"] / "notes.txt").write_text("mine\n")
    (e["foreign"] / "config.json").write_text("{}\n")

    for name, truncate in (("corrupt_zoo", False), ("truncated_zoo", True)):
        e[name] = root / name
        shutil.copytree(zoo_dir, e[name])
        e[name + "_shard"] = _corrupt_shard(e[name], truncate)
    e["empty_dir"] = root / "empty-dir"
    e["empty_dir"].mkdir()

    def sane_copy(name: str) -> Path:
        e[name] = root / name
        shutil.copytree(e["sane"], e[name])
        return e[name]

    weights = sane_copy("sane_trunc") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _edit_json(sane_copy("sane_badtype") / "config.json", d_model="64")
    _edit_json(sane_copy("sane_morelayers") / "config.json", num_encoder_layers=2)
    (sane_copy("sane_badtok") / "weight_tokenizer.json").write_text('{"token_size": 16,\n  "tensors": [\n')
    (sane_copy("sane_notok") / "weight_tokenizer.json").unlink()
    (sane_copy("sane_pickletok") / "weight_tokenizer.json").write_bytes(pickle.dumps(_Payload(e["marker"])))
    e["sane_fewer"] = root / "sane_fewer"  # weights of 2 encoder layers, config.json of 1
    torch.manual_seed(0)
    SaneModel(_tiny_sane_config(num_encoder_layers=2)).save_pretrained(e["sane_fewer"])
    _edit_json(e["sane_fewer"] / "config.json", num_encoder_layers=1)
    shutil.copy(e["sane"] / "weight_tokenizer.json", e["sane_fewer"])
    e["sane_huge"] = root / "sane_huge"
    shutil.copytree(e["sane"], e["sane_huge"])
    blob = (e["sane_huge"] / "model.safetensors").read_bytes()
    (e["sane_huge"] / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + blob[8:])

    # an old run folder: a checkpoint of pickles written by Accelerate's save_state (one carries a payload)
    e["old_run"] = root / "old-run"
    ckpt = e["old_run"] / "checkpoints" / "checkpoint_2"
    ckpt.mkdir(parents=True)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload(e["marker"])))
    SaneTrainingConfig(output_dir=str(e["old_run"])).to_json_file(e["old_run"] / "training_config.json")

    # import sources
    def src(name: str, n: int = 2) -> Path:
        e[name] = root / name
        e[name].mkdir()
        for i in range(n):
            save_file(_cnn_sd(i), str(e[name] / f"m{i}.safetensors"))
        return e[name]

    good = _cnn_sd(0)
    src("imp_good")
    (src("imp_trunc", 1) / "m0.safetensors").write_bytes((e["imp_trunc"] / "m0.safetensors").read_bytes()[:300])
    path = src("imp_huge", 1) / "m0.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])
    (src("imp_garbage", 1) / "m0.safetensors").write_bytes(b"this is not a safetensors file at all")
    e["imp_pickle"] = root / "imp_pickle"
    e["imp_pickle"].mkdir()
    (e["imp_pickle"] / "m0.pt").write_bytes(pickle.dumps(_Payload(e["marker"])))
    (src("imp_badjson") / "properties.json").write_text('{\n  "m0": {"test_acc": 0.5},\n  "m1": {"test_acc": 0.6,}\n}\n')
    (src("imp_dupcsv") / "properties.csv").write_text("file,test_acc\nm0,0.5\nm1,0.6\nm0,0.7\n")
    (src("imp_dupjson") / "properties.json").write_text(json.dumps({"m0": {"test_acc": 0.5}, "m0.safetensors": {}}))
    (src("imp_inf") / "properties.csv").write_text("file,test_acc,epoch\nm0,0.5,1\nm1,1e999,1\n")
    (src("imp_dupepoch") / "properties.csv").write_text("file,model_id,epoch\nm0,0,3\nm1,0,3\n")
    (src("imp_nofile") / "properties.csv").write_text("test_acc\n0.5\n")
    (src("imp_jsonlist") / "properties.json").write_text("[1, 2, 3]\n")
    (src("imp_jsonvalues") / "properties.json").write_text(json.dumps({"m0": 0.5}))
    mixed = src("imp_mixed", 1)
    save_file(create_model("mlp", image_size=8, seed=0).state_dict(), str(mixed / "other.safetensors"))
    stem = src("imp_stem", 1)
    torch.save(good, stem / "m0.pt")
    e["imp_notsd"] = root / "imp_notsd"
    e["imp_notsd"].mkdir()
    torch.save([1, 2, 3], e["imp_notsd"] / "m0.pt")
    e["imp_meta"] = root / "imp_meta"
    return e


def _cli(argv: list[str], capsys) -> str:
    """Run ``sane-hf argv`` in-process: it must fail with one message and no traceback; returns the message."""
    capsys.readouterr()
    try:
        code = main(argv)
        captured = capsys.readouterr()
        message = captured.err
    except SystemExit as stop:  # our SystemExit("sane-hf ...: ...") or argparse's exit(2) after printing usage
        captured = capsys.readouterr()
        code = stop.code
        message = stop.code if isinstance(stop.code, str) else captured.err
    assert code not in (0, None), f"succeeded: {argv}"
    assert "Traceback" not in message and "Traceback" not in captured.out
    lines = [line for line in message.strip().splitlines() if line.strip()]
    assert lines, "no error message"
    return message


# ----------------------------------------------------------------------------------------------
# the command line: (id, argv(env, out), regex the message must match)

ZOO_BUILD = ["zoo", "build", "--task", "digits", "--arch", "cnn-s", "--num-models", "3", "--epochs", "1",
             "--train-subset", "64", "--eval-subset", "32", "--no-progress"]  # fmt: skip


def _train(e, out, *extra):
    return ["train", "--zoo", str(e["zoo"]), "--out", str(out), "--config", "small", "--no_progress",
            "--max-steps", "1", *extra]  # fmt: skip


def _probe(e, out, model="sane", zoo="zoo9", *extra):
    return ["probe", "--model", str(e[model]), "--zoo", str(e[zoo]), "--out", str(out), "--no-progress",
            "--no-plots", *extra]  # fmt: skip


def _sample(e, out, model="sane", *extra):
    return ["sample", "--model", str(e[model]), "--zoo", str(e["zoo9"]), "--out", str(out), "--no-progress", *extra]


def _import(e, name, out, *extra):
    return ["zoo", "import", str(e[name]), "--format", "folder", "--out", str(out), "--no-progress", *extra]


CLI_CASES = [
    # -- sane-hf train: flags -------------------------------------------------------------------
    ("train-batch-size-1", lambda e, o: _train(e, o, "--batch-size", "1"), r"batch_size must be >= 2"),
    ("train-lr-0", lambda e, o: _train(e, o, "--learning-rate", "0"), r"learning_rate must be > 0"),
    ("train-warmup-1", lambda e, o: _train(e, o, "--warmup-ratio", "1.0"), r"warmup_ratio"),
    ("train-mixed-fp8", lambda e, o: _train(e, o, "--mixed-precision", "fp8"), r"mixed.precision"),
    ("train-scheduler", lambda e, o: _train(e, o, "--lr-scheduler", "step"), r"lr.scheduler"),
    ("train-epochs-0", lambda e, o: _train(e, o, "--num-epochs", "0"), r"num_epochs must be > 0"),
    ("train-accum-0", lambda e, o: _train(e, o, "--gradient-accumulation-steps", "0"), r"gradient_accumulation_steps"),
    ("train-erase-2", lambda e, o: _train(e, o, "--erase-prob", "2"), r"erase_prob"),
    ("train-noise-neg", lambda e, o: _train(e, o, "--noise-std", "-1"), r"noise_std"),
    ("train-save-limit-0", lambda e, o: _train(e, o, "--save-total-limit", "0"), r"save_total_limit"),
    ("train-max-steps-0", lambda e, o: _train(e, o, "--max-steps", "0"), r"max_steps"),
    ("train-tracker", lambda e, o: _train(e, o, "--tracker", "wandb"), r"tracker"),
    ("train-resume-and-overwrite", lambda e, o: _train(e, o, "--resume", "--overwrite"), r"exclude each other"),
    ("train-window-0", lambda e, o: _train(e, o, "--window-size", "0"), r"--window-size"),
    ("train-token-size-0", lambda e, o: _train(e, o, "--token-size", "0"), r"--token-size"),
    ("train-halo-negative", lambda e, o: _train(e, o, "--halo-size", "-1"), r"halo_size"),
    ("train-halo-too-big", lambda e, o: _train(e, o, "--window-size", "16", "--halo-size", "8"), r"halo_size"),
    ("train-window-too-long", lambda e, o: _train(e, o, "--window-size", "500", "--token-size", "16"),
     r"window_size \(500\)"),
    ("train-bad-preset", lambda e, o: _train(e, o, "--config", "huge"), r"--config"),
    # -- sane-hf train: files and folders -------------------------------------------------------
    ("train-zoo-missing", lambda e, o: ["train", "--zoo", str(e["root"] / "no-zoo"), "--out", str(o)], r"no-zoo"),
    ("train-zoo-is-file", lambda e, o: ["train", "--zoo", str(e["file"]), "--out", str(o)], r"a-file\.txt"),
    ("train-zoo-empty-dir", lambda e, o: ["train", "--zoo", str(e["empty_dir"]), "--out", str(o)],
     r"empty-dir.*not a zoo folder"),
    ("train-zoo-corrupt-shard", lambda e, o: ["train", "--zoo", str(e["corrupt_zoo"]), "--out", str(o),
                                              "--max-steps", "1", "--no_progress"], r"train-00000.*parquet"),
    ("train-zoo-truncated-shard", lambda e, o: ["train", "--zoo", str(e["truncated_zoo"]), "--out", str(o),
                                                "--max-steps", "1", "--no_progress"], r"train-00000.*parquet"),
    ("train-out-is-file", lambda e, o: _train(e, e["file"]), r"a-file\.txt is a file"),
    ("train-out-foreign", lambda e, o: _train(e, e["foreign"]), r"foreign is not empty.*--overwrite"),
    ("train-out-under-file", lambda e, o: _train(e, e["file"] / "sub"), r"a-file\.txt is a file"),
    ("train-resume-old-pickles", lambda e, o: _train(e, e["old_run"], "--resume"),
     r"checkpoint_2 holds pickled training state.*never loaded"),
    ("train-model-config-missing", lambda e, o: _train(e, o, "--model-config", str(e["root"] / "nope.json")),
     r"--model-config .*nope\.json"),
    ("train-model-config-bad-type", lambda e, o: _train(e, o, "--model-config", str(e["sane_badtype"] / "config.json")),
     r"--model-config .*config\.json.*d_model"),
    ("train-model-config-bad-json", lambda e, o: _train(e, o, "--model-config", str(e["file"])),
     r"--model-config .*a-file\.txt"),
    ("train-tokenizer-missing", lambda e, o: _train(e, o, "--tokenizer", str(e["root"] / "no-tok")), r"no-tok"),
    ("train-tokenizer-broken", lambda e, o: _train(e, o, "--tokenizer", str(e["sane_badtok"])),
     r"weight_tokenizer\.json is not a valid"),
    ("train-tokenizer-pickle", lambda e, o: _train(e, o, "--tokenizer", str(e["sane_pickletok"])),
     r"weight_tokenizer\.json is not a valid"),
    ("train-tokenizer-folder-without", lambda e, o: _train(e, o, "--tokenizer", str(e["sane_notok"])),
     r"holds no weight_tokenizer\.json"),
    # -- sane-hf zoo build ----------------------------------------------------------------------
    ("build-arch", lambda e, o: [*ZOO_BUILD, "--arch", "bogus", "--out", str(o)], r"unknown architecture 'bogus'"),
    ("build-task", lambda e, o: [*ZOO_BUILD, "--task", "bogus", "--out", str(o)], r"unknown task 'bogus'"),
    ("build-num-models-0", lambda e, o: [*ZOO_BUILD, "--num-models", "0", "--out", str(o)], r"num_models"),
    ("build-epochs-neg", lambda e, o: [*ZOO_BUILD, "--epochs", "-1", "--out", str(o)], r"epochs must be >= 0"),
    ("build-arch-kwargs-unknown", lambda e, o: [*ZOO_BUILD, "--arch-kwargs", '{"bogus": 1}', "--out", str(o)],
     r"'bogus'"),
    ("build-arch-kwargs-negative", lambda e, o: [*ZOO_BUILD, "--arch", "resnet18", "--arch-kwargs", '{"width": -3}',
                                                 "--out", str(o)], r"arch_kwargs\['width'\].*-3"),
    ("build-arch-kwargs-type", lambda e, o: [*ZOO_BUILD, "--arch", "mlp", "--arch-kwargs", '{"hidden": 5}',
                                             "--out", str(o)], r"arch_kwargs\['hidden'\]"),
    ("build-arch-kwargs-zero", lambda e, o: [*ZOO_BUILD, "--arch", "mlp", "--arch-kwargs", '{"hidden": [8, 0]}',
                                             "--out", str(o)], r"arch_kwargs\['hidden'\]"),
    ("build-arch-kwargs-not-json", lambda e, o: [*ZOO_BUILD, "--arch-kwargs", "{width: 3}", "--out", str(o)],
     r"--arch-kwargs.*not valid JSON"),
    ("build-arch-kwargs-list", lambda e, o: [*ZOO_BUILD, "--arch-kwargs", "[1]", "--out", str(o)],
     r"--arch-kwargs.*JSON object"),
    ("build-grid-unknown", lambda e, o: [*ZOO_BUILD, "--grid", '{"nope": [1]}', "--out", str(o)],
     r"unknown grid options \['nope'\]"),
    ("build-split-sum", lambda e, o: [*ZOO_BUILD, "--split-fractions", "0.5", "0.5", "0.5", "--out", str(o)],
     r"split_fractions must sum to 1"),
    ("build-checkpoint-epochs", lambda e, o: [*ZOO_BUILD, "--checkpoint-epochs", "5", "--out", str(o)],
     r"checkpoint_epochs"),
    ("build-chunk-0", lambda e, o: [*ZOO_BUILD, "--models-per-chunk", "0", "--out", str(o)], r"models_per_chunk"),
    ("build-image-size-0", lambda e, o: [*ZOO_BUILD, "--image-size", "0", "--out", str(o)], r"image_size"),
    ("build-config-missing", lambda e, o: [*ZOO_BUILD, "--config", str(e["root"] / "nope.json"), "--out", str(o)],
     r"nope\.json"),
    ("build-out-is-file", lambda e, o: [*ZOO_BUILD, "--out", str(e["file"])], r"a-file\.txt is a file"),
    ("build-out-foreign", lambda e, o: [*ZOO_BUILD, "--out", str(e["foreign"])], r"foreign is not empty.*--overwrite"),
    ("build-out-other-zoo", lambda e, o: [*ZOO_BUILD, "--out", str(e["zoo"])], r"already holds a different zoo"),
    # -- sane-hf zoo import ---------------------------------------------------------------------
    ("import-src-missing", lambda e, o: ["zoo", "import", str(e["root"] / "no-src"), "--format", "folder",
                                         "--out", str(o)], r"no-src"),
    ("import-src-empty", lambda e, o: _import(e, "empty_dir", o), r"empty-dir holds no checkpoint files"),
    ("import-truncated-safetensors", lambda e, o: _import(e, "imp_trunc", o), r"m0\.safetensors.*truncated"),
    ("import-huge-header", lambda e, o: _import(e, "imp_huge", o), r"m0\.safetensors.*header claims"),
    ("import-garbage-safetensors", lambda e, o: _import(e, "imp_garbage", o), r"m0\.safetensors"),
    ("import-pickle-payload", lambda e, o: _import(e, "imp_pickle", o), r"m0\.pt.*weights_only=True"),
    ("import-not-a-state-dict", lambda e, o: _import(e, "imp_notsd", o), r"m0\.pt does not hold a state_dict"),
    ("import-properties-bad-json", lambda e, o: _import(e, "imp_badjson", o), r"properties\.json.*line 3"),
    ("import-properties-dup-csv", lambda e, o: _import(e, "imp_dupcsv", o),
     r"properties\.csv: several rows name the same checkpoint: \[\"'m0' and 'm0' → m0\.safetensors"),
    ("import-properties-dup-json", lambda e, o: _import(e, "imp_dupjson", o), r"properties\.json: several rows name the same checkpoint.*'m0\.safetensors'"),
    ("import-properties-inf", lambda e, o: _import(e, "imp_inf", o), r"m1\.safetensors: property test_acc = inf"),
    ("import-duplicate-model-epoch", lambda e, o: _import(e, "imp_dupepoch", o),
     r"m0\.safetensors and m1\.safetensors \(model 'model_id=0', epoch 3\)"),
    ("import-properties-no-file", lambda e, o: _import(e, "imp_nofile", o), r"properties\.csv: record 0 has no 'path' entry"),
    ("import-properties-json-list", lambda e, o: _import(e, "imp_jsonlist", o), r"properties\.json must hold"),
    ("import-properties-json-values", lambda e, o: _import(e, "imp_jsonvalues", o), r"properties\.json.*\['m0'\]"),
    ("import-mixed-archs", lambda e, o: _import(e, "imp_mixed", o), r"mixes 2 architectures"),
    ("import-shared-stem", lambda e, o: _import(e, "imp_stem", o), r"share a name \['m0'\]"),
    ("import-properties-wrong-format", lambda e, o: ["zoo", "import", str(e["imp_dupcsv"]), "--format", "modelzoos",
                                                     "--properties", "x.csv", "--out", str(o)], r"--properties"),
    ("import-bad-format", lambda e, o: ["zoo", "import", str(e["imp_dupcsv"]), "--format", "bogus", "--out", str(o)],
     r"--format"),
    ("import-out-is-file", lambda e, o: _import(e, "imp_good", e["file"]), r"a-file\.txt is a file"),
    ("import-out-foreign", lambda e, o: _import(e, "imp_good", e["foreign"]), r"foreign is not empty"),
    # -- sane-hf probe --------------------------------------------------------------------------
    ("probe-model-missing", lambda e, o: _probe(e, o, "root") + ["--model", str(e["root"] / "no-model")],
     r"no-model holds no config\.json"),
    ("probe-truncated-weights", lambda e, o: _probe(e, o, "sane_trunc"), r"sane_trunc/model\.safetensors is truncated"),
    ("probe-huge-header", lambda e, o: _probe(e, o, "sane_huge"), r"sane_huge/model\.safetensors is truncated"),
    ("probe-config-wrong-type", lambda e, o: _probe(e, o, "sane_badtype"), r"config\.json of .*sane_badtype.*d_model"),
    ("probe-config-more-layers", lambda e, o: _probe(e, o, "sane_morelayers"),
     r"sane_morelayers do not fit its config\.json \(missing keys"),
    ("probe-weights-extra-layers", lambda e, o: _probe(e, o, "sane_fewer"), r"sane_fewer.*unexpected keys"),
    ("probe-tokenizer-broken", lambda e, o: _probe(e, o, "sane_badtok"), r"weight_tokenizer\.json is not a valid"),
    ("probe-tokenizer-missing", lambda e, o: _probe(e, o, "sane_notok"), r"holds no weight_tokenizer\.json"),
    ("probe-zoo-missing", lambda e, o: _probe(e, o, "sane", "root") + ["--zoo", str(e["root"] / "no-zoo")],
     r"no-zoo does not exist"),
    ("probe-zoo-corrupt", lambda e, o: _probe(e, o, "sane", "corrupt_zoo"), r"corrupt_zoo/data/train-00000.*parquet"),
    ("probe-zoo-truncated", lambda e, o: _probe(e, o, "sane", "truncated_zoo"), r"truncated_zoo/data/train-00000"),
    ("probe-out-is-file", lambda e, o: _probe(e, e["file"]), r"a-file\.txt is a file"),
    ("probe-out-foreign", lambda e, o: _probe(e, e["foreign"]), r"foreign is not empty.*--overwrite"),
    ("probe-bad-target", lambda e, o: _probe(e, o, "sane", "zoo9", "--targets", "nope"), r"'nope'"),
    ("probe-bad-method", lambda e, o: _probe(e, o, "sane", "zoo9", "--methods", "magic"), r"--methods"),
    # -- sane-hf sample -------------------------------------------------------------------------
    ("sample-model-missing", lambda e, o: _sample(e, o, "root") + ["--model", str(e["root"] / "no-model")],
     r"no-model holds no config\.json"),
    ("sample-truncated-weights", lambda e, o: _sample(e, o, "sane_trunc"), r"model\.safetensors is truncated"),
    ("sample-config-more-layers", lambda e, o: _sample(e, o, "sane_morelayers"), r"missing keys"),
    ("sample-out-is-file", lambda e, o: _sample(e, e["file"]), r"a-file\.txt is a file"),
    ("sample-out-foreign", lambda e, o: _sample(e, e["foreign"]), r"foreign is not empty.*--overwrite"),
    # -- sane-hf push ---------------------------------------------------------------------------
    ("push-bad-repo-id", lambda e, o: ["push", "--model", str(e["sane"]), "--repo-id", "bad repo!!/x y", "--dry-run"],
     r"--repo-id 'bad repo!!/x y' is not a valid Hub repo id"),
    ("push-deep-repo-id", lambda e, o: ["push", "--model", str(e["sane"]), "--repo-id", "a/b/c", "--dry-run"],
     r"--repo-id 'a/b/c'"),
    ("push-bad-dataset-repo-id", lambda e, o: ["push", "--zoo", str(e["zoo"]), "--dataset-repo-id", "user/a..b",
                                               "--dry-run"], r"--dataset-repo-id 'user/a\.\.b'"),
    ("push-model-without-repo", lambda e, o: ["push", "--model", str(e["sane"]), "--dry-run"], r"--model needs --repo-id"),
    ("push-nothing", lambda e, o: ["push", "--dry-run"], r"nothing to push"),
    # -- sane-hf quickstart ---------------------------------------------------------------------
    ("quickstart-out-is-file", lambda e, o: ["quickstart", "--fast", "--out", str(e["file"]), "--no-progress"],
     r"a-file\.txt is a file"),
    ("quickstart-out-foreign", lambda e, o: ["quickstart", "--fast", "--out", str(e["foreign"]), "--no-progress"],
     r"foreign is not empty.*--overwrite"),
]  # fmt: skip


@pytest.mark.parametrize("make_argv, pattern", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line(env, tmp_path, capsys, make_argv, pattern):
    before = sorted(p.name for p in env["foreign"].iterdir())
    message = _cli(make_argv(env, tmp_path / "out"), capsys)
    assert __import__("re").search(pattern, message, flags=__import__("re").S), message
    assert not env["marker"].exists(), "a pickle payload ran"
    assert sorted(p.name for p in env["foreign"].iterdir() if not p.name.startswith(".sane-hf.lock")) == before


def test_cli_errors_are_single_lines(env, tmp_path, capsys):
    """Errors raised deep inside (not by a command's own checks) still come out as one `error:` line."""
    message = _cli(["probe", "--model", str(env["sane_trunc"]), "--zoo", str(env["zoo9"]), "--out",
                    str(tmp_path / "o")], capsys)  # fmt: skip
    assert message.startswith("sane-hf probe: error: ") and message.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# the Python API: (id, call(env, tmp), error class, regex)


def _tok(e) -> WeightTokenizer:
    return WeightTokenizer.from_pretrained(e["sane"])


def _meta_sd():
    with torch.device("meta"):
        return create_model("cnn-s", image_size=8).state_dict()


def _scaled(factor: float):
    sd = _cnn_sd(0)
    return {k: v * factor if k == "conv1.weight" else v for k, v in sd.items()}


def _nan_sd():
    sd = _cnn_sd(0)
    sd["fc2.bias"] = sd["fc2.bias"].clone()
    sd["fc2.bias"][0] = float("nan")
    return sd


def _bad_tokens(e, value: float):
    tok = _tok(e)
    tokens = tok.encode(_cnn_sd(0))
    tokens.tokens[0, 0] = value
    return tok, tokens


def _embed_beyond_tables(e):
    from sane_hf.embedding import embed_models

    model = SaneModel(_tiny_sane_config(max_positions=(1000, 3, 64), position_encoding="learned-tables"))  # 5 layers
    calls = []
    model.encode = lambda *a, **k: calls.append(1)  # noqa: ARG005 - would record a window being encoded
    try:
        embed_models(model, _tok(e), [_cnn_sd(0)])
    finally:
        assert not calls, "windows were encoded before the check"


def _hold_lock_and_call(folder: Path, fn):
    """Hold folder's lock in another process while ``fn`` runs here."""
    import subprocess
    import sys
    import time

    code = ("import sys, time; from sane_hf.serialization import folder_lock\n"
            "with folder_lock(sys.argv[1], 'test writer'):\n    print('locked', flush=True); time.sleep(60)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        time.sleep(0.1)
        fn()
    finally:
        proc.kill()
        proc.wait()
    return proc.pid


API_CASES = [
    # -- SaneModel.from_pretrained --------------------------------------------------------------
    ("model-mistyped-local-path", lambda e, t: SaneModel.from_pretrained(str(e["root"] / "sane-typo")), OSError,
     r"model folder .*sane-typo does not exist"),
    ("model-relative-typo", lambda e, t: SaneModel.from_pretrained("./no/such/run"), OSError, r"\./no/such/run"),
    ("model-path-is-file", lambda e, t: SaneModel.from_pretrained(str(e["file"])), OSError, r"a-file\.txt is a file"),
    ("model-truncated-weights", lambda e, t: SaneModel.from_pretrained(e["sane_trunc"]), ValueError,
     r"sane_trunc/model\.safetensors is truncated"),
    ("model-huge-header", lambda e, t: SaneModel.from_pretrained(e["sane_huge"]), ValueError,
     r"sane_huge/model\.safetensors"),
    ("model-config-wrong-type", lambda e, t: SaneModel.from_pretrained(e["sane_badtype"]), ValueError, r"d_model"),
    ("model-missing-weights", lambda e, t: SaneModel.from_pretrained(e["sane_morelayers"]), ValueError,
     r"missing keys \['encoder\.layers\.1"),
    ("model-unexpected-weights", lambda e, t: SaneModel.from_pretrained(e["sane_fewer"]), ValueError,
     r"unexpected keys \['encoder\.layers\.1"),
    # -- WeightTokenizer ------------------------------------------------------------------------
    ("tokenizer-broken-json", lambda e, t: WeightTokenizer.from_pretrained(e["sane_badtok"]), ValueError,
     r"sane_badtok/weight_tokenizer\.json is not a valid"),
    ("tokenizer-pickle", lambda e, t: WeightTokenizer.from_pretrained(e["sane_pickletok"]), ValueError,
     r"sane_pickletok/weight_tokenizer\.json is not a valid"),
    ("tokenizer-folder-without", lambda e, t: WeightTokenizer.from_pretrained(e["sane_notok"]), OSError,
     r"sane_notok.*holds no weight_tokenizer\.json"),
    ("encode-meta-tensors", lambda e, t: _tok(e).encode(_meta_sd()), ValueError, r"'conv1\.weight'\] is a meta tensor"),
    ("encode-nan", lambda e, t: _tok(e).encode(_nan_sd()), ValueError, r"'fc2\.bias'.*NaN or Inf"),
    ("encode-inf", lambda e, t: _tok(e).encode(_scaled(float("inf"))), ValueError, r"'conv1\.weight'.*NaN or Inf"),
    ("encode-normalize-overflow", lambda e, t: _tok(e).encode(_scaled(3e38), normalize=True), ValueError,
     r"non-finite tokens after normalisation"),
    ("encode-float64", lambda e, t: _tok(e).encode({k: v.double() for k, v in _cnn_sd(0).items()}), TypeError,
     r"'conv1\.weight' is float64"),
    ("encode-missing-key", lambda e, t: _tok(e).encode({k: v for k, v in _cnn_sd(0).items() if k != "fc2.bias"}),
     ValueError, r"fc2\.bias"),
    ("decode-nan-tokens", lambda e, t: (lambda tk: tk[0].decode(tk[1]))(_bad_tokens(e, float("nan"))), ValueError,
     r"decode: the tokens give non-finite values for 'conv1\.weight'"),
    ("decode-inf-tokens", lambda e, t: (lambda tk: tk[0].decode_batch(tk[1].tokens[None]))(_bad_tokens(e, math.inf)),
     ValueError, r"decode_batch\[0\].*'conv1\.weight'"),
    ("embed-beyond-position-tables", lambda e, t: _embed_beyond_tables(e), ValueError,
     r"cannot be embedded with this SANE model: Position index 4 on axis l"),
    # -- architectures and zoo configs ----------------------------------------------------------
    ("arch-kwargs-unknown", lambda e, t: create_model("cnn-s", bogus=1), ValueError, r"no argument 'bogus'"),
    ("arch-kwargs-negative-width", lambda e, t: create_model("resnet18", width=-3), ValueError,
     r"arch_kwargs\['width'\].*-3"),
    ("arch-kwargs-bool-width", lambda e, t: create_model("resnet18", width=True), ValueError, r"'width'"),
    ("arch-kwargs-hidden-scalar", lambda e, t: create_model("mlp", hidden=5), ValueError, r"'hidden'"),
    ("zooconfig-arch-kwargs", lambda e, t: ZooConfig(arch="cnn-m", arch_kwargs={"width": 8}), ValueError,
     r"'cnn-m' takes no argument 'width'"),
    ("zooconfig-unknown-field", lambda e, t: ZooConfig.from_dict({"archh": "mlp"}), ValueError, r"archh"),
    # -- zoo folders ----------------------------------------------------------------------------
    ("load-zoo-corrupt-shard", lambda e, t: load_zoo(e["corrupt_zoo"], cache_dir=str(t / "c")), ValueError,
     r"corrupt_zoo/data/train-00000-of-00001\.parquet is corrupt"),
    ("load-zoo-truncated-shard", lambda e, t: load_zoo(e["truncated_zoo"], cache_dir=str(t / "c")), ValueError,
     r"truncated_zoo/data/train-00000-of-00001\.parquet"),
    ("load-zoo-mistyped", lambda e, t: load_zoo(str(e["root"] / "zoo-typo")), FileNotFoundError,
     r"zoo-typo does not exist"),
    ("load-zoo-is-file", lambda e, t: load_zoo(e["file"]), FileNotFoundError, r"a-file\.txt is a file"),
    ("load-zoo-empty-dir", lambda e, t: load_zoo(e["empty_dir"]), FileNotFoundError, r"empty-dir.*not a zoo folder"),
    # -- importers ------------------------------------------------------------------------------
    ("import-truncated", lambda e, t: import_folder(e["imp_trunc"], t / "z", progress=False), ValueError,
     r"m0\.safetensors.*truncated"),
    ("import-huge-header", lambda e, t: import_folder(e["imp_huge"], t / "z", progress=False), ValueError,
     r"m0\.safetensors.*header claims 4611686018427387904 bytes"),
    ("load-checkpoint-pickle", lambda e, t: load_checkpoint_file(e["imp_pickle"] / "m0.pt"), ValueError,
     r"m0\.pt with torch\.load\(weights_only=True\)"),
    ("import-dup-csv", lambda e, t: import_folder(e["imp_dupcsv"], t / "z", progress=False), ValueError,
     r"several rows name the same checkpoint"),
    ("import-inf", lambda e, t: import_folder(e["imp_inf"], t / "z", progress=False), ValueError,
     r"test_acc = inf"),
    ("import-dup-epoch", lambda e, t: import_folder(e["imp_dupepoch"], t / "z", progress=False), ValueError,
     r"two checkpoints for the same model and epoch"),
    ("import-bad-json", lambda e, t: import_folder(e["imp_badjson"], t / "z", progress=False), ValueError,
     r"line 3, column"),
    # -- safetensors readers --------------------------------------------------------------------
    ("safetensors-bytes-short", lambda e, t: load_safetensors_bytes(b"abc", "blob"), ValueError, r"blob is truncated"),
    ("safetensors-bytes-huge", lambda e, t: load_safetensors_bytes(struct.pack("<Q", 2**62) + b"{}", "blob"),
     ValueError, r"blob .*header claims"),
    ("safetensors-file-garbage", lambda e, t: load_safetensors_file(e["imp_garbage"] / "m0.safetensors"), ValueError,
     r"m0\.safetensors"),
    ("safetensors-file-missing", lambda e, t: load_safetensors_file(t / "nope.safetensors"), FileNotFoundError,
     r"nope\.safetensors"),
    # -- output folders and locks ---------------------------------------------------------------
    ("out-is-file", lambda e, t: check_output_folder(e["file"], kind="train"), NotADirectoryError, r"a-file\.txt"),
    ("out-foreign", lambda e, t: check_output_folder(e["foreign"], kind="probe"), FileExistsError,
     r"notes\.txt.*--overwrite"),
    ("out-locked", lambda e, t: _hold_lock_and_call(t / "locked", lambda: __import__("sane_hf.zoo.dataset").zoo.dataset
                                                    .build_zoo(ZooConfig(num_models=2, epochs=0), t / "locked")),
     FolderLockedError, r"locked is being written by pid \d+ on host .* \(test writer"),
    # -- training ------------------------------------------------------------------------------
    ("train-config-batch", lambda e, t: SaneTrainingConfig(batch_size=1), ValueError, r"batch_size must be >= 2"),
    ("train-config-unknown", lambda e, t: SaneTrainingConfig.from_dict({"lerning_rate": 1}), ValueError,
     r"lerning_rate"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(env, tmp_path, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(env, tmp_path)
    assert not env["marker"].exists(), "a pickle payload ran"


def test_train_sane_refuses_old_pickled_checkpoints(env, zoo_dir):
    from sane_hf.training import train_sane

    with pytest.raises(ValueError, match=r"pickled training state \(custom_checkpoint_0\.pkl, optimizer\.bin, "
                                         r"random_states_0\.pkl\)"):  # fmt: skip
        train_sane(_tiny_sane_config(), zoo_dir, SaneTrainingConfig(output_dir=str(env["old_run"]), resume=True))
    assert not env["marker"].exists()


def test_there_are_at_least_100_cases():
    assert len(CLI_CASES) + len(API_CASES) >= 100


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root may write into read-only folders")  # fmt: skip
@pytest.mark.parametrize("command", ["zoo-build", "probe", "sample"])
def test_read_only_out_is_one_line(env, tmp_path, capsys, command):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "out"
    argv = {"zoo-build": [*ZOO_BUILD, "--out", str(out)], "probe": _probe(env, out), "sample": _sample(env, out)}
    try:
        message = _cli(argv[command], capsys)
    finally:
        locked.chmod(0o755)
    assert "read-only" in message and str(locked) in message


def test_float64_import_is_converted_with_a_message(tmp_path):
    src = tmp_path / "f64"
    src.mkdir()
    for i in range(3):
        save_file({k: v.double() for k, v in _cnn_sd(i).items()}, str(src / f"m{i}.safetensors"))
    with pytest.warns(UserWarning, match=r"converted float64 weights to float32 in 3 checkpoint\(s\)"):
        zoo = import_folder(src, tmp_path / "zoo", progress=False, cache_dir=str(tmp_path / "c"))
    from sane_hf.zoo.dataset import state_dict_from_bytes

    row = next(r for split in zoo.values() for r in split)
    sd = state_dict_from_bytes(row["weights"])
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert torch.equal(sd["conv1.weight"], _cnn_sd(row["model_id"])["conv1.weight"])  # float32 -> 64 -> 32 is exact


def test_zoo_build_removes_only_its_own_temp_folders(tmp_path):
    from sane_hf.zoo.dataset import _TEMP_JOURNAL, build_zoo

    out = tmp_path / "zoo"
    out.mkdir()
    (out / ".sane-hf-owner.json").write_text('{"kind": "zoo"}\n')  # an earlier build of ours was killed...
    (out / ".data-tmp-4242").mkdir()  # ...leaving its temp folder, listed in its journal
    (out / _TEMP_JOURNAL).write_text('[".data-tmp-4242"]\n')
    (out / ".data-tmp-777").mkdir()  # a folder with a look-alike name that no journal lists: not ours
    (out / ".data-tmp-777" / "keep.txt").write_text("someone else's\n")
    build_zoo(ZooConfig(num_models=2, epochs=0, train_subset=32, eval_subset=32), out, progress=False,
              cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert not (out / ".data-tmp-4242").exists() and not (out / _TEMP_JOURNAL).exists()
    assert (out / ".data-tmp-777" / "keep.txt").read_text() == "someone else's\n"
