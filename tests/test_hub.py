"""Hub publishing (sane_hf.hub): everything up to the network, and the download side for real.

The Hub is not reachable here, so ``HfApi.create_repo``/``create_commit`` are mocked (the only
mocks in the suite: the network part cannot run) and the commit operations are inspected. The
download side runs for real: the pushed files are laid out as a Hub cache and loaded with
``HF_HUB_OFFLINE=1`` in a fresh process, with and without ``sane_hf`` importable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import textwrap
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import populate_hub_cache, run_python
from huggingface_hub import CommitInfo, DatasetCard, HfApi, ModelCard, RepoUrl

from sane_hf import SaneConfig, SaneModel, WeightTokenizer
from sane_hf.hub import (
    check_model_folder,
    prepare_model_folder,
    push_model,
    push_zoo,
    zoo_files,
)
from sane_hf.zoo.architectures import create_model

REPO_ID = "org/sane-tiny"
ZOO_REPO_ID = "org/tiny-zoo"
SECRET = "hf_secretTOKEN0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]

# fake but schema-correct measurements (the keys train_sane and sane-hf probe write)
TRAIN_METRICS = {
    "train_loss": 0.0731, "val_loss": 0.0912, "val_reconstruction_loss": 0.0884, "val_reconstruction_r2": 0.8765,
    "initial_val_loss": 1.0241, "steps": 40, "epochs": 2.5, "train_seconds": 12.5, "tokens_per_second": 5120.3,
    "tokens_seen": 64000, "num_parameters": 352216, "num_processes": 1, "train_windows_per_epoch": 16,
    "train_checkpoints": 8, "num_tokens_per_checkpoint": 228, "window_size": 64, "permutation_views": True,
    "eval_history": [{"step": 0, "val_loss": 1.0241}, {"step": 40, "val_loss": 0.0912}],
}
PROBE_METRICS = {
    "metrics": {
        "test_acc": {"sane": 0.6123, "layer_stats": 0.9345, "raw": 0.4012},
        "ggap": {"sane": 0.2233, "layer_stats": 0.5511, "raw": None},
        "activation": {"sane": 0.75, "layer_stats": 1.0, "raw": 0.5},
    },
    "metric_names": {"test_acc": "r2", "ggap": "r2", "activation": "accuracy"},
    "details": {},
    "notes": ["raw: ggap skipped (constant on train)"],
    "info": {"n_train": 8, "n_val": 2, "n_test": 2, "pooling": "mean"},
}



def _summary(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return {"mean": mean, "std": std, "n": len(values), "values": values}


# the layout of sane_hf.evaluation.evaluate_sampling (sane-hf sample --evaluate)
SAMPLING_METRICS = {
    "task": "digits", "arch": "mlp", "activation": "relu",
    "prompts": {"epoch": 2, "model_ids": [3, 5], "test_acc": [0.5, 0.7]},
    "sampling": {"mode": "joint", "bandwidth": 0.25, "bandwidth_setting": "scott", "score": "train-acc",
                 "scores": [0.61, 0.58], "anchor_model_ids": [3, 5], "nearest_prompt_model_ids": [3, 5], "rounds": [0, 0]},
    "accuracy": {
        "sampled": {"0": _summary([0.42, 0.44]), "1": _summary([0.61, 0.63])},
        "random_init": {"0": _summary([0.1, 0.1]), "1": _summary([0.3, 0.32])},
        "noise": {"0": _summary([0.2, 0.22]), "1": _summary([0.4, 0.42])},
        "aligned_average": {"0": _summary([0.15]), "1": _summary([0.35])},
        "prompts": {"0": _summary([0.5, 0.7]), "1": _summary([0.6, 0.72])},
    },
    "gain_over_random_init": {"0": 0.33, "1": 0.31},
    "novelty": {
        "sampled": {"nearest_distance": _summary([3.0, 5.0]), "agreement": _summary([0.5, 0.7]),
                    "neighbour_model_ids": [1, 2], "prompt_distance": _summary([2.0, 2.0])},
        "noise": {"nearest_distance": _summary([4.0, 4.0]), "agreement": _summary([0.3, 0.3]),
                  "neighbour_model_ids": [1, 2], "prompt_distance": _summary([2.0, 2.0])},
        "prompts": {"nearest_distance": _summary([6.0, 6.0]), "agreement": _summary([0.8, 0.8]),
                    "neighbour_model_ids": [1, 2]},
        "num_neighbours": 8,
    },
    "transfer": None,
    "config": {"num_samples": 2}, "timings": {"sampling": 1.0}, "seconds": 3.5,
}

# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


def tiny_model_and_tokenizer() -> tuple[SaneModel, WeightTokenizer]:
    torch.manual_seed(0)
    refs = [create_model("mlp", image_size=8, seed=s).state_dict() for s in range(3)]
    tokenizer = WeightTokenizer.from_reference(refs[0], token_size=16).fit(refs)
    config = SaneConfig(token_size=16, d_model=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
                        latent_dim=8, projection_dim=16, window_size=32, halo_size=4)
    return SaneModel(config).eval(), tokenizer


def write_run_files(folder: Path, probe_name: str = "probe/metrics.json") -> None:
    """What train_sane (and sane-hf probe) leave next to the model."""
    from sane_hf.training import SaneTrainingConfig
    from sane_hf.zoo.dataset import ZooConfig

    (folder / "metrics.json").write_text(json.dumps(TRAIN_METRICS, indent=2))
    (folder / probe_name).parent.mkdir(parents=True, exist_ok=True)
    (folder / probe_name).write_text(json.dumps(PROBE_METRICS, indent=2))
    SaneTrainingConfig(output_dir=str(folder), max_steps=40, batch_size=8).to_json_file(folder / "training_config.json")
    ZooConfig(task="digits", arch="mlp", num_models=6, epochs=2, image_size=8).to_json_file(folder / "zoo_config.json")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny) -> Path:
    from sane_hf.hub import save_sane_pipeline

    folder = tmp_path_factory.mktemp("run") / "sane-tiny"
    save_sane_pipeline(*tiny, folder)
    write_run_files(folder)
    return folder


@pytest.fixture(scope="module")
def staged(model_folder, tmp_path_factory) -> Path:
    return prepare_model_folder(model_folder, tmp_path_factory.mktemp("staged") / "repo", repo_id=REPO_ID,
                                dataset_repo_id=ZOO_REPO_ID)


@pytest.fixture(scope="module")
def zoo_folder(tmp_path_factory) -> Path:
    """A real zoo folder (importer output: parquet shards + card + zoo_config.json), built without training."""
    from safetensors.torch import save_file

    from sane_hf.zoo.importers import import_folder

    base = tmp_path_factory.mktemp("zoo")
    src = base / "src"
    src.mkdir()
    for i in range(6):
        save_file(create_model("mlp", image_size=8, seed=i).state_dict(), src / f"model_{i}.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # properties missing in the source: NaN, by design
        import_folder(src, base / "zoo", arch="mlp", task="digits", progress=False, cache_dir=str(base / "cache"))
    return base / "zoo"


def code_files() -> set[str]:
    """The remote-code files a model repo needs: the model's, the pipeline's and what the pipeline imports."""
    from transformers.dynamic_module_utils import get_relative_import_files

    package = ROOT / "sane_hf"
    pipeline_imports = {Path(p).name for p in get_relative_import_files(str(package / "pipeline_sane.py"))}
    return {"configuration_sane.py", "modeling_sane.py", "pipeline_sane.py"} | pipeline_imports


def expected_model_files() -> set[str]:
    return code_files() | {
        "README.md", "config.json", "model.safetensors", "weight_tokenizer.json",
        "metrics.json", "probe_metrics.json", "training_config.json", "zoo_config.json",
    }


@contextmanager
def mocked_hub():
    """Mock the network calls of HfApi; record what would have been sent (file contents read at call time)."""
    record: dict = {"create_repo": [], "create_commit": []}

    def create_repo(self, repo_id, **kwargs):
        record["create_repo"].append({"repo_id": repo_id, "token": self.token, **kwargs})
        prefix = "datasets/" if kwargs.get("repo_type") == "dataset" else ""
        return RepoUrl(f"https://huggingface.co/{prefix}{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        ops = list(operations)
        files = {}
        for op in ops:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
        record["create_commit"].append({"repo_id": repo_id, "token": self.token, "files": files, **kwargs})
        pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if kwargs.get("create_pr") else None
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'a' * 40}",
                          commit_message=kwargs["commit_message"], commit_description="", oid="a" * 40, pr_url=pr_url)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("only create_repo and create_commit may be called")

    with mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=create_repo), \
            mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=create_commit), \
            mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=forbidden), \
            mock.patch.object(HfApi, "upload_file", autospec=True, side_effect=forbidden), \
            mock.patch.object(HfApi, "preupload_lfs_files", autospec=True, side_effect=forbidden):
        yield record


# ----------------------------------------------------------------------------------------------
# pushing a model
# ----------------------------------------------------------------------------------------------


def test_staged_folder_is_complete(staged):
    assert {p for p in os.listdir(staged)} == expected_model_files()
    assert check_model_folder(staged) == []
    config = json.loads((staged / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    broken = staged.parent / "broken"
    broken.mkdir()
    for name in os.listdir(staged):
        (broken / name).write_bytes((staged / name).read_bytes())
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "sampling.py").unlink()  # imported relatively by pipeline_sane.py
    problems = check_model_folder(broken)
    assert any("auto_map has no AutoModel" in p for p in problems)
    assert any(p.startswith("sampling.py is referenced") for p in problems)


def test_push_model_commits_exactly_the_repo_files(model_folder):
    with mocked_hub() as hub:
        result = push_model(model_folder, REPO_ID, private=True, token=SECRET, dataset_repo_id=ZOO_REPO_ID)
    (repo_call,) = hub["create_repo"]
    assert repo_call["repo_id"] == REPO_ID and repo_call["exist_ok"] is True and repo_call["private"] is True
    assert repo_call["repo_type"] == "model" and repo_call["token"] == SECRET
    (commit,) = hub["create_commit"]
    assert commit["repo_id"] == REPO_ID and commit["repo_type"] == "model" and commit["create_pr"] is False
    assert commit["token"] == SECRET
    files = commit["files"]
    assert set(files) == expected_model_files() == set(result.files)
    assert result.url == f"https://huggingface.co/{REPO_ID}/commit/{'a' * 40}" and result.staging_dir is None

    config = json.loads(files["config.json"])
    assert config["model_type"] == "sane"
    assert config["auto_map"]["AutoConfig"] == "configuration_sane.SaneConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_sane.SaneModel"
    assert config["custom_pipelines"]["weight-sampling"]["impl"] == "pipeline_sane.WeightSamplingPipeline"
    for ref in [*config["auto_map"].values(), config["custom_pipelines"]["weight-sampling"]["impl"]]:
        assert ref.split(".")[0] + ".py" in files  # the pitfall: config names a file the commit lacks

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "weight-space-learning" in card.data.tags
    assert card.data.datasets == [ZOO_REPO_ID]
    assert "0.8765" in card.text and "| test accuracy (`test_acc`) | R² | 0.6123 | 0.9345 | 0.4012 |" in card.text
    assert json.loads(files["metrics.json"]) == TRAIN_METRICS
    assert json.loads(files["probe_metrics.json"]) == PROBE_METRICS
    assert json.loads(files["weight_tokenizer.json"]) == json.loads((model_folder / "weight_tokenizer.json").read_text())
    # the weights are the model folder's weights
    from safetensors.torch import load

    pushed, original = load(files["model.safetensors"]), load((model_folder / "model.safetensors").read_bytes())
    assert pushed.keys() == original.keys() and all(torch.equal(pushed[k], original[k]) for k in pushed)


def test_push_model_pull_request_and_message(model_folder):
    with mocked_hub() as hub:
        result = push_model(model_folder, REPO_ID, create_pr=True, commit_message="v2", revision="dev")
    (commit,) = hub["create_commit"]
    assert commit["create_pr"] is True and commit["commit_message"] == "v2" and commit["revision"] == "dev"
    assert commit["token"] is None  # huggingface_hub resolves HF_TOKEN / the stored login itself
    assert result.url == f"https://huggingface.co/{REPO_ID}/discussions/1"


def test_token_is_never_printed_or_logged(model_folder, zoo_folder, caplog):
    caplog.set_level(logging.DEBUG)
    out, err = io.StringIO(), io.StringIO()
    from contextlib import redirect_stderr

    from sane_hf.cli import main

    with mocked_hub() as hub, redirect_stdout(out), redirect_stderr(err):
        push_model(model_folder, REPO_ID, token=SECRET)
        push_zoo(zoo_folder, ZOO_REPO_ID, token=SECRET)
        assert main(["push", "--model", str(model_folder), "--repo-id", REPO_ID, "--zoo", str(zoo_folder),
                     "--dataset-repo-id", ZOO_REPO_ID, "--token", SECRET]) == 0
    assert all(call["token"] == SECRET for call in hub["create_repo"] + hub["create_commit"])  # it was used...
    printed = out.getvalue() + err.getvalue() + caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "pushed" in out.getvalue()
    assert SECRET not in printed  # ...and never shown


# ----------------------------------------------------------------------------------------------
# pushing a zoo
# ----------------------------------------------------------------------------------------------


def test_push_zoo_commits_card_configs_and_shards(zoo_folder, caplog):
    shards = sorted(p.relative_to(zoo_folder).as_posix() for p in (zoo_folder / "data").glob("*.parquet"))
    assert len(shards) == 3
    with mocked_hub() as hub, caplog.at_level(logging.WARNING, logger="sane_hf.hub"):
        result = push_zoo(zoo_folder, ZOO_REPO_ID, private=True)
    # imported zoos keep only the source folder's name, so there is no local path to warn about
    assert not any("import_options.src" in r.getMessage() for r in caplog.records)
    (repo_call,) = hub["create_repo"]
    assert repo_call["repo_type"] == "dataset" and repo_call["exist_ok"] is True and repo_call["private"] is True
    (commit,) = hub["create_commit"]
    assert commit["repo_type"] == "dataset"
    files = commit["files"]
    assert set(files) == {"README.md", "zoo_config.json", "zoo_summary.json", *shards} == set(result.files)
    for name, content in files.items():  # uploaded as they are
        assert content == (zoo_folder / name).read_bytes()
    card = DatasetCard(files["README.md"].decode())
    (config,) = card.data.to_dict()["configs"]
    assert {d["split"] for d in config["data_files"]} == {"train", "validation", "test"}
    assert all(any(s.startswith(d["path"].rstrip("*")) for s in shards) for d in config["data_files"])
    assert "weight-space-learning" in card.data.to_dict()["tags"]
    assert result.url == f"https://huggingface.co/{ZOO_REPO_ID}/commit/{'a' * 40}"


def test_push_zoo_refuses_unfinished_zoos(zoo_folder, tmp_path):
    partial = tmp_path / "zoo"
    partial.mkdir()
    for name in zoo_files(zoo_folder):
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        (partial / name).write_bytes((zoo_folder / name).read_bytes())
    (partial / ".partial").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete zoo"):
        push_zoo(partial, ZOO_REPO_ID, dry_run=True)
    (partial / ".partial").rmdir()
    for shard in (partial / "data").glob("test-*"):
        shard.unlink()
    with pytest.raises(ValueError, match="matches no shard"):
        zoo_files(partial)


# ----------------------------------------------------------------------------------------------
# the download side: a Hub cache, loaded offline
# ----------------------------------------------------------------------------------------------


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_populate_hub_cache_layout(staged, tmp_path):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    cache = tmp_path / "hub"
    snapshot = populate_hub_cache(staged, REPO_ID, cache)
    repo_dir = cache / "models--org--sane-tiny"
    revision = (repo_dir / "refs" / "main").read_text()
    assert snapshot == repo_dir / "snapshots" / revision and len(revision) == 40
    assert populate_hub_cache(staged, REPO_ID, cache) == snapshot  # deterministic, idempotent
    weights = (staged / "model.safetensors").read_bytes()
    config = (staged / "config.json").read_bytes()
    assert (snapshot / "model.safetensors").resolve() == repo_dir / "blobs" / hashlib.sha256(weights).hexdigest()
    assert (snapshot / "config.json").resolve() == repo_dir / "blobs" / _git_blob_sha1(config)
    assert not os.path.isabs(os.readlink(snapshot / "config.json"))  # relative links: the cache can move
    assert try_to_load_from_cache(REPO_ID, "config.json", cache_dir=cache) == str(snapshot / "config.json")
    (info,) = scan_cache_dir(cache).repos
    assert info.repo_id == REPO_ID and {f.file_name for f in next(iter(info.revisions)).files} == expected_model_files()
    with pytest.raises(ValueError, match="40 lowercase hex"):
        populate_hub_cache(staged, REPO_ID, cache, revision_hash="main")
    other = populate_hub_cache(staged, REPO_ID, cache, revision_hash="b" * 40, revision="v1")
    assert other.name == "b" * 40 and (repo_dir / "refs" / "v1").read_text() == "b" * 40


def test_zoo_from_hub_cache_offline(zoo_folder, tmp_path):
    from huggingface_hub import snapshot_download

    from sane_hf.zoo.dataset import load_zoo

    populate_hub_cache(zoo_folder, ZOO_REPO_ID, tmp_path / "hub", repo_type="dataset")
    path = snapshot_download(ZOO_REPO_ID, repo_type="dataset", cache_dir=tmp_path / "hub", local_files_only=True)
    zoo, original = load_zoo(path, cache_dir=str(tmp_path / "ds")), load_zoo(zoo_folder, cache_dir=str(tmp_path / "ds"))
    for split in ("train", "validation", "test"):
        assert zoo[split]["model_id"] == original[split]["model_id"]
        assert zoo[split]["weights"] == original[split]["weights"]


_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModel, pipeline

    inputs = torch.load(sys.argv[1], weights_only=True)
    out = {}

    def run(model):
        model.eval()
        with torch.no_grad():
            result = model(inputs["tokens"], inputs["positions"], inputs["mask"])
            return {"latents": result.latents, "reconstruction": result.reconstruction,
                    "embed": model.embed(inputs["tokens"], inputs["positions"], inputs["mask"])}

    auto = AutoModel.from_pretrained("org/sane-tiny", trust_remote_code=True)
    out["auto_module"] = type(auto).__module__
    out["auto"] = run(auto)
    pipe = pipeline("weight-sampling", model="org/sane-tiny", trust_remote_code=True)  # two pipelines: name one
    out["pipe_module"] = type(pipe).__module__
    samples = pipe(inputs["prompts"], num_samples=3, seed=0)
    out["pipe"] = [s["state_dict"] for s in samples]
    out["pipe_scores"] = [s["score"] for s in samples]

    sys.meta_path.remove(NO_SANE_HF)  # now as on a machine with sane_hf installed
    from sane_hf import SaneModel

    out["sane"] = run(SaneModel.from_pretrained("org/sane-tiny"))
    torch.save(out, sys.argv[2])
    """
)


def test_offline_hub_cache_load_in_fresh_process(staged, tiny, tmp_path):
    from sane_hf.pipeline_sane import WeightSamplingPipeline

    model, tokenizer = tiny
    home = tmp_path / "hf"
    populate_hub_cache(staged, REPO_ID, home / "hub")
    prompts = [create_model("mlp", image_size=8, seed=10 + i).state_dict() for i in range(3)]
    batch = tokenizer.encode_batch(prompts[:2], normalize=True)
    inputs = {"tokens": batch.tokens[:, :32], "positions": batch.positions[:, :32].long(), "mask": batch.mask[:, :32],
              "prompts": prompts}
    torch.save(inputs, tmp_path / "inputs.pt")

    run_python(_OFFLINE_SCRIPT, tmp_path / "inputs.pt", tmp_path / "out.pt", cwd=tmp_path, env={"HF_HOME": str(home)},
               without_sane_hf=True, timeout=240)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["auto_module"].startswith("transformers_modules.")  # the repo's code, not sane_hf
    assert out["pipe_module"].startswith("transformers_modules.")

    with torch.no_grad():
        expected = model(inputs["tokens"], inputs["positions"], inputs["mask"])
        expected_embed = model.embed(inputs["tokens"], inputs["positions"], inputs["mask"])
    for name in ("auto", "sane"):
        torch.testing.assert_close(out[name]["latents"], expected.latents, rtol=0, atol=1e-6)
        torch.testing.assert_close(out[name]["reconstruction"], expected.reconstruction, rtol=0, atol=1e-6)
        torch.testing.assert_close(out[name]["embed"], expected_embed, rtol=0, atol=1e-6)

    pipe = WeightSamplingPipeline(model=model, weight_tokenizer=tokenizer)
    local = pipe(prompts, num_samples=3, seed=0)
    assert len(out["pipe"]) == len(local) == 3
    assert out["pipe_scores"] == [s["score"] for s in local]
    for remote_sd, local_sample in zip(out["pipe"], local):
        assert remote_sd.keys() == local_sample["state_dict"].keys()
        for key, value in local_sample["state_dict"].items():
            torch.testing.assert_close(remote_sd[key], value, rtol=0, atol=1e-6)
