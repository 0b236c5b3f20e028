"""The weight-sampling / weight-embedding pipelines: in-process, and as remote code in a fresh process."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import run_python
from transformers import pipeline
from transformers.dynamic_module_utils import get_imports

from sane_hf.configuration_sane import SaneConfig
from sane_hf.embedding import embed_models
from sane_hf.hub import save_sane_pipeline
from sane_hf.modeling_sane import SaneModel
from sane_hf.pipeline_sane import WeightEmbeddingPipeline, WeightSamplingPipeline
from sane_hf.sampling import sample_models
from sane_hf.tokenization_sane import WeightTokenizer
from sane_hf.zoo.architectures import create_model
from sane_hf.zoo.dataset import state_dict_to_bytes

CODE_FILES = {"pipeline_sane.py", "sampling.py", "adaptation.py", "latent_kde.py", "embedding.py", "state_dict_io.py",
              "tokenization_sane.py", "tokenization_layout.py", "modeling_sane.py", "configuration_sane.py"}
PACKAGE = Path(__file__).resolve().parents[1] / "sane_hf"


@pytest.fixture(scope="module")
def parts():
    prompts = [create_model("cnn-s", image_size=8, seed=s).state_dict() for s in range(3)]
    tok = WeightTokenizer.from_reference(prompts[0], token_size=16).fit(prompts)
    torch.manual_seed(0)
    sane = SaneModel(SaneConfig(token_size=16, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                                latent_dim=4, projection_dim=8, window_size=32, halo_size=4, dropout=0.0)).eval()
    return sane, tok, prompts


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    sane, tok, prompts = parts
    root = tmp_path_factory.mktemp("pipe")
    save_sane_pipeline(sane, tok, root / "model")
    torch.save(prompts, root / "prompts.pt")
    return root


def test_saved_folder_is_self_contained(saved):
    folder = saved / "model"
    names = set(os.listdir(folder))
    assert CODE_FILES | {"config.json", "model.safetensors", "weight_tokenizer.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "weight-sampling": {"impl": "pipeline_sane.WeightSamplingPipeline", "pt": ["AutoModel"]}
    }
    assert config["auto_map"]["AutoModel"] == "modeling_sane.SaneModel"
    assert {p.name for p in folder.glob("*.py")} == CODE_FILES
    for name in CODE_FILES:
        assert "sane_hf" not in get_imports(folder / name), name  # transformers' import check passes without it
        assert (folder / name).read_bytes() == (PACKAGE / name).read_bytes(), name  # the package's own file


def test_in_process_pipeline_matches_sample_models(parts, saved):
    sane, tok, prompts = parts
    pipe = pipeline("weight-sampling", model=str(saved / "model"), pipeline_class=WeightSamplingPipeline, device="cpu")
    assert pipe.weight_tokenizer.to_dict() == tok.to_dict()  # read from the model folder
    out = pipe(prompts, num_samples=3, seed=5)  # a list is ONE prompt set
    assert isinstance(out, list) and len(out) == 3 and set(out[0]) == {"state_dict", "score"}
    ref = sample_models(sane, tok, prompts, 3, seed=5)
    for got, want in zip(out, ref):
        assert all(torch.equal(got["state_dict"][k], want.state_dict[k]) for k in want.state_dict)

    def score_fn(sd):
        return float(sd["fc2.bias"].mean())

    scored = pipe(prompts, num_samples=2, candidates=6, score_fn=score_fn, seed=0, batch_size=2)
    assert scored[0]["score"] >= scored[1]["score"]
    net = create_model("cnn-s", image_size=8)
    net.load_state_dict(scored[0]["state_dict"], strict=True)
    single = pipe(create_model("cnn-s", image_size=8, seed=9), num_samples=1, bandwidth=0.1)  # one nn.Module
    assert len(single) == 1
    with pytest.raises(TypeError, match="unknown parameters"):
        pipe(prompts, temperature=1.0)


def test_pipeline_accepts_a_zoo_split(parts):
    sane, tok, prompts = parts
    split = Dataset.from_dict({"weights": [state_dict_to_bytes(p) for p in prompts], "epoch": [1, 1, 1]})
    pipe = WeightSamplingPipeline(model=sane, weight_tokenizer=tok, device="cpu")
    out = pipe(split, num_samples=2, seed=1)
    ref = sample_models(sane, tok, prompts, 2, seed=1)
    assert all(torch.equal(out[0]["state_dict"][k], ref[0].state_dict[k]) for k in ref[0].state_dict)


def test_embedding_pipeline(parts):
    sane, tok, prompts = parts
    pipe = WeightEmbeddingPipeline(model=sane, weight_tokenizer=tok, device="cpu")
    ref = embed_models(sane, tok, prompts, return_token_latents=True)
    many = pipe(prompts, return_tensors=True, return_token_latents=True)
    assert len(many) == 3
    for i, row in enumerate(many):
        torch.testing.assert_close(row["embedding"], ref.embeddings[i])
        torch.testing.assert_close(row["token_latents"], ref.token_latents[i])
    one = pipe(prompts[0])
    assert isinstance(one, dict) and one["embedding"] == pytest.approx(ref.embeddings[0].tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        pipe(prompts, pooling="median")


def test_save_with_both_tasks(parts, tmp_path):
    sane, tok, _ = parts
    save_sane_pipeline(sane, tok, tmp_path, tasks=("weight-sampling", "weight-embedding"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"weight-sampling", "weight-embedding"}
    assert config["custom_pipelines"]["weight-embedding"]["impl"] == "pipeline_sane.WeightEmbeddingPipeline"
    with pytest.raises(ValueError, match="tasks"):
        save_sane_pipeline(sane, tok, tmp_path, tasks=("text-generation",))


REMOTE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import pipeline

    folder, prompts = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
    inferred = pipeline(model=folder, trust_remote_code=True, device="cpu")
    named = pipeline("weight-sampling", model=folder, trust_remote_code=True, device="cpu")
    a = inferred(prompts, num_samples=3, seed=5)
    b = named(prompts, num_samples=3, seed=5)
    torch.save({"inferred": [s["state_dict"] for s in a], "named": [s["state_dict"] for s in b]}, sys.argv[3])
    print(json.dumps({"class": type(inferred).__module__, "task": inferred.task,
                      "sane_hf_loaded": any(m == "sane_hf" or m.startswith("sane_hf.") for m in sys.modules)}))
    """
)


def test_remote_code_in_a_fresh_process_without_sane_hf(parts, saved, tmp_path):
    sane, tok, prompts = parts
    result = run_python(REMOTE, saved / "model", saved / "prompts.pt", tmp_path / "out.pt", cwd=tmp_path,
                        without_sane_hf=True)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["class"].startswith("transformers_modules.") and info["class"].endswith("pipeline_sane")
    assert info["task"] == "weight-sampling" and not info["sane_hf_loaded"]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    ref = sample_models(sane, tok, prompts, 3, seed=5)
    for key in ("inferred", "named"):
        for got, want in zip(remote[key], ref):
            assert list(got) == list(want.state_dict)
            assert all(torch.equal(got[k], want.state_dict[k]) for k in got), key
