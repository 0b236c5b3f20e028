"""The baselines and measurements the sampling evaluation compares samples with.

Scores of a state_dict (:func:`accuracy_score_fn`, :func:`target_score_fn` with
:func:`nearest_mean_loo_accuracy`), the baselines built from the prompts (:func:`noise_like`,
:func:`calibrate_noise`, :func:`matched_noise`, :func:`aligned_average`) and the novelty
measurements (:func:`evaluation_spec`, :func:`nearest_neighbours`, :func:`prediction_agreement`).
Pure computation on state_dicts and modules: no zoo, no files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sane_hf.adaptation import last_linear
from sane_hf.sampling import condition_batchnorm

__all__ = [
    "accuracy_score_fn",
    "target_score_fn",
    "nearest_mean_loo_accuracy",
    "aligned_average",
    "noise_like",
    "calibrate_noise",
    "matched_noise",
    "evaluation_spec",
    "nearest_neighbours",
    "prediction_agreement",
]


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _scored_net(
    build: Callable[[], nn.Module], state_dict: Mapping[str, Tensor], bn_data: Tensor | None
) -> nn.Module:
    """``build()`` loaded strictly with ``state_dict``, BatchNorm conditioned on ``bn_data``, in eval mode."""
    net = build()
    net.load_state_dict(state_dict, strict=True)
    if bn_data is not None and _has_batchnorm(net):
        condition_batchnorm(net, bn_data)
    return net.eval()


def accuracy_score_fn(
    build: Callable[[], nn.Module], x: Tensor, y: Tensor, bn_data: Tensor | None = None
) -> Callable[[Mapping[str, Tensor]], float]:
    """``score_fn(state_dict)`` = accuracy on ``(x, y)`` of ``build()`` loaded with it (BN conditioned on ``bn_data``)."""

    @torch.no_grad()
    def score_fn(state_dict: Mapping[str, Tensor]) -> float:
        net = _scored_net(build, state_dict, bn_data)
        return float((net(x).argmax(-1) == y).float().mean())

    return score_fn


def _head_input(net: nn.Module, x: Tensor) -> Tensor:
    """The input of ``net``'s head (its last ``nn.Linear``, as :func:`~sane_hf.sampling.reset_head` finds it)."""
    found = last_linear(net)
    if found is None:
        raise ValueError(f"{type(net).__name__} has no nn.Linear head: the target score reads the head's input")
    seen: list[Tensor] = []
    hook = found[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
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
        return nearest_mean_loo_accuracy(_head_input(_scored_net(build, state_dict, bn_data), x), y)

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
    *,
    score_fn: Callable[[Mapping[str, Tensor]], float] | None = None,
    draws: int = 1,
) -> tuple[list[dict[str, Tensor]], list[int], list[float]]:
    """The "prompts + noise at matched distance" baseline of ``samples``.

    Noise model ``i`` is sample ``i``'s nearest prompt (after alignment) plus isotropic Gaussian
    noise on ``keys`` whose L2 norm equals that distance. Anchoring each noise model at the same
    prompt as its sample keeps the comparison fair when a sampler concentrates on the best
    prompts.

    With ``score_fn`` and ``draws > 1`` the noise gets the samples' selection too: ``draws``
    noise models are drawn for each sample (same prompt, same distance) and the one ``score_fn``
    rates highest is kept — as a scored sampler keeps its best candidates, so that selection
    alone cannot make the samples look better than noise.

    Returns ``(noise state_dicts, nearest prompt index per sample, distances)``.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if draws > 1 and score_fn is None:
        raise ValueError(f"draws={draws} noise models per sample need a score_fn to choose the best by")
    dists, index = nearest_neighbours(samples, prompts, spec, keys)
    noisy = []
    for j, d in zip(index, dists):
        candidates = [noise_like(prompts[j], keys, d, generator) for _ in range(draws)]
        noisy.append(candidates[0] if draws == 1 else max(candidates, key=score_fn))  # first best on ties
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
