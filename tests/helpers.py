"""Test helpers: backend-specific autodiff and tiny models, kept out of the library."""

from __future__ import annotations

import keras
import numpy as np


def value_and_grad(fn, w: np.ndarray):
    """Returns `(fn(w), dfn/dw)` as NumPy, using the active backend's autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(w)
        with tf.GradientTape() as tape:
            value = fn(x)
        return np.asarray(value), tape.gradient(value, x).numpy()
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(fn)(w)
        return np.asarray(value), np.asarray(grad)
    if backend == "torch":
        import torch

        x = torch.tensor(w, requires_grad=True)
        value = fn(x)
        value.backward()
        return value.detach().cpu().numpy(), x.grad.cpu().numpy()
    raise NotImplementedError(backend)


def reset_keras() -> None:
    """Float32 defaults, a fixed seed and a fresh session (layer names, the pinned dtype policy).

    conftest runs this before every test. A module fixture runs before that,
    with whatever the last test left in Keras' global state, so it calls this itself.
    """
    keras.config.set_floatx("float32")
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)


def weights(model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]


def mlp(hidden: int = 6, inputs: int = 5, classes: int = 3, seed: int = 1, activation="softmax"):
    """The note's network: one hidden ReLU Dense layer and a softmax Dense output."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(classes, activation=activation, name="out"),
        ],
        name="note_net",
    )


def data(examples: int = 24, inputs: int = 5, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, inputs))
    y = np.eye(classes)[rng.integers(0, classes, examples)]
    return x, y


ROUTES = ("regularizer", "loss", "coupled", "decoupled")


def compile_route(model, route: str, optimizer, l2: float, n: int, layers, **compile_kwargs):
    """Compiles `model` with L2 applied through one of the four routes (or "none")."""
    from keras_l2.routes import apply_route

    loss = "categorical_crossentropy"
    if route != "none":
        optimizer, loss = apply_route(model, route, optimizer, l2, n, layers)
    model.compile(optimizer=optimizer, loss=loss, **compile_kwargs)
    return model


def reference_gd(weights0, x, y, lr: float, n: int, lambdas, chosen=(True, True)):
    """The note's network in NumPy, written out by hand (MATH.md), full-batch GD.

    weights0: [W1, b1, W2, b2]; `lambdas[t]` is the lambda of step t;
    `chosen[l]` says whether layer l's kernel is regularized.
    Returns the weights after `len(lambdas)` steps.
    """
    w1, b1, w2, b2 = (np.array(w, dtype=np.float64) for w in weights0)
    examples = x.shape[0]
    for lam in lambdas:
        z1 = x @ w1 + b1
        a1 = np.maximum(z1, 0.0)
        z2 = a1 @ w2 + b2
        e = np.exp(z2 - z2.max(axis=1, keepdims=True))
        a2 = e / e.sum(axis=1, keepdims=True)
        dz2 = (a2 - y) / examples  # d(mean CCE)/dZ2 for softmax + CCE
        dw2 = a1.T @ dz2 + (2 * lam / n * w2 if chosen[1] else 0.0)
        db2 = dz2.sum(axis=0)
        dz1 = (dz2 @ w2.T) * (z1 > 0)
        dw1 = x.T @ dz1 + (2 * lam / n * w1 if chosen[0] else 0.0)
        db1 = dz1.sum(axis=0)
        w1, b1, w2, b2 = w1 - lr * dw1, b1 - lr * db1, w2 - lr * dw2, b2 - lr * db2
    return [w1, b1, w2, b2]


def reference_loss(weights, x, y, l2: float, n: int) -> tuple[float, float]:
    """(mean CCE, penalty) of the note's network in NumPy."""
    w1, b1, w2, b2 = weights
    z2 = np.maximum(x @ w1 + b1, 0.0) @ w2 + b2
    log_p = z2 - z2.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-(y * log_p).sum(axis=1).mean()), l2 / n * float((w1**2).sum() + (w2**2).sum())


def reported_rtol() -> float:
    """Tolerance for losses Keras reports in float64.

    On torch Keras reports float64 losses and metrics through float32 (its
    own `loss` is 1e-8 to 2e-7 relative off NumPy even without
    regularization); elsewhere they are exact to rounding.
    """
    return 5e-7 if keras.backend.backend() == "torch" else 1e-12


_TEMPLATE_STORE: list = []  # one SQLite store with MLflow's schema per test process


def sqlite_store(directory, name: str = "store.db") -> str:
    """The URI of a new, empty MLflow SQLite store `directory/name`.

    A copy of one store whose schema MLflow made in this process: running MLflow's
    migrations takes 1.5-2.5 s per store here, a copy 0.05 s. Creating a store
    from nothing (and concurrently) is tested in test_tracking_store.py.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from keras_l2.tracking.store import TrackingStore, open_store

    if not _TEMPLATE_STORE:
        template = Path(tempfile.mkdtemp(prefix="keras_l2_store_")) / "template.db"
        open_store(TrackingStore(f"sqlite:///{template}"))
        _TEMPLATE_STORE.append(template)
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_TEMPLATE_STORE[0], path)
    return f"sqlite:///{path}"


def user_data(examples: int = 60, features: int = 8, classes: int = 3, seed: int = 0):
    """Learnable tiny data: labels from a fixed linear map, class ids."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples + 30, features)).astype("float32")
    y = (x @ rng.normal(size=(features, classes))).argmax(axis=1)
    return x[:examples], y[:examples], x[examples:], y[examples:]
