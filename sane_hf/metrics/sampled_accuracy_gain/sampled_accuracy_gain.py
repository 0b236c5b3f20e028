"""Sampled-model accuracy gain: mean accuracy of sampled models minus that of a baseline group.

An ``evaluate`` metric module, loadable offline from its folder::

    >>> import evaluate
    >>> from sane_hf.metrics import metric_path
    >>> gain = evaluate.load(metric_path("sampled_accuracy_gain"))    # doctest: +SKIP
    >>> gain.compute(predictions=[0.5, 1.0], references=[0.25, 0.75])  # doctest: +SKIP
    {'gain': 0.25, 'sampled_mean': 0.75, 'baseline_mean': 0.5, 'win_rate': 1.0, 'n': 2}

or imported as a class (``from sane_hf.metrics import SampledAccuracyGain``). ``sane-hf sample
--evaluate`` reports its ``gain`` as the gain of samples over random init at every fine-tuning
epoch and on the transfer task. This file imports only ``evaluate``, ``datasets`` and ``numpy``.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
How much more accurate networks sampled from a weight-space model (e.g. SANE) are than a baseline
group of the same architecture (random initialisation, noisy prompts, ...), evaluated on the same
test set after the same fine-tuning. ``predictions`` are the sampled models' accuracies and
``references`` the baseline models' (paired: sample i with baseline model i).
gain = mean(predictions) − mean(references); win_rate = fraction of pairs where the sample is more
accurate.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: test accuracies of the sampled models.
    references: test accuracies of the baseline models, one per sampled model.
Returns:
    {"gain": float, "sampled_mean": float, "baseline_mean": float, "win_rate": float, "n": int}
Examples:
    >>> SampledAccuracyGain().compute(predictions=[0.5, 1.0], references=[0.25, 0.75])["gain"]
    0.25
"""

_CITATION = """
@inproceedings{schurholt2024sane,
  title={Towards Scalable and Versatile Weight Space Learning},
  author={Sch{\\"u}rholt, Konstantin and Mahoney, Michael W. and Borth, Damian},
  booktitle={ICML}, year={2024}
}
"""


class SampledAccuracyGain(evaluate.Metric):
    """Mean accuracy of sampled models minus the mean accuracy of paired baseline models."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://arxiv.org/abs/2406.09997"],
        )

    def _compute(self, predictions, references) -> dict:
        if len(predictions) != len(references) or not len(references):
            raise ValueError(f"need one baseline accuracy per sampled model, at least one; got {len(predictions)} "
                             f"and {len(references)}")
        sampled = np.asarray(predictions, dtype=np.float64)
        baseline = np.asarray(references, dtype=np.float64)
        return {
            "gain": float(sampled.mean() - baseline.mean()),
            "sampled_mean": float(sampled.mean()),
            "baseline_mean": float(baseline.mean()),
            "win_rate": float((sampled > baseline).mean()),
            "n": int(sampled.size),
        }
