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
        return value.detach().numpy(), x.grad.numpy()
    raise NotImplementedError(backend)


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
