"""Per-replica scaling under `tf.distribute`, the one backend where it matters.

Under a TensorFlow strategy with R replicas, each replica's loss is divided by
R and the replicas' gradients are summed. A term added on every replica (the
penalty in the loss, `2 * l2 / n * W` in the gradient) must be divided by R
too, or it counts R times. Keras does this for `model.losses` (the
regularizer route); the loss and coupled routes add their term themselves.
"""

from __future__ import annotations

import keras
from keras import ops


def replicas() -> int:
    """R: the number of replicas in sync (1 outside a TensorFlow strategy)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def per_replica(value):
    """Returns `value / R` inside a TensorFlow strategy with R > 1 replicas, else `value`."""
    count = replicas()
    if count == 1:
        return value
    return ops.multiply(value, ops.convert_to_tensor(1.0 / count, dtype=value.dtype))


def all_replicas(value):
    """Undoes `per_replica`: `value * R` (what Keras' loss tracker records)."""
    count = replicas()
    if count == 1:
        return value
    return ops.multiply(value, ops.convert_to_tensor(float(count), dtype=value.dtype))
