"""`weight_norm/<layer>`: every Dense kernel's Frobenius norm, one compiled reader per model.

Dispatching a dozen eager ops per log would cost more than computing them, so
the norms are computed in one compiled call (`keras_l2.backend.CompiledRead`)
and copied to the host once. A reader is kept per model and shared by the
loggers of its fits, and every reader computes with one function, which
TensorFlow traces once per kernel shapes: a logger per fit (a sweep, or `fit`
in a loop) or per member of a stack would otherwise trace anew each time,
and TensorFlow warns about that after five.

Example:

>>> import keras
>>> from keras_l2.tracking.norms import reader_for
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, kernel_initializer="ones")])
>>> reader = reader_for(model, [model.layers[0].kernel])
>>> reader().round(6).tolist(), reader_for(model, [model.layers[0].kernel]) is reader
([2.0], True)
"""

from __future__ import annotations

import weakref

import numpy as np
from keras import ops

from keras_l2 import backend, l2_math


class NormReader:
    """`[||W||_F for W in kernels]` as a NumPy vector; pass `values` to read those instead of the live kernels."""

    def __init__(self, kernels):
        self.kernels = list(kernels)
        self._read = backend.CompiledRead(_norms, self.kernels)
        self._fn = self._read.compiled  # the compiled function (TensorFlow: its tracing count shows retraces)

    def __call__(self, values=None) -> np.ndarray:
        return self._read(values)


def _norms(values):
    # One function for every reader: TensorFlow then traces it once per kernel shapes, not once per model.
    return ops.stack(l2_math.kernel_norms(values))


# The owner of the readers is the model; a weak map lets them go with it.
_READERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reader_for(model, kernels) -> NormReader:
    """The model's reader, made anew when its kernels changed."""
    reader = _READERS.get(model)
    if reader is None or [id(k) for k in reader.kernels] != [id(k) for k in kernels]:
        reader = _READERS[model] = NormReader(kernels)
    return reader
