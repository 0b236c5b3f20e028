"""Prompt selection and sample drawing: the first two steps of the sampling evaluation.

:func:`choose_prompts` picks the prompts from a zoo's test split (and says why there are not
more), :func:`run_sampling` prepares a :class:`SamplingSetup` (task, architecture builder,
prompts) and draws samples around the prompts; :func:`prompt_metrics` and
:func:`diversity_metrics` describe both for ``metrics.json``, and :func:`save_samples` writes
the samples as safetensors. ``sane-hf sample`` without ``--evaluate`` stops here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from sane_hf.evaluation.baselines import _has_batchnorm, accuracy_score_fn
from sane_hf.evaluation.config import SamplingEvalConfig
from sane_hf.sampling import condition_batchnorm, sample_models

__all__ = [
    "PromptSelection",
    "choose_prompts",
    "select_prompts",
    "SamplingSetup",
    "run_sampling",
    "prompt_metrics",
    "diversity_metrics",
    "save_samples",
    "source_score_fn",
    "selection_draws",
]


@dataclass
class PromptSelection:
    """The prompts :func:`choose_prompts` picked, and why there are not more.

    Attributes:
        rows: the chosen zoo rows, best test accuracy first.
        epoch: their checkpoint epoch.
        activation: their activation (``"any"`` when the architecture does not take one).
        asked: how many prompts were asked for (None = all).
        removed: ``{filter: [model ids]}`` — test models each filter removed (``"epoch"``: no
            checkpoint at ``epoch``; ``"activation"``: another activation).
        notes: one sentence per relaxation or shortfall, for metrics and messages.
    """

    rows: list[dict[str, Any]]
    epoch: int
    activation: str
    asked: int | None = None
    removed: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def explain(self) -> str:
        """One line: how many prompts, and which filter removed which test models."""
        parts = [f"{len(self.rows)} prompt(s) (asked {self.asked if self.asked is not None else 'all'})"]
        for name, ids in self.removed.items():
            if ids:
                parts.append(f"filter {name} removed model(s) {ids[:10]}{' …' if len(ids) > 10 else ''}")
        return "; ".join(parts + self.notes)


def _best_activation(at: list[int], acts: list[str], acc: list[float], counts: dict[str, int], want: int) -> str:
    """The activation whose best ``min(n, want)`` models have the largest summed test accuracy.

    More prompts count, but only as much as they are good; ties go to the activation of the better
    model. ``at`` is sorted best first. Taking the activation with the *most* models instead picks
    a family that never trained when it is the most common one (on the digits zoo: ten sigmoid
    models, nine at chance, over nine tanh models, six of them at 0.78-0.96).
    """
    rank = {a: min(r for r, i in enumerate(at) if acts[i] == a) for a in counts}

    def top_sum(a: str) -> float:
        return sum([acc[i] for i in at if acts[i] == a][:want])

    return max(counts, key=lambda a: (top_sum(a), -rank[a]))


def choose_prompts(
    split: Any, *, num_prompts: int | None, epoch: int | None, activation: str = "auto", uses_activation: bool = True
) -> PromptSelection:
    """The best ``num_prompts`` rows of ``split`` at ``epoch`` with one activation, best first, explained.

    ``epoch=None`` takes the split's last epoch. ``activation="auto"`` takes the best model's
    activation when enough test models share it, else the activation whose best ``num_prompts``
    models have the largest summed test accuracy (a state_dict is only meaningful with its
    activation, so prompts never mix them); a named activation is kept as asked. With
    ``uses_activation=False`` (your own architecture, built the same whatever the column says)
    there is no activation filter. Every model a filter removed is listed in
    :attr:`PromptSelection.removed`.
    """
    if len(split) == 0:
        raise ValueError("the zoo's test split is empty: no prompt models (import with a larger test fraction)")
    meta = split.select_columns(["model_id", "epoch", "test_acc", "activation"]).with_format(None)[:]
    epochs, ids, acts = meta["epoch"], meta["model_id"], meta["activation"]
    epoch = max(epochs) if epoch is None else int(epoch)
    at = [i for i, e in enumerate(epochs) if e == epoch]
    if not at:
        raise ValueError(f"no test-split checkpoint at epoch {epoch}; stored epochs: {sorted(set(epochs))}")
    acc = [meta["test_acc"][i] if meta["test_acc"][i] == meta["test_acc"][i] else -1.0 for i in range(len(epochs))]
    at.sort(key=lambda i: -acc[i])
    present = {ids[i] for i in at}
    removed: dict[str, list[int]] = {"epoch": sorted({m for m in ids if m not in present})}
    notes: list[str] = []
    want = len(at) if num_prompts is None else min(num_prompts, len(at))
    if not uses_activation:
        chosen, activation = at, "any"
    else:
        counts: dict[str, int] = {}
        for i in at:
            counts[acts[i]] = counts.get(acts[i], 0) + 1
        if activation == "auto":
            best = acts[at[0]]
            activation = best
            if counts[best] < want:
                activation = _best_activation(at, acts, acc, counts, want)
                if activation != best:
                    notes.append(
                        f"the best model's activation {best!r} has {counts[best]} test model(s) at epoch {epoch}, "
                        f"fewer than the {want} asked; took {activation!r} ({counts[activation]} models, the largest "
                        f"summed test accuracy of its top {min(counts[activation], want)})"
                    )
        chosen = [i for i in at if acts[i] == activation]
        if not chosen:
            raise ValueError(f"no test model with activation {activation!r} at epoch {epoch}; found {sorted(counts)}")
        removed["activation"] = [ids[i] for i in at if acts[i] != activation]
    if num_prompts is not None:
        chosen = chosen[:num_prompts]
    selection = PromptSelection([split[i] for i in chosen], epoch, activation, num_prompts, removed, notes)
    if num_prompts is not None and len(chosen) < num_prompts:
        selection.notes.append(
            f"the test split has {len(set(ids))} model(s), {len(at)} with a checkpoint at epoch {epoch}"
        )
    return selection


def select_prompts(
    split: Any, *, num_prompts: int | None, epoch: int | None, activation: str = "auto"
) -> tuple[list[dict[str, Any]], int, str]:
    """``(rows, epoch, activation)`` of :func:`choose_prompts` (which also says why there are not more)."""
    selection = choose_prompts(split, num_prompts=num_prompts, epoch=epoch, activation=activation)
    return selection.rows, selection.epoch, selection.activation


def save_samples(samples: Sequence[Any], out_dir: Path, metadata: Mapping[str, str]) -> list[str]:
    """Write ``sample_XXX.safetensors`` files (best first); returns their names."""
    from safetensors.torch import save_file

    from sane_hf.serialization import atomic_path, usual_file_mode

    names = []
    for i, s in enumerate(samples):
        name = f"sample_{i:03d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in s.state_dict.items()}
        meta = {
            **metadata,
            "rank": str(i),
            "score": "none" if s.score is None else repr(float(s.score)),
            "anchor_index": str(s.anchor_index),
            "round": str(s.round),
            "key_order": json.dumps(list(tensors)),
        }
        with atomic_path(out_dir / name) as tmp:  # a killed run leaves no half-written sample
            save_file(tensors, str(tmp), metadata=meta)
            usual_file_mode(tmp)
        names.append(name)
    return names


@dataclass
class SamplingSetup:
    """What :func:`run_sampling` prepared: the task, an architecture builder, the prompts.

    ``task`` and ``build`` are None when the zoo names a task / architecture that is neither
    registered nor an entry point (:mod:`sane_hf.zoo.custom`): samples can then still be drawn
    and saved, but not scored or evaluated.
    """

    task: Any
    build: Callable[..., nn.Module] | None
    prompts: list[dict[str, Any]]
    prompt_sds: list[dict[str, Tensor]]
    epoch: int
    activation: str
    param_keys: list[str]
    bn_data: Tensor | None
    selection: PromptSelection | None = None
    score: str = "none"
    notes: list[str] = field(default_factory=list)

    def load(self, state_dict: Mapping[str, Tensor], condition: bool = True, data: Tensor | None = None) -> nn.Module:
        """The architecture with ``state_dict`` loaded strictly, BatchNorm conditioned on ``data`` (default: train images)."""
        if self.build is None:
            raise ValueError("the zoo's architecture is unknown: import the zoo with --arch module:callable")
        net = self.build()
        net.load_state_dict(state_dict, strict=True)
        if condition and _has_batchnorm(net):
            bn = self.bn_data if data is None else data
            if bn is not None:
                condition_batchnorm(net, bn)
        return net.eval()


def _setup(
    zoo: Any, zoo_config: Any, config: SamplingEvalConfig, *, build: Callable[..., nn.Module] | None = None,
    task: Callable[[], Any] | None = None, need_task: bool = False,
) -> SamplingSetup:
    from sane_hf.state_dict_io import state_dict_from_bytes
    from sane_hf.zoo.architectures import list_architectures
    from sane_hf.zoo.custom import architecture_builder, zoo_task

    user_arch = build is not None or bool(getattr(zoo_config, "arch_entrypoint", None))
    # fail before any sampling: an unimportable entry point, a task the evaluation cannot load
    task_data = zoo_task(zoo_config, required=need_task, task=task)
    selection = choose_prompts(
        zoo["test"], num_prompts=config.num_prompts, epoch=config.prompt_epoch, activation=config.activation,
        uses_activation=not user_arch and zoo_config.arch in list_architectures(),
    )
    activation = selection.activation
    if activation == "unknown":  # imported zoos: zoo_model's convention
        activation = "relu"
    builder = architecture_builder(zoo_config, activation=activation, build=build)
    if builder is None and need_task:
        raise ValueError(
            f"the zoo's architecture {zoo_config.arch!r} is not registered and the zoo records no entry point: "
            "import it with --arch module:callable (your function returning the nn.Module) to evaluate samples"
        )
    prompt_sds = [state_dict_from_bytes(r["weights"]) for r in selection.rows]
    if builder is not None:
        param_keys = [k for k, _ in builder().named_parameters()]
    else:
        param_keys = [k for k, v in prompt_sds[0].items() if v.is_floating_point() and "running_" not in k]
    bn_data = task_data.x_train[: config.bn_samples] if task_data is not None else None
    return SamplingSetup(task_data, builder, selection.rows, prompt_sds, selection.epoch, activation, param_keys,
                         bn_data, selection)


def run_sampling(
    model: Any, tokenizer: Any, zoo: Any, zoo_config: Any, config: SamplingEvalConfig, *, progress: bool = False,
    build: Callable[..., nn.Module] | None = None, task: Callable[[], Any] | None = None, need_task: bool = False,
) -> tuple[SamplingSetup, list[Any]]:
    """Prompts + :func:`sample_models` with the configured score; returns ``(setup, samples)``.

    ``build``/``task``: your architecture and task callables (default: the zoo's, registered or
    recorded as entry points). Without a known task or architecture ``score="train-acc"`` falls
    back to no score (noted in ``setup.notes``); ``need_task=True`` makes that an error instead.
    """
    setup = _setup(zoo, zoo_config, config, build=build, task=task, need_task=need_task)
    if len(setup.prompt_sds) < 2 and isinstance(config.bandwidth, str):
        raise ValueError(
            f"{setup.selection.explain() if setup.selection else '1 prompt'}: the {config.bandwidth!r} bandwidth "
            "rule needs at least 2 prompts to measure their spread; pass --bandwidth NUMBER (a kernel std in latent "
            "units), another --activation or --prompt-epoch, or import the zoo with a larger test fraction"
        )
    score_fn = None
    setup.score = config.score
    if config.score == "train-acc":
        if setup.task is None or setup.build is None:
            missing = "task" if setup.task is None else "architecture"
            setup.score = "none"
            setup.notes.append(
                f"score 'train-acc' skipped: the zoo's {missing} is unknown (import with --{missing[:4]} "
                "module:callable to score samples)"
            )
        else:
            score_fn = source_score_fn(setup, config)
    samples = _draw(model, tokenizer, setup, config, score_fn, config.bootstrap_rounds, progress)
    return setup, samples


def source_score_fn(setup: SamplingSetup, config: SamplingEvalConfig) -> Callable[[Mapping[str, Tensor]], float]:
    """The score that ranks candidates: accuracy on the first ``config.score_samples`` training images."""
    n = config.score_samples
    return accuracy_score_fn(setup.build, setup.task.x_train[:n], setup.task.y_train[:n], setup.bn_data)


def selection_draws(config: SamplingEvalConfig, bootstrap_rounds: int | None = None) -> int:
    """Candidates scored per kept sample by a scored draw: ``candidates · (bootstrap_rounds + 1) / num_samples``.

    ``bootstrap_rounds`` defaults to ``config.bootstrap_rounds``. The sampler draws
    ``4 · num_samples`` candidates per round by default, so 4 without bootstrapping.
    """
    rounds = config.bootstrap_rounds if bootstrap_rounds is None else bootstrap_rounds
    candidates = config.candidates if config.candidates is not None else 4 * config.num_samples
    return max(1, round(candidates * (rounds + 1) / config.num_samples))


def _draw(
    model: Any, tokenizer: Any, setup: SamplingSetup, config: SamplingEvalConfig,
    score_fn: Callable[[Mapping[str, Tensor]], float] | None, bootstrap_rounds: int, progress: bool, seed_offset: int = 0,
) -> list[Any]:
    """:func:`~sane_hf.sampling.sample_models` around the setup's prompts with ``config``'s settings and ``score_fn``."""
    return sample_models(
        model, tokenizer, setup.prompt_sds, config.num_samples, mode=config.mode, bandwidth=config.bandwidth,
        bandwidth_scale=config.bandwidth_scale, score_fn=score_fn,
        bootstrap_rounds=bootstrap_rounds if score_fn is not None else 0,
        keep_top=config.keep_top, candidates=config.candidates if score_fn is not None else None,
        seed=config.seed + seed_offset, window=config.window, halo=config.halo, batch_size=config.batch_size,
        progress=progress, spread_anchors=config.spread_anchors, residual=config.residual,
    )


def prompt_metrics(setup: SamplingSetup) -> dict[str, Any]:
    """The prompts for ``metrics.json``: epoch, model ids, test accuracy, and how they were selected."""
    selection = setup.selection
    return {
        "epoch": setup.epoch,
        "model_ids": [int(r["model_id"]) for r in setup.prompts],
        "test_acc": [float(r["test_acc"]) for r in setup.prompts],
        "asked": selection.asked if selection else None,
        "removed": selection.removed if selection else {},
        "notes": (selection.notes if selection else []) + setup.notes,
    }


def diversity_metrics(setup: SamplingSetup, samples: Sequence[Any]) -> dict[str, Any]:
    """:func:`~sane_hf.sampling.sample_diversity` over the setup's parameters, anchors as prompt model ids."""
    from sane_hf.sampling import sample_diversity

    out = sample_diversity(samples, setup.prompt_sds, keys=setup.param_keys)
    hist = out.get("anchor_histogram")
    if hist is not None:
        out["anchor_histogram"] = {str(int(r["model_id"])): h for r, h in zip(setup.prompts, hist)}
    return out
