"""Sampling new models from a trained SANE: KDE in latent space, subsampling, bootstrapping.

The recipe of Schürholt et al. (2024, arXiv 2406.09997, §3.3), step by step:

1. **Anchors.** Each prompt model is tokenized with the model's :class:`WeightTokenizer`
   (normalised tokens, as in training) and encoded window by window with halo context
   (:func:`~sane_hf.embedding.embed_models`), giving per-token latents ``(P, N, latent_dim)``.
2. **KDE.** A Gaussian kernel density estimate is fitted on the anchors
   (:class:`LatentKDE`, on :class:`sklearn.neighbors.KernelDensity`), in one of two modes:

   - ``"joint"``: one KDE over whole latent sequences (flattened, ``N·latent_dim`` dims). A draw
     picks *one* anchor model and adds isotropic Gaussian noise to all of its token latents.
   - ``"token"``: one KDE per token position over the anchors' latents at that position. A draw
     picks an anchor *independently for every position* and adds noise, so one sample mixes
     tokens of different prompt models (vectorised: one anchor index per position, one noise
     draw per sample).

   Sampling a Gaussian KDE is exactly "pick a random anchor, add ``N(0, bandwidth²)`` noise",
   which is what :meth:`LatentKDE.sample` does, returning the anchor indices as well.
   ``bandwidth`` is a number (the kernel's standard deviation, in latent units) or a rule on the
   anchors: ``"scott"`` ``σ·n^(-1/(d+4))``, ``"silverman"`` ``σ·(n(d+2)/4)^(-1/(d+4))``, with
   ``n`` anchors, ``d`` the KDE's dimension (``N·latent_dim`` for joint, ``latent_dim`` for
   token) and ``σ`` the anchors' pooled per-dimension standard deviation (scipy's
   ``gaussian_kde`` convention; sklearn's own ``"scott"``/``"silverman"`` omit ``σ`` and assume
   standardised data), times ``bandwidth_scale``. In ``N·latent_dim`` dimensions both rules give
   ``≈ σ``: noise as large as the spread of the prompts, which on a digits CNN zoo decodes to
   near-chance models. The default, ``"scott"`` × 0.2 (≈ 0.2 σ), kept ~95 % of the prompts'
   accuracy there (measured with ``sane-hf sample --evaluate``, :mod:`sane_hf.evaluation`).

   Joint vs token: on that zoo (not permutation-aligned) ``"joint"`` samples were far better
   (epoch-0 accuracy 0.89 vs 0.14 at the same bandwidth): mixing token positions of different
   prompts mixes neurons of networks whose hidden units are not in correspondence. ``"token"``
   can only work on aligned zoos (``ZooConfig(align=True)``) or with prompts that share an origin.
3. **Decoding.** Sampled latents are decoded window by window with the same halo plan as
   encoding (:func:`decode_latents`, equal to :func:`~sane_hf.embedding.decode_haloed` per
   sample), de-normalised by the tokenizer and turned into state_dicts that load with
   ``load_state_dict(strict=True)`` into the prompts' architecture.
4. **Subsampling.** With ``score_fn(state_dict) -> float`` (higher is better, e.g. accuracy on a
   few training batches), ``candidates`` samples are drawn and the best are kept — by default
   spread over the prompts (``spread_anchors=True``: each prompt's best candidate, then each
   one's second best, ...). Joint-mode draws are balanced: every prompt anchors
   ``⌊candidates/P⌋`` or ``⌈candidates/P⌉`` of them. Taking the globally best instead
   (``spread_anchors=False``) was seen to put all 16 samples on one prompt, nearly identical.
   :func:`sample_diversity` reports the samples' mean pairwise distance beside the prompts' and
   how many samples each prompt anchored.
5. **Bootstrapping.** ``bootstrap_rounds`` more rounds refit the KDE on the ``keep_top`` best
   latents found so far (spread likewise) and draw ``candidates`` again; the best
   ``num_samples`` of *all* rounds are returned, so each prompt's samples are never worse than
   its round-0 ones.

Randomness: one ``numpy.random.Generator`` seeded by ``seed`` draws, in order, the anchor indices
of each round and one 63-bit seed per round; candidate ``i`` of round ``r`` draws its noise from
``SeedSequence([round_seed, i])``. A sample therefore does not depend on chunking or
``batch_size``, and no token position reuses another's random state (the reference code fixed
``random_state`` per token, silently turning every sample into one anchor plus noise).

Helpers for using samples (in :mod:`sane_hf.adaptation`, importable from here): :func:`condition_batchnorm`
re-estimates BatchNorm running statistics on data, :func:`reset_head` re-initialises or resizes a
classification head for a new task, and
``target_tokenizer=`` samples for another architecture of the same family
(:func:`map_token_positions`, a heuristic — see there).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from sane_hf import SaneConfig, SaneModel, WeightTokenizer
    >>> from sane_hf.sampling import sample_models
    >>> nets = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)]
    >>> tok = WeightTokenizer.from_reference(nets[0], token_size=8).fit(nets)
    >>> sane = SaneModel(SaneConfig(token_size=8, d_model=32, latent_dim=4, num_encoder_layers=1,
    ...                             num_decoder_layers=1, window_size=16, halo_size=2)).eval()
    >>> out = sample_models(sane, tok, nets, num_samples=2, seed=0)
    >>> len(out), nets[0].load_state_dict(out[0].state_dict, strict=True)
    (2, <All keys matched successfully>)

This module travels to the Hub as remote code with ``pipeline_sane.py``: it imports only
torch, numpy, scikit-learn, safetensors and (relatively) ``adaptation``, ``embedding``, ``latent_kde``
(:class:`LatentKDE`, :func:`select_bandwidth`), ``state_dict_io`` and ``tokenization_sane``.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .adaptation import _check_int, condition_batchnorm, reset_head
from .embedding import embed_models, resolve_window, window_plan
from .latent_kde import BANDWIDTH_RULES, SAMPLING_MODES, LatentKDE, select_bandwidth
from .state_dict_io import state_dict_from_bytes
from .tokenization_sane import WeightTokenizer, WeightTokens

__all__ = [
    "SAMPLING_MODES",
    "BANDWIDTH_RULES",
    "SampledModel",
    "LatentKDE",
    "select_bandwidth",
    "as_state_dicts",
    "encode_prompts",
    "decode_latents",
    "map_token_positions",
    "sample_models",
    "sample_diversity",
    "condition_batchnorm",
    "reset_head",
]

_CHUNK = 16  # candidates decoded and scored at a time (memory: chunk · N · (latent_dim + token_size) floats)


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class SampledModel:
    """One sampled model.

    Attributes:
        state_dict: the weights, keys/shapes/dtypes of the (target) tokenizer's reference
            architecture; loads with ``load_state_dict(strict=True)``.
        score: ``score_fn(state_dict)``; None without a ``score_fn``.
        anchor_index: index (into the prompts) of the prompt model this sample descends from —
            the anchor it was drawn around (``"joint"``), or the prompt that supplied most of its
            token positions (``"token"``); through bootstrap rounds, the prompt at the root.
        round: the bootstrap round that drew it (0 = from the prompts).
        candidate: its index among the candidates of that round.
        anchor_share: fraction of token positions drawn around ``anchor_index`` (1.0 in joint mode).
        bandwidth: the kernel standard deviation of the round that drew it.
        latents: its sampled latents ``(N, latent_dim)`` in the prompts' token layout (only with
            ``return_latents=True``).
    """

    state_dict: OrderedDict[str, Tensor] = field(repr=False)
    score: float | None = None
    anchor_index: int = 0
    round: int = 0
    candidate: int = 0
    anchor_share: float = 1.0
    bandwidth: float | None = None
    latents: Tensor | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------
# prompts in, tokens out
# ----------------------------------------------------------------------------------------------


def _datasets_types() -> tuple[type, type] | None:
    """``(Dataset, DatasetDict)`` when ``datasets`` is imported (an instance implies it is)."""
    import sys

    module = sys.modules.get("datasets")
    return None if module is None else (module.Dataset, module.DatasetDict)


def as_state_dicts(prompts: Any) -> list[Mapping[str, Tensor]]:
    """Normalise every accepted prompt form to a list of state_dicts.

    Accepted: a state_dict, an ``nn.Module``, a zoo row (a mapping with a ``weights`` blob), a
    list/tuple/iterable of these, or a zoo split (``datasets.Dataset`` with a ``weights`` column).
    """
    types = _datasets_types()
    if types is not None and isinstance(prompts, types[1]):
        raise TypeError(f"prompts is a DatasetDict with splits {list(prompts)}; pass one split (e.g. zoo['test'])")
    if types is not None and isinstance(prompts, types[0]):
        if "weights" not in prompts.column_names:
            raise ValueError(
                f"the dataset has no 'weights' column (columns: {prompts.column_names}); pass a raw zoo split"
            )
        weights = prompts.select_columns(["weights"]).with_format(None)
        return [state_dict_from_bytes(b) for b in weights["weights"]]

    def one(obj: Any, index: int) -> Mapping[str, Tensor]:
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if isinstance(obj, Mapping):
            if isinstance(obj.get("weights"), (bytes, bytearray, memoryview)):  # a zoo row
                return state_dict_from_bytes(obj["weights"])
            return obj
        raise TypeError(
            f"prompts[{index}] is a {type(obj).__name__}; expected a state_dict, an nn.Module or a zoo row"
        )

    if isinstance(prompts, (Mapping, nn.Module)):
        return [one(prompts, 0)]
    if isinstance(prompts, (str, bytes, Tensor)) or not isinstance(prompts, Iterable):
        raise TypeError(
            f"cannot use a {type(prompts).__name__} as prompts: pass a state_dict, an nn.Module, a list of them "
            "or a zoo split (datasets.Dataset)"
        )
    return [one(obj, i) for i, obj in enumerate(prompts)]


def _check_tokenizer(model: Any, tokenizer: WeightTokenizer, what: str = "tokenizer") -> None:
    token_size = int(model.config.token_size)
    if tokenizer.token_size != token_size:
        raise ValueError(
            f"the {what} makes tokens of size {tokenizer.token_size} but the SANE model expects token_size="
            f"{token_size}; use the tokenizer saved with the model (WeightTokenizer.from_pretrained(model_dir))"
        )


def encode_prompts(
    model: Any,
    tokenizer: WeightTokenizer,
    prompts: Any,
    *,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Per-token latents of the prompt models, ``(P, N, latent_dim)`` float32 on CPU.

    Normalised tokens, haloed windows (:func:`~sane_hf.embedding.embed_models`).
    """
    _check_tokenizer(model, tokenizer)
    if tokenizer.stats is None:
        raise ValueError(
            "sampling needs a fitted tokenizer (SANE sees normalised tokens): load the tokenizer saved with the "
            "model (WeightTokenizer.from_pretrained(model_dir)) or call tokenizer.fit(zoo state_dicts)"
        )
    sds = as_state_dicts(prompts)
    if not sds:
        raise ValueError("no prompt models given: pass at least one state_dict or nn.Module")
    try:
        out = embed_models(
            model, tokenizer, sds, window=window, halo=halo, batch_size=batch_size, normalize=True,
            return_token_latents=True,
        )
    except (ValueError, TypeError) as err:
        message = str(err).replace("inputs[", "prompts[")
        raise type(err)(f"prompt models do not fit the model's tokenizer: {message}") from err
    return out.token_latents


@torch.no_grad()
def decode_latents(
    model: Any,
    latents: Tensor,
    positions: Tensor,
    *,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Decode latents ``(S, N, latent_dim)`` to tokens ``(S, N, token_size)`` with haloed windows.

    The windows of all ``S`` sequences are batched ``batch_size`` at a time; per sequence the
    result equals :func:`~sane_hf.embedding.decode_haloed` (same window plan, float round-off).
    Runs the model in eval mode (its training flag is restored). Returns float32 on CPU.
    """
    window, halo = resolve_window(model.config, window, halo)
    if latents.dim() != 3 or positions.dim() != 2 or positions.shape[0] != latents.shape[1]:
        raise ValueError(
            f"decode_latents expects latents (S, N, D) and positions (N, 3), got {tuple(latents.shape)} "
            f"and {tuple(positions.shape)}"
        )
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    num, length = latents.shape[:2]
    plan = window_plan(length, window, halo)
    work = [(s, w) for w in plan for s in range(num)]
    out = torch.empty(num, length, int(model.config.token_size), dtype=torch.float32)
    positions = positions.to(device)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(work), batch_size):
            chunk = work[start : start + batch_size]
            z = torch.stack([latents[s, cs:ce] for s, (cs, ce, _, _) in chunk])  # (B, L, latent_dim)
            pos = torch.stack([positions[cs:ce] for _, (cs, ce, _, _) in chunk])  # (B, L, 3)
            rec = model.decode(z.to(device=device, dtype=dtype), pos).reconstruction.float().cpu()  # (B, L, d)
            for i, (s, (cs, _, a, b)) in enumerate(chunk):
                out[s, a:b] = rec[i, a - cs : b - cs]
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# new architectures
# ----------------------------------------------------------------------------------------------


def _relative_match(i: int, n_target: int, n_source: int) -> int:
    """Index in ``range(n_source)`` at the same relative position as ``i`` in ``range(n_target)``."""
    if n_target <= 1 or n_source <= 1:
        return n_source - 1 if n_target > 1 and i == n_target - 1 else 0
    return int(round(i * (n_source - 1) / (n_target - 1)))


def map_token_positions(source: WeightTokenizer, target: WeightTokenizer) -> tuple[Tensor, Tensor]:
    """For each token of ``target``, the ``source`` token whose latent it takes (a heuristic).

    Layers are matched **by kind and relative depth**: the ``i``-th of the target's layers of a
    kind (``weight``, ``norm``, ``norm_stats``, ``vector``) takes the source layer of that kind at
    the same relative position (first ↔ first, last ↔ last; a kind missing in the source falls
    back to all source layers). Within a layer, row ``k`` of ``R_t`` rows takes source row
    ``⌊(k + ½)·R_s/R_t⌋`` and a row's ``j``-th token the source token at the same relative
    position in its row.

    Limits (honestly): this transfers *where* in the network a latent sits, nothing more. Wider
    layers repeat source rows (their decoded values still differ through the position code),
    narrower ones skip rows, and a row's values are laid out by column index, so the bias column
    and the input fan-in of a resized layer do not line up with the source's. Layers with no
    counterpart of their kind get the nearest layer of any kind. Sampled models for a new
    architecture are initialisations to fine-tune, not finished models — and measured on digits
    (``cnn-s`` prompts → ``cnn-m`` samples, 8 samples scored by training accuracy) they were *worse*
    than random init after fine-tuning (test accuracy 0.47 vs 0.57 after one epoch, 0.83 vs 0.92
    after five): the mapping does not carry a useful function across a change of width.

    Returns:
        ``(source_token (N_t,), source_layer (N_t,))`` int64 index tensors.
    """
    by_kind_s: dict[str, list[int]] = {}
    for j, layer in enumerate(source.layers):
        by_kind_s.setdefault(layer.kind, []).append(j)
    by_kind_t: dict[str, list[int]] = {}
    for i, layer in enumerate(target.layers):
        by_kind_t.setdefault(layer.kind, []).append(i)
    all_source = list(range(source.num_layers))

    token_index = torch.empty(target.num_tokens, dtype=torch.long)
    layer_index = torch.empty(target.num_tokens, dtype=torch.long)
    for kind, target_ids in by_kind_t.items():
        source_ids = by_kind_s.get(kind, all_source)
        for rank, i in enumerate(target_ids):
            j = source_ids[_relative_match(rank, len(target_ids), len(source_ids))]
            lt, ls = target.layers[i], source.layers[j]
            rows = ((torch.arange(lt.num_rows, dtype=torch.float64) + 0.5) * ls.num_rows / lt.num_rows).long()
            rows = rows.clamp_(max=ls.num_rows - 1)  # (R_t,)
            cols = ((torch.arange(lt.tokens_per_row, dtype=torch.float64) + 0.5) * ls.tokens_per_row / lt.tokens_per_row)
            cols = cols.long().clamp_(max=ls.tokens_per_row - 1)  # (T_t,)
            src = ls.token_start + rows[:, None] * ls.tokens_per_row + cols[None, :]  # (R_t, T_t)
            token_index[lt.token_start : lt.token_end] = src.reshape(-1)
            layer_index[lt.token_start : lt.token_end] = j
    return token_index, layer_index


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


class _Decoder:
    """Latents in the prompts' layout ``(S, N_s, D)`` → state_dicts of the (target) architecture."""

    def __init__(self, model: Any, tokenizer: WeightTokenizer, target: WeightTokenizer | None, window, halo, batch_size):
        self.model, self.window, self.halo, self.batch_size = model, window, halo, batch_size
        self.source = tokenizer
        self.target = target if target is not None else tokenizer
        plan = self.target._get_plan()
        self.positions = plan.positions.clone()  # (N_t, 3)
        self.mask = plan.mask.clone()  # (N_t, d)
        self.gather: Tensor | None = None
        self.denorm: tuple[Tensor, Tensor] | None = None
        if target is not None:
            self.gather, layers = map_token_positions(tokenizer, target)
            mean, std = tokenizer.stats.mean, tokenizer.stats.std
            self.denorm = (
                torch.tensor(mean, dtype=torch.float32)[layers],  # (N_t,)
                torch.tensor(std, dtype=torch.float32)[layers],
            )

    def __call__(self, latents: Tensor, shift: Tensor | None = None) -> list[OrderedDict[str, Tensor]]:
        if self.gather is not None:
            latents = latents[:, self.gather]  # (S, N_s, D) -> (S, N_t, D)
        tokens = decode_latents(
            self.model, latents, self.positions, window=self.window, halo=self.halo, batch_size=self.batch_size
        )  # (S, N_t, d)
        if shift is not None:  # residual decoding: + (prompt tokens - their reconstruction), normalised units
            tokens = tokens + shift
        num = tokens.shape[0]
        mask = self.mask.expand(num, *self.mask.shape)
        positions = self.positions.expand(num, *self.positions.shape)
        if self.denorm is None:  # the prompts' own architecture: the tokenizer undoes its normalisation
            return self.target.decode_batch(WeightTokens(tokens, positions, mask, normalized=True))
        mean, std = self.denorm
        raw = tokens * std[:, None] + mean[:, None]  # (S, N_t, d), source-layer statistics
        return self.target.decode_batch(WeightTokens(raw, positions, mask, normalized=False))


@dataclass
class _Candidate:
    score: float | None
    round: int
    candidate: int
    order: int  # global draw order (ties keep it)
    root: np.ndarray  # prompt index per position (N,), for anchor bookkeeping
    bandwidth: float
    latents: Tensor  # (N, D) float32
    state_dict: OrderedDict[str, Tensor]

    def key(self) -> tuple[float, int]:
        s = self.score if self.score is not None and math.isfinite(self.score) else -math.inf
        return (-s, self.order)

    @property
    def anchor(self) -> int:
        """The prompt this candidate descends from (most of its token positions)."""
        (root, _), = Counter(self.root.tolist()).most_common(1)
        return int(root)


def _select(pool: list[_Candidate], k: int, spread: bool) -> list[_Candidate]:
    """The ``k`` best candidates, best first; with ``spread``, taken round-robin over their anchors.

    Spread: every anchor's best candidate first (anchors ordered by their best score), then every
    anchor's second best, and so on — so a score cannot pile all samples onto the best prompt.
    """
    ranked = sorted(pool, key=_Candidate.key)
    if not spread or k >= len(ranked):
        return ranked[:k]
    groups: dict[int, list[_Candidate]] = {}
    for c in ranked:
        groups.setdefault(c.anchor, []).append(c)
    order = list(groups.values())  # dicts keep insertion order: anchors by their best candidate
    chosen: list[_Candidate] = []
    for level in range(max(len(g) for g in order)):
        for g in order:
            if level < len(g) and len(chosen) < k:
                chosen.append(g[level])
    return sorted(chosen, key=_Candidate.key)


def _fit_kde(anchors: np.ndarray, mode: str, bandwidth, scale: float, previous: LatentKDE | None) -> LatentKDE:
    """The KDE of one round; a rule that cannot be applied to bootstrap anchors (fewer than 2, or
    identical) keeps the previous round's bandwidth."""
    if previous is None or not isinstance(bandwidth, str):
        return LatentKDE(anchors, mode, bandwidth, bandwidth_scale=scale)
    try:
        return LatentKDE(anchors, mode, bandwidth, bandwidth_scale=scale)
    except ValueError:
        return LatentKDE(anchors, mode, previous.bandwidth)


def _call_score_fn(score_fn: Callable, sd: Mapping[str, Tensor], round_: int, index: int) -> float:
    try:
        value = score_fn(sd)
    except Exception as err:
        raise RuntimeError(
            f"score_fn raised {type(err).__name__} while scoring candidate {index} of round {round_}: {err}"
        ) from err
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"score_fn must return a number (higher = better), got {type(value).__name__} for candidate {index} "
            f"of round {round_}"
        ) from err
    return value


def sample_models(
    model: Any,
    tokenizer: WeightTokenizer,
    prompts: Any,
    num_samples: int = 1,
    *,
    mode: str = "joint",
    bandwidth: float | str = "scott",
    bandwidth_scale: float = 0.2,
    score_fn: Callable[[Mapping[str, Tensor]], float] | None = None,
    bootstrap_rounds: int = 0,
    keep_top: int | None = None,
    candidates: int | None = None,
    seed: int = 0,
    target_tokenizer: WeightTokenizer | None = None,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 32,
    return_latents: bool = False,
    progress: bool = False,
    spread_anchors: bool = True,
    residual: bool = False,
) -> list[SampledModel]:
    """Sample new models around prompt models in SANE's latent space (module docstring: the recipe).

    Args:
        model: a trained :class:`~sane_hf.modeling_sane.SaneModel` (``encode``/``decode``/``config``).
        tokenizer: its fitted :class:`WeightTokenizer` (the prompts' architecture).
        prompts: state_dicts, ``nn.Module``\\ s, zoo rows, a list of them or a zoo split (one prompt set).
        num_samples: models to return (best first when scored).
        mode: ``"joint"`` (one anchor per sample) or ``"token"`` (one anchor per token position).
        bandwidth: kernel standard deviation in latent units, or ``"scott"``/``"silverman"``
            (:func:`select_bandwidth`); recomputed on the new anchors each bootstrap round when a rule.
        bandwidth_scale: multiplies a rule's bandwidth (default 0.2: the rules alone sample about as
            far from the prompts as the prompts are from each other); ignored for a number.
        score_fn: ``score_fn(state_dict) -> float``, higher is better (e.g. accuracy on a few
            training batches). Needed for ``candidates > num_samples`` and for bootstrapping.
        bootstrap_rounds: extra rounds, each refitting the KDE on the ``keep_top`` best latents so far.
        keep_top: anchors kept for the next round (default ``num_samples``).
        candidates: samples drawn per round (default ``num_samples``; with a ``score_fn``, ``4·num_samples``).
        seed: seeds everything (see the module docstring); same seed → same samples.
        target_tokenizer: sample for another architecture (its tokenizer, same token size): latents
            are mapped with :func:`map_token_positions` and decoded at the target's positions,
            de-normalised with the matched source layers' statistics. A heuristic.
        window, halo, batch_size: haloed window plan and windows per forward pass (default: the
            model config's; ``batch_size`` changes speed, not results).
        return_latents: keep each sample's latents in :attr:`SampledModel.latents`.
        progress: progress bar over candidates.
        spread_anchors: keep samples spread over the prompts: with a ``score_fn`` the best
            candidates are taken round-robin over their anchors (each anchor's best, then each
            one's second best, ...), for the returned samples and for bootstrap anchors alike;
            False takes the globally best (which can put every sample on the best prompt).
            Joint-mode draws are balanced over the anchors either way.
        residual: decode each draw as ``decode(z) + (prompt − decode(encode(prompt)))`` per token
            position, with the prompt that position was drawn around: the sampled change is the
            decoder's, the rest is the prompt's own weights rather than its reconstruction. With a
            perfect autoencoder this equals plain decoding; with an imperfect one plain decoding
            pulls every sample toward the decoder's mean (collapse), residual decoding keeps the
            prompts' identity (samples then sit close to their prompts: see the novelty metrics).

    Returns:
        ``num_samples`` :class:`SampledModel`, best score first (draw order without ``score_fn``).

    Raises:
        ValueError: bad counts or options, prompts that do not match ``tokenizer``, an unfitted
            tokenizer, a tokenizer whose token size differs from the model's.
        RuntimeError: ``score_fn`` raised (the message names ``score_fn`` and the candidate).
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    bootstrap_rounds = _check_int("bootstrap_rounds", bootstrap_rounds, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
    if score_fn is not None and not callable(score_fn):
        raise TypeError(f"score_fn must be callable (state_dict -> float), got {type(score_fn).__name__}")
    if score_fn is None:
        if bootstrap_rounds > 0:
            raise ValueError("bootstrap_rounds > 0 needs a score_fn to rank the samples of each round")
        if candidates is not None and candidates != num_samples:
            raise ValueError(
                f"candidates={candidates} differs from num_samples={num_samples}, but without a score_fn there is "
                "nothing to choose the best by; pass score_fn or drop candidates"
            )
    candidates = _check_int("candidates", candidates, 1) if candidates is not None else (
        num_samples if score_fn is None else 4 * num_samples
    )
    if candidates * (bootstrap_rounds + 1) < num_samples:
        raise ValueError(
            f"{candidates} candidates x {bootstrap_rounds + 1} rounds cannot give num_samples={num_samples}"
        )
    keep_top = _check_int("keep_top", keep_top, 1) if keep_top is not None else num_samples
    if not (isinstance(bandwidth, str) and bandwidth in BANDWIDTH_RULES):
        select_bandwidth(np.zeros((2, 1)), bandwidth)  # raises on anything but a finite number > 0
    if target_tokenizer is not None:
        if not isinstance(target_tokenizer, WeightTokenizer) and not hasattr(target_tokenizer, "decode_batch"):
            raise TypeError(f"target_tokenizer must be a WeightTokenizer, got {type(target_tokenizer).__name__}")
        _check_tokenizer(model, target_tokenizer, "target_tokenizer")

    if residual and target_tokenizer is not None:
        raise ValueError("residual=True keeps each prompt's own weights and cannot map them to a target_tokenizer")
    anchors = encode_prompts(model, tokenizer, prompts, window=window, halo=halo, batch_size=batch_size)  # (P, N, D)
    num_prompts, num_tokens, _ = anchors.shape
    decoder = _Decoder(model, tokenizer, target_tokenizer, window, halo, batch_size)
    residual_tokens = None
    if residual:  # prompt tokens - decode(encode(prompt)), normalised: (P, N, d)
        true = tokenizer.encode_batch(as_state_dicts(prompts), normalize=True).tokens.float()
        rebuilt = decode_latents(model, anchors, decoder.positions, window=window, halo=halo, batch_size=batch_size)
        residual_tokens = (true - rebuilt) * decoder.mask  # padding stays 0
    rng = np.random.default_rng(seed)

    from tqdm.auto import tqdm

    keep = max(num_samples, keep_top) if score_fn is not None else num_samples
    pool: list[_Candidate] = []
    anchor_latents = anchors.numpy().astype(np.float64)
    anchor_roots = np.repeat(np.arange(num_prompts)[:, None], num_tokens, axis=1)  # (P, N) prompt per position
    order = 0
    kde: LatentKDE | None = None
    with tqdm(total=candidates * (bootstrap_rounds + 1), desc="sampling", unit="model", disable=not progress) as bar:
        for round_ in range(bootstrap_rounds + 1):
            if round_ > 0:
                best = _select(pool, keep_top, spread_anchors)
                anchor_latents = np.stack([c.latents.numpy() for c in best]).astype(np.float64)
                anchor_roots = np.stack([np.broadcast_to(c.root, (num_tokens,)) for c in best])
            kde = _fit_kde(anchor_latents, mode, bandwidth, bandwidth_scale, kde if round_ > 0 else None)
            indices = kde.sample_indices(candidates, rng)  # (C,) or (C, N)
            round_seed = int(rng.integers(0, 2**63 - 1))
            for start in range(0, candidates, _CHUNK):
                ids = range(start, min(start + _CHUNK, candidates))
                noise = np.stack([
                    np.random.default_rng(np.random.SeedSequence([round_seed, i])).standard_normal(
                        anchor_latents.shape[1:]
                    )
                    for i in ids
                ])  # (c, N, D)
                z = torch.from_numpy(kde.latents_for(indices[start : start + len(ids)], noise).astype(np.float32))
                roots = np.stack([
                    anchor_roots[indices[i]] if mode == "joint" else anchor_roots[indices[i], np.arange(num_tokens)]
                    for i in ids
                ])  # (c, N) prompt per position
                shift = None
                if residual_tokens is not None:  # (c, N, d): each position's prompt minus its reconstruction
                    shift = residual_tokens[torch.from_numpy(roots), torch.arange(num_tokens)[None, :]]
                sds = decoder(z, shift)
                for offset, (i, sd) in enumerate(zip(ids, sds)):
                    score = _call_score_fn(score_fn, sd, round_, i) if score_fn is not None else None
                    root = roots[offset]
                    pool.append(
                        _Candidate(score, round_, i, order, np.asarray(root), kde.bandwidth, z[offset].clone(), sd)
                    )
                    order += 1
                if score_fn is not None and len(pool) > keep:
                    pool = _select(pool, keep, spread_anchors)
                bar.update(len(ids))

    chosen = _select(pool, num_samples, spread_anchors) if score_fn is not None else pool[:num_samples]
    out = []
    for c in chosen:
        (root, count), = Counter(c.root.tolist()).most_common(1)
        out.append(
            SampledModel(
                state_dict=c.state_dict, score=c.score, anchor_index=int(root), round=c.round, candidate=c.candidate,
                anchor_share=count / len(c.root), bandwidth=c.bandwidth, latents=c.latents if return_latents else None,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# diversity
# ----------------------------------------------------------------------------------------------

_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _mean_pairwise_distance(state_dicts: list[Mapping[str, Tensor]], keys: list[str]) -> float | None:
    """Mean L2 distance over ``keys`` between all pairs (Gram matrix accumulated key by key)."""
    n = len(state_dicts)
    if n < 2:
        return None
    gram = torch.zeros(n, n, dtype=torch.float64)
    for k in keys:
        x = torch.stack([sd[k].detach().reshape(-1).to("cpu", torch.float64) for sd in state_dicts])  # (n, numel)
        gram += x @ x.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt()  # (n, n)
    iu = torch.triu_indices(n, n, offset=1)
    return float(dist[iu[0], iu[1]].mean())


def sample_diversity(
    samples: Any, prompts: Any, *, keys: list[str] | None = None, num_prompts: int | None = None
) -> dict[str, Any]:
    """How spread out samples are, beside their prompts: pairwise distances and the anchor histogram.

    Args:
        samples: the sampled models (:class:`SampledModel`) or their state_dicts.
        prompts: the prompts' state_dicts (or anything :func:`as_state_dicts` takes).
        keys: the tensors compared (default: the floating-point ones, BatchNorm statistics excluded).
        num_prompts: length of the histogram (default ``len(prompts)``).

    Returns:
        ``{"samples_mean_pairwise_distance", "prompts_mean_pairwise_distance", "ratio",
        "anchor_histogram", "anchors_used", "num_samples", "num_prompts"}``: the mean L2 distance
        over ``keys`` between every two samples and every two prompts (not permutation-aligned),
        their ratio (samples / prompts; near 0 means the samples collapsed onto one model), and
        how many samples each prompt anchored (SampledModel inputs only, else None).
    """
    sample_sds = [s.state_dict if isinstance(s, SampledModel) else s for s in samples]
    prompt_sds = as_state_dicts(prompts)
    reference = sample_sds[0] if sample_sds else prompt_sds[0]
    if keys is None:
        keys = [k for k, v in reference.items() if v.is_floating_point() and not k.endswith(_STAT_SUFFIXES)]
    d_samples = _mean_pairwise_distance(sample_sds, keys)
    d_prompts = _mean_pairwise_distance(prompt_sds, keys)
    histogram = None
    if samples and all(isinstance(s, SampledModel) for s in samples):
        histogram = [0] * (num_prompts if num_prompts is not None else len(prompt_sds))
        for s in samples:
            histogram[s.anchor_index] += 1
    return {
        "samples_mean_pairwise_distance": d_samples,
        "prompts_mean_pairwise_distance": d_prompts,
        "ratio": d_samples / d_prompts if d_samples is not None and d_prompts else None,
        "anchor_histogram": histogram,
        "anchors_used": None if histogram is None else sum(1 for h in histogram if h),
        "num_samples": len(sample_sds),
        "num_prompts": len(prompt_sds),
    }
