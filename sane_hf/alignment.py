"""Applying permutations and weight matching: random, inverted and aligning permutations.

Hidden units of a network can be permuted without changing its function. Given the
:class:`~sane_hf.symmetry.PermutationSpec` of a model (derived from its module graph by
:func:`~sane_hf.symmetry.permutation_spec`, which documents the rules), this module permutes a
``state_dict`` (:func:`apply_permutation`), draws random function-preserving permutations to
*augment* a model during training (:func:`random_permutations`, :func:`random_permutation`) and
*aligns* a model to a reference before comparing them by weight matching (:func:`align_to`;
Ainsworth et al. 2022, "Git Re-Basin", arXiv 2209.04836).

The spec types and :func:`permutation_spec` live in :mod:`sane_hf.symmetry` and are re-exported
here, so ``from sane_hf.alignment import permutation_spec, PermutationSpec`` keeps working.

Example::

    >>> from sane_hf.alignment import permutation_spec
    >>> from sane_hf.zoo.architectures import create_model
    >>> spec = permutation_spec(create_model("cnn-s", image_size=8))
    >>> [g.name for g in spec.groups]
    ['conv1', 'conv2', 'conv3', 'fc1']
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sane_hf.symmetry import (
    SPEC_VERSION,
    PermutationAxis,
    PermutationGroup,
    PermutationSpec,
    UnsupportedOperationError,
    permutation_spec,
)

__all__ = [
    "SPEC_VERSION",
    "UnsupportedOperationError",
    "PermutationAxis",
    "PermutationGroup",
    "PermutationSpec",
    "permutation_spec",
    "identity_permutations",
    "random_permutations",
    "invert_permutations",
    "apply_permutation",
    "random_permutation",
    "align_to",
    "state_dict_distance",
]


# --------------------------------------------------------------------------------------------
# applying permutations
# --------------------------------------------------------------------------------------------

Permutations = dict[str, Tensor]


@functools.lru_cache(maxsize=64)
def _key_actions(spec: PermutationSpec) -> dict[str, tuple[tuple[int, str, int], ...]]:
    """``key -> ((axis, group name, block), ...)`` for every key a group acts on."""
    actions: dict[str, list[tuple[int, str, int]]] = {}
    for g in spec.groups:
        for a in g.axes:
            actions.setdefault(a.key, []).append((a.axis, g.name, a.block))
    return {k: tuple(v) for k, v in actions.items()}


def _expand(perm: Tensor, block: int) -> Tensor:
    """Unit permutation (n,) -> entry permutation (n*block,) moving contiguous blocks."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block, device=perm.device)).reshape(
        -1
    )  # (n, block) -> (n*block,)


def _permute_tensor(
    t: Tensor,
    actions: Iterable[tuple[int, str, int]],
    perms: Mapping[str, Tensor],
    skip_axis: int | None = None,
) -> Tensor:
    for axis, name, block in actions:
        if axis == skip_axis or name not in perms:
            continue
        t = t.index_select(axis, _expand(perms[name].to(t.device), block))
    return t


def identity_permutations(spec: PermutationSpec) -> Permutations:
    """``{group: arange(size)}``."""
    return {g.name: torch.arange(g.size) for g in spec.groups}


def random_permutations(spec: PermutationSpec, generator: torch.Generator | None = None) -> Permutations:
    """``{group: randperm(size)}`` drawn from ``generator``."""
    return {g.name: torch.randperm(g.size, generator=generator) for g in spec.groups}


def invert_permutations(perms: Mapping[str, Tensor]) -> Permutations:
    """Inverse permutations: ``apply(apply(sd, p), invert(p)) == sd``."""
    return {name: torch.argsort(p) for name, p in perms.items()}


def apply_permutation(
    state_dict: Mapping[str, Tensor], spec: PermutationSpec, perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Permute ``state_dict`` by ``perms`` (``{group: LongTensor(size)}``; a missing group = identity).

    Unit ``i`` of the result is unit ``perms[g][i]`` of the input on every axis of group ``g``
    (gather convention). The result is a new dict in the same key order; tensors no group acts
    on are the input's objects, not copies.
    """
    for name, p in perms.items():
        size = spec.group(name).size
        if p.shape != (size,):
            raise ValueError(f"permutation for group {name!r} has shape {tuple(p.shape)}, expected ({size},)")
    actions = _key_actions(spec)
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        out[key] = _permute_tensor(t, actions[key], perms) if key in actions else t
    missing = set(actions) - set(state_dict)
    if missing:
        raise ValueError(f"state_dict lacks keys the spec permutes: {sorted(missing)[:5]}")
    return out


def random_permutation(
    state_dict: Mapping[str, Tensor], spec: PermutationSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """A random function-preserving permutation of ``state_dict`` (augmentation view)."""
    return apply_permutation(state_dict, spec, random_permutations(spec, generator))


# --------------------------------------------------------------------------------------------
# weight matching
# --------------------------------------------------------------------------------------------


def state_dict_distance(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Iterable[str] | None = None
) -> float:
    """L2 distance between two state_dicts over their floating-point tensors (or ``keys``)."""
    keys = [k for k in a if a[k].is_floating_point()] if keys is None else list(keys)
    total = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    return math.sqrt(total)


def align_to(
    state_dict: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], Permutations]:
    """Permute ``state_dict`` to be as close as possible (L2) to ``reference`` by weight matching.

    Coordinate descent (Ainsworth et al. 2022, Alg. 1): in a random group order, each step
    solves ``linear_sum_assignment`` on the similarity ``S[i, j] = Σ <ref unit i, sd unit j>``
    summed over every axis the group acts on, with the other groups' current permutations
    applied; stops after a sweep with no improvement or ``max_iter`` sweeps. Every step can
    only raise ``Σ <ref, permuted sd>``, i.e. lower the distance. ``generator`` fixes the group
    orders (default: seed 0, so the result is deterministic).

    Returns ``(aligned_state_dict, perms)`` with ``aligned = apply_permutation(sd, spec, perms)``.
    """
    spec.validate(state_dict)
    spec.validate(reference)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    actions = _key_actions(spec)
    perms = identity_permutations(spec)
    # (key -> float64 cpu copies) once; similarity in float64 keeps ties stable
    sd64 = {k: state_dict[k].detach().to("cpu", torch.float64) for k in actions}
    ref64 = {k: reference[k].detach().to("cpu", torch.float64) for k in actions}
    for _ in range(max_iter):
        improved = False
        for gi in torch.randperm(len(spec.groups), generator=generator).tolist():
            group = spec.groups[gi]
            n = group.size
            sim = torch.zeros(n, n, dtype=torch.float64)  # (ref unit, sd unit)
            for ax in group.axes:
                w = _permute_tensor(sd64[ax.key], actions[ax.key], perms, skip_axis=ax.axis)
                w_ref = ref64[ax.key]
                a = w_ref.movedim(ax.axis, 0).reshape(n, -1)  # (n*block, ...) -> (n, block*rest)
                b = w.movedim(ax.axis, 0).reshape(n, -1)
                sim += a @ b.T  # (n, n)
            _, cols = linear_sum_assignment(sim.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(n)
            old_score = float(sim[rows, perms[group.name]].sum())
            new_score = float(sim[rows, new].sum())
            if new_score > old_score + 1e-10 * max(1.0, abs(old_score)):
                perms[group.name] = new
                improved = True
        if not improved:
            break
    return apply_permutation(state_dict, spec, perms), perms
