"""Gaussian kernel density estimates in SANE's latent space: the bandwidth rules and :class:`LatentKDE`.

Sampling a Gaussian KDE is "pick a random anchor, add ``N(0, bandwidth²)`` noise";
:class:`LatentKDE` does it vectorised in ``"joint"`` mode (whole latent sequences) or
``"token"`` mode (each token position independently) and returns each draw's anchor.
:func:`select_bandwidth` turns a rule (``"scott"``, ``"silverman"``) into a kernel width. Used
by :func:`~sane_hf.sampling.sample_models`; the recipe is in :mod:`sane_hf.sampling`.

This module travels to the Hub as remote code with ``sampling.py``: it imports only torch,
numpy and scikit-learn.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["SAMPLING_MODES", "BANDWIDTH_RULES", "select_bandwidth", "LatentKDE"]

SAMPLING_MODES = ("joint", "token")
BANDWIDTH_RULES = ("scott", "silverman")


def select_bandwidth(points: np.ndarray, bandwidth: float | str = "scott", *, dim: int | None = None) -> float:
    """The Gaussian kernel's standard deviation for a KDE on ``points`` ``(n, ...)``.

    A number is returned as it is (it must be finite and > 0). A rule (``"scott"``,
    ``"silverman"``) is ``factor(n, d) · σ`` with ``σ`` the root mean per-dimension variance of the
    points over their first axis (``ddof=1``) and ``d = dim`` (default: the points' flattened size).
    """
    if isinstance(bandwidth, (int, float, np.integer, np.floating)) and not isinstance(bandwidth, bool):
        value = float(bandwidth)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"bandwidth must be a finite number > 0 or one of {BANDWIDTH_RULES}, got {bandwidth!r}")
        return value
    if bandwidth not in BANDWIDTH_RULES:
        raise ValueError(f"bandwidth must be a finite number > 0 or one of {BANDWIDTH_RULES}, got {bandwidth!r}")
    n = points.shape[0]
    if n < 2:
        raise ValueError(
            f"the {bandwidth!r} bandwidth rule needs at least 2 anchors to measure their spread, got {n}; "
            "pass a number (the kernel's standard deviation in latent units) instead"
        )
    flat = points.reshape(n, -1).astype(np.float64)
    sigma = float(np.sqrt(flat.var(axis=0, ddof=1).mean()))
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"the anchors are identical (spread {sigma}): the {bandwidth!r} rule gives no bandwidth; pass a number"
        )
    d = int(dim) if dim is not None else flat.shape[1]
    if bandwidth == "scott":
        factor = n ** (-1.0 / (d + 4))
    else:  # silverman
        factor = (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
    return factor * sigma


class LatentKDE:
    """Gaussian KDE over anchor latent sequences ``(P, N, D)`` in ``"joint"`` or ``"token"`` mode.

    ``kde`` is the fitted :class:`sklearn.neighbors.KernelDensity` (joint mode; token mode fits
    one per position on demand in :meth:`score_samples`). Sampling is done here, vectorised, with
    the Gaussian-KDE algorithm sklearn uses (random anchor + ``N(0, bandwidth²)`` noise) so that
    the anchor of every draw is known.

    Args:
        anchors: ``(P, N, D)`` latents (P anchor models, N token positions, D latent dims).
        mode: ``"joint"`` (whole sequences) or ``"token"`` (each position independently).
        bandwidth: kernel standard deviation or a rule (:func:`select_bandwidth`; ``d`` is
            ``N·D`` in joint mode and ``D`` in token mode).
        bandwidth_scale: multiplies a rule's bandwidth (e.g. 0.1 for samples ten times closer to
            the anchors than the rule says); a number is used as given.
        weights: optional ``(P,)`` non-negative anchor weights (probability of picking each).
    """

    def __init__(
        self,
        anchors: np.ndarray | Tensor,
        mode: str = "joint",
        bandwidth: float | str = "scott",
        *,
        bandwidth_scale: float = 1.0,
        weights: np.ndarray | None = None,
    ):
        from sklearn.neighbors import KernelDensity

        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
        if isinstance(anchors, Tensor):
            anchors = anchors.detach().to("cpu", torch.float64).numpy()
        anchors = np.asarray(anchors, dtype=np.float64)
        if anchors.ndim != 3 or min(anchors.shape) < 1:
            raise ValueError(f"anchors must be a non-empty (P, N, D) array, got shape {anchors.shape}")
        if not np.isfinite(anchors).all():
            raise ValueError("anchors contain NaN or Inf")
        if not (math.isfinite(bandwidth_scale) and bandwidth_scale > 0):
            raise ValueError(f"bandwidth_scale must be a finite number > 0, got {bandwidth_scale!r}")
        self.anchors = anchors
        self.mode = mode
        p, n, d = anchors.shape
        dim = n * d if mode == "joint" else d
        self.bandwidth = select_bandwidth(anchors, bandwidth, dim=dim)
        if isinstance(bandwidth, str):
            self.bandwidth *= float(bandwidth_scale)
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (p,) or (weights < 0).any() or not weights.sum() > 0:
                raise ValueError(f"weights must be ({p},) non-negative with a positive sum")
            weights = weights / weights.sum()
        self.weights = weights
        self.kde = None
        if mode == "joint":
            self.kde = KernelDensity(kernel="gaussian", bandwidth=self.bandwidth).fit(
                anchors.reshape(p, -1), sample_weight=weights
            )
        self._token_kdes: list[Any] | None = None

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    def sample_indices(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Anchor indices: ``(n,)`` in joint mode, ``(n, N)`` in token mode (one per position).

        Joint mode without weights draws the anchors *balanced*: every anchor ``⌊n/P⌋`` or
        ``⌈n/P⌉`` times, in random order (shuffled rounds over all anchors) — the KDE's uniform
        choice of anchor without the chance of leaving one out or piling draws on another.
        """
        size = (n,) if self.mode == "joint" else (n, self.anchors.shape[1])
        if self.weights is None:
            if self.mode == "joint":
                rounds = -(-n // self.num_anchors)
                return np.concatenate([rng.permutation(self.num_anchors) for _ in range(rounds)])[:n]
            return rng.integers(0, self.num_anchors, size=size)
        return rng.choice(self.num_anchors, size=size, p=self.weights)

    def latents_for(self, indices: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Latents ``(n, N, D)`` = anchors picked by ``indices`` + ``bandwidth · noise`` (standard normal)."""
        if self.mode == "joint":
            base = self.anchors[indices]  # (n,) -> (n, N, D)
        else:
            base = self.anchors[indices, np.arange(self.anchors.shape[1])[None, :]]  # (n, N) -> (n, N, D)
        return base + self.bandwidth * noise

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` latent sequences; returns ``(latents (n, N, D), anchor indices)``."""
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        indices = self.sample_indices(n, rng)
        noise = rng.standard_normal((n, *self.anchors.shape[1:]))
        return self.latents_for(indices, noise), indices

    def score_samples(self, latents: np.ndarray) -> np.ndarray:
        """Log density of ``latents`` ``(n, N, D)`` under the KDE (token mode: sum over positions)."""
        from sklearn.neighbors import KernelDensity

        latents = np.asarray(latents, dtype=np.float64)
        n = latents.shape[0]
        if self.mode == "joint":
            return self.kde.score_samples(latents.reshape(n, -1))
        if self._token_kdes is None:
            self._token_kdes = [
                KernelDensity(kernel="gaussian", bandwidth=self.bandwidth).fit(
                    self.anchors[:, t], sample_weight=self.weights
                )
                for t in range(self.anchors.shape[1])
            ]
        return sum(kde.score_samples(latents[:, t]) for t, kde in enumerate(self._token_kdes))
