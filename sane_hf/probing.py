"""Linear probes of model properties from embeddings, and the baselines they are judged against.

The evaluation protocol of sane-hf: features of the train/validation/test models (SANE
embeddings, or a baseline computed from the weights directly) are mapped to each property by a
linear probe whose penalty is chosen on the validation split:

* continuous targets (``test_acc``, ``epoch``, ``ggap``, ...): ``Ridge`` over a log grid of
  ``alpha`` (1e-4 … 1e4), scored by R² on test;
* categorical targets (``activation``, ``optimizer``, ``init``): ``LogisticRegression`` over a log
  grid of ``C``, scored by accuracy on test (a target with one class in train is skipped, with a
  note).

Features are standardised on the training rows only (``StandardScaler`` inside a ``Pipeline``).
The penalty is chosen by fitting on train and scoring on validation; the chosen probe is then
refit on **train** only (``refit="train"``, the default: the scaler and probe never see
validation rows, and the validation score stays an honest model-selection score) or on
train+validation (``refit="train+val"``; more data, scaler fitted on both).

Baselines, on the same split with the same probe:

* :func:`layer_statistics` — per layer: mean, variance and the 1/25/50/75/99 % quantiles of its
  real weights (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights",
  showed these reach R² > 0.9 on CNN zoos);
* :func:`raw_weights` — every weight flattened, for models of at most ``max_params`` values.

Both are computed in :mod:`sane_hf.weight_features` and re-exported here.

:func:`evaluate_zoo_probes` runs the whole protocol on a zoo: embed every split, compute the
baselines, probe every target, check that no model is in two splits.

Example::

    >>> import numpy as np
    >>> from sane_hf.probing import probe_properties
    >>> rng = np.random.default_rng(0)
    >>> def split(n):
    ...     x = rng.normal(size=(n, 4))
    ...     return x, {"y": x @ [1.0, -2.0, 0.5, 0.0], "c": np.where(x[:, 0] > 0, "a", "b")}
    >>> results = probe_properties(split(60), split(20), split(20), targets=["y", "c"])
    >>> round(results["y"].value, 3), results["c"].metric
    (1.0, 'accuracy')
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sane_hf.weight_features import (
    QUANTILES,
    STAT_NAMES,
    layer_statistics,
    layer_statistics_names,
    raw_weights,
)

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.tokenization_sane import WeightTokenizer

__all__ = [
    "DEFAULT_TARGETS",
    "CATEGORICAL_TARGETS",
    "DEFAULT_ALPHAS",
    "DEFAULT_CS",
    "QUANTILES",
    "STAT_NAMES",
    "METHODS",
    "ProbeResult",
    "ProbeResults",
    "ZooProbeReport",
    "probe_properties",
    "layer_statistics",
    "layer_statistics_names",
    "raw_weights",
    "check_model_splits",
    "methods_to_probe",
    "evaluate_zoo_probes",
]

#: Properties probed by default (the evaluation protocol).
DEFAULT_TARGETS = ("test_acc", "epoch", "ggap", "activation", "optimizer", "init")
#: Targets always treated as categorical (any target of string/bool dtype is too).
CATEGORICAL_TARGETS = ("activation", "optimizer", "init", "arch", "task")
#: Ridge penalties tried (half-decades from 1e-4 to 1e4).
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 17))
#: LogisticRegression inverse penalties tried (decades from 1e-4 to 1e4).
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 9))
#: Feature sets compared by :func:`evaluate_zoo_probes`, in report order. ``"sane+stats"`` is not a
#: feature set of its own: the SANE and layer-statistics probes blended on validation
#: (:mod:`sane_hf.probe_blend`), which says whether SANE adds anything to the statistics.
METHODS = ("sane", "layer_stats", "raw", "sane+stats")
_SPLITS = ("train", "validation", "test")
_MISSING_LABELS = (None, "unknown", "")


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _json_value(x: Any) -> Any:
    if isinstance(x, (np.floating, float)):
        return _json_float(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


@dataclass
class ProbeResult:
    """The probe of one target on one feature set.

    Attributes:
        target: the property's name.
        kind: ``"regression"`` (Ridge) or ``"classification"`` (LogisticRegression).
        metric: ``"r2"`` or ``"accuracy"`` — what ``value`` is.
        value: the metric on the test split; None when the target was skipped (see ``note``);
            NaN when undefined (R² of a constant test target).
        val_value: the metric on the validation split for the chosen penalty.
        alpha: the chosen penalty: Ridge's ``alpha``, or LogisticRegression's ``C`` (see
            ``penalty_name``).
        penalty_name: ``"alpha"`` or ``"C"``.
        predictions: test-split predictions (``(n_test,)``), None when skipped.
        true: the test-split targets the predictions are scored against.
        n_train, n_val, n_test: rows used per split (after dropping missing values).
        n_features: feature dimension.
        classes: the classes seen in train (classification).
        note: why the target was skipped, or what was dropped.
        blend_inputs: the validation outputs :func:`~sane_hf.probe_blend.blend_probe` needs
            (``val_true`` and ``val_predictions``, or class probabilities with their class
            orders); not serialised.
    """

    target: str
    kind: str
    metric: str
    value: float | None = None
    val_value: float | None = None
    alpha: float | None = None
    penalty_name: str = "alpha"
    predictions: np.ndarray | None = field(default=None, repr=False)
    true: np.ndarray | None = field(default=None, repr=False)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    n_features: int = 0
    classes: list[Any] | None = None
    note: str | None = None
    blend_inputs: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def skipped(self) -> bool:
        return self.value is None

    def to_dict(self, predictions: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN becomes None); ``predictions=True`` adds the test predictions."""
        out = {
            "target": self.target,
            "kind": self.kind,
            "metric": self.metric,
            "value": _json_float(self.value),
            "val_value": _json_float(self.val_value),
            self.penalty_name: _json_float(self.alpha),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_test": self.n_test,
            "n_features": self.n_features,
        }
        if self.classes is not None:
            out["classes"] = [_json_value(c) for c in self.classes]
        if self.note:
            out["note"] = self.note
        if predictions and self.predictions is not None:
            out["predictions"] = [_json_value(v) for v in self.predictions.tolist()]
            out["true"] = [_json_value(v) for v in np.asarray(self.true).tolist()]
        return out


class ProbeResults(dict):
    """``{target: ProbeResult}`` from :func:`probe_properties`, in target order."""

    def metrics(self) -> dict[str, float | None]:
        """``{target: test metric}`` (None for skipped targets)."""
        return {name: result.value for name, result in self.items()}

    def to_dict(self, predictions: bool = False) -> dict[str, dict[str, Any]]:
        return {name: result.to_dict(predictions=predictions) for name, result in self.items()}


class ZooProbeReport(dict):
    """What :func:`evaluate_zoo_probes` returns: ``{target: {"sane": v, "layer_stats": v, "raw": v}}``.

    ``v`` is R² (continuous targets) or accuracy (categorical) on the test split, None when a
    method or target was skipped. The details ride along as attributes:

    Attributes:
        results: ``{method: ProbeResults}`` (chosen penalties, predictions, notes).
        embeddings: ``{split: (n_rows, dim) ndarray}`` SANE embeddings.
        properties: ``{split: {target: list}}`` the probed properties (plus ``model_id``).
        metric_names: ``{target: "r2" | "accuracy"}``.
        notes: skipped methods and targets, and why.
        info: splits' sizes, pooling, windowing, refit choice.
    """

    def __init__(
        self,
        metrics: Mapping[str, Mapping[str, float | None]],
        *,
        results: Mapping[str, ProbeResults],
        embeddings: Mapping[str, np.ndarray],
        properties: Mapping[str, Mapping[str, list[Any]]],
        metric_names: Mapping[str, str],
        notes: Sequence[str],
        info: Mapping[str, Any],
    ):
        super().__init__({t: dict(m) for t, m in metrics.items()})
        self.results = dict(results)
        self.embeddings = dict(embeddings)
        self.properties = {s: dict(p) for s, p in properties.items()}
        self.metric_names = dict(metric_names)
        self.notes = list(notes)
        self.info = dict(info)

    def to_dict(self, predictions: bool = False) -> dict[str, Any]:
        """JSON-serialisable: ``metrics`` (the mapping itself), ``metric_names``, ``details``, ``notes``, ``info``."""
        return {
            "metrics": {t: {m: _json_float(v) for m, v in row.items()} for t, row in self.items()},
            "metric_names": dict(self.metric_names),
            "details": {m: r.to_dict(predictions=predictions) for m, r in self.results.items()},
            "notes": list(self.notes),
            "info": {k: _json_value(v) for k, v in self.info.items()},
        }

    def table(self, float_format: str = "{:.3f}") -> str:
        """A plain-text table: one row per target, one column per method."""
        methods = [m for m in METHODS if any(m in row for row in self.values())]
        header = ["property", "metric", *methods]
        rows = [header]
        for target, row in self.items():
            cells = [target, self.metric_names.get(target, "")]
            for m in methods:
                v = row.get(m)
                cells.append("—" if v is None else ("nan" if not math.isfinite(v) else float_format.format(v)))
            rows.append(cells)
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# probes
# ----------------------------------------------------------------------------------------------


def _features(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} features must be a 2-D array (n_models, n_features), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} features contain NaN or Inf values")
    return x


def _column(properties: Any, name: str, what: str) -> np.ndarray:
    """One property column from a mapping, a pandas DataFrame or a ``datasets.Dataset``."""
    if hasattr(properties, "column_names"):  # datasets.Dataset
        available = list(properties.column_names)
        if name not in available:
            raise ValueError(f"property {name!r} is missing from the {what} properties (columns: {available})")
        values = properties.select_columns([name]).with_format(None)[name]
    else:
        keys = list(properties.keys()) if hasattr(properties, "keys") else None
        if keys is None:
            raise TypeError(
                f"{what} properties must be a mapping, a pandas DataFrame or a datasets.Dataset, "
                f"got {type(properties).__name__}"
            )
        if name not in properties:
            raise ValueError(f"property {name!r} is missing from the {what} properties (available: {keys})")
        values = properties[name]
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if hasattr(values, "to_numpy"):
        values = values.to_numpy()
    values = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if values.ndim != 1:
        raise ValueError(f"property {name!r} of the {what} split must be one value per model, got shape {values.shape}")
    return values


def _is_categorical(name: str, values: Sequence[np.ndarray], categorical: Iterable[str]) -> bool:
    if name in set(categorical):
        return True
    return any(v.dtype.kind in "OUSb" for v in values)


def _valid_rows(y: np.ndarray, classification: bool) -> np.ndarray:
    if classification:
        return np.array([not (v in _MISSING_LABELS or (isinstance(v, float) and math.isnan(v))) for v in y.tolist()],
                        dtype=bool)
    return np.isfinite(y.astype(np.float64))


def _ridge(alpha: float):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=alpha))


def _logistic(c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    """``sklearn.metrics.r2_score``, but NaN (undefined) for constant targets instead of sklearn's 0 or 1."""
    from sklearn.metrics import r2_score

    with np.errstate(divide="ignore", invalid="ignore"):  # constant targets: x / 0
        value = float(r2_score(y, pred, force_finite=False))
    return value if math.isfinite(value) else math.nan


def _probe_regression(result: ProbeResult, data, alphas: Sequence[float], refit: str) -> None:
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data
    y_tr, y_va, y_te = (y.astype(np.float64) for y in (y_tr, y_va, y_te))
    best: tuple[float, float] | None = None  # (val mse, alpha)
    for alpha in alphas:
        pred = _ridge(alpha).fit(x_tr, y_tr).predict(x_va)
        mse = float(((pred - y_va) ** 2).mean())
        if best is None or mse < best[0]:  # ties keep the smaller alpha (grid ascending)
            best = (mse, float(alpha))
    assert best is not None
    alpha = best[1]
    chosen = _ridge(alpha).fit(x_tr, y_tr)
    val_pred = chosen.predict(x_va)
    result.val_value = _r2(y_va, val_pred)
    result.blend_inputs = {"val_true": y_va, "val_predictions": val_pred}
    if refit == "train+val":
        chosen = _ridge(alpha).fit(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]))
    pred = chosen.predict(x_te)
    result.alpha, result.predictions, result.true = alpha, pred, y_te
    result.value = _r2(y_te, pred)
    if math.isnan(result.value):
        result.note = _join(result.note, "the test targets are constant: R² is undefined")


def _probe_classification(result: ProbeResult, data, cs: Sequence[float], refit: str, max_iter: int) -> None:
    from sklearn.exceptions import ConvergenceWarning

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data
    classes = sorted(set(y_tr.tolist()), key=str)
    result.classes = classes
    if len(classes) < 2:
        result.note = _join(result.note, f"only one class ({classes[0]!r}) in train: nothing to classify")
        return
    best: tuple[float, float, float] | None = None  # (val accuracy, mean p(true class), C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            probe = _logistic(c, max_iter).fit(x_tr, y_tr)
            proba = probe.predict_proba(x_va)  # (n_val, classes)
            index = {k: i for i, k in enumerate(probe.classes_.tolist())}
            p_true = np.array([proba[r, index[v]] if v in index else 0.0 for r, v in enumerate(y_va.tolist())])
            acc = float((probe.classes_[proba.argmax(axis=1)] == y_va).mean())
            key = (acc, float(p_true.mean()), float(c))
            if best is None or key[:2] > best[:2]:  # accuracy first, then confidence in the truth
                best = key
        assert best is not None
        c = best[2]
        chosen = _logistic(c, max_iter).fit(x_tr, y_tr)
        result.val_value = float((chosen.predict(x_va) == y_va).mean())
        inputs = {"val_true": y_va, "val_proba": chosen.predict_proba(x_va), "val_classes": chosen.classes_.tolist()}
        if refit == "train+val":
            chosen = _logistic(c, max_iter).fit(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]))
        pred = chosen.predict(x_te)
        result.blend_inputs = {**inputs, "test_proba": chosen.predict_proba(x_te), "test_classes": chosen.classes_.tolist()}
    result.alpha, result.penalty_name, result.predictions, result.true = c, "C", pred, y_te
    result.value = float((pred == y_te).mean())


def _join(note: str | None, more: str) -> str:
    return more if not note else f"{note}; {more}"


def probe_properties(
    train: tuple[Any, Any],
    val: tuple[Any, Any],
    test: tuple[Any, Any],
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    categorical: Iterable[str] = CATEGORICAL_TARGETS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    Cs: Sequence[float] = DEFAULT_CS,
    refit: str = "train",
    max_iter: int = 1000,
    num_threads: int | None = 1,
) -> ProbeResults:
    """Linear probes from features to properties, penalty chosen on ``val``, scored on ``test``.

    Args:
        train, val, test: ``(features, properties)`` per split: features ``(n, f)`` (ndarray or
            tensor), properties a mapping of name → values, a pandas DataFrame or a
            ``datasets.Dataset`` with one row per feature row.
        targets: property names to probe.
        categorical: names probed as classes (string/bool properties always are).
        alphas: Ridge penalties to try (the one with the lowest validation MSE wins; ties keep
            the smaller).
        Cs: LogisticRegression inverse penalties to try (highest validation accuracy wins, ties
            broken by the mean predicted probability of the true class).
        refit: ``"train"`` — the chosen probe is the one fitted on train (default); or
            ``"train+val"`` — refit on both splits before scoring test.
        max_iter: LogisticRegression iterations.
        num_threads: BLAS/OpenMP threads while fitting (``threadpoolctl``); None = leave as is.
            These are small problems: one thread is fastest, and oversubscribed BLAS threads on a
            busy 2-core machine made the probes ~40x slower.

    Returns:
        :class:`ProbeResults` ``{target: ProbeResult}``: R² (regression) or accuracy
        (classification) on test, the chosen penalty, the test predictions. Rows with a missing
        target (NaN, None, ``"unknown"``) are dropped for that target; a target left with fewer
        than 3 rows in a split, or with a single class in train, is skipped with a ``note``.

    Raises:
        ValueError: a split with fewer than 3 rows, features and properties of different lengths,
            non-finite features, splits with different feature dimensions, a missing property,
            a bad ``refit``.
    """
    if refit not in ("train", "train+val"):
        raise ValueError(f"refit must be 'train' or 'train+val', got {refit!r}")
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("probe_properties needs at least one target")
    splits = {}
    for name, item in (("train", train), ("validation", val), ("test", test)):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"the {name} split must be a (features, properties) pair")
        x = _features(item[0], name)
        if len(x) < 3:
            raise ValueError(f"the {name} split has {len(x)} rows; probing needs at least 3 models per split")
        splits[name] = (x, item[1])
    dims = {name: x.shape[1] for name, (x, _) in splits.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"the splits' features have different dimensions: {dims}")

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=num_threads):
        return _probe_targets(splits, dims, targets, categorical, alphas, Cs, refit, max_iter)


def _probe_targets(splits, dims, targets, categorical, alphas, Cs, refit, max_iter) -> ProbeResults:
    results = ProbeResults()
    for target in targets:
        columns = {}
        for name, (x, props) in splits.items():
            y = _column(props, target, name)
            if len(y) != len(x):
                raise ValueError(
                    f"the {name} split has {len(x)} feature rows but {len(y)} values of property {target!r}"
                )
            columns[name] = y
        classification = _is_categorical(target, list(columns.values()), categorical)
        result = ProbeResult(
            target=target,
            kind="classification" if classification else "regression",
            metric="accuracy" if classification else "r2",
            penalty_name="C" if classification else "alpha",
            n_features=dims["train"],
        )
        data = []
        for name, (x, _) in splits.items():
            y = columns[name]
            if not classification and y.dtype.kind not in "iuf":
                try:
                    y = y.astype(np.float64)
                except (TypeError, ValueError) as err:
                    raise ValueError(
                        f"property {target!r} is not numeric ({y.dtype}); list it in categorical= to classify it"
                    ) from err
            keep = _valid_rows(y, classification)
            if not keep.all():
                result.note = _join(result.note, f"{int((~keep).sum())} {name} rows without a value dropped")
            data.append((x[keep], y[keep]))
        result.n_train, result.n_val, result.n_test = (len(d[1]) for d in data)
        if min(result.n_train, result.n_val, result.n_test) < 3:
            result.note = _join(result.note, "fewer than 3 rows with a value in a split: skipped")
        elif classification:
            _probe_classification(result, data, Cs, refit, max_iter)
        else:
            _probe_regression(result, data, alphas, refit)
        results[target] = result
    return results



# ----------------------------------------------------------------------------------------------
# the whole protocol on a zoo
# ----------------------------------------------------------------------------------------------


def _zoo_splits(zoo: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(zoo, Mapping) and not hasattr(zoo, "keys"):
        raise TypeError(f"zoo must be a DatasetDict with train/validation/test splits, got {type(zoo).__name__}")
    out = {}
    for split in _SPLITS:
        name = split if split in zoo else ("val" if split == "validation" and "val" in zoo else None)
        if name is None:
            raise ValueError(f"the zoo has no {split!r} split (splits: {list(zoo.keys())})")
        out[split] = zoo[name]
    return out


def check_model_splits(zoo: Mapping[str, Any], min_models: int = 3) -> dict[str, int]:
    """Check that no ``model_id`` is in two splits and each split holds ``min_models`` models.

    Returns ``{split: number of models}``; raises ``ValueError`` naming the shared ids or the
    small split. A model's checkpoints (epochs) must all be in one split, else a probe is scored
    on models it was fitted on.
    """
    splits = _zoo_splits(zoo)
    ids: dict[str, set[Any]] = {}
    for name, ds in splits.items():
        if "model_id" not in ds.column_names:
            raise ValueError(f"the {name} split has no 'model_id' column: cannot check that splits are by model")
        ids[name] = set(ds.select_columns(["model_id"]).with_format(None)["model_id"])
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(ids[a] & ids[b], key=str)
            if shared:
                shown = ", ".join(map(str, shared[:10])) + (" ..." if len(shared) > 10 else "")
                raise ValueError(
                    f"{len(shared)} model(s) appear in both the {a} and {b} splits (model_id {shown}): "
                    "splits must be by model, never by checkpoint (re-split with split_model_ids, or "
                    "`sane-hf probe --split-by model`)"
                )
    for name, s in ids.items():
        if len(s) < min_models:
            raise ValueError(
                f"the {name} split holds {len(s)} model(s); probing needs at least {min_models} models per split "
                "(build a larger zoo or change its split fractions)"
            )
    return {name: len(s) for name, s in ids.items()}


def methods_to_probe(methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` plus the probes ``"sane+stats"`` is blended from, each before it (report order kept)."""
    out = [m for m in methods if m != "sane+stats"]
    if "sane+stats" in methods:
        out += [m for m in ("sane", "layer_stats") if m not in out] + ["sane+stats"]
    return tuple(out)


def evaluate_zoo_probes(
    model: Any,
    tokenizer: WeightTokenizer,
    zoo: Mapping[str, Any],
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    methods: Sequence[str] = METHODS,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 32,
    pooling: str | None = None,
    normalize: bool = True,
    raw_max_params: int = 50_000,
    refit: str = "train",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    Cs: Sequence[float] = DEFAULT_CS,
    categorical: Iterable[str] = CATEGORICAL_TARGETS,
    extra_columns: Sequence[str] = (),
    num_threads: int | None = 1,
    progress: bool = False,
) -> ZooProbeReport:
    """Property prediction on a zoo (the evaluation protocol): SANE embeddings beside the baselines.

    Embeds every split with :func:`~sane_hf.embedding.embed_models` (from the raw ``weights``,
    tokenized with ``tokenizer``), computes the layer-statistics and raw-weights baselines from the
    same rows, and probes each target with :func:`probe_properties` on every feature set.

    Args:
        model: a trained :class:`~sane_hf.modeling_sane.SaneModel`.
        tokenizer: its :class:`WeightTokenizer` (fitted when ``normalize=True``).
        zoo: a ``DatasetDict`` with ``train``/``validation``/``test`` splits of raw zoo rows
            (``load_zoo(path)``), split by model.
        targets: properties to probe (must be zoo columns).
        methods: feature sets among :data:`METHODS`: ``"sane"``, ``"layer_stats"``, ``"raw"``, and
            ``"sane+stats"`` (the two first blended on validation, :mod:`sane_hf.probe_blend`;
            both are computed for it even when not asked for, and reported only when asked).
        window, halo, batch_size, pooling, normalize: passed to ``embed_models``; ``pooling=None`` is
            :data:`~sane_hf.embedding.DEFAULT_POOLING` (per-layer mean and std of token latents), the
            readout every command uses.
        raw_max_params: the raw-weights baseline is skipped (with a note) above this many weights.
        refit, alphas, Cs, categorical, num_threads: passed to :func:`probe_properties`.
        extra_columns: zoo columns to carry into ``report.properties`` without probing them
            (e.g. ``test_acc`` to colour a plot); those missing from the zoo are ignored.
        progress: progress bars while embedding.

    Returns:
        :class:`ZooProbeReport` ``{target: {method: test R² or accuracy}}`` with details.

    Raises:
        ValueError: a model in two splits, a split with fewer than 3 models, a target missing from
            the zoo, an unknown method; errors of ``embed_models`` (weights not matching the tokenizer).
    """
    from sane_hf.embedding import DEFAULT_POOLING, embed_models, resolve_window

    pooling = DEFAULT_POOLING if pooling is None else pooling

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if isinstance(targets, str):
        targets = [targets]
    splits = _zoo_splits(zoo)
    counts = check_model_splits(splits)
    for name, ds in splits.items():
        missing = [t for t in targets if t not in ds.column_names]
        if missing:
            raise ValueError(
                f"properties {missing} are missing from the zoo's {name} split (columns: {ds.column_names})"
            )
        if "weights" not in ds.column_names:
            raise ValueError(f"the zoo's {name} split has no 'weights' column: pass a raw zoo (load_zoo(path))")

    notes: list[str] = []
    probed = methods_to_probe(methods)  # the asked methods and the parts of a blend
    features: dict[str, dict[str, np.ndarray]] = {m: {} for m in probed if m != "sane+stats"}
    properties: dict[str, dict[str, list[Any]]] = {}
    embeddings: dict[str, np.ndarray] = {}
    raw_ok = "raw" in methods and tokenizer.num_params <= raw_max_params
    if "raw" in methods and not raw_ok:
        notes.append(
            f"raw: skipped, the models have {tokenizer.num_params} weights (> raw_max_params={raw_max_params})"
        )
    for name, ds in splits.items():
        extra = [c for c in extra_columns if c in ds.column_names and c not in targets and c != "model_id"]
        properties[name] = ds.select_columns(["model_id", *targets, *extra]).with_format(None).to_dict()
        if "sane" in probed:
            out = embed_models(
                model, tokenizer, ds, window=window, halo=halo, batch_size=batch_size, pooling=pooling,
                normalize=normalize, progress=progress,
            )
            embeddings[name] = features["sane"][name] = out.embeddings.numpy().astype(np.float64)
        if "layer_stats" in probed:
            features["layer_stats"][name] = layer_statistics(ds, tokenizer)
        if raw_ok:
            features["raw"][name] = raw_weights(ds, tokenizer, max_params=raw_max_params)

    results: dict[str, ProbeResults] = {}
    for method in probed:
        if method == "raw" and not raw_ok:
            continue
        if method == "sane+stats":
            from sane_hf.probe_blend import blend_probe_results

            results[method] = blend_probe_results(results["sane"], results["layer_stats"])
        else:
            f = features[method]
            results[method] = probe_properties(
                (f["train"], properties["train"]), (f["validation"], properties["validation"]),
                (f["test"], properties["test"]), targets, categorical=categorical, alphas=alphas, Cs=Cs,
                refit=refit, num_threads=num_threads,
            )
        if method in methods:
            for target, result in results[method].items():
                if result.note:
                    notes.append(f"{method}/{target}: {result.note}")
    results = {m: r for m, r in results.items() if m in methods}  # a blend's parts only when asked for

    metric_names: dict[str, str] = {}
    metrics: dict[str, dict[str, float | None]] = {}
    for target in targets:
        row: dict[str, float | None] = {}
        for method in methods:
            result = results.get(method, {}).get(target)
            row[method] = None if result is None else result.value
            if result is not None:
                metric_names[target] = result.metric
        metrics[target] = row
    win, hal = resolve_window(model.config, window, halo) if "sane" in features else (window, halo)
    info = {
        "refit": refit,
        "pooling": pooling,
        "window": win,
        "halo": hal,
        "normalize": normalize,
        "token_size": tokenizer.token_size,
        "num_tokens": tokenizer.num_tokens,
        "num_params": tokenizer.num_params,
        **{f"{name}_rows": len(ds) for name, ds in splits.items()},
        **{f"{name}_models": n for name, n in counts.items()},
    }
    return ZooProbeReport(
        metrics, results=results, embeddings=embeddings, properties=properties, metric_names=metric_names,
        notes=notes, info=info,
    )
