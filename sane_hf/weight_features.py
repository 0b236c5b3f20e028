"""Features computed from the weights directly, without SANE: the baselines SANE's probes are judged against.

* :func:`layer_statistics` — per layer (or tensor): mean, variance and the 1/25/50/75/99 %
  quantiles of its real weights (Unterthiner et al. 2020, "Predicting Neural Network Accuracy
  from Weights"); feature names from :func:`layer_statistics_names`;
* :func:`raw_weights` — every tokenized weight flattened, for small models.

Both read state_dicts, ``nn.Module``\\ s, ``WeightTokens`` (decoded with their tokenizer) or a raw
zoo split. The probes that use them are :mod:`sane_hf.probing`, which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sane_hf.tokenization_sane import WeightTokens

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.tokenization_sane import WeightTokenizer

__all__ = ["QUANTILES", "STAT_NAMES", "layer_statistics", "layer_statistics_names", "raw_weights"]

#: Quantiles of the layer-statistics baseline.
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
#: Names of the statistics per layer, in feature order.
STAT_NAMES = ("mean", "var", "q01", "q25", "q50", "q75", "q99")


def _reference_tokenizer(first: Mapping[str, torch.Tensor]) -> WeightTokenizer:
    from sane_hf.tokenization_sane import WeightTokenizer

    return WeightTokenizer.from_reference(first, token_size=64)


def _iter_weights(inputs: Any, tokenizer: WeightTokenizer | None) -> Iterator[Mapping[str, torch.Tensor]]:
    """State_dicts from state_dicts/modules (or a list of them), WeightTokens, or a zoo split."""
    import sys

    ds_module = sys.modules.get("datasets")
    if ds_module is not None and isinstance(inputs, ds_module.DatasetDict):
        raise TypeError(f"pass one split of the zoo (splits: {list(inputs)}), not the DatasetDict")
    if ds_module is not None and isinstance(inputs, ds_module.Dataset):
        from sane_hf.zoo.dataset import iter_state_dicts

        if "weights" not in inputs.column_names:
            raise ValueError("the dataset has no 'weights' column: baselines are computed from a raw zoo split")
        yield from iter_state_dicts(inputs)
    elif isinstance(inputs, WeightTokens):
        if tokenizer is None:
            raise ValueError("baselines from WeightTokens need the tokenizer that made them (to decode the weights)")
        batch = inputs if inputs.is_batched else WeightTokens.stack([inputs])
        for item in batch.unbind():
            yield tokenizer.decode(item)
    elif isinstance(inputs, nn.Module):
        yield inputs.state_dict()
    elif isinstance(inputs, Mapping):
        yield inputs
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, torch.Tensor)):
        for item in inputs:
            if isinstance(item, (WeightTokens, nn.Module, Mapping)):
                yield from _iter_weights(item, tokenizer)
            else:
                raise TypeError(f"cannot read weights from a {type(item).__name__}")
    else:
        raise TypeError(
            f"cannot read weights from a {type(inputs).__name__}: pass state_dicts, nn.Modules, a list of them, "
            "WeightTokens (with the tokenizer) or a zoo split"
        )


def _groups_of_keys(tokenizer: WeightTokenizer, per: str) -> list[tuple[str, tuple[str, ...]]]:
    if per == "layer":
        return [(layer.name, layer.keys) for layer in tokenizer.layers]
    if per == "tensor":
        return [(key, (key,)) for layer in tokenizer.layers for key in layer.keys]
    raise ValueError(f"per must be 'layer' or 'tensor', got {per!r}")


def _check_keys(sd: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], index: int) -> None:
    for key, shape in shapes.items():
        if key not in sd:
            raise ValueError(
                f"model {index} has no {key!r}: it does not match the architecture of the first model / tokenizer"
            )
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"model {index}: {key!r} has shape {tuple(sd[key].shape)}, expected {shape}")


def layer_statistics_names(tokenizer: WeightTokenizer, per: str = "layer") -> list[str]:
    """Feature names of :func:`layer_statistics`: ``"<layer>/<stat>"``, in feature order."""
    return [f"{name}/{stat}" for name, _ in _groups_of_keys(tokenizer, per) for stat in STAT_NAMES]


def layer_statistics(
    inputs: Any,
    tokenizer: WeightTokenizer | None = None,
    *,
    per: str = "layer",
    quantiles: Sequence[float] = QUANTILES,
) -> np.ndarray:
    """The layer-statistics baseline: ``(n_models, n_groups · (2 + len(quantiles)))`` float64.

    For every group of weights — a layer of the tokenizer's spec (``per="layer"``: a weight with
    its bias, a norm layer's weight+bias, running statistics) or a single tensor
    (``per="tensor"``) — the mean, the variance (population, ``ddof=0``) and the quantiles
    (linear interpolation, ``np.quantile``) of its real values, in that order (names:
    :func:`layer_statistics_names`). Values are the raw weights, not normalised tokens, and
    never include token padding. Integer buffers are ignored.

    Args:
        inputs: state_dicts / ``nn.Module``\\ s (or a list), ``WeightTokens`` (decoded with
            ``tokenizer``), or a raw zoo split (``datasets.Dataset`` with ``weights``).
        tokenizer: defines the layers; None = derive them from the first model (as
            ``WeightTokenizer.from_reference`` does).
    """
    rows: list[np.ndarray] = []
    groups: list[tuple[str, tuple[str, ...]]] | None = None
    shapes: dict[str, tuple[int, ...]] = {}
    qs = np.asarray(quantiles, dtype=np.float64)
    for index, sd in enumerate(_iter_weights(inputs, tokenizer)):
        if groups is None:
            tok = tokenizer if tokenizer is not None else _reference_tokenizer(sd)
            groups = _groups_of_keys(tok, per)
            shapes = {t.key: t.shape for t in tok.tensors if t.role == "tokenized"}
        _check_keys(sd, shapes, index)
        feats = []
        for _, keys in groups:
            values = np.concatenate([sd[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k in keys])
            feats.append([values.mean(), values.var(), *np.quantile(values, qs)])
        rows.append(np.asarray(feats, dtype=np.float64).reshape(-1))
    if not rows:
        raise ValueError("layer_statistics got no models")
    return np.stack(rows)


def raw_weights(inputs: Any, tokenizer: WeightTokenizer | None = None, *, max_params: int = 50_000) -> np.ndarray:
    """The raw-weights baseline: every tokenized value of each model, flattened: ``(n_models, n_params)``.

    Values in the tokenizer's layer order (float32 → float64), padding excluded. Models with
    more than ``max_params`` values raise a ``ValueError`` (a linear probe on millions of raw
    weights is neither cheap nor meaningful); :func:`evaluate_zoo_probes` skips the baseline
    with a note instead.
    """
    rows: list[np.ndarray] = []
    keys: list[str] | None = None
    shapes: dict[str, tuple[int, ...]] = {}
    for index, sd in enumerate(_iter_weights(inputs, tokenizer)):
        if keys is None:
            tok = tokenizer if tokenizer is not None else _reference_tokenizer(sd)
            if tok.num_params > max_params:
                raise ValueError(
                    f"the models have {tok.num_params} weights, more than max_params={max_params}: "
                    "the raw-weights baseline is for small models"
                )
            keys = [k for layer in tok.layers for k in layer.keys]
            shapes = {t.key: t.shape for t in tok.tensors if t.role == "tokenized"}
        _check_keys(sd, shapes, index)
        rows.append(np.concatenate([sd[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k in keys]))
    if not rows:
        raise ValueError("raw_weights got no models")
    return np.stack(rows)
