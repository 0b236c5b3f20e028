"""File names shared by the jobs, the Hub code and the presentation layer, defined once.

A model folder (``sane-hf train`` output) holds ``config.json``, ``model.safetensors``,
:data:`TOKENIZER_FILE`, :data:`TRAINING_CONFIG_FILE`, :data:`ZOO_CONFIG_FILE`,
:data:`TRAINING_METRICS_FILE` and the model card :data:`CARD_FILE`; a zoo folder holds
:data:`CARD_FILE` (the dataset card), :data:`ZOO_CONFIG_FILE`, :data:`ZOO_SUMMARY_FILE` and
``data/*.parquet`` (:data:`PARTIAL_DIR` while a build is unfinished).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CARD_FILE",
    "TOKENIZER_FILE",
    "TRAINING_CONFIG_FILE",
    "TRAINING_METRICS_FILE",
    "METRICS_FILE",
    "PROBE_METRICS_FILE",
    "SAMPLING_METRICS_FILE",
    "ZOO_CONFIG_FILE",
    "ZOO_SUMMARY_FILE",
    "PARTIAL_DIR",
    "REPORT_FILE",
    "QUICKSTART_METRICS_FILE",
    "QUICKSTART_ZOO_DIR",
    "QUICKSTART_MODEL_DIR",
    "QUICKSTART_PROBE_DIR",
    "QUICKSTART_SAMPLES_DIR",
    "FALLBACK_FILES",
    "find_metrics_file",
]

#: The model card of a model folder and the dataset card of a zoo folder.
CARD_FILE = "README.md"
#: The :class:`~sane_hf.tokenization_sane.WeightTokenizer` beside the model weights.
TOKENIZER_FILE = "weight_tokenizer.json"
#: The :class:`~sane_hf.training.SaneTrainingConfig` of a run.
TRAINING_CONFIG_FILE = "training_config.json"
#: What every job writes into its output folder (training, probing, sampling measurements).
METRICS_FILE = "metrics.json"
#: The training measurements in a model folder (the ``metrics.json`` of ``train_sane``).
TRAINING_METRICS_FILE = METRICS_FILE
#: The probe job's ``metrics.json`` copied into a model folder (read by the model card).
PROBE_METRICS_FILE = "probe_metrics.json"
#: The sampling job's ``metrics.json`` copied into a model folder (read by the model card).
SAMPLING_METRICS_FILE = "sampling_metrics.json"
#: The :class:`~sane_hf.zoo.ZooConfig` of a zoo (written last: it marks a complete zoo).
ZOO_CONFIG_FILE = "zoo_config.json"
#: A zoo's summary: counts, splits, property statistics, library versions.
ZOO_SUMMARY_FILE = "zoo_summary.json"
#: The hidden folder of an unfinished zoo build or import.
PARTIAL_DIR = ".partial"
#: The quickstart's Markdown report and its measurements.
REPORT_FILE = "report.md"
QUICKSTART_METRICS_FILE = "quickstart_metrics.json"
#: The sub-folders of a quickstart run.
QUICKSTART_ZOO_DIR, QUICKSTART_MODEL_DIR, QUICKSTART_PROBE_DIR, QUICKSTART_SAMPLES_DIR = "zoo", "model", "probe", "samples"

#: Where the probe and sample commands write by default inside a model folder; read when the flat
#: name (:data:`PROBE_METRICS_FILE`, :data:`SAMPLING_METRICS_FILE`) is absent.
FALLBACK_FILES = {PROBE_METRICS_FILE: "probe/metrics.json", SAMPLING_METRICS_FILE: "sampling/metrics.json"}


def find_metrics_file(folder: str | os.PathLike, name: str) -> Path | None:
    """``folder/name``, or the default location of that file written by its command, or None."""
    folder = Path(folder)
    for candidate in (name, FALLBACK_FILES.get(name)):
        if candidate and (folder / candidate).is_file():
            return folder / candidate
    return None
