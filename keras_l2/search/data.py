"""The data of a sweep: an .npz file, the user's arrays or `tf.data` datasets (the bundled ones: `datasets`).

Everything is checked before any run is created. `n` (the λ/n of the penalty)
is always the number of training examples:

- arrays: `len(x_train)`;
- `tf.data.Dataset`s: the training dataset must be batched (yielding `(x, y)`
  batches) with a known, finite cardinality (its number of batches); `n` is
  then counted in one pass over it (the sum of its batch sizes). A dataset of
  unknown or infinite cardinality (e.g. after `filter` or `repeat()`) is
  refused: use `dataset.apply(tf.data.experimental.assert_cardinality(batches))`
  when you know its length.

Example:

>>> import numpy as np
>>> from keras_l2.search import as_sweep_data
>>> data = as_sweep_data((np.zeros((6, 4)), np.arange(6) % 3, np.ones((3, 4)), np.arange(3)))
>>> data.n, data.features, data.classes
(6, 4, 3)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

ARRAY_KEYS = ("x_train", "y_train", "x_val", "y_val")
TEST_KEYS = ("x_test", "y_test")  # optional: a held-out split, never used to choose lambda
_INFINITE = -1  # tf.data.INFINITE_CARDINALITY (UNKNOWN_CARDINALITY is -2)


@dataclasses.dataclass
class SweepData:
    """A classification data set: features and one-hot labels, train and validation, and optionally test.

    Lambda is chosen on the validation split; the test split (when given)
    only reports the chosen lambda's data loss on examples no choice saw.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    name: str
    class_names: tuple | None = None  # the labels of the classes, in column order, when given as strings
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def classes(self) -> int:
        return self.y_train.shape[1]

    @property
    def features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n(self) -> int:
        return len(self.x_train)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.n // batch_size)

    def fit_args(self, batch_size: int) -> dict:
        """The data arguments of `model.fit`."""
        return {"x": self.x_train, "y": self.y_train, "validation_data": (self.x_val, self.y_val),
                "batch_size": batch_size, "validation_batch_size": 512}


@dataclasses.dataclass
class DatasetData:
    """Batched `tf.data` datasets of `(x, y)`, train and validation, with `n` counted once."""

    train: object
    val: object
    n: int
    features: int
    classes: int
    name: str
    batches: int = 0  # batches per epoch of the train dataset
    x_test = y_test = None  # datasets bring no test split

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.batches

    def fit_args(self, batch_size: int) -> dict:
        """The data arguments of `model.fit` (the datasets keep their own batch size and order)."""
        return {"x": self.train, "validation_data": self.val, "shuffle": False}  # Keras cannot shuffle a dataset


# ---------------------------------------------------------------- arrays
def load_npz(path) -> SweepData:
    """Reads `x_train, y_train, x_val, y_val` (and optionally `x_test, y_test`) from an .npz, with clear errors.

    Labels may be integer class ids or strings (1-D), or one-hot rows (2-D).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: no such file {str(path)!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"--data: {str(path)!r} is not a readable .npz file ({error})") from None
    missing = [key for key in ARRAY_KEYS if key not in archive.files]
    if missing:
        raise ValueError(f"--data: {path.name} lacks {missing}; it must hold {list(ARRAY_KEYS)} "
                         f"(found {sorted(archive.files)})")
    present = [key for key in TEST_KEYS if key in archive.files]
    if len(present) == 1:
        raise ValueError(f"--data: {path.name} holds {present[0]} without "
                         f"{(set(TEST_KEYS) - set(present)).pop()}; a test split needs both")
    keys = ARRAY_KEYS + (TEST_KEYS if present else ())
    return check_arrays([archive[key] for key in keys], path.name, "--data")


def check_arrays(arrays, name: str, source: str = "data") -> SweepData:
    """Checks `(x_train, y_train, x_val, y_val[, x_test, y_test])`; returns them as float32 `SweepData`, one-hot.

    `source` starts every error message (the option or argument the arrays came from).
    """
    arrays = [np.asarray(a) for a in arrays]
    if len(arrays) not in (4, 6):
        raise ValueError(f"{source}: expected {', '.join(ARRAY_KEYS)} and optionally {', '.join(TEST_KEYS)}; "
                         f"received {len(arrays)} arrays")
    arrays = dict(zip(ARRAY_KEYS + TEST_KEYS[:len(arrays) - 4], arrays, strict=True))
    splits = ("train", "val", "test")[:len(arrays) // 2]
    for split in splits:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{source}: x_{split} must be a 2-D numeric array (examples, features); "
                             f"got shape {x.shape}, dtype {x.dtype}")
        if len(x) != len(y):
            raise ValueError(f"{source}: x_{split} has {len(x)} examples but y_{split} has {len(y)}")
        if len(x) == 0:
            raise ValueError(f"{source}: x_{split} is empty")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{source}: x_{split} holds NaN or infinite values "
                             f"({int(np.sum(~np.isfinite(x)))} of them)")
        if x.shape[1] != arrays["x_train"].shape[1]:
            raise ValueError(f"{source}: x_train has {arrays['x_train'].shape[1]} features but x_{split} has "
                             f"{x.shape[1]}")
    held_out = [arrays[f"y_{split}"] for split in splits[1:]]
    if len(held_out) == 2 and held_out[0].ndim != held_out[1].ndim:
        raise ValueError(f"{source}: y_val and y_test must both be 1-D class ids or both 2-D one-hot; got "
                         f"{held_out[0].ndim}-D and {held_out[1].ndim}-D")
    # Validation and test labels are read as one (the same classes, the same encoding), then split again.
    y_train, y_held, class_names = _labels(arrays["y_train"], np.concatenate(held_out), source)
    y_train, y_held = _one_hot(y_train, y_held, source)
    x = {split: arrays[f"x_{split}"].astype("float32") for split in splits}
    y_val, y_test = y_held[:len(x["val"])], (y_held[len(x["val"]):] if "test" in x else None)
    sizes = ", ".join(f"{split} {len(x[split])}" for split in splits)
    return SweepData(x["train"], y_train, x["val"], y_val, name=f"{name} ({sizes})", class_names=class_names,
                     x_test=x.get("test"), y_test=y_test)


def _labels(y_train, y_val, source):
    """String labels (1-D) as class ids, in sorted order of the labels; numbers pass unchanged."""
    text = [y.ndim == 1 and y.dtype.kind in "USO" for y in (y_train, y_val)]
    if not any(text):
        return y_train, y_val, None
    if not all(text):
        raise ValueError(f"{source}: y_train and y_val must both hold class labels of one kind; got "
                         f"{y_train.dtype} and {y_val.dtype}")
    try:
        names = np.unique(np.concatenate([y_train, y_val]).astype(str))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: labels must be class ids, one-hot rows or strings ({error})") from None
    return (np.searchsorted(names, y_train.astype(str)), np.searchsorted(names, y_val.astype(str)),
            tuple(str(v) for v in names))


def check_classes(data: SweepData, allow_unseen: bool = False) -> SweepData:
    """Refuses validation classes that the training split lacks (the model cannot learn them), unless allowed."""
    unseen = sorted(set(np.flatnonzero(data.y_val.sum(axis=0))) - set(np.flatnonzero(data.y_train.sum(axis=0))))
    if unseen and not allow_unseen:
        names = [data.class_names[i] if data.class_names else int(i) for i in unseen]
        raise ValueError(f"data: y_val holds class(es) {names} that y_train lacks ({int(data.y_val[:, unseen].sum())}"
                         " validation examples): no lambda can make the model learn them, and they weigh on every "
                         "validation loss alike. Split the data by class (stratified), or allow it with "
                         "--allow-unseen-classes (allow_unseen_classes=True).")
    return data


def _one_hot(y_train, y_val, source):
    if y_train.ndim == 1 and y_val.ndim == 1:
        for split, y in (("train", y_train), ("val", y_val)):
            if not np.issubdtype(y.dtype, np.number) or (not np.issubdtype(y.dtype, np.integer)
                                                       and not np.all(np.mod(y, 1) == 0)):
                raise ValueError(f"{source}: y_{split} must hold integer class ids, string labels or one-hot "
                                 f"rows; got dtype {y.dtype}")
            if y.min() < 0:
                raise ValueError(f"{source}: y_{split} has negative class ids")
        classes = int(max(y_train.max(), y_val.max())) + 1
        if len(np.unique(y_train)) < 2:
            raise ValueError(f"{source}: y_train holds {len(np.unique(y_train))} class; at least 2 are needed")
        eye = np.eye(classes, dtype="float32")
        return eye[y_train.astype(int)], eye[y_val.astype(int)]
    if y_train.ndim == 2 and y_val.ndim == 2:
        if y_train.shape[1] != y_val.shape[1]:
            raise ValueError(f"{source}: y_train has {y_train.shape[1]} classes but y_val has {y_val.shape[1]}")
        for split, y in (("train", y_train), ("val", y_val)):
            if not (np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)):
                raise ValueError(f"{source}: y_{split} is 2-D but not one-hot (rows of 0s with a single 1)")
        if y_train.shape[1] < 2 or len(np.unique(y_train.argmax(axis=1))) < 2:
            raise ValueError(f"{source}: y_train holds fewer than 2 classes; at least 2 are needed")
        return y_train.astype("float32"), y_val.astype("float32")
    raise ValueError(f"{source}: y_train and y_val must both be 1-D class ids or both 2-D one-hot; got "
                     f"{y_train.ndim}-D and {y_val.ndim}-D")


# -------------------------------------------------------------- datasets
def _is_dataset(value) -> bool:
    """A `tf.data.Dataset`, recognized without importing TensorFlow (only `keras_l2.backend` may)."""
    return type(value).__module__.split(".")[0] == "tensorflow" and hasattr(value, "element_spec")


def check_datasets(train, val) -> DatasetData:
    """Checks batched `tf.data` datasets of `(x, y)` (one-hot `y`) and counts `n` (see the module docstring)."""
    shapes = {}
    for split, dataset in (("train", train), ("val", val)):
        spec = dataset.element_spec
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise ValueError(f"data: the {split} dataset must yield (x, y) pairs. Received: element_spec={spec}")
        x_shape, y_shape = (tuple(s.shape) for s in spec)
        if len(x_shape) != 2 or len(y_shape) != 2:
            raise ValueError(f"data: the {split} dataset must be batched, yielding x of shape (batch, features) "
                             f"and one-hot y of shape (batch, classes). Received: x {x_shape}, y {y_shape}")
        shapes[split] = (x_shape[1], y_shape[1])
    if shapes["train"] != shapes["val"]:
        raise ValueError(f"data: train yields (features, classes) {shapes['train']} but val {shapes['val']}")
    batches = int(train.cardinality())
    if batches < 0:
        kind = "infinite" if batches == _INFINITE else "unknown"
        raise ValueError(f"data: the train dataset's cardinality is {kind}; n (lambda/n) needs a known, finite "
                         "number of batches (allowed: a finite dataset; if you know its length, apply "
                         "tf.data.experimental.assert_cardinality(batches))")
    n = sum(int(x.shape[0]) for x, _ in train)  # one pass; eager batches have concrete shapes
    if n == 0:
        raise ValueError("data: the train dataset is empty")
    features, classes = shapes["train"]
    return DatasetData(train, val, n=n, features=features, classes=classes,
                       name=f"tf.data (train {n} in {batches} batches)", batches=batches)


def as_sweep_data(data) -> SweepData | DatasetData:
    """The user's data, checked: `SweepData`, `(x_train, y_train, x_val, y_val[, x_test, y_test])` arrays or
    `(train, val)` datasets."""
    if isinstance(data, (SweepData, DatasetData)):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(_is_dataset(d) for d in data):
        return check_datasets(*data)
    if isinstance(data, (tuple, list)) and len(data) in (4, 6) and not any(_is_dataset(d) for d in data):
        return check_arrays(data, "arrays")
    raise ValueError("data: expected (x_train, y_train, x_val, y_val[, x_test, y_test]) arrays or (train, val) "
                     "batched tf.data "
                     f"datasets. Received: {type(data).__name__}"
                     + (f" of {len(data)} items" if isinstance(data, (tuple, list)) else ""))
