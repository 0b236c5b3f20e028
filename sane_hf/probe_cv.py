"""Property probes by k-fold cross-validation grouped by model, for zoos too small for fixed splits.

A zoo of ten models split 70/15/15 leaves one or two models for validation and test, fewer than a
probe needs. :func:`cross_validate_zoo_probes` pools every row of the zoo, splits the *models*
(``model_id``, so a model's checkpoints never straddle two parts) into ``folds`` groups, and for
each fold ``k`` fits the probes of :func:`~sane_hf.probing.probe_properties` on the other models
(validation: fold ``k+1``, which chooses the penalty; train: the rest) and scores them on fold
``k``. Every model is tested exactly once. Features (SANE embeddings and the baselines) are
computed once for all rows.

The fold scores are computed from each fold's test predictions by the ``property_probe``
``evaluate`` metric (:class:`sane_hf.metrics.PropertyProbe`); the report's ``metrics`` hold their
mean over folds (the layout of the fixed-split report, so cards and summaries read both) and
``info["cv"]`` the per-fold values and their standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sane_hf.probing import (
    CATEGORICAL_TARGETS,
    DEFAULT_TARGETS,
    METHODS,
    ProbeResult,
    ProbeResults,
    ZooProbeReport,
    layer_statistics,
    methods_to_probe,
    probe_properties,
    raw_weights,
)

__all__ = ["MIN_MODELS_PER_FOLD", "model_folds", "cross_validate_zoo_probes"]

#: A fold (validation or test part) must hold at least this many models.
MIN_MODELS_PER_FOLD = 1


def model_folds(model_ids: Sequence[Any], folds: int, seed: int = 0) -> list[list[Any]]:
    """The distinct ``model_ids`` shuffled (seeded) and dealt into ``folds`` groups of near-equal size.

    Raises ``ValueError`` when there are fewer than 3 folds or fewer models than folds.
    """
    if folds < 3:
        raise ValueError(f"k-fold cross-validation needs at least 3 folds (train, validation, test), got {folds}")
    unique = sorted(set(model_ids), key=str)
    if len(unique) < folds:
        raise ValueError(
            f"the zoo holds {len(unique)} model(s), fewer than the {folds} folds asked for: pass --folds "
            f"{max(3, len(unique))} or fewer" if len(unique) >= 3 else
            f"the zoo holds {len(unique)} model(s); cross-validation needs at least 3 (one per fold)"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    return [[unique[i] for i in part] for part in np.array_split(order, folds)]


def _score(metric: Any, result: ProbeResult) -> float | None:
    """The fold's test score by the ``property_probe`` evaluate metric (None when the probe was skipped)."""
    if result.skipped or result.predictions is None:
        return None
    kind = "classification" if result.metric == "accuracy" else "regression"
    if kind == "classification":
        preds, refs = [str(v) for v in result.predictions], [str(v) for v in result.true]
    else:
        preds, refs = [float(v) for v in result.predictions], [float(v) for v in result.true]
    value = metric.compute(predictions=preds, references=refs, kind=kind)["accuracy" if kind == "classification" else "r2"]
    return None if value is None or not math.isfinite(value) else float(value)


def cross_validate_zoo_probes(
    model: Any,
    tokenizer: Any,
    zoo: Any,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    folds: int = 5,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 32,
    pooling: str | None = None,
    normalize: bool = True,
    raw_max_params: int = 50_000,
    refit: str = "train",
    categorical: Iterable[str] = CATEGORICAL_TARGETS,
    extra_columns: Sequence[str] = (),
    num_threads: int | None = 1,
    progress: bool = False,
) -> ZooProbeReport:
    """Probe every target on every feature set by ``folds``-fold cross-validation grouped by ``model_id``.

    Args mirror :func:`~sane_hf.probing.evaluate_zoo_probes`; ``zoo`` is any mapping of splits (all
    rows are pooled), ``folds``/``seed`` set the grouping.

    Returns:
        a :class:`~sane_hf.probing.ZooProbeReport`: ``{target: {method: mean test score over folds}}``;
        ``results`` hold every fold's test predictions concatenated (out-of-fold predictions, for plots);
        ``info["cv"]`` = ``{"folds", "seed", "models_per_fold", "per_fold": {target: {method: [..]}},
        "std": {target: {method: std}}}``; ``embeddings``/``properties`` under the split name ``"all"``.
    """
    from datasets import concatenate_datasets

    from sane_hf.embedding import DEFAULT_POOLING, embed_models
    from sane_hf.metrics import load_metric

    pooling = DEFAULT_POOLING if pooling is None else pooling  # the readout every command uses

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if isinstance(targets, str):
        targets = [targets]
    parts = [zoo[name] for name in zoo.keys() if len(zoo[name])] if hasattr(zoo, "keys") else [zoo]
    rows = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    missing = [t for t in targets if t not in rows.column_names]
    if missing:
        raise ValueError(f"properties {missing} are missing from the zoo (columns: {rows.column_names})")
    for column in ("model_id", "weights"):
        if column not in rows.column_names:
            raise ValueError(f"the zoo has no {column!r} column: pass a raw zoo (load_zoo(path))")
    extra = [c for c in extra_columns if c in rows.column_names and c not in targets and c != "model_id"]
    properties = rows.select_columns(["model_id", *targets, *extra]).with_format(None).to_dict()
    ids = properties["model_id"]
    groups = model_folds(ids, folds, seed)

    notes: list[str] = []
    needed = methods_to_probe(methods)  # the asked methods and the parts of a blend
    features: dict[str, np.ndarray] = {}
    raw_ok = "raw" in methods and tokenizer.num_params <= raw_max_params
    if "raw" in methods and not raw_ok:
        notes.append(f"raw: skipped, the models have {tokenizer.num_params} weights (> raw_max_params={raw_max_params})")
    embeddings: dict[str, np.ndarray] = {}
    if "sane" in needed:
        out = embed_models(model, tokenizer, rows, window=window, halo=halo, batch_size=batch_size, pooling=pooling,
                           normalize=normalize, progress=progress)  # fmt: skip
        embeddings["all"] = features["sane"] = out.embeddings.numpy().astype(np.float64)
    if "layer_stats" in needed:
        features["layer_stats"] = layer_statistics(rows, tokenizer)
    if raw_ok:
        features["raw"] = raw_weights(rows, tokenizer, max_params=raw_max_params)

    metric = load_metric("property_probe")
    fold_of = {m: k for k, members in enumerate(groups) for m in members}
    row_fold = np.asarray([fold_of[m] for m in ids])

    def take(values: Any, index: np.ndarray) -> Any:
        return [values[i] for i in index]

    probed = [m for m in needed if m in features or m == "sane+stats"]
    reported = [m for m in probed if m in methods]
    per_fold: dict[str, dict[str, list[float | None]]] = {t: {m: [] for m in reported} for t in targets}
    pooled: dict[str, dict[str, list[ProbeResult]]] = {m: {t: [] for t in targets} for m in reported}
    for k in range(folds):
        test = np.flatnonzero(row_fold == k)
        val = np.flatnonzero(row_fold == (k + 1) % folds)
        train = np.flatnonzero((row_fold != k) & (row_fold != (k + 1) % folds))
        split_props = [{c: take(properties[c], index) for c in targets} for index in (train, val, test)]
        by_method: dict[str, ProbeResults] = {}
        for method in probed:
            if method == "sane+stats":
                from sane_hf.probe_blend import blend_probe_results

                results = blend_probe_results(by_method["sane"], by_method["layer_stats"])
            else:
                x = features[method]
                results = probe_properties(
                    (x[train], split_props[0]), (x[val], split_props[1]), (x[test], split_props[2]), targets,
                    categorical=categorical, refit=refit, num_threads=num_threads,
                )  # fmt: skip
            by_method[method] = results
            if method not in reported:
                continue
            for target, result in results.items():
                per_fold[target][method].append(_score(metric, result))
                pooled[method][target].append(result)
                if result.note:
                    notes.append(f"fold {k + 1}, {method}/{target}: {result.note}")

    metrics: dict[str, dict[str, float | None]] = {}
    std: dict[str, dict[str, float | None]] = {}
    metric_names: dict[str, str] = {}
    for target in targets:
        metrics[target], std[target] = {}, {}
        for method in methods:
            values = [v for v in per_fold[target].get(method, []) if v is not None]
            metrics[target][method] = float(np.mean(values)) if values else None
            std[target][method] = float(np.std(values)) if values else None
            for result in pooled.get(method, {}).get(target, []):
                metric_names[target] = result.metric

    # out-of-fold predictions, one ProbeResult per method and target (for the predicted-vs-true plot)
    results: dict[str, ProbeResults] = {}
    for method, by_target in pooled.items():
        results[method] = ProbeResults()
        for target, fold_results in by_target.items():
            scored = [r for r in fold_results if not r.skipped and r.predictions is not None]
            first = fold_results[0]
            combined = ProbeResult(target, first.kind, first.metric, value=metrics[target][method],
                                   penalty_name=first.penalty_name, n_features=first.n_features)  # fmt: skip
            if scored:
                combined.predictions = np.concatenate([np.asarray(r.predictions) for r in scored])
                combined.true = np.concatenate([np.asarray(r.true) for r in scored])
                combined.n_test = len(combined.true)
            else:
                combined.note = "skipped in every fold"
            results[method][target] = combined

    info = {
        "refit": refit,
        "pooling": pooling,
        "normalize": normalize,
        "token_size": tokenizer.token_size,
        "num_tokens": tokenizer.num_tokens,
        "num_params": tokenizer.num_params,
        "rows": len(rows),
        "models": len(set(ids)),
        "cv": {
            "folds": folds,
            "seed": seed,
            "models_per_fold": [len(g) for g in groups],
            "per_fold": per_fold,
            "std": std,
        },
    }
    return ZooProbeReport(
        metrics, results=results, embeddings=embeddings, properties={"all": properties}, metric_names=metric_names,
        notes=notes, info=info,
    )
