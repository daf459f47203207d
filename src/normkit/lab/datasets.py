"""Where the lab's data sets live; nothing here downloads anything.

- Fashion-MNIST: the four standard IDX ``.gz`` files, from Debian's ``dataset-fashion-mnist`` package
  (/usr/share/datasets/fashion-mnist), ``$NORMKIT_DATA`` or an explicit directory.
- The 8x8 digits that ship inside scikit-learn (1,797 images).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_candidates(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for Fashion-MNIST, in order."""
    candidates = []
    if data_dir is not None:
        candidates += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    if os.environ.get("NORMKIT_DATA"):
        root = Path(os.environ["NORMKIT_DATA"])
        candidates += [root, root / "fashion-mnist"]
    candidates.append(DEBIAN_FASHION_MNIST)
    return candidates


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first candidate directory holding all four Fashion-MNIST files, or None."""
    for candidate in fashion_mnist_candidates(data_dir):
        if all((candidate / name).is_file() for name in FASHION_MNIST_FILES):
            return candidate
    return None


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 8x8 digits as float32 arrays scaled to [0, 1], split into train and test.

    Returns ``(x_train, y_train, x_test, y_test)``; the split is stratified and seeded.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test
