"""The sampling evaluation protocol, behind ``sane-hf sample --evaluate``.

Given a trained SANE, its tokenizer and a zoo:

1. **Prompts**: the best ``num_prompts`` models of the zoo's *test* split at ``prompt_epoch``
   (default: the last stored epoch), by test accuracy, among models with one activation (the best
   model's, unless ``activation`` names one): a state_dict is only meaningful with its
   activation function, so samples, prompts and baselines all use it.
2. **Samples**: :func:`~sane_hf.sampling.sample_models` around the prompts; with ``score="train-acc"``
   candidates are ranked by accuracy on ``score_samples`` training images (after BatchNorm
   conditioning when the architecture has BatchNorm). BatchNorm statistics of every evaluated
   model are re-estimated on ``bn_samples`` training images (:func:`~sane_hf.sampling.condition_batchnorm`).
3. **Accuracy vs fine-tuning epoch** (``finetune_epochs``, e.g. 0, 1, 5) on the test split, mean ± std, of:

   - ``sampled``: the samples;
   - ``random_init``: the same architecture from random initialisation (one per sample);
   - ``noise``: sample ``i``'s nearest prompt (after alignment) plus isotropic Gaussian noise on the
     parameters whose norm equals that distance: "the same prompts perturbed as far as the samples
     are" — so a sampler that keeps only candidates near the best prompts is compared with noise
     around those prompts, not around all of them;
   - ``noise_matched_accuracy``: the same prompts with one common noise norm, chosen by bisection so that
     the mean *validation* accuracy equals the samples' (:func:`calibrate_noise`): "prompts
     perturbed until they are as good as the samples" — the reference for "farther from the zoo
     at equal accuracy";
   - ``aligned_average``: the prompts aligned to the best one by weight matching
     (:func:`~sane_hf.alignment.align_to`), then averaged;
   - ``prompts``: the prompts themselves.

   Every model is fine-tuned with the same recipe (:func:`~sane_hf.zoo.train.fine_tune`: Adam,
   ``finetune_lr``, batch 32, dropout off).
4. **Novelty**: for each sample (and noise model, and prompt), the L2 distance over parameters to
   its nearest training-zoo checkpoint after aligning it to that checkpoint (up to
   ``max_neighbours`` train-split checkpoints, seeded subsample), and the fraction of test inputs
   on which it predicts the same class as that neighbour. A sample that copies a training
   checkpoint shows a small distance and an agreement near 1.
5. **Transfer**: samples and prompts with their head reset (:func:`~sane_hf.sampling.reset_head`)
   and random init, fine-tuned ``transfer_epochs`` on another task: ``transfer_task="auto"``
   takes the first installed of Fashion-MNIST, MNIST and digits that differs from the zoo's task
   and has its number of input channels, resampled to the zoo's image size; if none is installed,
   the zoo's own task with a seeded permutation of the class labels (a weak stand-in: the features
   transfer unchanged, only the head must be relearnt — reported as such). As in the paper, the
   transfer samples are chosen by the *new* task (``transfer_score="target"``): candidates are
   drawn again around the same prompts, ranked by :func:`target_score_fn` on
   ``transfer_score_samples`` labelled images of the new task, and the KDE is refit on the best
   ones for ``transfer_bootstrap_rounds`` rounds. Reported beside them: the source-scored samples,
   the prompts, prompts + noise as far as the target-scored samples are, and random init.

Everything is written to ``out_dir``: ``metrics.json``, ``accuracy_vs_epoch.png`` and the
samples as ``sample_XXX.safetensors`` (metadata: score, anchor prompt, round, activation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sane_hf.constants import METRICS_FILE
from sane_hf.sampling import SAMPLING_MODES, condition_batchnorm, reset_head, sample_models
from sane_hf.serialization import JsonConfigMixin, atomic_write_text

__all__ = [
    "SamplingEvalConfig",
    "SamplingSetup",
    "TRANSFER_CANDIDATES",
    "PromptSelection",
    "choose_prompts",
    "select_prompts",
    "accuracy_score_fn",
    "aligned_average",
    "noise_like",
    "matched_noise",
    "evaluation_spec",
    "target_score_fn",
    "nearest_mean_loo_accuracy",
    "calibrate_noise",
    "nearest_neighbours",
    "prediction_agreement",
    "resolve_transfer_task",
    "run_sampling",
    "diversity_metrics",
    "prompt_metrics",
    "evaluate_sampling",
    "plot_accuracy",
    "save_samples",
]

#: Tasks tried, in order, by ``transfer_task="auto"``.
TRANSFER_CANDIDATES = ("fashion-mnist", "mnist", "digits")
GROUPS = ("sampled", "random_init", "noise", "noise_matched_accuracy", "aligned_average", "prompts")


def _parse_bandwidth(value: Any) -> float | str:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class SamplingEvalConfig(JsonConfigMixin):
    """Settings of :func:`evaluate_sampling` (each field's ``help`` also drives ``sane-hf sample``)."""

    num_samples: int = field(default=16, metadata={"help": "Models to sample."})
    num_prompts: int | None = field(
        default=5, metadata={"help": "Prompts: the best N test models at --prompt-epoch (0 = all of them)."}
    )
    prompt_epoch: int | None = field(
        default=None, metadata={"help": "Checkpoint epoch of the prompts (default: the zoo's last stored epoch)."}
    )
    activation: str = field(
        default="auto",
        metadata={"help": "Activation of the prompts ('auto' = the best test model's); samples use it too."},
    )
    mode: str = field(default="joint", metadata={"help": f"KDE mode, one of {SAMPLING_MODES}."})
    bandwidth: float | str = field(
        default="scott",
        metadata={"help": "KDE kernel std in latent units, or a rule: 'scott' / 'silverman' (on the prompts)."},
    )
    bandwidth_scale: float = field(default=0.2, metadata={"help": "Multiplies a rule's bandwidth."})
    score: str = field(
        default="train-acc",
        metadata={"help": "Rank candidates by 'train-acc' (accuracy on --score-samples training images) or 'none'."},
    )
    score_samples: int = field(default=256, metadata={"help": "Training images the score uses."})
    candidates: int | None = field(
        default=None, metadata={"help": "Candidates drawn per round (default: 4 x num-samples when scored)."}
    )
    keep_top: int | None = field(default=None, metadata={"help": "Anchors kept per bootstrap round (default: num-samples)."})
    bootstrap_rounds: int = field(default=0, metadata={"help": "Bootstrap rounds after the first draw."})
    spread_anchors: bool = field(
        default=True,
        metadata={"help": "Keep scored samples spread over the prompts (each prompt's best first), not the global best."},
    )
    residual: bool = field(
        default=False,
        metadata={"help": "Residual decoding: each sample = its prompt + (decode(z) - decode(encode(prompt))), so an "
                          "imperfect decoder does not pull samples toward its mean."},
    )
    finetune_epochs: tuple[int, ...] = field(
        default=(0, 1, 5), metadata={"help": "Fine-tuning epochs at which test accuracy is reported."}
    )
    finetune_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of fine-tuning."})
    bn_samples: int = field(default=512, metadata={"help": "Training images for BatchNorm conditioning."})
    max_neighbours: int | None = field(
        default=200, metadata={"help": "Train-split checkpoints searched for nearest neighbours (0 = all)."}
    )
    transfer_task: str | None = field(
        default="auto",
        metadata={"help": "Task for the transfer test ('auto', a task name, or 'none' to skip)."},
    )
    transfer_epochs: int = field(default=1, metadata={"help": "Fine-tuning epochs on the transfer task."})
    transfer_train_subset: int | None = field(
        default=1000,
        metadata={"help": "Training images of the transfer task (0 = all); few images are where an init matters."},
    )
    transfer_score: str = field(
        default="target",
        metadata={"help": "Score that picks the transfer samples: 'target' (drawn again, ranked and bootstrapped on "
                          "--transfer-score-samples labelled images of the new task) or 'source' (the samples above)."},
    )
    transfer_score_samples: int = field(
        default=100, metadata={"help": "Labelled images of the new task the 'target' score uses (from its training set)."}
    )
    transfer_bootstrap_rounds: int = field(
        default=2, metadata={"help": "Bootstrap rounds of the 'target'-scored draw: KDE refit on its best samples."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling, baselines, subsets and fine-tuning."})
    window: int | None = field(default=None, metadata={"help": "Content tokens per window (default: from the model)."})
    halo: int | None = field(default=None, metadata={"help": "Halo tokens on each side (default: from the model)."})
    batch_size: int = field(default=32, metadata={"help": "Windows per SANE forward pass."})

    def __post_init__(self) -> None:
        self.bandwidth = _parse_bandwidth(self.bandwidth)
        self.finetune_epochs = tuple(sorted({int(e) for e in self.finetune_epochs}))
        if self.num_prompts == 0:
            self.num_prompts = None
        if self.max_neighbours == 0:
            self.max_neighbours = None
        if self.transfer_train_subset == 0:
            self.transfer_train_subset = None
        if self.transfer_task in ("none", ""):
            self.transfer_task = None
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {self.mode!r}")
        if self.score not in ("train-acc", "none"):
            raise ValueError(f"score must be 'train-acc' or 'none', got {self.score!r}")
        for name in ("num_samples", "score_samples", "bn_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.finetune_epochs or self.finetune_epochs[0] < 0:
            raise ValueError(f"finetune_epochs must be non-negative integers, got {self.finetune_epochs}")
        if self.transfer_epochs < 0 or self.bootstrap_rounds < 0 or self.transfer_bootstrap_rounds < 0:
            raise ValueError("transfer_epochs, bootstrap_rounds and transfer_bootstrap_rounds must be >= 0")
        if self.transfer_score not in ("target", "source"):
            raise ValueError(f"transfer_score must be 'target' or 'source', got {self.transfer_score!r}")
        if self.transfer_score_samples < 2:
            raise ValueError(f"transfer_score_samples must be >= 2, got {self.transfer_score_samples}")


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size), "values": [float(v) for v in arr]}


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


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


def choose_prompts(
    split: Any, *, num_prompts: int | None, epoch: int | None, activation: str = "auto", uses_activation: bool = True
) -> PromptSelection:
    """The best ``num_prompts`` rows of ``split`` at ``epoch`` with one activation, best first, explained.

    ``epoch=None`` takes the split's last epoch. ``activation="auto"`` takes the best model's
    activation when enough test models share it, else the activation shared by the most models
    (a state_dict is only meaningful with its activation, so prompts never mix them); a named
    activation is kept as asked. With ``uses_activation=False`` (your own architecture, built
    the same whatever the column says) there is no activation filter. Every model a filter
    removed is listed in :attr:`PromptSelection.removed`.
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
            if counts[best] < want:  # relax: the activation that gives the most prompts (ties: the best model's)
                rank = {a: min(r for r, i in enumerate(at) if acts[i] == a) for a in counts}
                activation = max(counts, key=lambda a: (min(counts[a], want), -rank[a]))
                if activation != best:
                    notes.append(
                        f"the best model's activation {best!r} has {counts[best]} test model(s) at epoch {epoch}, "
                        f"fewer than the {want} asked; took {activation!r} ({counts[activation]} models)"
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


def accuracy_score_fn(
    build: Callable[[], nn.Module], x: Tensor, y: Tensor, bn_data: Tensor | None = None
) -> Callable[[Mapping[str, Tensor]], float]:
    """``score_fn(state_dict)`` = accuracy on ``(x, y)`` of ``build()`` loaded with it (BN conditioned on ``bn_data``)."""

    @torch.no_grad()
    def score_fn(state_dict: Mapping[str, Tensor]) -> float:
        net = build()
        net.load_state_dict(state_dict, strict=True)
        if bn_data is not None and _has_batchnorm(net):
            condition_batchnorm(net, bn_data)
        net.eval()
        return float((net(x).argmax(-1) == y).float().mean())

    return score_fn


def _head_input(net: nn.Module, x: Tensor) -> Tensor:
    """The input of ``net``'s head (its last ``nn.Linear``, as :func:`~sane_hf.sampling.reset_head` finds it)."""
    heads = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(net).__name__} has no nn.Linear head: the target score reads the head's input")
    seen: list[Tensor] = []
    hook = heads[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        net(x)
    finally:
        hook.remove()
    return seen[-1].flatten(1)  # (n, features)


def nearest_mean_loo_accuracy(features: Tensor, labels: Tensor) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier on standardised ``features``.

    Each image is classified by the nearest class mean computed *without* it, so the score needs
    no training and no held-out split; a class with one image cannot be predicted for that image.
    """
    f = features.double()
    f = (f - f.mean(0)) / f.std(0, unbiased=False).clamp(min=1e-8)  # (n, k)
    classes = torch.unique(labels)
    onehot = (labels[:, None] == classes[None, :]).double()  # (n, C)
    counts = onehot.sum(0)  # (C,)
    sums = onehot.T @ f  # (C, k)
    # mean of each class without image i (only its own class changes)
    own = onehot.bool()
    means = sums[None, :, :].expand(len(f), -1, -1).clone()  # (n, C, k)
    n_c = counts[None, :].expand(len(f), -1).clone()  # (n, C)
    means[own] -= f
    n_c[own] -= 1
    dist = ((f[:, None, :] - means / n_c.clamp(min=1)[..., None]) ** 2).sum(-1)  # (n, C)
    dist[n_c == 0] = math.inf
    pred = classes[dist.argmin(1)]
    return float((pred == labels).double().mean())


def target_score_fn(
    build: Callable[[], nn.Module], x: Tensor, y: Tensor, bn_data: Tensor | None = None
) -> Callable[[Mapping[str, Tensor]], float]:
    """``score_fn(state_dict)`` for a *new* task from a few labelled images ``(x, y)``.

    The source task's head says nothing about new classes, so the score reads the features the
    head receives: the leave-one-out nearest-class-mean accuracy of ``build()`` loaded with the
    state_dict (BatchNorm conditioned on ``bn_data``, images of the new task) on ``(x, y)``
    (:func:`nearest_mean_loo_accuracy`). Higher is better.
    """

    @torch.no_grad()
    def score_fn(state_dict: Mapping[str, Tensor]) -> float:
        net = build()
        net.load_state_dict(state_dict, strict=True)
        if bn_data is not None and _has_batchnorm(net):
            condition_batchnorm(net, bn_data)
        net.eval()
        return nearest_mean_loo_accuracy(_head_input(net, x), y)

    return score_fn


def aligned_average(
    state_dicts: Sequence[Mapping[str, Tensor]], spec: Any, reference: int = 0
) -> dict[str, Tensor]:
    """Align every state_dict to ``state_dicts[reference]`` (weight matching), then average the float tensors."""
    from sane_hf.alignment import align_to

    ref = state_dicts[reference]
    aligned = [sd if i == reference else align_to(sd, ref, spec)[0] for i, sd in enumerate(state_dicts)]
    out: dict[str, Tensor] = {}
    for key, value in ref.items():
        if value.is_floating_point():
            out[key] = torch.stack([sd[key].float() for sd in aligned]).mean(0).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def _unit_noise(state_dict: Mapping[str, Tensor], keys: Sequence[str], generator: torch.Generator) -> dict[str, Tensor]:
    noise = {k: torch.randn(state_dict[k].shape, generator=generator, dtype=torch.float64) for k in keys}
    total = math.sqrt(sum(float(n.pow(2).sum()) for n in noise.values())) or 1.0
    return {k: n / total for k, n in noise.items()}


def _perturb(state_dict: Mapping[str, Tensor], direction: Mapping[str, Tensor], norm: float) -> dict[str, Tensor]:
    out = {k: v.clone() for k, v in state_dict.items()}
    for k, n in direction.items():
        out[k] = (state_dict[k].double() + n * norm).to(state_dict[k].dtype)
    return out


def noise_like(
    state_dict: Mapping[str, Tensor], keys: Sequence[str], norm: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """``state_dict`` plus isotropic Gaussian noise on ``keys`` whose total L2 norm is ``norm``."""
    return _perturb(state_dict, _unit_noise(state_dict, keys, generator), norm)


def calibrate_noise(
    bases: Sequence[Mapping[str, Tensor]],
    keys: Sequence[str],
    accuracy: Callable[[Mapping[str, Tensor]], float],
    target: float,
    generator: torch.Generator,
    *,
    start: float = 1.0,
    steps: int = 12,
) -> tuple[float, list[dict[str, Tensor]]]:
    """One noise norm ``r`` such that the mean ``accuracy`` of ``base_i + r · u_i`` is ``≈ target``.

    ``u_i`` are fixed random unit directions (from ``generator``), so the mean accuracy is a
    deterministic function of ``r``; it is found by bisection (``steps`` halvings after bracketing
    from ``start``). If the bases themselves are no better than ``target``, ``r = 0``.
    Returns ``(r, perturbed state_dicts)``.
    """
    directions = [_unit_noise(b, keys, generator) for b in bases]

    def models(r: float) -> list[dict[str, Tensor]]:
        return [_perturb(b, d, r) for b, d in zip(bases, directions)]

    def mean_acc(r: float) -> float:
        return float(np.mean([accuracy(sd) for sd in models(r)]))

    if mean_acc(0.0) <= target:
        return 0.0, models(0.0)
    lo, hi = 0.0, max(start, 1e-6)
    for _ in range(20):  # bracket: grow hi until the noisy models are no better than the target
        if mean_acc(hi) <= target:
            break
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        if mean_acc(mid) > target:
            lo = mid
        else:
            hi = mid
    r = (lo + hi) / 2
    return r, models(r)


def _distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Sequence[str]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys))


def evaluation_spec(build: Callable[[], nn.Module], example: Tensor) -> Any:
    """The permutation spec distances are aligned with: derived from ``build()``'s graph on ``example``.

    Not strict: an operation the graph walker does not know (e.g. ``x.unsqueeze(1)`` in your own
    module) keeps its channels in place instead of failing the evaluation, so distances are then
    aligned over fewer permutations — an upper bound of the fully aligned distance.
    """
    from sane_hf.alignment import permutation_spec

    return permutation_spec(build(), example, strict=False)


def nearest_neighbours(
    state_dicts: Sequence[Mapping[str, Tensor]],
    neighbours: Sequence[Mapping[str, Tensor]],
    spec: Any,
    keys: Sequence[str],
) -> tuple[list[float], list[int]]:
    """For each state_dict: the L2 distance over ``keys`` to its nearest neighbour after aligning to it, and its index."""
    from sane_hf.alignment import align_to

    dists, index = [], []
    for sd in state_dicts:
        best, arg = math.inf, -1
        for j, nb in enumerate(neighbours):
            aligned, _ = align_to(sd, nb, spec)
            d = _distance(aligned, nb, keys)
            if d < best:
                best, arg = d, j
        dists.append(best)
        index.append(arg)
    return dists, index


def matched_noise(
    samples: Sequence[Mapping[str, Tensor]],
    prompts: Sequence[Mapping[str, Tensor]],
    spec: Any,
    keys: Sequence[str],
    generator: torch.Generator,
) -> tuple[list[dict[str, Tensor]], list[int], list[float]]:
    """The "prompts + noise at matched distance" baseline of ``samples``.

    Noise model ``i`` is sample ``i``'s nearest prompt (after alignment) plus isotropic Gaussian
    noise on ``keys`` whose L2 norm equals that distance. Anchoring each noise model at the same
    prompt as its sample keeps the comparison fair when a sampler concentrates on the best
    prompts. Returns ``(noise state_dicts, nearest prompt index per sample, distances)``.
    """
    dists, index = nearest_neighbours(samples, prompts, spec, keys)
    noisy = [noise_like(prompts[j], keys, d, generator) for j, d in zip(index, dists)]
    return noisy, index, dists


@torch.no_grad()
def prediction_agreement(a: nn.Module, b: nn.Module, x: Tensor, batch_size: int = 1000) -> float:
    """Fraction of inputs on which ``a`` and ``b`` (in eval mode) predict the same class."""
    flags = (a.training, b.training)
    a.eval()
    b.eval()
    try:
        same = 0
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            same += int((a(xb).argmax(-1) == b(xb).argmax(-1)).sum())
        return same / max(len(x), 1)
    finally:
        a.train(flags[0])
        b.train(flags[1])


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


# ----------------------------------------------------------------------------------------------
# the protocol
# ----------------------------------------------------------------------------------------------


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
            n = config.score_samples
            score_fn = accuracy_score_fn(setup.build, setup.task.x_train[:n], setup.task.y_train[:n], setup.bn_data)
    samples = _draw(model, tokenizer, setup, config, score_fn, config.bootstrap_rounds, progress)
    return setup, samples


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
    """Run the protocol of the module docstring; returns the metrics (also written to ``out_dir``).

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

    # the samples' distance to their nearest prompt sets the noise baseline's scale
    gen = torch.Generator().manual_seed(config.seed)
    noise_sds, prompt_idx, prompt_dist = matched_noise(sample_sds, setup.prompt_sds, spec, keys, gen)
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
        "noise": {**novelty(noise_sds, noise_nets), "prompt_distance": _summary(prompt_dist)},
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
            noisy, _, _ = matched_noise(
                target_sds, setup.prompt_sds, spec, keys, torch.Generator().manual_seed(config.seed + 2)
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


def plot_accuracy(metrics: Mapping[str, Any], path: str | Path) -> bool:
    """Test accuracy (mean ± std) vs fine-tuning epoch per group; transfer in a second panel."""
    from matplotlib.figure import Figure  # no pyplot: headless
    from matplotlib.ticker import MaxNLocator

    from sane_hf.verdicts import degenerate_groups, group_name

    accuracy = metrics.get("accuracy") or {}
    degenerate = set(degenerate_groups(metrics))
    if not accuracy:
        return False
    transfer = metrics.get("transfer")
    panels = 2 if transfer else 1
    fig = Figure(figsize=(5.5 * panels, 4.2), dpi=110)
    axes = fig.subplots(1, panels, squeeze=False)[0]

    def draw(ax, curves: Mapping[str, Any], title: str) -> None:
        for name, curve in curves.items():
            xs = sorted(int(e) for e in curve)
            mean = [curve[str(e)]["mean"] for e in xs]
            std = [curve[str(e)]["std"] for e in xs]
            label = group_name(name) + (" (degenerate)" if name in degenerate else "")
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label,
                        ls=":" if name in degenerate else "-")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("fine-tuning epochs")
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")

    draw(axes[0], accuracy, f"SANE samples vs baselines: {metrics.get('arch')} on {metrics.get('task')}")
    if transfer:
        fallback = " (fallback: permuted labels)" if transfer.get("fallback") else ""
        draw(axes[1], transfer["accuracy"], f"transfer to {transfer['task']}{fallback}: samples vs random init")
    fig.tight_layout()
    fig.savefig(path)
    return True
