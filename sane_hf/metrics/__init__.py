"""sane-hf's metrics as Hugging Face ``evaluate`` modules.

Each metric is one self-contained script in its own folder, so that ``evaluate.load(<folder>)``
loads it offline from a local path, and the same class is importable from here:

================================  ===========================  ==========================================
folder (``metric_path(name)``)    class                        used by
================================  ===========================  ==========================================
``property_probe``                :class:`PropertyProbe`       ``sane-hf probe --split-by model`` (score
                                                               of each cross-validation fold)
``sampled_accuracy_gain``         :class:`SampledAccuracyGain` ``sane-hf sample --evaluate`` (gain of
                                                               samples over random init, and on transfer)
================================  ===========================  ==========================================

Example::

    >>> import evaluate
    >>> from sane_hf.metrics import metric_path
    >>> r2 = evaluate.load(metric_path("property_probe"))   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sane_hf.metrics.property_probe.property_probe import PropertyProbe
from sane_hf.metrics.sampled_accuracy_gain.sampled_accuracy_gain import SampledAccuracyGain

__all__ = ["METRICS", "PropertyProbe", "SampledAccuracyGain", "metric_path", "load_metric"]

#: name → class of every metric module shipped here.
METRICS = {"property_probe": PropertyProbe, "sampled_accuracy_gain": SampledAccuracyGain}


def metric_path(name: str) -> str:
    """The folder of metric ``name``, for ``evaluate.load(metric_path(name))``."""
    if name not in METRICS:
        raise ValueError(f"unknown sane-hf metric {name!r}; available: {sorted(METRICS)}")
    return str(Path(__file__).resolve().parent / name)


def load_metric(name: str, **kwargs: Any) -> Any:
    """An in-memory instance of metric ``name`` (no cache files, no network), e.g. ``load_metric("property_probe")``."""
    if name not in METRICS:
        raise ValueError(f"unknown sane-hf metric {name!r}; available: {sorted(METRICS)}")
    return METRICS[name](keep_in_memory=True, **kwargs)
