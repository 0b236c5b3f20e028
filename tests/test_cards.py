"""Model cards (sane_hf.cards): the numbers of a model folder's files, in the packaged template.

The fixtures' measurements are the fake but schema-correct ones of ``test_hub.py`` (the keys
``train_sane``, ``sane-hf probe`` and ``sane-hf sample --evaluate`` write).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_hub import SAMPLING_METRICS, tiny_model_and_tokenizer, write_run_files

from sane_hf.cards import MODEL_CARD_TAGS, NOT_MEASURED, model_card_template_path, render_model_card

REPO_ID = "org/sane-tiny"
ZOO_REPO_ID = "org/tiny-zoo"
ROOT = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------


def test_packaged_template_is_the_root_template():
    root = ROOT / "model_card.md"
    assert root.is_file(), "model_card.md at the repository root is the canonical template"
    assert model_card_template_path().read_bytes() == root.read_bytes(), (
        "sane_hf/templates/model_card.md must be a copy of model_card.md: cp model_card.md sane_hf/templates/"
    )


def test_model_card_metadata_and_measured_numbers(model_folder):
    card = render_model_card(model_folder, REPO_ID, dataset_repo_id=ZOO_REPO_ID)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert set(MODEL_CARD_TAGS) <= set(data["tags"]) and {"weight-space-learning", "sane", "model-zoo"} <= set(data["tags"])
    assert data["datasets"] == [ZOO_REPO_ID]
    assert set(data["metrics"]) == {"mse", "r_squared", "accuracy"}
    text = card.text
    assert "{{" not in text and "{#" not in text
    # training numbers from metrics.json
    for number in ("0.8765", "0.0912", "1.0241", "0.0731", "| 40 |"):
        assert number in text, number
    # probe table (read from probe/metrics.json, the probe CLI's default place): SANE vs baselines
    assert "| test accuracy (`test_acc`) | R² | 0.6123 | 0.9345 | 0.4012 |" in text
    assert f"| generalisation gap (`ggap`) | R² | 0.2233 | 0.5511 | {NOT_MEASURED} |" in text
    assert "| activation function (`activation`) | accuracy | 0.75 | 1 | 0.5 |" in text
    # the verdict, worded from the numbers; no file the repository lacks is cited
    verdict = text.split("### Verdict")[1].split("### Training")[0]
    assert "SANE predicts test accuracy worse than layer statistics (R² 0.61 vs 0.93; raw weights 0.40)." in verdict
    assert "SANE predicts activation function worse than layer statistics (accuracy 0.75 vs 1.00" in verdict
    assert "**Verdict: SANE does not win on this run" in verdict and "DESIGN.md" not in text
    assert "raw: ggap skipped" in text
    # sampling was not measured: said so, no numbers invented
    sampling = text.split("### Sampling")[1].split("## Limitations")[0]
    assert "Not measured" in sampling and "|" not in sampling
    # zoo, model, usage and citation
    assert "| task | `digits` |" in text and "| architecture | `mlp` |" in text and "| models | 6 |" in text
    assert "| `d_model` | 32 |" in text and "228 tokens of 16 values" in text
    assert f'SaneModel.from_pretrained("{REPO_ID}")' in text and f'model="{REPO_ID}", trust_remote_code=True' in text
    assert "Towards Scalable and Versatile Weight Space Learning" in text and "2406.09997" in text
    assert "Mahoney" in text and "ICML" in text
    assert f"https://huggingface.co/datasets/{ZOO_REPO_ID}" in text


def test_model_card_without_measurements_says_not_measured(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "sampling_metrics.json").write_text(json.dumps({"sampled": {"epoch_0": {"acc_mean": 0.4321}}}))
    card = render_model_card(tmp_path)
    results = card.text.split("## Results")[1].split("## Limitations")[0]
    training = results.split("### Training")[1].split("### Property")[0]
    probe = results.split("### Property prediction")[1].split("### Sampling")[0]
    assert "Not measured" in training and "|" not in training
    assert "Not measured" in probe and "|" not in probe
    assert "| `sampled.epoch_0.acc_mean` | 0.4321 |" in results
    assert card.data.to_dict()["metrics"] == ["accuracy"] and "datasets" not in card.data.to_dict()
    assert "Not recorded: the folder holds no `zoo_config.json`" in card.text


def test_model_card_sampling_evaluation_tables(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "sampling").mkdir()
    (tmp_path / "sampling" / "metrics.json").write_text(json.dumps(SAMPLING_METRICS))  # the fallback location
    text = render_model_card(tmp_path).text
    sampling = text.split("### Sampling")[1].split("## Limitations")[0]
    assert "| SANE samples | 0.43 ± 0.01 (n=2) | 0.62 ± 0.01 (n=2) |" in sampling
    assert "| random init | 0.1 ± 0 (n=2) | 0.31 ± 0.01 (n=2) |" in sampling
    assert "| aligned prompt average | 0.15 (n=1) | 0.35 (n=1) |" in sampling
    assert "| **gain of samples over random init** | 0.33 | 0.31 |" in sampling
    assert "| SANE samples | 4 ± 1 (n=2) | 0.6 ± 0.1 (n=2) | 2 ± 0 (n=2) |" in sampling
    assert f"| prompt models | 6 ± 0 (n=2) | 0.8 ± 0 (n=2) | {NOT_MEASURED} |" in sampling
    assert "8 training-zoo checkpoints" in sampling and "Transfer to a new task: not measured." in sampling
    assert "test accuracy mean 0.6" in sampling
    verdict = text.split("### Verdict")[1].split("### Training")[0]
    assert "SANE samples beat random init by +0.33 at epoch 0 and by +0.31 after 1 fine-tuning epoch." in verdict


def test_reports_name_the_probe_methods_of_the_probes():
    from sane_hf.probing import METHODS
    from sane_hf.reports import METHODS as SHOWN
    from sane_hf.verdicts import METHOD_NAMES

    assert SHOWN == METHODS and set(METHOD_NAMES) == set(METHODS)


def test_file_names_agree_with_the_self_contained_tokenizer():
    # tokenization_sane.py travels as remote code and keeps its own copy of the file name
    from sane_hf.constants import TOKENIZER_FILE
    from sane_hf.tokenization_sane import TOKENIZER_FILE as SHIPPED

    assert TOKENIZER_FILE == SHIPPED
