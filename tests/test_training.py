"""train_sane: loss goes down, final folder, exact kill/resume, 2 processes, bad inputs fail early."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest
import torch

from sane_hf.configuration_sane import SaneConfig
from sane_hf.modeling_sane import SaneModel
from sane_hf.tokenization_sane import WeightTokenizer
from sane_hf.training import (
    PRESETS,
    SaneTrainingConfig,
    TrainingInterrupted,
    latest_checkpoint,
    sane_config_preset,
    train_sane,
)
from sane_hf.zoo.dataset import fit_tokenizer_on_zoo, load_zoo, tokenize_zoo

TOKEN_SIZE = 16  # cnn-s on 8x8 digits: 102 tokens of 16 values


def tiny_config(**overrides) -> SaneConfig:
    kwargs = dict(token_size=TOKEN_SIZE, d_model=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
                  latent_dim=8, projection_dim=16, window_size=32, halo_size=4)  # fmt: skip
    return SaneConfig(**{**kwargs, **overrides})


def tiny_training(out, **overrides) -> SaneTrainingConfig:
    kwargs = dict(output_dir=str(out), batch_size=8, learning_rate=3e-3, eval_steps=10, save_steps=10,
                  progress=False, num_threads=1, windows_per_sample=4)  # fmt: skip
    return SaneTrainingConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def raw_zoo(zoo_dir, tmp_path_factory):
    return load_zoo(zoo_dir, cache_dir=str(tmp_path_factory.getbasetemp() / "hf-cache"))


@pytest.fixture(scope="module")
def trained(zoo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sane"
    path = train_sane(tiny_config(), zoo_dir, tiny_training(out, max_steps=30, eval_on_start=True))
    return path


def test_training_reduces_validation_loss_and_writes_the_model_folder(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "weight_tokenizer.json", "configuration_sane.py", "modeling_sane.py",
            "training_config.json", "metrics.json", "zoo_config.json", "checkpoints"} <= names  # fmt: skip
    assert not [n for n in names if n.startswith(".tmp")]
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["permutation_views"] is True
    assert metrics["val_loss"] < metrics["initial_val_loss"]
    assert [h["step"] for h in metrics["eval_history"]] == [0, 10, 20, 30]
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train_loss", "val_reconstruction_r2", "tokens_per_second"))
    model = SaneModel.from_pretrained(trained)
    tokenizer = WeightTokenizer.from_pretrained(trained)
    assert model.config.token_size == tokenizer.token_size == TOKEN_SIZE and tokenizer.is_fitted
    assert SaneTrainingConfig.from_json_file(trained / "training_config.json").max_steps == 30
    assert latest_checkpoint(trained).name == "checkpoint_30"
    config = json.loads((trained / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("SaneModel")


def _same_run(a, b) -> None:
    sa, sb = SaneModel.from_pretrained(a).state_dict(), SaneModel.from_pretrained(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    for key in ("train_loss", "val_loss", "val_reconstruction_r2", "steps", "tokens_seen", "eval_history"):
        assert ma[key] == mb[key], key


def test_kill_and_resume_reaches_the_same_parameters(zoo_dir, tmp_path):
    """Killed after a checkpoint (mid-epoch, then at an epoch's end), resumed: identical to an uninterrupted run."""
    settings = dict(max_steps=10, batch_size=4, windows_per_sample=2, gradient_accumulation_steps=2, eval_steps=3)
    # 12 checkpoints x 2 windows / 4 = 6 batches = 3 optimizer steps per epoch
    full = train_sane(tiny_config(), zoo_dir, tiny_training(tmp_path / "full", save_steps=4, **settings))

    for save_steps, kill_at, resume_at in ((4, 6, 4), (3, 5, 3)):  # step 4: mid-epoch; step 3: end of epoch 0
        out = tmp_path / f"killed-{save_steps}"

        def kill(info, kill_at=kill_at):
            if info.step == kill_at:
                raise TrainingInterrupted("simulated kill")

        with pytest.raises(TrainingInterrupted):
            train_sane(tiny_config(), zoo_dir, tiny_training(out, save_steps=save_steps, **settings), step_callback=kill)
        assert latest_checkpoint(out).name == f"checkpoint_{resume_at}"
        assert not (out / "metrics.json").exists()
        resumed = train_sane(tiny_config(), zoo_dir, tiny_training(out, resume=True, save_steps=save_steps, **settings))
        _same_run(full, resumed)

    out = tmp_path / "killed-4"
    with pytest.raises(ValueError, match="already holds a training run"):
        train_sane(tiny_config(), zoo_dir, tiny_training(out, save_steps=4, **settings))
    with pytest.raises(ValueError, match="settings changed.*learning_rate"):
        train_sane(tiny_config(), zoo_dir, tiny_training(out, resume=True, **{**settings, "learning_rate": 1e-4}))
    with pytest.raises(ValueError, match="model config changed"):
        train_sane(tiny_config(latent_dim=4), zoo_dir, tiny_training(out, resume=True, **settings))


def test_dataloader_workers_do_not_change_the_run(zoo_dir, tmp_path):
    """Windows and augmentations are a pure function of (seed, epoch, index): workers see the same data."""
    runs = [
        train_sane(tiny_config(), zoo_dir, tiny_training(tmp_path / f"w{w}", max_steps=4, dataloader_num_workers=w,
                                                         eval_steps=0, save_steps=0))  # fmt: skip
        for w in (0, 2)
    ]
    _same_run(*runs)


def _two_process_run(zoo_dir: str, out: str) -> None:
    """Runs in each of the 2 debug_launcher processes (module level: picklable)."""

    def record(info):
        if info.step == 4:
            flat = torch.cat([p.detach().reshape(-1) for p in info.model.parameters()])
            torch.save({"params": flat, "loss": info.loss}, f"{out}/rank{info.accelerator.process_index}.pt")

    train_sane(tiny_config(), zoo_dir, tiny_training(out, max_steps=4, batch_size=4, eval_steps=2, save_steps=2),
               step_callback=record)  # fmt: skip


def test_two_processes_stay_in_sync(zoo_dir, tmp_path):
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState, GradientState

    # forked children would inherit this process's (single-process) Accelerate state: start them clean
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        debug_launcher(_two_process_run, args=(str(zoo_dir), str(tmp_path)), num_processes=2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])  # DDP kept the replicas identical
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ranks)
    assert ranks[0]["loss"] != ranks[1]["loss"]  # ...while each process saw its own batches
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4
    ckpt = latest_checkpoint(tmp_path)
    names = {p.name for p in ckpt.iterdir()}
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors", "model.safetensors", "checkpoint.json"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".bin", ".pt"))]  # no pickles


def _never(info):  # a step callback that proves no training step ran
    raise AssertionError(f"training started (step {info.step})")


@pytest.fixture(scope="module")
def tokenized_8(raw_zoo):
    tokenizer = fit_tokenizer_on_zoo(raw_zoo, token_size=8)
    return tokenize_zoo(raw_zoo, tokenizer), tokenizer


def _mixed_arch(raw_zoo):
    train = raw_zoo["train"]
    arch = ["cnn-s"] * (len(train) - 1) + ["mlp"]
    return datasets.DatasetDict({**raw_zoo, "train": train.remove_columns("arch").add_column("arch", arch)})


BAD_INPUTS = [
    ("token size differs", lambda z, t: (t[0], t[1]), {}, r"token size|token_size"),
    ("mixed architectures", lambda z, t: (_mixed_arch(z), None), {}, "mixes architectures"),
    ("empty validation split", lambda z, t: (datasets.DatasetDict({**z, "validation": z["validation"].select([])}), None),
     {}, r"'validation' split is empty.*eval_split=None"),
    ("empty train split", lambda z, t: (datasets.DatasetDict({**z, "train": z["train"].select([])}), None), {},
     r"'train' split is empty"),
    ("window larger than the sequences", lambda z, t: (z, None), {"window_size": 200, "halo_size": 4},
     r"window_size \(200\) is larger than the sequences of this zoo \(102 tokens"),
    ("tokenized zoo without tokenizer", lambda z, t: (t[0], None), {"token_size": 8}, "no tokenizer was given"),
]  # fmt: skip


@pytest.mark.parametrize("make, overrides, match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_fail_before_training(raw_zoo, tokenized_8, tmp_path, make, overrides, match):
    zoo, tokenizer = make(raw_zoo, tokenized_8)
    with pytest.raises(ValueError, match=match):
        train_sane(tiny_config(**overrides), zoo, tiny_training(tmp_path / "out", max_steps=2), tokenizer=tokenizer,
                   step_callback=_never)  # fmt: skip
    assert latest_checkpoint(tmp_path / "out") is None and not (tmp_path / "out" / "metrics.json").exists()


def test_tokenized_zoo_with_its_tokenizer_and_no_validation(tokenized_8, tmp_path):
    tokenized, tokenizer = tokenized_8
    with pytest.warns(UserWarning, match="permutation views are off"):  # no zoo_config: architecture unknown
        out = train_sane(tiny_config(token_size=8), tokenized, tiny_training(tmp_path, max_steps=3, eval_split=None,
                         save_steps=0, lr_scheduler="cosine"), tokenizer=tokenizer)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["val_loss"] is None and not metrics["permutation_views"]
    assert WeightTokenizer.from_pretrained(out).to_dict() == tokenizer.to_dict()
    assert latest_checkpoint(out) is None


def test_raw_datasetdict_with_its_zoo_config(raw_zoo, zoo_dir, tmp_path):
    from sane_hf.zoo.dataset import load_zoo_config

    out = train_sane(tiny_config(), raw_zoo, tiny_training(tmp_path, max_steps=2, save_steps=0),
                     zoo_config=load_zoo_config(zoo_dir))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["permutation_views"] and metrics["val_loss"] is not None
    assert json.loads((out / "zoo_config.json").read_text())["arch"] == "cnn-s"
    assert WeightTokenizer.from_pretrained(out).token_size == TOKEN_SIZE


def test_mixed_precision_on_cpu_warns(zoo_dir, tmp_path):
    with pytest.warns(UserWarning, match="mixed_precision='bf16' on CPU"):
        train_sane(tiny_config(), zoo_dir, tiny_training(tmp_path, max_steps=1, mixed_precision="bf16", eval_split=None,
                   save_steps=0, permutation=False))  # fmt: skip


def test_tensorboard_tracker_needs_tensorboard(zoo_dir, tmp_path):
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        out = train_sane(tiny_config(), zoo_dir, tiny_training(tmp_path, max_steps=2, tracker="tensorboard"))
        assert any((out / "logs").rglob("events.out.tfevents*"))
    else:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            train_sane(tiny_config(), zoo_dir, tiny_training(tmp_path, max_steps=2, tracker="tensorboard"),
                       step_callback=_never)  # fmt: skip


def test_training_config_fields_and_validation():
    fields = dataclasses.fields(SaneTrainingConfig)
    assert all(f.metadata.get("help") for f in fields)
    cfg = SaneTrainingConfig(output_dir="x", max_steps=5, tracker="tensorboard")
    assert SaneTrainingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert 1 <= SaneTrainingConfig().num_threads <= 2
    bad = [dict(batch_size=1), dict(learning_rate=0), dict(mixed_precision="fp8"), dict(lr_scheduler="step"),
           dict(tracker="wandb"), dict(max_steps=0), dict(erase_prob=2), dict(warmup_ratio=1.0),
           dict(resume=True, overwrite_output_dir=True), dict(gradient_accumulation_steps=0)]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(ValueError):
            SaneTrainingConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown SaneTrainingConfig fields"):
        SaneTrainingConfig.from_dict({"lerning_rate": 1})
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(SaneTrainingConfig).parse_args_into_dataclasses(
        ["--max-steps", "7", "--no_permutation", "--mixed_precision", "bf16"]
    )
    assert parsed.max_steps == 7 and parsed.permutation is False and parsed.mixed_precision == "bf16"


def test_presets():
    assert set(PRESETS) == {"small", "defaults", "large"}
    small = sane_config_preset("small", token_size=16)
    assert small.token_size == 16 and small.d_model < SaneConfig().d_model < sane_config_preset("large").d_model
    assert sane_config_preset("defaults", token_size=64).to_dict()["d_model"] == SaneConfig().d_model
    with pytest.raises(ValueError, match="unknown preset"):
        sane_config_preset("huge")


def test_recipe_reconstructs_better_than_the_old_defaults(zoo_dir, tmp_path):
    # the study's recipe (sinusoid-projection positions, dropout 0, latent as wide as the token) against the
    # defaults it replaced (unscaled sinusoid + learned l/k tables, dropout 0.1, latent 16), same seed, data and steps
    def val_r2(out, **model):
        config = sane_config_preset("small", token_size=64, window_size=54, halo_size=0, **model)
        training = SaneTrainingConfig(output_dir=str(out), max_steps=60, batch_size=16, eval_steps=0, save_steps=0,
                                      progress=False, num_threads=1, seed=0)  # fmt: skip
        train_sane(config, zoo_dir, training)
        return json.loads((out / "metrics.json").read_text())["val_reconstruction_r2"]

    recipe = val_r2(tmp_path / "recipe")
    old = val_r2(tmp_path / "old", position_encoding="learned-tables", dropout=0.1, latent_dim=16)
    assert recipe > old + 0.1, (recipe, old)


# ----------------------------------------------------------------------------------------------
# resume never unpickles anything


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker) -> None:
    import pickle

    path.write_bytes(pickle.dumps(_Payload(marker)))


# every name Accelerate's save_state (and torch.save habits) would put into a checkpoint folder
ACCELERATE_NAMES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "random_states_1.pkl",
                    "optimizer.bin", "scheduler.bin", "sampler.bin", "dl_state_dict.bin", "scaler.pt",
                    "pytorch_model.bin", "model.pt", "training_args.bin", "rng_state.pth")  # fmt: skip


def test_resume_never_unpickles_and_stays_exact(zoo_dir, tmp_path):
    """Pickles with a payload planted under every name a checkpoint may hold: nothing runs; resume is exact;
    a pickle in place of one of sane-hf's own files is a clear error, and an old pickled checkpoint is refused."""
    import shutil

    settings = dict(max_steps=6, batch_size=4, windows_per_sample=2, eval_steps=3, save_steps=3)
    full = train_sane(tiny_config(), zoo_dir, tiny_training(tmp_path / "full", **settings))
    out = tmp_path / "killed"

    def kill(info):
        if info.step == 4:
            raise TrainingInterrupted("simulated kill")

    with pytest.raises(TrainingInterrupted):
        train_sane(tiny_config(), zoo_dir, tiny_training(out, **settings), step_callback=kill)
    ckpt = latest_checkpoint(out)
    own = sorted(p.name for p in ckpt.iterdir())
    assert {"checkpoint.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "loop_state.json", "rng_state_0.safetensors", "rng_state_0.json"} <= set(own)  # fmt: skip
    marker = tmp_path / "PAYLOAD_RAN"
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)

    # 1. one of sane-hf's own files replaced by a pickle: a one-line error naming the file, nothing runs
    for name in own:
        if name in ("training_config.json", "sane_config.json", "weight_tokenizer.json"):
            continue  # compared/parsed as JSON before training; covered by the JSON-error cases below
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        _plant(ckpt / name, marker)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            train_sane(tiny_config(), zoo_dir, tiny_training(out, resume=True, **settings), step_callback=_never)
        assert not marker.exists(), name
    for name in ("training_config.json", "sane_config.json", "weight_tokenizer.json"):
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        _plant(ckpt / name, marker)
        with pytest.raises(ValueError):
            train_sane(tiny_config(), zoo_dir, tiny_training(out, resume=True, **settings), step_callback=_never)
        assert not marker.exists(), name

    # 2. an old Accelerate checkpoint (pickles, no manifest): refused before anything is read
    shutil.rmtree(ckpt)
    ckpt.mkdir()
    for name in ACCELERATE_NAMES:
        _plant(ckpt / name, marker)
    with pytest.raises(ValueError, match=r"pickled training state.*never loaded"):
        train_sane(tiny_config(), zoo_dir, tiny_training(out, resume=True, **settings), step_callback=_never)
    assert not marker.exists()

    # 3. pickles under every foreign name beside a good checkpoint: ignored, and the resumed run is exact
    shutil.rmtree(ckpt)
    shutil.copytree(pristine, ckpt)
    for name in ACCELERATE_NAMES:
        _plant(ckpt / name, marker)
    resumed = train_sane(tiny_config(), zoo_dir, tiny_training(out, resume=True, **settings))
    assert not marker.exists()
    _same_run(full, resumed)


def test_resume_with_another_zoo_is_refused(zoo_dir, zoo_and_model, tmp_path):
    settings = dict(max_steps=4, batch_size=4, windows_per_sample=2, eval_steps=0, save_steps=2)

    def kill(info):
        if info.step == 3:
            raise TrainingInterrupted("simulated kill")

    with pytest.raises(TrainingInterrupted):
        train_sane(tiny_config(), zoo_dir, tiny_training(tmp_path, **settings), step_callback=kill)
    with pytest.raises(ValueError, match=r"zoo is not the one this run was trained on.*--zoo"):
        train_sane(tiny_config(), zoo_and_model / "zoo", tiny_training(tmp_path, resume=True, **settings),
                   step_callback=_never)  # fmt: skip
    # the run folder is untouched: resuming with the right zoo still works
    train_sane(tiny_config(), zoo_dir, tiny_training(tmp_path, resume=True, **settings))
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4
