"""The lab's loaders, on tiny files written in the real formats (IDX, CIFAR-10 python batches)."""

import gzip
import pickle
import random
import struct

import numpy as np
import pytest
import torch

from normkit.errors import ConfigError
from normkit.lab import datasets
from normkit.lab.datasets import (
    FASHION_MNIST_FILES,
    DatasetFormatError,
    DatasetNotFoundError,
    load_dataset,
    read_idx,
    split_validation,
    subset,
)


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """An IDX file as LeCun describes it: 0, 0, type code, ndim, big-endian dims, C-order data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


def write_fashion_mnist(root, train: int = 120, test: int = 60, seed: int = 0):
    """Four IDX .gz files shaped like Fashion-MNIST's; each class is a bright band at its own row."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = []
    for count in (train, test):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = rng.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label] = 255
        arrays += [images, labels]
    for name, array in zip(FASHION_MNIST_FILES, arrays, strict=True):
        write_idx(root / name, array)
    return arrays


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.delenv("NORMKIT_DATA", raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, ">i4", ">f4"])
def test_read_idx_round_trips(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 5) * 7 % 251).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x99\x01\x00\x00\x00\x02ab"))
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")
    short = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"12345"
    (tmp_path / "short").write_bytes(short)
    with pytest.raises(DatasetFormatError, match="promises shape"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_data_dir_and_environment(tmp_path, no_system_data, monkeypatch):
    x_train, y_train, x_test, y_test = write_fashion_mnist(tmp_path / "fashion-mnist")
    data = load_dataset("fashion-mnist", tmp_path / "fashion-mnist")
    assert data.x_train.shape == (120, 1, 28, 28) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (60, 1, 28, 28)
    np.testing.assert_array_equal(data.x_train[:, 0].numpy(), x_train / np.float32(255.0))
    np.testing.assert_array_equal(data.y_test.numpy(), y_test)
    assert data.source == str(tmp_path / "fashion-mnist") and not data.notes
    # a root holding a fashion-mnist/ folder, found through NORMKIT_DATA
    monkeypatch.setenv("NORMKIT_DATA", str(tmp_path))
    assert load_dataset("fashion-mnist").source == str(tmp_path / "fashion-mnist")
    assert load_dataset("auto").name == "fashion-mnist"


def test_missing_fashion_mnist_says_where_and_how(tmp_path, no_system_data):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("fashion-mnist", tmp_path / "empty")
    message = str(error.value)
    assert str(tmp_path / "empty") in message and "not-installed" in message
    assert "apt-get install dataset-fashion-mnist" in message and "NORMKIT_DATA" in message


def test_auto_falls_back_to_digits_and_says_so(tmp_path, no_system_data):
    data = load_dataset("auto", tmp_path / "empty")
    assert data.name == "digits" and data.x_train.shape[1:] == (1, 8, 8)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert any("Fashion-MNIST was not found" in note for note in data.notes)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="fashion-mnist, digits, mnist1d"):
        load_dataset("imagenet")


def _cifar_batch(path, count, seed):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"test",
        b"labels": [int(v) for v in rng.integers(0, 10, count)],
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * count,
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def test_cifar10_python_batches(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMKIT_DATA", raising=False)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [_cifar_batch(root / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test = _cifar_batch(root / "test_batch", 3, 9)
    data = load_dataset("cifar10", tmp_path)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    expected = batches[0][b"data"][1].reshape(3, 32, 32) / np.float32(255.0)
    np.testing.assert_array_equal(data.x_train[1].numpy(), expected)
    assert data.y_test.tolist() == test[b"labels"]


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    root = tmp_path
    for name in datasets.CIFAR10_FILES:
        (root / name).write_bytes(pickle.dumps({b"data": random.Random}, protocol=2))
    with pytest.raises(DatasetFormatError, match="refusing to unpickle"):
        load_dataset("cifar10", root)


def test_missing_cifar10_says_how(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMKIT_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)


def test_mnist1d_is_generated_locally_and_leaves_global_randomness_alone():
    random.seed(5)
    np.random.seed(5)
    before = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    data = load_dataset("mnist1d")
    after = (random.random(), np.random.rand())
    assert before == after
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert sorted(data.y_train.unique().tolist()) == list(range(10))


def test_subset_and_validation_split_are_balanced_disjoint_and_seeded(tmp_path, no_system_data):
    data = load_dataset("digits")
    small = subset(data, 100, seed=3)
    assert len(small.y_train) == 100 and torch.bincount(small.y_train).tolist() == [10] * 10
    assert torch.equal(subset(data, 100, seed=3).x_train, small.x_train)
    assert not torch.equal(subset(data, 100, seed=4).x_train, small.x_train)
    split = split_validation(data, 200, seed=0)
    assert len(split.y_val) == 200 and len(split.y_train) == len(data.y_train) - 200
    assert torch.bincount(split.y_val).min() >= 19
    # together the two parts are the original training set: same labels, same pixel sums
    pixels = torch.cat([split.x_train, split.x_val]).double().sum(0)
    torch.testing.assert_close(pixels, data.x_train.double().sum(0))
    merged = torch.cat([split.y_train, split.y_val]).sort().values
    assert torch.equal(merged, data.y_train.sort().values)
