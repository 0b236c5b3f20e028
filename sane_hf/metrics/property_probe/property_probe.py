"""Property-probe score: R² for a continuous property, accuracy for a categorical one.

An ``evaluate`` metric module, loadable offline from its folder::

    >>> import evaluate
    >>> from sane_hf.metrics import metric_path
    >>> probe = evaluate.load(metric_path("property_probe"))          # doctest: +SKIP
    >>> probe.compute(predictions=[0.5, 0.7, 0.9], references=[0.4, 0.8, 0.9])   # doctest: +SKIP
    {'r2': 0.7857142857142857, 'n': 3}

or imported as a class (``from sane_hf.metrics import PropertyProbe``). This is the score the
``sane-hf probe`` cross-validation reports per fold (a linear probe's test-split predictions of a
model property against the true values). This file imports only ``evaluate``, ``datasets`` and
``numpy``, so ``evaluate.load`` can copy it anywhere.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The score of a probe that predicts a property of neural networks (test accuracy, training epoch,
generalisation gap, activation function, ...) from their weights or embeddings. Continuous
properties (``kind="regression"``) are scored by the coefficient of determination
R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)² (undefined, NaN, when the references are constant); categorical
ones (``kind="classification"``, or string inputs) by accuracy, the fraction of exact matches.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the probe's predictions, one per model (floats, or class labels as strings).
    references: the true property values, one per model.
    kind: "regression" (R², the default for numbers) or "classification" (accuracy, the default for strings).
Returns:
    {"r2": float, "n": int} or {"accuracy": float, "n": int}.
Examples:
    >>> probe = PropertyProbe()
    >>> probe.compute(predictions=[1.0, 2.0, 3.0], references=[1.0, 2.0, 4.0])["r2"]
    0.7857142857142857
    >>> probe.compute(predictions=["relu", "tanh"], references=["relu", "relu"])
    {'accuracy': 0.5, 'n': 2}
"""

_CITATION = """
@inproceedings{schurholt2024sane,
  title={Towards Scalable and Versatile Weight Space Learning},
  author={Sch{\\"u}rholt, Konstantin and Mahoney, Michael W. and Borth, Damian},
  booktitle={ICML}, year={2024}
}
"""

_KINDS = ("regression", "classification")


class PropertyProbe(evaluate.Metric):
    """R² (regression) or accuracy (classification) of predicted model properties."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://arxiv.org/abs/2406.09997"],
        )

    def _compute(self, predictions, references, kind: str | None = None) -> dict:
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if len(predictions) != len(references) or not len(references):
            raise ValueError(f"need as many predictions as references, at least one; got {len(predictions)} and "
                             f"{len(references)}")
        strings = isinstance(references[0], str)
        if kind is None:
            kind = "classification" if strings else "regression"
        if kind == "classification":
            matches = [p == r for p, r in zip(predictions, references)]
            return {"accuracy": float(np.mean(matches)), "n": len(matches)}
        if strings:
            raise ValueError("kind='regression' needs numeric predictions and references, got strings")
        y = np.asarray(references, dtype=np.float64)
        pred = np.asarray(predictions, dtype=np.float64)
        total = float(((y - y.mean()) ** 2).sum())
        r2 = float("nan") if total == 0.0 else 1.0 - float(((y - pred) ** 2).sum()) / total
        return {"r2": r2, "n": int(y.size)}
