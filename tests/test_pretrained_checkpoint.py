"""The shipped pretrained checkpoint ``checkpoints/sane-digits-cnn-s`` loads and samples with no training.

It is the digits SANE model (seed 0) of ``benchmarks/quality.py``, staged with
``sane-hf push --dry-run --staging-dir``; these tests pin that it stays a complete Hub folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "sane-digits-cnn-s"


def _prompts(n: int = 3) -> list[dict[str, torch.Tensor]]:
    from sane_hf.zoo.architectures import create_model

    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(create_model("cnn-s", image_size=8).state_dict())
    return out


def test_folder_is_complete():
    assert (CKPT / "model.safetensors").is_file()
    assert (CKPT / "weight_tokenizer.json").is_file()
    assert (CKPT / "README.md").is_file()
    size = sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file())
    assert size < 8 * 2**20, f"shipped checkpoint is {size / 2**20:.1f} MB"
    config = json.loads((CKPT / "config.json").read_text())
    assert "AutoConfig" in config["auto_map"] and "AutoModel" in config["auto_map"]
    assert "weight-sampling" in config["custom_pipelines"]
    for ref in [*config["auto_map"].values(), config["custom_pipelines"]["weight-sampling"]["impl"]]:
        assert (CKPT / (ref.split(".")[0] + ".py")).is_file(), ref


def test_model_and_tokenizer_load():
    from sane_hf import SaneModel, WeightTokenizer

    model = SaneModel.from_pretrained(CKPT)
    tok = WeightTokenizer.from_pretrained(CKPT)
    assert model.config.token_size == tok.token_size
    tokens = tok.encode(_prompts(1)[0])
    assert tokens.tokens.shape[-1] == tok.token_size


def test_pipeline_samples_load_strictly():
    from transformers import pipeline

    import sane_hf.pipeline_sane  # noqa: F401  (registers the weight-sampling task)
    from sane_hf.zoo.architectures import create_model

    pipe = pipeline("weight-sampling", model=str(CKPT), trust_remote_code=True, device="cpu")
    first = pipe(_prompts(), num_samples=2, seed=0)
    again = pipe(_prompts(), num_samples=2, seed=0)
    assert len(first) == 2
    x = torch.randn(4, 1, 8, 8)
    for s, t in zip(first, again):
        net = create_model("cnn-s", image_size=8)
        net.load_state_dict(s["state_dict"], strict=True)
        with torch.no_grad():
            y = net.eval()(x)
        assert y.shape == (4, 10) and torch.isfinite(y).all()
        for key in s["state_dict"]:
            torch.testing.assert_close(s["state_dict"][key], t["state_dict"][key])  # same seed, same samples


@pytest.mark.parametrize("name", ["probe_metrics.json", "metrics.json"])
def test_card_numbers_come_from_measurements(name):
    """The model card is rendered from the measured files shipped beside it."""
    assert (CKPT / name).is_file()
    card = (CKPT / "README.md").read_text()
    assert "R²" in card or "r2" in card.lower()
