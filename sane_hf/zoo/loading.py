"""Reading a zoo back: :func:`load_zoo` (folder or Hub id), numeric formatting, state_dict iteration,
the zoo's models, and tokenization for SANE (:func:`fit_tokenizer_on_zoo`, :func:`tokenize_zoo`)."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import Array2D, Dataset, DatasetDict, Features
from torch import nn

from sane_hf.state_dict_io import state_dict_from_bytes
from sane_hf.zoo.schema import (
    NUMERIC_COLUMNS,
    SPLITS,
    ZOO_FEATURES,
    ZooConfig,
)

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.tokenization_sane import WeightTokenizer


__all__ = ["load_zoo", "with_numeric_format", "iter_state_dicts", "zoo_model", "fit_tokenizer_on_zoo", "tokenize_zoo"]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _looks_local(text: str) -> bool:
    """True for a path the user surely meant as local: ``./x``, ``/x``, ``~/x``, ``a/b/c``, or ``a/b`` with ``a`` here."""
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def _raise_for_bad_shard(folder: Path, err: BaseException) -> None:
    """Raise a ``ValueError`` naming the first parquet shard of ``folder`` that cannot be read, if any."""
    for shard in sorted((folder / "data").glob("*.parquet")):
        try:
            pq.read_table(shard)
        except Exception as shard_err:  # noqa: BLE001 - arrow raises several types for broken files
            raise ValueError(
                f"zoo shard {shard} is corrupt or truncated ({' '.join(str(shard_err).split())}); rebuild the zoo "
                "(--overwrite) or copy that file again"
            ) from err


def load_zoo(path_or_repo: str | os.PathLike, *, cache_dir: str | None = None, **kwargs: Any) -> DatasetDict:
    """Load a zoo folder (written by :func:`build_zoo` or an importer) or a Hub dataset repo id.

    Always returns the three splits ``train``, ``validation`` and ``test`` (an empty split is an
    empty dataset with the zoo features). ``kwargs`` go to ``datasets.load_dataset`` (e.g.
    ``revision``, ``token``).
    """
    import datasets

    path = Path(path_or_repo)
    if path.is_dir():
        try:
            if not (path / "README.md").exists():
                files = {s: sorted(str(p) for p in (path / "data").glob(f"{s}-*.parquet")) for s in SPLITS}
                files = {s: f for s, f in files.items() if f}
                if not files:
                    raise FileNotFoundError(
                        f"{path} holds no README.md and no data/<split>-*.parquet: not a zoo folder"
                    )
                zoo = datasets.load_dataset("parquet", data_files=files, cache_dir=cache_dir, **kwargs)
            else:
                zoo = datasets.load_dataset(str(path.resolve()), cache_dir=cache_dir, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as err:  # datasets wraps a broken shard in errors that name no file: find it
            _raise_for_bad_shard(path, err)
            raise
    elif path.exists() or _looks_local(str(path_or_repo)):
        what = "is a file, not a zoo folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"zoo folder {path} {what} (a Hub dataset id looks like 'user/name')")
    else:
        zoo = datasets.load_dataset(str(path_or_repo), cache_dir=cache_dir, **kwargs)
    if not isinstance(zoo, DatasetDict):  # pragma: no cover - split= was passed
        return zoo
    out = DatasetDict()
    for split in SPLITS:
        out[split] = zoo[split] if split in zoo else Dataset.from_dict(
            {k: [] for k in ZOO_FEATURES}, features=ZOO_FEATURES
        )
    for split in zoo:
        if split not in out:
            out[split] = zoo[split]
    return out


def with_numeric_format(dataset: Dataset, type: str = "torch", columns: Sequence[str] | None = None) -> Dataset:
    """Format the numeric columns as ``type`` and keep the rest (weights bytes, strings) as Python.

    Formatting a binary column as numpy/torch strips its trailing NUL bytes (corrupting the
    safetensors blob); this leaves it alone.
    """
    if columns is None:
        columns = [c for c in dataset.column_names if c in NUMERIC_COLUMNS or c in ("tokens", "positions", "mask")]
    return dataset.with_format(type, columns=list(columns), output_all_columns=True)


def iter_state_dicts(split: Dataset, batch_size: int = 64) -> Iterator[OrderedDict[str, torch.Tensor]]:
    """The state_dicts of a zoo split, in row order (reads only the ``weights`` column)."""
    weights = split.select_columns(["weights"]).with_format(None)
    for start in range(0, len(weights), batch_size):
        for blob in weights[start : start + batch_size]["weights"]:
            yield state_dict_from_bytes(blob)


def zoo_model(config: ZooConfig, row: Mapping[str, Any]) -> nn.Module:
    """The architecture instance for a zoo ``row`` (its activation and dropout), weights loaded strictly."""
    from sane_hf.zoo.architectures import create_model, list_architectures

    if config.arch_entrypoint:  # the user's architecture (sane_hf.zoo.custom)
        from sane_hf.zoo.custom import architecture_builder

        module = architecture_builder(config)()
        module.load_state_dict(state_dict_from_bytes(row["weights"]), strict=True)
        return module.eval()
    arch = row.get("arch", config.arch)
    if arch not in list_architectures():
        raise ValueError(
            f"architecture {arch!r} of this zoo is not in the registry {list_architectures()}; "
            "import the zoo with --arch module:callable (your function returning the nn.Module), or use "
            "state_dict_from_bytes(row['weights']) with your own module"
        )
    dropout = row.get("dropout", 0.0)
    dropout = 0.0 if dropout is None or not math.isfinite(float(dropout)) else float(dropout)
    activation = row.get("activation") or "relu"
    if activation == "unknown":
        activation = "relu"
    module = create_model(arch, activation=activation, dropout=dropout, init="default", **config.model_kwargs())
    module.load_state_dict(state_dict_from_bytes(row["weights"]), strict=True)
    return module.eval()


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------


def check_single_architecture(zoo: Mapping[str, Any] | Dataset,
                              why: str = "a WeightTokenizer covers one architecture") -> None:
    """Raise a ValueError naming the architectures when the zoo (splits or one split) mixes several."""
    splits = [zoo] if isinstance(zoo, Dataset) else list(zoo.values())
    archs: set[str] = set()
    for split in splits:
        if "arch" in split.column_names and len(split):
            archs.update(split.unique("arch"))
    if len(archs) > 1:
        raise ValueError(
            f"the zoo mixes architectures {sorted(archs)}; {why}: "
            "filter the zoo first (zoo.filter(lambda r: r['arch'] == ...))"
        )


def fit_tokenizer_on_zoo(
    zoo: DatasetDict | Dataset,
    token_size: int = 64,
    *,
    split: str = "train",
    include_norm_stats: bool = True,
    max_models: int | None = None,
) -> WeightTokenizer:
    """A :class:`WeightTokenizer` for the zoo's architecture, normalisation fitted on ``split``.

    ``max_models`` limits the fit to the first checkpoints of that many rows (None = all rows).
    """
    from sane_hf.tokenization_sane import WeightTokenizer

    check_single_architecture(zoo)
    data = zoo[split] if isinstance(zoo, DatasetDict) else zoo
    if len(data) == 0:
        raise ValueError(f"split {split!r} is empty: nothing to fit the tokenizer on")
    if max_models is not None:
        data = data.select(range(min(max_models, len(data))))
    reference = state_dict_from_bytes(data[0]["weights"])
    tokenizer = WeightTokenizer.from_reference(reference, token_size=token_size, include_norm_stats=include_norm_stats)
    return tokenizer.fit(iter_state_dicts(data))


def tokenize_zoo(
    zoo: DatasetDict | Dataset,
    tokenizer: WeightTokenizer,
    normalize: bool = True,
    batch_size: int = 64,
    *,
    keep_weights: bool = True,
    num_proc: int | None = None,
) -> DatasetDict | Dataset:
    """Add ``tokens`` ``(N, d)`` float32, ``positions`` ``(N, 3)`` int32 and ``mask`` ``(N, d)`` bool.

    Uses ``tokenizer.encode_batch`` in a batched ``Dataset.map``. Every row must be of the
    tokenizer's architecture (a clear ``ValueError`` otherwise). ``normalize=True`` needs a
    fitted tokenizer (:func:`fit_tokenizer_on_zoo` or ``tokenizer.fit``). With
    ``keep_weights=False`` the ``weights`` column is dropped.
    """
    check_single_architecture(zoo)
    if normalize and not tokenizer.is_fitted:
        raise ValueError(
            "tokenize_zoo(normalize=True) needs a fitted tokenizer: call fit_tokenizer_on_zoo(zoo, ...) "
            "or tokenizer.fit(iter_state_dicts(zoo['train'])) first, or pass normalize=False"
        )
    n, d = tokenizer.num_tokens, tokenizer.token_size

    def encode(batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        sds = [state_dict_from_bytes(b) for b in batch["weights"]]
        try:
            out = tokenizer.encode_batch(sds, normalize=normalize)
        except (ValueError, TypeError) as err:
            ids = batch.get("model_id", ["?"])
            raise ValueError(
                f"zoo rows (model_id {ids[0]}…) do not fit the tokenizer's architecture: {err}"
            ) from err
        return {
            "tokens": out.tokens.numpy(),  # (B, N, d)
            "positions": out.positions.to(torch.int32).numpy(),  # (B, N, 3)
            "mask": out.mask.numpy(),  # (B, N, d)
        }

    def features_for(ds: Dataset) -> Features:
        feats = ds.features.copy()
        feats["tokens"] = Array2D((n, d), "float32")
        feats["positions"] = Array2D((n, 3), "int32")
        feats["mask"] = Array2D((n, d), "bool")
        if not keep_weights:
            del feats["weights"]
        return feats

    def run(ds: Dataset) -> Dataset:
        if len(ds) == 0:
            empty = {k: [] for k in features_for(ds)}
            return Dataset.from_dict(empty, features=features_for(ds))
        return ds.with_format(None).map(
            encode,
            batched=True,
            batch_size=batch_size,
            writer_batch_size=batch_size,
            features=features_for(ds),
            remove_columns=None if keep_weights else ["weights"],
            num_proc=num_proc,
            desc="tokenizing",
        )

    if isinstance(zoo, DatasetDict):
        return DatasetDict({name: run(ds) for name, ds in zoo.items()})
    return run(zoo)
