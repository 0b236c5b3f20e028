"""Training data for SANE: random windows of tokenized zoos, with two augmented views each.

:class:`ZooWindowDataset` serves windows of ``window_size`` tokens cut from the rows of a
tokenized zoo split (what :func:`~sane_hf.zoo.dataset.tokenize_zoo` returns). Each item is one
window of one checkpoint; every item draws its own random offset, positions stay absolute (the
window keeps its ``(n, l, k)`` from the tokenizer), and ``windows_per_sample`` windows of every
checkpoint are served per epoch (oversampling). Each window comes as two views for the contrastive
loss, each made of

1. a **permutation view**: a random function-preserving permutation of the whole network
   (:mod:`sane_hf.alignment`), re-tokenized, then windowed — so the model is taught that
   permuted networks are the same network;
2. **multiplicative Gaussian noise** ``x · (1 + σ·ε)`` on the values;
3. **random erasing** of a rectangle of the ``(window, token_size)`` value grid (as torchvision's
   ``RandomErasing``: area 2–33 %, aspect ratio 0.3–3.3, erased to 0).

The reconstruction target of each view (``labels`` / ``labels_2``) is its *un-noised but
permuted* tokens, i.e. step 1 without steps 2–3.

Fast permutation views
----------------------
A permutation moves values within a layer, and per-layer normalisation commutes with it, so it
acts on the flat token tensor of *any* model of one architecture as the same gather:
``permuted.flatten() == tokens.flatten()[index]``. :class:`PermutationBank` precomputes ``K``
such index maps per **architecture** (not per sample — the reference implementation stored 201
permuted, tokenized copies of every checkpoint, which does not fit at ResNet scale). A map is
found by encoding an "identity" state_dict whose values are their own indices, permuting it with
:func:`~sane_hf.alignment.apply_permutation` and encoding it again: the value found at a slot is
the slot it came from. Indices are exact in float32 up to 2^24 parameters; larger models are
encoded as two exact parts (``id // 4096`` and ``id % 4096``), up to 2^36 parameters. Padding slots map to themselves
(padding is 0 in every token tensor). A bank of ``K`` maps costs ``K · N · d`` int32 (ResNet-18
at ``d = 64``: ~48 MB per map), and a permuted view of any window is then one gather of
``window · d`` values.

Reading
-------
The token columns are read straight from the dataset's (memory-mapped) Arrow table as zero-copy
numpy views of one row: a window reads ``window · d`` values, a permuted window gathers them from
the row's layers — the zoo is never loaded into RAM, and no row is converted in full. Only the
numeric columns ``tokens``, ``positions`` and ``mask`` are touched (binary ``weights`` columns
lose trailing NUL bytes under ``with_format``; they are never formatted here).

Randomness is a pure function of ``(seed, epoch, index)`` (a ``numpy`` ``SeedSequence`` per
item), so an epoch's windows do not depend on the number of data-loader workers, and a resumed
run sees exactly the windows an uninterrupted run would.

Example::

    >>> from sane_hf.data import Augmentation, ZooWindowDataset, collate_windows  # doctest: +SKIP
    >>> ds = ZooWindowDataset(tokenized["train"], window_size=32, windows_per_sample=4,
    ...                       augmentation=Augmentation(noise_std=0.05), bank=bank)
    >>> batch = collate_windows([ds[0], ds[1]])
    >>> sorted(batch)
    ['labels', 'labels_2', 'mask', 'positions', 'sample_index', 'tokens', 'tokens_2', 'window_start']
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from sane_hf.alignment import PermutationSpec
    from sane_hf.tokenization_sane import WeightTokenizer

__all__ = [
    "TOKEN_COLUMNS",
    "MODEL_INPUT_NAMES",
    "Augmentation",
    "PermutationBank",
    "ZooWindowDataset",
    "EpochSampler",
    "collate_windows",
    "token_shape",
]

#: The numeric columns this module reads (``tokenize_zoo`` output).
TOKEN_COLUMNS = ("tokens", "positions", "mask")
#: Batch keys that are :meth:`SaneModel.forward` arguments (the rest is bookkeeping).
MODEL_INPUT_NAMES = (
    "tokens", "positions", "mask", "attention_mask", "tokens_2", "labels", "labels_2",
)  # fmt: skip

_EXACT_FLOAT_IDS = 2**24  # float32 holds every integer up to here exactly
_ID_SPLIT = 4096  # beyond: index = hi * 4096 + lo, both parts exact in float32 up to 2^36 parameters
_ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing defaults (as the SANE reference)
_ERASE_RATIO = (0.3, 3.3)


# ----------------------------------------------------------------------------------------------
# augmentation settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """Value augmentations of a view (the permutation view is the :class:`PermutationBank`).

    Attributes:
        noise_std: σ of the multiplicative Gaussian noise ``x · (1 + σ·ε)``; 0 disables it.
        erase_prob: probability of erasing one random rectangle of the ``(window, d)`` grid.
        permutation_prob: probability that a view is permuted (when a bank is given); a view
            draws one of the bank's maps uniformly, otherwise it keeps the identity.
    """

    noise_std: float = 0.05
    erase_prob: float = 0.5
    permutation_prob: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        for name in ("erase_prob", "permutation_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @classmethod
    def none(cls) -> Augmentation:
        """No augmentation at all (clean views)."""
        return cls(noise_std=0.0, erase_prob=0.0, permutation_prob=0.0)


# ----------------------------------------------------------------------------------------------
# permutation bank
# ----------------------------------------------------------------------------------------------


class PermutationBank:
    """``K`` precomputed gather maps, one per random permutation of an architecture.

    ``index_maps[j]`` is a flat ``(N·d,)`` index with ``permuted.flatten() == tokens.flatten()[index_maps[j]]``
    for the tokens of *every* network of the tokenizer's architecture, normalised or not.

    Args:
        index_maps: ``(K, N·d)`` integer maps.
        num_tokens, token_size: ``N`` and ``d``.
    """

    def __init__(self, index_maps: np.ndarray | Tensor, num_tokens: int, token_size: int):
        maps = index_maps.numpy() if isinstance(index_maps, Tensor) else np.asarray(index_maps)
        if maps.ndim != 2 or maps.shape[1] != num_tokens * token_size:
            raise ValueError(
                f"index_maps must have shape (K, {num_tokens * token_size}) for {num_tokens} tokens of size "
                f"{token_size}, got {maps.shape}"
            )
        self.index_maps = np.ascontiguousarray(maps)
        self.num_tokens = int(num_tokens)
        self.token_size = int(token_size)

    def __len__(self) -> int:
        return self.index_maps.shape[0]

    def __repr__(self) -> str:
        return f"PermutationBank(num_permutations={len(self)}, num_tokens={self.num_tokens}, token_size={self.token_size})"

    @property
    def nbytes(self) -> int:
        return int(self.index_maps.nbytes)

    @classmethod
    def build(
        cls,
        tokenizer: WeightTokenizer,
        spec: PermutationSpec,
        num_permutations: int = 16,
        seed: int = 0,
    ) -> PermutationBank:
        """Draw ``num_permutations`` random permutations of ``spec`` and turn each into a gather map.

        ``spec`` must describe the tokenizer's architecture (same keys and shapes).
        """
        from sane_hf.alignment import apply_permutation, random_permutations

        if num_permutations < 1:
            raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
        n, d = tokenizer.num_tokens, tokenizer.token_size
        template = tokenizer.decode(torch.zeros(n, d))  # every key with the reference's shape
        tokenized = [t.key for t in tokenizer.tensors if t.role == "tokenized"]
        ids: dict[str, Tensor] = {}
        start = 0
        for key in tokenized:
            numel = template[key].numel()
            ids[key] = torch.arange(start, start + numel, dtype=torch.int64).reshape(template[key].shape)
            start += numel
        try:
            spec.validate(template)
        except ValueError as err:
            raise ValueError(f"the permutation spec does not fit the tokenizer's architecture: {err}") from err
        unknown = set(spec.key_shapes) - set(template) if spec.shapes else set()
        if unknown:
            raise ValueError(f"the permutation spec names keys the tokenizer does not know: {sorted(unknown)[:5]}")

        mask = tokenizer.encode(template).mask.reshape(-1)  # (N*d,)
        # ids below 2^24 are exact in float32: one encode; beyond, two exact parts (hi, lo)
        splits = [lambda t: t] if start <= _EXACT_FLOAT_IDS else [lambda t: t // _ID_SPLIT, lambda t: t % _ID_SPLIT]

        def encode_ids(id_sd: Mapping[str, Tensor]) -> np.ndarray:
            """Flat ``(N·d,)`` int64: the id held at each slot (padding: -1)."""
            flat = torch.zeros(n * d, dtype=torch.int64)
            for fn in splits:
                sd = {k: (fn(id_sd[k]).to(torch.float32) if k in id_sd else v) for k, v in template.items()}
                flat = flat * _ID_SPLIT + tokenizer.encode(sd).tokens.reshape(-1).to(torch.int64)
            return torch.where(mask, flat, torch.full_like(flat, -1)).numpy()

        base = encode_ids(ids)
        real = base >= 0
        slot_of_id = np.empty(start, dtype=np.int64)
        slot_of_id[base[real]] = np.flatnonzero(real)
        index_dtype = np.int32 if n * d < 2**31 else np.int64
        generator = torch.Generator().manual_seed(int(seed))
        identity = np.arange(n * d, dtype=index_dtype)
        maps = np.empty((num_permutations, n * d), dtype=index_dtype)
        for j in range(num_permutations):
            perms = random_permutations(spec, generator)
            permuted = apply_permutation({**template, **ids}, spec, perms)
            held = encode_ids({k: permuted[k] for k in ids})
            if not np.array_equal(held >= 0, real):  # pragma: no cover - permutations keep the padding layout
                raise RuntimeError("a permutation moved values into padding; the spec and tokenizer disagree")
            maps[j] = identity
            maps[j, real] = slot_of_id[held[real]]
        return cls(maps, n, d)

    def gather(self, flat: np.ndarray, which: int | None, start: int, end: int) -> np.ndarray:
        """Tokens ``start:end`` of permutation ``which`` (None = identity) of one network's flat ``(N·d,)`` values.

        Returns ``(end - start, d)`` (a fresh array).
        """
        d = self.token_size
        if which is None:
            return np.array(flat[start * d : end * d]).reshape(end - start, d)
        index = self.index_maps[which, start * d : end * d]
        return flat[index].reshape(end - start, d)

    def permute(self, tokens: Tensor, which: int | None) -> Tensor:
        """Permutation ``which`` of full tokens ``(N, d)`` or ``(B, N, d)`` (a new tensor)."""
        if tokens.shape[-2:] != (self.num_tokens, self.token_size):
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not match the bank's ({self.num_tokens}, {self.token_size})"
            )
        if which is None:
            return tokens.clone()
        index = torch.from_numpy(self.index_maps[which].astype(np.int64)).to(tokens.device)
        flat = tokens.reshape(*tokens.shape[:-2], -1)  # (..., N*d)
        return flat[..., index].reshape(tokens.shape)


# ----------------------------------------------------------------------------------------------
# Arrow access
# ----------------------------------------------------------------------------------------------


def token_shape(dataset: datasets.Dataset) -> tuple[int, int]:
    """``(N, d)`` of a tokenized split: from its ``Array2D`` feature, else from its first row."""
    missing = [c for c in TOKEN_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the dataset has no {missing} column(s): it is not tokenized; run "
            "sane_hf.zoo.dataset.tokenize_zoo(zoo, tokenizer) first"
        )
    feature = dataset.features["tokens"]
    shape = getattr(feature, "shape", None)
    if shape is not None and None not in shape:
        return int(shape[0]), int(shape[1])
    if len(dataset) == 0:
        raise ValueError("cannot tell the token shape of an empty dataset")
    row = np.asarray(dataset.select_columns(["tokens"]).with_format("numpy")[0]["tokens"])
    return int(row.shape[0]), int(row.shape[1])


class _ArrowRows:
    """Zero-copy flat numpy views of one Array2D / list-of-lists column, row by row."""

    def __init__(self, dataset: datasets.Dataset, column: str):
        self.dataset = dataset
        self.column = column
        self._chunks: list[tuple[np.ndarray, np.ndarray, pa.Array]] | None = None
        self._starts: list[int] = []

    def __getstate__(self) -> dict[str, Any]:  # workers rebuild the views from the (picklable) dataset
        return {"dataset": self.dataset, "column": self.column, "_chunks": None, "_starts": []}

    def _load(self) -> list[tuple[np.ndarray, np.ndarray, pa.Array]]:
        if self._chunks is None:
            chunks, starts, total = [], [], 0
            for chunk in self.dataset.data.column(self.column).chunks:
                storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
                if not (pa.types.is_list(storage.type) or pa.types.is_large_list(storage.type)):
                    raise TypeError(f"column {self.column!r} is {storage.type}, expected a list of lists (Array2D)")
                inner = storage.values  # (all rows' tokens) list<value>
                outer_offsets = storage.offsets.to_numpy()  # row -> token range in `inner`
                inner_offsets = inner.offsets.to_numpy()  # token -> value range in `inner.values`
                chunks.append((outer_offsets, inner_offsets, inner.values))
                starts.append(total)
                total += len(storage)
            self._chunks, self._starts = chunks, starts
        return self._chunks

    def flat(self, row: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values ``start:stop`` of the row's flat ``(N·d,)`` values (default: all of them).

        A zero-copy view of the memory-mapped data for numeric types; booleans (bit-packed in
        Arrow) are converted, so only the requested range is.
        """
        chunks = self._load()
        c = bisect.bisect_right(self._starts, row) - 1
        outer, inner, values = chunks[c]
        j = row - self._starts[c]
        lo, hi = int(inner[outer[j]]), int(inner[outer[j + 1]])
        stop = hi - lo if stop is None else min(stop, hi - lo)
        piece = values.slice(lo + start, max(0, stop - start))
        if pa.types.is_boolean(piece.type):
            return piece.to_numpy(zero_copy_only=False)
        return piece.to_numpy(zero_copy_only=True)


# ----------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------


class ZooWindowDataset(TorchDataset):
    """Random windows of the checkpoints of one tokenized zoo split, as two augmented views.

    Item ``i`` is window ``i % windows_per_sample`` of row ``i // windows_per_sample``. Its offset
    is drawn uniformly in ``[0, N - window_size]`` from a generator seeded with
    ``(seed, epoch, i)``; call :meth:`set_epoch` once per epoch for fresh windows.

    Args:
        dataset: a tokenized split (``tokens`` ``(N, d)``, ``positions`` ``(N, 3)``, ``mask``
            ``(N, d)`` per row, as :func:`~sane_hf.zoo.dataset.tokenize_zoo` writes), one architecture.
        window_size: tokens per window; must be ``<= N``.
        windows_per_sample: windows of each checkpoint per epoch.
        augmentation: noise, erasing and permutation probability (default: :class:`Augmentation` ()).
        bank: permutation maps of the architecture; None = no permutation views.
        two_views: return ``tokens_2``/``labels_2`` (the contrastive pair); False gives one view.
        clean_first_view: the first view is the plain window (no permutation, noise or erasing) —
            used for validation, so reconstruction metrics measure the clean input.
        seed: base seed of the windows and augmentations.

    Items are dicts of tensors: ``tokens``, ``labels`` ``(W, d)`` float32, ``positions``
    ``(W, 3)`` int64, ``mask`` ``(W, d)`` bool, [``tokens_2``, ``labels_2``], and the ints
    ``sample_index`` (row) and ``window_start``.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        window_size: int,
        windows_per_sample: int = 1,
        augmentation: Augmentation | None = None,
        bank: PermutationBank | None = None,
        *,
        two_views: bool = True,
        clean_first_view: bool = False,
        seed: int = 0,
    ):
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if windows_per_sample < 1:
            raise ValueError(f"windows_per_sample must be >= 1, got {windows_per_sample}")
        if len(dataset) == 0:
            raise ValueError("the dataset split is empty: no checkpoint to cut windows from")
        num_tokens, token_size = token_shape(dataset)
        if window_size > num_tokens:
            raise ValueError(
                f"window_size {window_size} is larger than the sequences of this zoo ({num_tokens} tokens of size "
                f"{token_size} per checkpoint); use a window of at most {num_tokens} tokens "
                "(SaneConfig.window_size) or a smaller token size"
            )
        if bank is not None and (bank.num_tokens, bank.token_size) != (num_tokens, token_size):
            raise ValueError(
                f"the permutation bank is for ({bank.num_tokens}, {bank.token_size}) tokens but the dataset holds "
                f"({num_tokens}, {token_size})"
            )
        if getattr(dataset, "_indices", None) is not None:  # rows selected/shuffled: make row i physical row i
            dataset = dataset.flatten_indices()
        self.dataset = dataset
        self.num_tokens, self.token_size = num_tokens, token_size
        self.window_size = int(window_size)
        self.windows_per_sample = int(windows_per_sample)
        self.augmentation = augmentation if augmentation is not None else Augmentation()
        self.bank = bank
        self.two_views = two_views
        self.clean_first_view = clean_first_view
        self.seed = int(seed)
        self.epoch = 0
        self._tokens = _ArrowRows(dataset, "tokens")
        self._positions = _ArrowRows(dataset, "positions")
        self._mask = _ArrowRows(dataset, "mask")

    def __len__(self) -> int:
        return len(self.dataset) * self.windows_per_sample

    def set_epoch(self, epoch: int) -> None:
        """Select the windows and augmentations of ``epoch``."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Checkpoints (rows) in the split."""
        return len(self.dataset)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, int(index)))

    def _view(self, flat: np.ndarray, start: int, rng: np.random.Generator, clean: bool) -> tuple[np.ndarray, np.ndarray]:
        """(augmented view, its target) of window ``start`` — both ``(W, d)`` float32."""
        aug = self.augmentation
        which = None
        if not clean and self.bank is not None and aug.permutation_prob > 0 and rng.random() < aug.permutation_prob:
            which = int(rng.integers(len(self.bank)))
        end = start + self.window_size
        if self.bank is not None:
            target = self.bank.gather(flat, which, start, end)
        else:
            d = self.token_size
            target = np.array(flat[start * d : end * d]).reshape(self.window_size, d)
        if clean:
            return target, target
        view = target
        if aug.noise_std > 0:
            noise = rng.standard_normal(target.shape, dtype=np.float32)
            view = target * (1.0 + np.float32(aug.noise_std) * noise)  # padding (0) stays 0
        if aug.erase_prob > 0 and rng.random() < aug.erase_prob:
            view = view.copy() if view is target else view
            _erase(view, rng)
        return view, target

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        row = index // self.windows_per_sample
        rng = self._rng(index)
        start = int(rng.integers(0, self.num_tokens - self.window_size + 1))
        end = start + self.window_size
        d = self.token_size
        flat = self._tokens.flat(row)
        positions = self._positions.flat(row, start * 3, end * 3).reshape(self.window_size, 3)
        mask = self._mask.flat(row, start * d, end * d).reshape(self.window_size, d)
        view, target = self._view(flat, start, rng, clean=self.clean_first_view)
        item: dict[str, Any] = {
            "tokens": torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32)),
            "positions": torch.from_numpy(positions.astype(np.int64)),
            "mask": torch.from_numpy(np.array(mask, dtype=bool)),
            "labels": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "sample_index": row,
            "window_start": start,
        }
        if self.two_views:
            view_2, target_2 = self._view(flat, start, rng, clean=False)
            item["tokens_2"] = torch.from_numpy(np.ascontiguousarray(view_2, dtype=np.float32))
            item["labels_2"] = torch.from_numpy(np.ascontiguousarray(target_2, dtype=np.float32))
        return item


def _erase(values: np.ndarray, rng: np.random.Generator) -> None:
    """Zero one random rectangle of the ``(W, d)`` grid in place (torchvision RandomErasing's recipe)."""
    height, width = values.shape
    area = height * width
    log_ratio = (math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_ERASE_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * ratio)))
        w = int(round(math.sqrt(target / ratio)))
        if 0 < h <= height and 0 < w <= width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            values[top : top + h, left : left + w] = 0.0
            return


# ----------------------------------------------------------------------------------------------
# sampling and collation
# ----------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """A reproducible order: a permutation seeded by ``(seed, epoch)`` (or ``range`` without shuffle).

    Unlike a ``RandomSampler`` it draws nothing from the global RNG, so the order of an epoch
    never depends on what ran before it (what exact resume needs).
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True):
        self.length = int(length)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def collate_windows(items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Stack windows into a batch; windows of unequal length are right-padded.

    Returns ``tokens``/``labels`` [``tokens_2``/``labels_2``] ``(B, W, d)``, ``positions``
    ``(B, W, 3)``, ``mask`` ``(B, W, d)``, ``sample_index``/``window_start`` ``(B,)``, and
    ``attention_mask`` ``(B, W)`` (True on real tokens) only when some window was padded.
    """
    if not items:
        raise ValueError("collate_windows got no items")
    lengths = [int(it["tokens"].shape[0]) for it in items]
    width = max(lengths)
    batch: dict[str, Tensor] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if not isinstance(values[0], Tensor):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        elif min(lengths) == width:
            batch[key] = torch.stack(values)  # (B, W, ...)
        else:
            out = values[0].new_zeros((len(values), width, *values[0].shape[1:]))  # (B, W, ...)
            for i, v in enumerate(values):
                out[i, : v.shape[0]] = v
            batch[key] = out
    if min(lengths) != width:
        attention = torch.zeros(len(items), width, dtype=torch.bool)  # (B, W)
        for i, n in enumerate(lengths):
            attention[i, :n] = True
        batch["attention_mask"] = attention
    return batch
