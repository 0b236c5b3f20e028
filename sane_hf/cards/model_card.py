"""The model card of a SANE model folder, rendered from the folder's own files.

:func:`render_model_card` reads the files below (names from :mod:`sane_hf.constants`) and fills the
packaged Jinja template ``templates/model_card.md`` through ``huggingface_hub.ModelCard.from_template``;
a results section whose file is missing says "not measured". Nothing here computes a number: the
card shows what the jobs measured, under the names of :mod:`sane_hf.verdicts`.

===============================  ===============================================================
``config.json``                  the :class:`~sane_hf.configuration_sane.SaneConfig`
``weight_tokenizer.json``        the :class:`~sane_hf.tokenization_sane.WeightTokenizer`
``zoo_config.json``              the training zoo's :class:`~sane_hf.zoo.ZooConfig` (``train_sane`` copies it)
``training_config.json``         the :class:`~sane_hf.training.SaneTrainingConfig`
``metrics.json``                 training measurements written by ``train_sane``: ``steps``, ``epochs``,
                                 ``train_loss``, ``initial_val_loss``, ``val_loss``, ``val_reconstruction_loss``,
                                 ``val_reconstruction_r2``, ``train_seconds``, ``tokens_per_second``, ...
``probe_metrics.json``           the ``metrics.json`` of ``sane-hf probe`` (``{"metrics": {property: {method:
                                 value}}, "metric_names": {property: "r2" | "accuracy"}, "notes": [...]}``);
                                 ``probe/metrics.json`` (where ``sane-hf probe`` writes by default) is used
                                 when ``probe_metrics.json`` is absent
``sampling_metrics.json``        the ``metrics.json`` of ``sane-hf sample`` (``sampling/metrics.json`` is used
                                 when it is absent)
===============================  ===============================================================
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sane_hf.constants import (
    CARD_FILE,
    PROBE_METRICS_FILE,
    SAMPLING_METRICS_FILE,
    TOKENIZER_FILE,
    TRAINING_CONFIG_FILE,
    TRAINING_METRICS_FILE,
    ZOO_CONFIG_FILE,
    find_metrics_file,
)
from sane_hf.reports import markdown_table
from sane_hf.serialization import flatten_json, read_json
from sane_hf.verdicts import METHOD_NAMES as _METHOD_NAMES  # one set of names for every output
from sane_hf.verdicts import (
    degenerate_groups,
    group_name,
    method_name,
    overall_verdict,
    probe_verdicts,
    property_name,
    readable_note,
    sampling_verdicts,
    sampling_warnings,
)

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

__all__ = [
    "MODEL_CARD_TAGS",
    "LIBRARY_NAME",
    "LICENSE",
    "NOT_MEASURED",
    "model_card_template_path",
    "render_model_card",
    "write_model_card",
]

MODEL_CARD_TAGS = ("weight-space-learning", "sane", "model-zoo", "sane-hf")
# The card's library is `transformers`: the checkpoint is a transformers PreTrainedModel with remote
# code (config.json carries auto_map), so the Hub's "Use this model" snippet (AutoModel,
# trust_remote_code=True) and its download counter (config.json fetches) work as for any
# transformers model. "sane-hf" is not a library the Hub knows (no snippet, no counting); it goes
# into the tags instead.
LIBRARY_NAME = "transformers"
LICENSE = "apache-2.0"  # the license of sane-hf, under which the code files in the repo are shared
NOT_MEASURED = "not measured"
_TEMPLATE_NAME = "model_card.md"


def _fmt(value: Any) -> str:
    """A number for a Markdown table: None → "not measured", floats to 4 significant digits."""
    if value is None:
        return NOT_MEASURED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "–"
    return str(value)


def model_card_template_path() -> Path:
    """The packaged model-card template (a copy of ``model_card.md`` at the repository root)."""
    return Path(__file__).resolve().parent.parent / "templates" / _TEMPLATE_NAME


_TRAINING_ROWS = (
    ("steps", "optimizer steps"),
    ("epochs", "passes over the training windows"),
    ("train_loss", "final training loss (last logged)"),
    ("initial_val_loss", "validation loss before training"),
    ("val_loss", "final validation loss, γ·NT-Xent + (1−γ)·MSE"),
    ("val_reconstruction_loss", "final validation reconstruction MSE (normalised tokens, real values)"),
    ("val_reconstruction_r2", "reconstruction R² on validation windows (real values)"),
    ("train_checkpoints", "zoo checkpoints trained on"),
    ("num_tokens_per_checkpoint", "tokens per checkpoint"),
    ("window_size", "tokens per training window"),
    ("permutation_views", "permutation augmentation"),
    ("tokens_per_second", "training throughput (tokens/s)"),
    ("train_seconds", "training time (s)"),
    ("num_processes", "processes"),
)


def _training_results(metrics: Mapping[str, Any] | None) -> str:
    if metrics is None:
        return (
            f"Not measured: the folder holds no `{TRAINING_METRICS_FILE}` (written by `sane-hf train` / "
            "`train_sane` at the end of a run)."
        )
    rows = [(f"`{key}`", meaning, _fmt(metrics.get(key))) for key, meaning in _TRAINING_ROWS]
    return markdown_table(("metric", "meaning", "value"), rows)


def _probe_results(probe: Mapping[str, Any] | None) -> str:
    if probe is None:
        return (
            f"Not measured: the folder holds no `{PROBE_METRICS_FILE}` (the `metrics.json` of "
            "`sane-hf probe --model <folder> --zoo <zoo>`, which writes it to `<folder>/probe/metrics.json`)."
        )
    table = probe.get("metrics", probe)  # the probe CLI's file, or a bare {property: {method: value}}
    if not isinstance(table, Mapping) or not table or not all(isinstance(v, Mapping) for v in table.values()):
        return f"Not measured: `{PROBE_METRICS_FILE}` holds no `metrics` table of property × method."
    names = probe.get("metric_names", {}) if isinstance(probe.get("metric_names"), Mapping) else {}
    # the protocol always sets SANE beside both baselines: a method that did not run shows "not measured"
    methods = list(_METHOD_NAMES) + sorted({m for row in table.values() for m in row} - set(_METHOD_NAMES))
    rows = []
    for prop, row in table.items():
        metric = names.get(prop, "")
        metric = {"r2": "R²", "accuracy": "accuracy"}.get(metric, metric)
        rows.append((f"{property_name(prop)} (`{prop}`)", metric, *(_fmt(row.get(m)) for m in methods)))
    text = [
        "Test-split score of a linear probe per property (R² for continuous properties, accuracy for "
        "categorical ones), fitted on SANE embeddings and on the two baselines of the same split:",
        "",
        markdown_table(("property", "metric", *(method_name(m) for m in methods)), rows),
    ]
    info = probe.get("info") if isinstance(probe.get("info"), Mapping) else {}
    sizes = {k: v for k, v in info.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if sizes:
        text += ["", "Setup: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in sizes.items()) + "."]
    notes = probe.get("notes") or []
    if notes:
        text += ["", "Notes:", ""] + [f"- {readable_note(n)}" for n in notes]
    return "\n".join(text)


_SAMPLING_ROWS_SHOWN = 60


def _mean_std(summary: Any) -> str:
    """``mean ± std (n=…)`` of an evaluation summary ``{"mean", "std", "n"}``; "not measured" when empty."""
    if not isinstance(summary, Mapping) or summary.get("mean") is None:
        return NOT_MEASURED
    text = _fmt(float(summary["mean"]))
    if summary.get("std") is not None and summary.get("n", 0) > 1:
        text += f" ± {_fmt(float(summary['std']))}"
    return text + (f" (n={summary['n']})" if summary.get("n") is not None else "")


def _curve_table(
    curves: Mapping[str, Any], gain: Mapping[str, Any] | None = None, degenerate: Sequence[str] = ()
) -> str:
    """Group × fine-tuning epoch table of accuracy summaries (``{group: {epoch: summary}}``)."""
    epochs = sorted({e for c in curves.values() if isinstance(c, Mapping) for e in c}, key=lambda e: float(e))
    rows = [
        (group_name(g) + (" ⚠ degenerate" if g in degenerate else ""),
         *(_mean_std(c.get(e)) for e in epochs))
        for g, c in curves.items() if isinstance(c, Mapping)
    ]
    if gain:
        rows.append(("**gain of samples over random init**", *(_fmt(gain.get(e)) for e in epochs)))
    return markdown_table(("test accuracy after fine-tuning epochs →", *(str(e) for e in epochs)), rows)


def _degenerate_groups(m: Mapping[str, Any]) -> list[str]:
    """Sampling groups whose baseline degenerated (see :func:`sane_hf.verdicts.degenerate_groups`)."""
    return list(degenerate_groups(m))


def _sampling_evaluation(m: Mapping[str, Any]) -> list[str]:
    """The metrics of ``sane-hf sample --evaluate`` (:func:`sane_hf.evaluation.evaluate_sampling`)."""
    prompts = m.get("prompts") or {}
    sampling = m.get("sampling") or {}
    accs = [a for a in prompts.get("test_acc") or [] if isinstance(a, (int, float))]
    text = [
        f"Task `{m.get('task')}`, architecture `{m.get('arch')}`, activation `{m.get('activation')}`; "
        f"{len(accs)} prompt models from the test split at epoch {prompts.get('epoch')} "
        f"(test accuracy mean {_fmt(sum(accs) / len(accs)) if accs else NOT_MEASURED}); "
        f"{len(sampling.get('scores') or [])} samples, mode `{sampling.get('mode')}`, "
        f"bandwidth {_fmt(sampling.get('bandwidth'))}, score `{sampling.get('score')}`.",
        "",
        "Test accuracy, mean ± std over models, without fine-tuning (epoch 0) and after fine-tuning "
        "(every group with the same recipe):",
        "",
        _curve_table(m["accuracy"], m.get("gain_over_random_init"), _degenerate_groups(m)),
    ]
    novelty = m.get("novelty")
    if isinstance(novelty, Mapping):
        rows = []
        for group in ("sampled", "noise", "noise_matched_accuracy", "prompts"):
            entry = novelty.get(group)
            if isinstance(entry, Mapping):
                name = group_name(group) + (" ⚠ degenerate" if group in _degenerate_groups(m) else "")
                rows.append((name, _mean_std(entry.get("nearest_distance")),
                             _mean_std(entry.get("agreement")), _mean_std(entry.get("prompt_distance"))))
        text += [
            "",
            f"Novelty: L2 distance to the nearest of {novelty.get('num_neighbours', '?')} training-zoo checkpoints "
            "after permutation alignment, and the fraction of test inputs on which a model predicts the same "
            "class as that checkpoint (near 1 with a small distance = a copy):",
            "",
            markdown_table(("models", "distance to nearest zoo checkpoint", "agreement with it", "distance to nearest prompt"),
                   rows),
        ]
    warnings = sampling_warnings(m)
    text += ["", *[f"> **Warning:** {w}" for w in warnings]] if warnings else []
    transfer = m.get("transfer")
    if isinstance(transfer, Mapping) and isinstance(transfer.get("accuracy"), Mapping):
        fallback = (" — **fallback stand-in: the zoo's own task with permuted labels**, not a new task"
                    if transfer.get("fallback") else "")
        text += [
            "",
            f"Transfer to `{transfer.get('task')}` ({transfer.get('description', '')}{fallback}), head reset, "
            f"fine-tuned {transfer.get('epochs')} epoch(s); gain of samples over random init "
            f"{_fmt(transfer.get('gain_over_random_init'))}:",
            "",
            _curve_table(transfer["accuracy"]),
        ]
    else:
        text += ["", "Transfer to a new task: not measured."]
    return text


def _sampling_samples(m: Mapping[str, Any]) -> list[str]:
    """The metrics of ``sane-hf sample`` without ``--evaluate``: one row per sample."""
    rows = [(f"`{r.get('file', i)}`", _fmt(r.get("score")), _fmt(r.get("test_acc")), _fmt(r.get("anchor_model_id")))
            for i, r in enumerate(m["samples"]) if isinstance(r, Mapping)]
    accs = [a for a in (m.get("prompts") or {}).get("test_acc") or [] if isinstance(a, (int, float))]
    return [
        f"Samples for task `{m.get('task')}` (architecture `{m.get('arch')}`), test accuracy without fine-tuning; "
        f"prompt models' test accuracy mean {_fmt(sum(accs) / len(accs)) if accs else NOT_MEASURED}:",
        "",
        markdown_table(("sample", "score", "test accuracy", "anchor prompt model"), rows),
        "",
        "Fine-tuning curves, baselines, novelty and transfer: not measured (`sane-hf sample --evaluate`).",
    ]


def _sampling_results(sampling: Mapping[str, Any] | None) -> str:
    if sampling is None:
        return (
            f"Not measured: the folder holds no `{SAMPLING_METRICS_FILE}` (the `metrics.json` of "
            "`sane-hf sample --evaluate --model <folder> --zoo <zoo> --out <dir>`, copied here under that name)."
        )
    if isinstance(sampling.get("accuracy"), Mapping):
        return "\n".join(_sampling_evaluation(sampling))
    if isinstance(sampling.get("samples"), list) and sampling["samples"]:
        return "\n".join(_sampling_samples(sampling))
    # an unknown layout: every number as recorded, nothing derived
    rows = [(f"`{k}`", _fmt(v)) for k, v in flatten_json(sampling) if k]
    if not rows:
        return f"Not measured: `{SAMPLING_METRICS_FILE}` holds no numbers."
    shown = rows[:_SAMPLING_ROWS_SHOWN]
    text = ["Every number of the sampling evaluation, as recorded:", "", markdown_table(("quantity", "value"), shown)]
    if len(rows) > len(shown):
        text += ["", f"({len(rows) - len(shown)} more in `{SAMPLING_METRICS_FILE}`.)"]
    return "\n".join(text)


def _zoo_section(zoo: Mapping[str, Any] | None, dataset_repo_id: str | None) -> str:
    link = (
        f"The zoo is published as the dataset [`{dataset_repo_id}`](https://huggingface.co/datasets/{dataset_repo_id}).\n\n"
        if dataset_repo_id
        else ""
    )
    if zoo is None:
        return link + f"Not recorded: the folder holds no `{ZOO_CONFIG_FILE}`."
    epochs = zoo.get("checkpoint_epochs")
    if epochs is None and isinstance(zoo.get("epochs"), int):
        epochs = list(range(zoo["epochs"] + 1))
    source = zoo.get("source", "build")
    rows = [
        ("task", f"`{zoo.get('task')}`" if zoo.get("task") else NOT_MEASURED),
        ("architecture", f"`{zoo.get('arch')}`" if zoo.get("arch") else NOT_MEASURED),
        ("models", _fmt(zoo.get("num_models"))),
        ("training epochs per model", _fmt(zoo.get("epochs"))),
        ("stored checkpoint epochs", _fmt(epochs)),
        ("image size", _fmt(zoo.get("image_size"))),
        ("training images", "all" if zoo.get("train_subset") is None else _fmt(zoo.get("train_subset"))),
        ("split fractions (train/val/test, by model)", _fmt(zoo.get("split_fractions"))),
        ("grid seed", _fmt(zoo.get("seed"))),
        ("permutation-aligned", _fmt(zoo.get("align"))),
        ("made by", "`sane-hf zoo build`" if source == "build" else f"`{source}`"),
    ]
    if zoo.get("grid"):
        rows.append(("grid arguments", f"`{json.dumps(zoo['grid'], sort_keys=True)}`"))
    return link + f"From `{ZOO_CONFIG_FILE}`:\n\n" + markdown_table(("", ""), rows)


def _model_section(folder: Path, config: Mapping[str, Any] | None) -> str:
    if config is None:
        return "Not recorded: the folder holds no `config.json`."
    keys = ("token_size", "d_model", "num_encoder_layers", "num_decoder_layers", "num_heads", "mlp_ratio",
            "latent_dim", "projection_dim", "window_size", "halo_size", "gamma", "temperature", "dropout")
    rows = [(f"`{k}`", _fmt(config.get(k))) for k in keys if k in config]
    num_params = _count_parameters(folder)
    if num_params is not None:
        rows.append(("parameters", _fmt(num_params)))
    text = ["SANE transformer autoencoder (`SaneConfig`, from `config.json`):", "", markdown_table(("", ""), rows)]
    tokenizer = _tokenizer_summary(folder)
    if tokenizer:
        text += ["", tokenizer]
    return "\n".join(text)


def _count_parameters(folder: Path) -> int | None:
    path = folder / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


def _tokenizer_summary(folder: Path) -> str | None:
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    from sane_hf.tokenization_sane import WeightTokenizer

    tok = WeightTokenizer.from_pretrained(folder)
    values = sum(layer.num_values for layer in tok.layers)
    fitted = "fitted on the zoo's training split" if tok.is_fitted else "not fitted (raw weights)"
    return (
        f"Tokenizer (`{TOKENIZER_FILE}`): {len(tok.layers)} tokenized layers, {values:,} weights per network "
        f"→ {tok.num_tokens:,} tokens of {tok.token_size} values; per-layer normalisation {fitted}."
    )


def _training_section(training: Mapping[str, Any] | None) -> str:
    if training is None:
        return f"Not recorded: the folder holds no `{TRAINING_CONFIG_FILE}`."
    keys = ("learning_rate", "weight_decay", "lr_scheduler", "warmup_ratio", "num_epochs", "max_steps", "batch_size",
            "gradient_accumulation_steps", "mixed_precision", "noise_std", "erase_prob", "permutation",
            "windows_per_sample", "max_grad_norm", "seed")
    rows = [(f"`{k}`", _fmt(training.get(k)) if training.get(k) is not None else "–") for k in keys if k in training]
    return f"`SaneTrainingConfig` (from `{TRAINING_CONFIG_FILE}`):\n\n" + markdown_table(("", ""), rows)


def render_model_card(
    folder: str | os.PathLike,
    repo_id: str | None = None,
    *,
    dataset_repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """The model card of a SANE model folder, filled with that checkpoint's own measurements.

    Reads the files listed at the top of this module (config, tokenizer, zoo and training configs,
    training/probe/sampling metrics); a results section whose file is missing says "not measured".
    The YAML metadata: ``library_name: transformers`` (see ``LIBRARY_NAME``), ``license``,
    ``tags`` (:data:`MODEL_CARD_TAGS`), ``datasets`` (``dataset_repo_id`` when given) and the
    ``metrics`` that were measured.

    Args:
        folder: a model folder (``sane-hf train`` output, or a folder staged by :func:`prepare_model_folder`).
        repo_id: the Hub id the card is for (used in the usage snippets); None = a placeholder.
        dataset_repo_id: the Hub id of the training zoo, linked from the card and its metadata.
        template_path: a Jinja2 Markdown template; default: :func:`model_card_template_path`.
        model_name: the card's title; default: the repo's name, else the folder's name.

    Returns:
        a ``huggingface_hub.ModelCard`` (``card.save(path)``, ``card.data``, ``card.text``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = read_json(folder / "config.json")
    zoo = read_json(folder / ZOO_CONFIG_FILE)
    training = read_json(folder / TRAINING_CONFIG_FILE)
    metrics = read_json(folder / TRAINING_METRICS_FILE)
    probe_path = find_metrics_file(folder, PROBE_METRICS_FILE)
    sampling_path = find_metrics_file(folder, SAMPLING_METRICS_FILE)
    probe = read_json(probe_path) if probe_path else None
    sampling = read_json(sampling_path) if sampling_path else None

    measured: list[str] = []
    if metrics is not None:
        measured += ["mse", "r_squared"]
    if probe is not None:
        names = set((probe.get("metric_names") or {}).values()) if isinstance(probe, Mapping) else set()
        measured += ["r_squared"] + (["accuracy"] if "accuracy" in names else [])
    if sampling is not None:
        measured.append("accuracy")
    measured = list(dict.fromkeys(measured))

    name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=LICENSE,
        tags=list(MODEL_CARD_TAGS),
        datasets=[dataset_repo_id] if dataset_repo_id else None,
        metrics=measured or None,
        model_name=name,
    )
    zoo = zoo if isinstance(zoo, Mapping) else None
    template = Path(template_path) if template_path is not None else model_card_template_path()
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=name,
        repo_id=repo_id or "path/to/this/repo",
        local_name=name,
        zoo_arch=(zoo or {}).get("arch", "unknown"),
        zoo_task=(zoo or {}).get("task", "unknown"),
        zoo_section=_zoo_section(zoo, dataset_repo_id),
        model_section=_model_section(folder, config),
        training_section=_training_section(training),
        training_results=_training_results(metrics),
        probe_results=_probe_results(probe),
        sampling_results=_sampling_results(sampling),
        verdicts=_verdicts(probe, sampling),
    )


def _verdicts(probe: Mapping[str, Any] | None, sampling: Mapping[str, Any] | None) -> str:
    """The verdict lines of the card (:mod:`sane_hf.verdicts`), derived from the probe and sampling metrics."""
    probe = probe if isinstance(probe, Mapping) else None
    sampling = sampling if isinstance(sampling, Mapping) else None
    lines = []
    if probe is not None:
        table = probe.get("metrics", probe)
        lines += probe_verdicts(table if isinstance(table, Mapping) else {}, probe.get("metric_names") or {})
    if sampling is not None and isinstance(sampling.get("accuracy"), Mapping):
        lines += sampling_verdicts(sampling)
    overall = overall_verdict(probe, sampling)
    if not lines and overall is None:
        return (
            "Not measured: no property-prediction or sampling evaluation in this folder yet "
            "(`sane-hf probe` and `sane-hf sample --evaluate` add them)."
        )
    return "\n".join(([f"**{overall}**", ""] if overall else []) + [f"- {line}" for line in lines])


def write_model_card(
    folder: str | os.PathLike, *, model_name: str | None = None, repo_id: str | None = None,
    dataset_repo_id: str | None = None,
) -> Path:
    """Render :func:`render_model_card` for ``folder`` and save it as ``folder/README.md``; returns the path."""
    folder = Path(folder)
    path = folder / CARD_FILE
    render_model_card(folder, repo_id, dataset_repo_id=dataset_repo_id, model_name=model_name).save(path)
    return path

