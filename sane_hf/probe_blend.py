"""The ``"sane+stats"`` probe: does SANE's embedding add anything to layer statistics?

Concatenating the two feature sets into one Ridge does not answer that question: the embedding's
hundreds of coordinates share one penalty with the few dozen statistics and drown them (measured:
grouped-CV R² of ``test_acc`` on the quickstart zoo 0.38 for the concatenation vs 0.54 for the
statistics alone). This probe keeps the two probes as they are — each with its own penalty chosen
on the validation split — and blends their outputs:

- regression: ``w · pred_sane + (1 − w) · pred_stats``;
- classification: the same blend of the two probes' class probabilities, argmax.

The SANE weight ``w`` is chosen on the validation split from :data:`SANE_WEIGHTS` (lowest MSE;
classification: highest accuracy, then mean probability of the true class); ties keep the smaller
``w``, so an embedding that adds nothing gets ``w = 0`` and the probe *is* the statistics probe.
The chosen ``w`` is reported as the result's ``sane_weight``: how much of the prediction SANE
carries. The test split is scored once, with that ``w``.

>>> import numpy as np
>>> from sane_hf.probing import probe_properties
>>> rng = np.random.default_rng(0)
>>> signal = rng.normal(size=(90, 2))
>>> a = signal[:, :1] + 0.1 * rng.normal(size=(90, 1))  # sees the first half of the target
>>> b = signal[:, 1:] + 0.1 * rng.normal(size=(90, 1))  # and the other one the second half
>>> props = {"y": signal.sum(1)}
>>> split = lambda x, s: (x[s], {"y": props["y"][s]})
>>> parts = [slice(0, 60), slice(60, 75), slice(75, 90)]
>>> ra = probe_properties(*[split(a, s) for s in parts], targets=["y"])
>>> rb = probe_properties(*[split(b, s) for s in parts], targets=["y"])
>>> both = blend_probe_results(ra, rb)["y"]
>>> both.value > max(ra["y"].value, rb["y"].value), 0.0 < both.alpha < 1.0
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from sane_hf.probing import ProbeResult, ProbeResults, _r2

__all__ = ["SANE_WEIGHTS", "BLEND_METHOD", "blend_probe", "blend_probe_results"]

#: The method key of the blended probe in reports (``probe.metrics.<property>["sane+stats"]``).
BLEND_METHOD = "sane+stats"
#: SANE weights tried on the validation split (0 = layer statistics alone, 1 = SANE alone).
SANE_WEIGHTS = tuple(float(w) for w in np.linspace(0.0, 1.0, 21))


def _skipped(sane: ProbeResult, note: str) -> ProbeResult:
    return ProbeResult(sane.target, sane.kind, sane.metric, penalty_name="sane_weight", note=note)


def _aligned(proba: np.ndarray, classes: list, order: list) -> np.ndarray:
    """``proba`` ``(n, len(classes))`` with its columns put in ``order`` (classes it lacks: 0)."""
    out = np.zeros((proba.shape[0], len(order)))
    for j, c in enumerate(classes):
        out[:, order.index(c)] = proba[:, j]
    return out


def blend_probe(sane: ProbeResult, stats: ProbeResult) -> ProbeResult:
    """The blended probe of one target from its SANE probe and its layer-statistics probe.

    Both must come from :func:`~sane_hf.probing.probe_properties` on the same rows (same splits,
    same target); the blend uses their validation and test outputs, nothing is refitted.

    Raises:
        ValueError: the two results are of different targets or kinds, or have different test or
            validation rows.
    """
    if (sane.target, sane.kind) != (stats.target, stats.kind):
        raise ValueError(
            f"cannot blend a probe of {sane.target!r} ({sane.kind}) with one of {stats.target!r} ({stats.kind})"
        )
    if sane.skipped or stats.skipped:
        which = "SANE" if sane.skipped else "layer statistics"
        return _skipped(sane, f"the {which} probe was skipped, so the blend was too")
    ins_a, ins_b = sane.blend_inputs, stats.blend_inputs
    if ins_a is None or ins_b is None:
        raise ValueError("blend_probe needs results of probe_properties (they carry validation outputs)")
    if not (np.array_equal(ins_a["val_true"], ins_b["val_true"]) and np.array_equal(sane.true, stats.true)):
        raise ValueError(f"the two probes of {sane.target!r} were scored on different rows: probe the same splits")
    y_val, y_test = ins_a["val_true"], sane.true
    out = ProbeResult(
        sane.target, sane.kind, sane.metric, penalty_name="sane_weight", true=y_test, n_train=sane.n_train,
        n_val=sane.n_val, n_test=sane.n_test, n_features=sane.n_features + stats.n_features, classes=sane.classes,
    )
    if sane.kind == "regression":
        val = [np.asarray(i["val_predictions"], dtype=np.float64) for i in (ins_a, ins_b)]
        test = [np.asarray(r.predictions, dtype=np.float64) for r in (sane, stats)]
        losses = [float(((w * val[0] + (1 - w) * val[1] - y_val) ** 2).mean()) for w in SANE_WEIGHTS]
        w = SANE_WEIGHTS[int(np.argmin(losses))]  # argmin keeps the first (smallest w) of equal losses
        out.val_value = _r2(y_val, w * val[0] + (1 - w) * val[1])
        out.predictions = w * test[0] + (1 - w) * test[1]
        out.value = _r2(y_test, out.predictions)
    else:
        order = sorted({*ins_a["val_classes"], *ins_b["val_classes"], *ins_a["test_classes"], *ins_b["test_classes"]},
                       key=str)  # fmt: skip
        val = [_aligned(i["val_proba"], i["val_classes"], order) for i in (ins_a, ins_b)]
        test = [_aligned(i["test_proba"], i["test_classes"], order) for i in (ins_a, ins_b)]
        truth = np.array([order.index(v) if v in order else -1 for v in y_val.tolist()])
        best: tuple[float, float] | None = None
        w = 0.0
        for weight in SANE_WEIGHTS:
            proba = weight * val[0] + (1 - weight) * val[1]  # (n_val, classes)
            p_true = np.where(truth >= 0, proba[np.arange(len(truth)), truth.clip(min=0)], 0.0)
            key = (float((proba.argmax(1) == truth).mean()), float(p_true.mean()))
            if best is None or key > best:
                best, w = key, weight
        assert best is not None
        out.val_value = best[0]
        labels = np.asarray(order, dtype=object)
        out.predictions = labels[(w * test[0] + (1 - w) * test[1]).argmax(1)]
        out.value = float(np.mean([p == t for p, t in zip(out.predictions.tolist(), y_test.tolist())]))
    out.alpha = w
    if math.isnan(out.value):
        out.note = "the test targets are constant: R² is undefined"
    return out


def blend_probe_results(sane: Mapping[str, ProbeResult], stats: Mapping[str, ProbeResult]) -> ProbeResults:
    """:func:`blend_probe` for every target the two :class:`~sane_hf.probing.ProbeResults` share."""
    return ProbeResults({t: blend_probe(sane[t], stats[t]) for t in sane if t in stats})
