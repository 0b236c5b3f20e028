"""The sampling evaluation protocol runner: :func:`evaluate_sampling` and the transfer task.

Runs the steps described in :mod:`sane_hf.evaluation` in order, from the pieces in
:mod:`~sane_hf.evaluation.draw` (prompts and samples) and :mod:`~sane_hf.evaluation.baselines`,
fine-tunes every group and writes ``out_dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sane_hf.constants import METRICS_FILE
from sane_hf.evaluation.baselines import (
    _has_batchnorm,
    aligned_average,
    calibrate_noise,
    evaluation_spec,
    matched_noise,
    nearest_neighbours,
    prediction_agreement,
    target_score_fn,
)
from sane_hf.evaluation.config import TRANSFER_CANDIDATES, SamplingEvalConfig
from sane_hf.evaluation.draw import (
    _draw,
    diversity_metrics,
    prompt_metrics,
    run_sampling,
    save_samples,
    selection_draws,
    source_score_fn,
)
from sane_hf.evaluation.plotting import plot_accuracy
from sane_hf.sampling import condition_batchnorm, reset_head
from sane_hf.serialization import atomic_write_text

__all__ = ["evaluate_sampling", "resolve_transfer_task"]


def resolve_transfer_task(
    name: str | None, source: Any, *, train_subset: int | None, seed: int,
    candidates: Sequence[str] = TRANSFER_CANDIDATES,
) -> tuple[Any, str, bool] | None:
    """``(task data, description, is_fallback)`` for the transfer test, or None when skipped.

    ``"auto"`` tries ``candidates`` in order (none for your own task: its labels permuted).
    """
    from sane_hf.zoo.tasks import list_tasks, load_task

    if name is None:
        return None
    size = source.image_size
    if name != "auto":
        task = load_task(name, image_size=size, train_subset=train_subset, seed=seed)
        if task.in_channels != source.in_channels:
            raise ValueError(
                f"transfer task {name!r} has {task.in_channels} input channels but the zoo's models take "
                f"{source.in_channels}"
            )
        return task, f"{name} ({size}x{size})", False
    installed = set(list_tasks(installed_only=True))
    for candidate in candidates:
        if candidate == source.name or candidate not in installed:
            continue
        task = load_task(candidate, image_size=size, train_subset=train_subset, seed=seed)
        if task.in_channels == source.in_channels:
            return task, f"{candidate} ({size}x{size})", False
    # fallback: the source task with permuted labels (documented as a weak stand-in)
    perm = torch.from_numpy(np.random.default_rng([seed, 7]).permutation(source.num_classes))
    task = dataclasses.replace(
        source, name=f"{source.name}-permuted-labels",
        y_train=perm[source.y_train], y_val=perm[source.y_val], y_test=perm[source.y_test],
    )
    if train_subset is not None and train_subset < len(task.y_train):
        task = dataclasses.replace(task, x_train=task.x_train[:train_subset], y_train=task.y_train[:train_subset])
    return task, f"{source.name} with permuted labels (fallback: no other installed task fits)", True


def _summary(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size), "values": [float(v) for v in arr]}


def _curve(
    modules: Sequence[nn.Module], task: Any, epochs: Sequence[int], lr: float, seed: int, bar: Any = None
) -> dict[str, Any]:
    """Test accuracy of each module at each requested fine-tuning epoch (modules are fine-tuned in place)."""
    from sane_hf.zoo.train import evaluate_model, fine_tune

    top = max(epochs)
    per_epoch: dict[int, list[float]] = {e: [] for e in epochs}
    for i, module in enumerate(modules):
        accs = [evaluate_model(module, task, "test")[0]]
        if top > 0:
            accs += fine_tune(module, task, epochs=top, lr=lr, seed=seed + i)
        for e in epochs:
            per_epoch[e].append(accs[e])
        if bar is not None:
            bar.update(1)
    return {str(e): _summary(v) for e, v in per_epoch.items()}


def _bar(progress: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar for one stage of the protocol (disabled without ``progress``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def _gain(sampled: Mapping[str, Any], baseline: Mapping[str, Any]) -> float | None:
    """Mean accuracy of the samples minus the baseline's, by the ``sampled_accuracy_gain`` evaluate metric."""
    from sane_hf.metrics import load_metric

    a, b = sampled.get("values") or [], baseline.get("values") or []
    if not a or len(a) != len(b):
        return None if sampled.get("mean") is None or baseline.get("mean") is None else (
            sampled["mean"] - baseline["mean"])
    return load_metric("sampled_accuracy_gain").compute(predictions=a, references=b)["gain"]


def evaluate_sampling(
    model: Any,
    tokenizer: Any,
    zoo: Any,
    zoo_config: Any,
    config: SamplingEvalConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
    build: Callable[..., nn.Module] | None = None,
    task: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run the protocol of :mod:`sane_hf.evaluation`; returns the metrics (also written to ``out_dir``).

    ``build``/``task``: your architecture and task callables, when the zoo does not record them
    as entry points (:mod:`sane_hf.zoo.custom`). Nothing is written when a step fails.
    """
    from sane_hf.state_dict_io import state_dict_from_bytes
    from sane_hf.zoo.dataset import zoo_model
    from sane_hf.zoo.train import evaluate_model

    config = config or SamplingEvalConfig()
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    t = time.perf_counter()
    user_task = task is not None or bool(getattr(zoo_config, "task_entrypoint", None))
    user_arch = build is not None or bool(getattr(zoo_config, "arch_entrypoint", None))
    setup, samples = run_sampling(
        model, tokenizer, zoo, zoo_config, config, progress=progress, build=build, task=task, need_task=True
    )
    t = lap("sampling", t)
    task, build, keys = setup.task, setup.build, setup.param_keys
    spec = evaluation_spec(build, task.x_train[:2])
    sample_sds = [s.state_dict for s in samples]
    sample_nets = [setup.load(sd) for sd in sample_sds]
    prompt_nets = [setup.load(sd, condition=False) for sd in setup.prompt_sds]

    # the samples' distance to their nearest prompt sets the noise baseline's scale; scored samples were
    # chosen from several candidates each, so each noise model is the best of as many draws by the same score
    gen = torch.Generator().manual_seed(config.seed)
    scored = setup.score == "train-acc"
    draws = selection_draws(config) if scored else 1
    noise_sds, prompt_idx, prompt_dist = matched_noise(
        sample_sds, setup.prompt_sds, spec, keys, gen, score_fn=source_score_fn(setup, config) if scored else None,
        draws=draws,
    )
    bases = [setup.prompt_sds[j] for j in prompt_idx]  # each sample's nearest prompt
    noise_nets = [setup.load(sd) for sd in noise_sds]

    calibration = _bar(progress, None, "noise at matched accuracy (models evaluated)")

    def val_acc(sd: Mapping[str, Tensor]) -> float:
        calibration.update(1)
        return evaluate_model(setup.load(sd), task, "val")[0]

    sample_val = float(np.mean([val_acc(sd) for sd in sample_sds]))
    matched_norm, matched_sds = calibrate_noise(
        bases, keys, val_acc, sample_val,
        torch.Generator().manual_seed(config.seed + 1), start=float(np.mean(prompt_dist)),
    )
    calibration.close()
    matched_nets = [setup.load(sd) for sd in matched_sds]
    average_sd = aligned_average(setup.prompt_sds, spec, reference=0)
    average_net = setup.load(average_sd)
    random_nets = [build(seed=config.seed * 100_003 + i, init="kaiming-uniform").eval() for i in range(len(samples))]
    t = lap("baselines", t)

    # novelty against the training zoo (before any fine-tuning)
    train = zoo["train"]
    rows = list(range(len(train)))
    if config.max_neighbours is not None and len(rows) > config.max_neighbours:
        rows = sorted(np.random.default_rng([config.seed, 11]).choice(len(rows), config.max_neighbours, replace=False))
    neighbour_rows = [train[int(i)] for i in rows]
    neighbour_sds = [state_dict_from_bytes(r["weights"]) for r in neighbour_rows]
    x_test = task.x_test
    novelty_bar = _bar(progress, 4, "novelty: nearest zoo checkpoints (groups)")

    def novelty(sds: Sequence[Mapping[str, Tensor]], nets: Sequence[nn.Module]) -> dict[str, Any]:
        novelty_bar.update(1)
        norms = _summary([math.sqrt(sum(float(sd[k].double().pow(2).sum()) for k in keys)) for sd in sds])
        if not neighbour_sds:
            return {"nearest_distance": _summary([]), "agreement": _summary([]), "neighbour_model_ids": [],
                    "param_norm": norms}
        dists, idx = nearest_neighbours(sds, neighbour_sds, spec, keys)
        def neighbour_net(row: Mapping[str, Any]) -> nn.Module:
            if user_arch:  # your architecture: built as the samples are
                return setup.load(state_dict_from_bytes(row["weights"]), condition=False)
            return zoo_model(zoo_config, row)

        agree = [prediction_agreement(net, neighbour_net(neighbour_rows[j]), x_test) for net, j in zip(nets, idx)]
        return {
            "nearest_distance": _summary(dists),
            "agreement": _summary(agree),
            "neighbour_model_ids": [int(neighbour_rows[j]["model_id"]) for j in idx],
            "neighbour_epochs": [int(neighbour_rows[j]["epoch"]) for j in idx],
            "param_norm": norms,
        }

    novelty_metrics = {
        "sampled": {**novelty(sample_sds, sample_nets), "prompt_distance": _summary(prompt_dist)},
        "noise": {**novelty(noise_sds, noise_nets), "prompt_distance": _summary(prompt_dist),
                  "draws_per_model": draws, "selected_by": setup.score if scored else "none"},
        "noise_matched_accuracy": {
            **novelty(matched_sds, matched_nets), "noise_norm": matched_norm, "target_val_acc": sample_val,
            # False when the samples beat the prompts themselves: no noise can match, the group = the prompts
            "matched": matched_norm > 0,
        },
        "prompts": novelty(setup.prompt_sds, prompt_nets),
        "num_neighbours": len(neighbour_sds),
    }
    novelty_bar.close()
    t = lap("novelty", t)

    # accuracy vs fine-tuning epoch (copies: the epoch-0 models are reused for transfer)
    epochs, lr, seed = config.finetune_epochs, config.finetune_lr, config.seed
    groups = {
        "sampled": sample_nets, "random_init": random_nets, "noise": noise_nets,
        "noise_matched_accuracy": matched_nets, "aligned_average": [average_net], "prompts": prompt_nets,
    }
    with _bar(progress, sum(len(n) for n in groups.values()), f"fine-tuning {max(epochs)} epochs (models)") as bar:
        accuracy = {
            name: _curve([copy.deepcopy(m) for m in nets], task, epochs, lr, seed, bar) for name, nets in groups.items()
        }
    gain = {e: _gain(accuracy["sampled"][e], accuracy["random_init"][e]) for e in accuracy["sampled"]}
    t = lap("finetune", t)

    transfer: dict[str, Any] | None = None
    resolved = resolve_transfer_task(
        config.transfer_task, task, train_subset=config.transfer_train_subset, seed=config.seed,
        candidates=() if user_task else TRANSFER_CANDIDATES,  # your task: its own labels permuted
    ) if config.transfer_task is not None else None
    if resolved is not None:
        ttask, description, fallback = resolved
        t_epochs = tuple(range(config.transfer_epochs + 1))

        def head_reset(nets: Sequence[nn.Module], offset: int) -> list[nn.Module]:
            out = []
            for i, net in enumerate(nets):
                new = reset_head(copy.deepcopy(net), num_classes=ttask.num_classes, seed=seed + offset + i)
                if _has_batchnorm(new):
                    condition_batchnorm(new, ttask.x_train[: config.bn_samples])
                out.append(new.eval())
            return out

        t_random = [
            build(num_classes=ttask.num_classes, seed=config.seed * 100_003 + 50_000 + i, init="kaiming-uniform").eval()
            for i in range(len(samples))
        ]
        transfer_nets, transfer_noise, target_info = sample_nets, noise_nets, {}
        if config.transfer_score == "target":
            n = config.transfer_score_samples
            score_new = target_score_fn(build, ttask.x_train[:n], ttask.y_train[:n], ttask.x_train[: config.bn_samples])
            target_samples = _draw(
                model, tokenizer, setup, config, score_new, config.transfer_bootstrap_rounds, progress, seed_offset=1
            )
            target_sds = [s.state_dict for s in target_samples]
            transfer_nets = [setup.load(sd) for sd in target_sds]
            noisy, _, _ = matched_noise(  # selected like the target-scored samples, by the same score
                target_sds, setup.prompt_sds, spec, keys, torch.Generator().manual_seed(config.seed + 2),
                score_fn=score_new, draws=selection_draws(config, config.transfer_bootstrap_rounds),
            )
            transfer_noise = [setup.load(sd) for sd in noisy]
            target_info = {
                "score_images": int(min(n, len(ttask.y_train))),
                "scores": [s.score for s in target_samples],
                "rounds": [s.round for s in target_samples],
                "prompt_scores": [score_new(sd) for sd in setup.prompt_sds],
            }
        transfer_groups = {
            "sampled": head_reset(transfer_nets, 0),
            "random_init": t_random,
            "prompts": head_reset(prompt_nets, 10_000),
            "noise": head_reset(transfer_noise, 30_000),
        }
        if config.transfer_score == "target":
            transfer_groups["sampled_source_score"] = head_reset(sample_nets, 20_000)
        total = sum(len(v) for v in transfer_groups.values())
        with _bar(progress, total, f"transfer to {ttask.name} (models)") as bar:
            transfer_acc = {
                name: _curve(nets, ttask, t_epochs, lr, seed, bar) for name, nets in transfer_groups.items()
            }
        last = str(config.transfer_epochs)
        transfer = {
            "task": ttask.name, "description": description, "fallback": fallback, "epochs": config.transfer_epochs,
            "train_images": int(len(ttask.y_train)), "score": config.transfer_score, **target_info,
            "accuracy": transfer_acc,
            "gain_over_random_init": _gain(transfer_acc["sampled"][last], transfer_acc["random_init"][last]),
        }
        t = lap("transfer", t)

    metrics: dict[str, Any] = {
        "task": task.name,
        "arch": zoo_config.arch,
        "activation": setup.activation,
        "prompts": prompt_metrics(setup),
        "sampling": {
            "mode": config.mode,
            "diversity": diversity_metrics(setup, samples),
            "bandwidth": samples[0].bandwidth if samples else None,
            "bandwidth_setting": config.bandwidth,
            "score": config.score,
            "scores": [s.score for s in samples],
            "anchor_model_ids": [int(setup.prompts[s.anchor_index]["model_id"]) for s in samples],
            "nearest_prompt_model_ids": [int(setup.prompts[i]["model_id"]) for i in prompt_idx],
            "rounds": [s.round for s in samples],
        },
        "accuracy": accuracy,
        "gain_over_random_init": gain,
        "novelty": novelty_metrics,
        "transfer": transfer,
        "config": config.to_dict(),
        "timings": timings,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = save_samples(samples, out, {"arch": zoo_config.arch, "activation": setup.activation, "task": task.name})
        if plot_accuracy(metrics, out / "accuracy_vs_epoch.png"):
            files.append("accuracy_vs_epoch.png")
        metrics["files"] = ["metrics.json", *files]
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return metrics
