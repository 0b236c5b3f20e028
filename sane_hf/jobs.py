"""The jobs a user runs, as library functions that write their folder: probing and sampling.

``sane-hf probe`` / ``sane-hf sample`` parse their flags and call these; so does the quickstart
(:mod:`sane_hf.quickstart`). A job takes loaded objects (model, tokenizer, zoo) and an output
folder, writes ``metrics.json`` (atomically) and its artifacts, and returns the payload it wrote.
Training is :func:`sane_hf.training.train_sane` and the sampling evaluation
:func:`sane_hf.evaluation.evaluate_sampling`, which write their own folders.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sane_hf.constants import CARD_FILE, METRICS_FILE
from sane_hf.reports import PLOT_PROPERTY, plot_embedding_map, plot_predictions
from sane_hf.serialization import atomic_write_text, json_default

__all__ = [
    "load_sane",
    "resplit_by_model",
    "write_probe_artifacts",
    "run_probe_job",
    "write_plain_samples",
    "refresh_model_card",
]


def load_sane(model_dir: str | os.PathLike, device: str | None = None) -> tuple[Any, Any]:
    """The :class:`~sane_hf.modeling_sane.SaneModel` (in eval mode on ``device``) and its tokenizer.

    ``device`` None: ``cuda`` when available, else ``cpu``. The tokenizer is read first, so a
    folder without ``weight_tokenizer.json`` fails before the weights are loaded.
    """
    import torch

    from sane_hf.modeling_sane import SaneModel
    from sane_hf.tokenization_sane import WeightTokenizer

    tokenizer = WeightTokenizer.from_pretrained(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SaneModel.from_pretrained(model_dir).to(device).eval(), tokenizer


def resplit_by_model(zoo: Any, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> Any:
    """Pool all rows of ``zoo`` and split them again by ``model_id`` (seeded), as ``build_zoo`` does."""
    from datasets import DatasetDict, concatenate_datasets

    from sane_hf.zoo.dataset import split_model_ids

    rows = concatenate_datasets([ds for ds in zoo.values() if len(ds)])
    ids = rows.select_columns(["model_id"]).with_format(None)["model_id"]
    assignment = split_model_ids(ids, fractions, seed)
    split_of = {m: split for split, members in assignment.items() for m in members}
    out = DatasetDict()
    for split in assignment:
        out[split] = rows.select([i for i, m in enumerate(ids) if split_of[m] == split])
    return out


def write_probe_artifacts(report: Any, out: Path, *, plots: bool = True) -> list[str]:
    """Write the probe's plots and ``embeddings.npz`` into ``out``; the file names, ``metrics.json`` first.

    ``metrics.json`` itself is written by :func:`run_probe_job` (its payload names the model and zoo).
    """
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [METRICS_FILE]
    if plots:
        if plot_predictions(report, out / "pred_vs_true_test_acc.png"):
            files.append("pred_vs_true_test_acc.png")
        if plot_embedding_map(report, out / "embedding_pca.png"):
            files.append("embedding_pca.png")
    if report.embeddings:
        arrays: dict[str, Any] = {}
        for split, emb in report.embeddings.items():
            arrays[f"{split}_embeddings"] = emb.astype(np.float32)
            for col in ("model_id", "epoch"):
                if col in report.properties[split]:
                    arrays[f"{split}_{col}"] = np.asarray(report.properties[split][col])
        np.savez_compressed(out / "embeddings.npz", **arrays)
        files.append("embeddings.npz")
    return files


def run_probe_job(
    model: Any,
    tokenizer: Any,
    zoo: Any,
    targets: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    model_dir: str | os.PathLike,
    zoo_id: str | os.PathLike,
    split_by: str = "zoo",
    folds: int = 5,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    plots: bool = True,
    start: float | None = None,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Probe ``targets`` from SANE embeddings beside the baselines; write ``out_dir`` and return its payload.

    ``split_by="zoo"`` uses the zoo's own splits (:func:`sane_hf.probing.evaluate_zoo_probes`);
    ``"model"`` pools the rows and cross-validates over ``folds`` folds grouped by model
    (:func:`sane_hf.probe_cv.cross_validate_zoo_probes`), or with ``folds=1`` re-splits once by
    model with ``split_fractions``. ``probe_kwargs`` go to the probe function (methods, pooling,
    window, batch size, ...). Writes the plots, ``embeddings.npz`` and ``metrics.json`` (the
    report, the model and zoo it came from, the device, the seconds since ``start``, the files).

    Returns:
        the payload of ``metrics.json`` as it reads back from the file (plain JSON types).

    Raises:
        ValueError: from the probes (e.g. too few models per split).
    """
    from sane_hf.probing import evaluate_zoo_probes

    start = time.perf_counter() if start is None else start
    targets = list(targets)
    cross_validate = split_by == "model" and folds != 1
    if split_by == "model" and not cross_validate:
        zoo = resplit_by_model(zoo, tuple(split_fractions), seed)
    extra = [c for c in ("epoch", PLOT_PROPERTY) if c not in targets]
    if cross_validate:
        from sane_hf.probe_cv import cross_validate_zoo_probes

        report = cross_validate_zoo_probes(
            model, tokenizer, zoo, targets, folds=folds, seed=seed, extra_columns=extra, **probe_kwargs
        )
    else:
        report = evaluate_zoo_probes(model, tokenizer, zoo, targets, extra_columns=extra, **probe_kwargs)
    out = Path(out_dir)
    files = write_probe_artifacts(report, out, plots=plots)
    payload = {
        **report.to_dict(),
        "model": str(model_dir),
        "zoo": str(zoo_id),
        "split_by": split_by,
        **({"cv": report.info["cv"]} if cross_validate else {}),
        "device": str(next(model.parameters()).device),
        "seconds": round(time.perf_counter() - start, 2),
        "files": files,
    }
    text = json.dumps(payload, indent=2, default=json_default) + "\n"
    atomic_write_text(out / METRICS_FILE, text)
    return json.loads(text)


def write_plain_samples(out: Path, setup: Any, samples: list[Any], zoo_config: Any, config: Any, start: float) -> dict:
    """Samples without the evaluation: the state_dicts, and each one's test accuracy when the task is known.

    ``setup`` and ``samples`` come from :func:`sane_hf.evaluation.run_sampling`. Writes
    ``sample_XXX.safetensors`` and ``metrics.json`` into ``out``; returns the metrics.
    """
    from sane_hf.evaluation import diversity_metrics, prompt_metrics, save_samples
    from sane_hf.zoo.train import evaluate_model

    rows = []
    for s in samples:
        row = {"score": s.score, "anchor_model_id": int(setup.prompts[s.anchor_index]["model_id"]), "round": s.round}
        if setup.build is not None:
            net = setup.load(s.state_dict)  # loads strictly: a sample that does not fit fails here, before writing
            if setup.task is not None:
                row["test_acc"] = evaluate_model(net, setup.task, "test")[0]
        rows.append(row)
    task_name = setup.task.name if setup.task is not None else zoo_config.task
    out.mkdir(parents=True, exist_ok=True)
    files = save_samples(samples, out, {"arch": zoo_config.arch, "activation": setup.activation, "task": task_name})
    for name, row in zip(files, rows):
        row["file"] = name
    metrics = {
        "task": task_name, "arch": zoo_config.arch, "activation": setup.activation,
        "prompts": prompt_metrics(setup), "score": setup.score,
        "samples": [{"file": r.pop("file"), **r} for r in rows],
        "diversity": diversity_metrics(setup, samples),
        "bandwidth": samples[0].bandwidth, "config": config.to_dict(),
        "files": [METRICS_FILE, *files], "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return metrics


def refresh_model_card(model_dir: str | os.PathLike, out: str | os.PathLike, default_subdir: str) -> bool:
    """Re-render the model card when a job's metrics went where the card reads them (``<model>/<subdir>``).

    True when the card was rewritten (the folder already had one).
    """
    from sane_hf.cards import write_model_card

    model_dir = Path(model_dir)
    if Path(out).resolve() == (model_dir / default_subdir).resolve() and (model_dir / CARD_FILE).is_file():
        write_model_card(model_dir)
        return True
    return False
