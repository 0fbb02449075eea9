"""scikit-learn's bundled data sets a sweep or tune trains on by default (`--dataset`), split three ways.

Each keeps a small training split that a wide network overfits without L2;
the rest splits in halves, stratified, into validation (where λ is chosen)
and test (only reported).

Example:

>>> from keras_l2.search.datasets import bundled
>>> data = bundled("wine")
>>> len(data.x_train), len(data.x_val), len(data.x_test), data.classes
(60, 59, 59, 3)
"""

from __future__ import annotations

import numpy as np

from keras_l2._checks import check_dataset
from keras_l2.search.data import SweepData


def all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 of scikit-learn's digits: pixels scaled to [0, 1] and one-hot labels, float32."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype("float32"), np.eye(10, dtype="float32")[bunch.target]


def digits(train_size: int = 200, seed: int = 0) -> SweepData:
    """scikit-learn's bundled handwritten digits (8x8, 10 classes, 1797 images), split three ways.

    A small training set (`train_size` images) that a wide network overfits
    without L2; the rest split in halves into validation (where lambda is
    chosen) and test (reported, never chosen on). Every split is stratified.
    """
    x, y = all_digits()
    return _three_way(x, y, train_size, seed, "digits")


def wine(train_size: int = 60, seed: int = 0) -> SweepData:
    """scikit-learn's bundled wine data (13 features, 3 classes, 178 samples), split three ways like `digits`.

    Features are standardized with the training split's mean and spread (the
    raw ones differ by three orders of magnitude).
    """
    from sklearn.datasets import load_wine

    bunch = load_wine()
    data = _three_way(bunch.data.astype("float64"), np.eye(3, dtype="float32")[bunch.target], train_size, seed, "wine")
    mean, std = data.x_train.mean(axis=0), data.x_train.std(axis=0) + 1e-12
    for split in ("train", "val", "test"):
        setattr(data, f"x_{split}", ((getattr(data, f"x_{split}") - mean) / std).astype("float32"))
    return data


def bundled(name: str, train_size: int | None = None, seed: int = 0) -> SweepData:
    """One of `DATASETS` by name, with its default training size unless `train_size` is given."""
    loaders = {"digits": digits, "wine": wine}
    name = check_dataset(name)
    return loaders[name](seed=seed) if train_size is None else loaders[name](train_size, seed)


def _three_way(x, y, train_size: int, seed: int, name: str) -> SweepData:
    from sklearn.model_selection import train_test_split

    labels = y.argmax(axis=1)
    if not 0 < train_size <= len(x) - 2 * y.shape[1]:
        raise ValueError(f"--train-size: {train_size} does not leave a validation and a test split of the "
                         f"{len(x)} {name} examples (allowed: 1 to {len(x) - 2 * y.shape[1]})")
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, train_size=train_size, stratify=labels,
                                                        random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest.argmax(axis=1),
                                                    random_state=seed)
    return SweepData(x_train, y_train, x_val, y_val, x_test=x_test, y_test=y_test,
                     name=f"{name} (train {len(x_train)}, val {len(x_val)}, test {len(x_test)})")
