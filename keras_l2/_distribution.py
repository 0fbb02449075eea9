"""Per-replica scaling under `tf.distribute`, the one backend where it matters.

Under a TensorFlow strategy with R replicas, each replica's loss is divided by
R and the replicas' gradients are summed. A term added on every replica (the
penalty in the loss, `2 * l2 / n * W` in the gradient) must be divided by R
too, or it counts R times. Keras does this for `model.losses` (the
regularizer route); the loss and coupled routes add their term themselves.
"""

from __future__ import annotations

import contextlib

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


def strategy_scope(model):
    """The scope of `model`'s TensorFlow strategy (a no-op on other backends).

    A metric's variables made in it are the strategy's (sync-on-read, summed
    over every replica of every worker), like those Keras makes in `compile`.
    """
    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    return model.distribute_strategy.scope()


def is_chief(model) -> bool:
    """False only on the non-chief workers of a multi-worker TensorFlow strategy.

    Under `MultiWorkerMirroredStrategy` every worker runs `fit` and its
    callbacks; what is to be written once (checkpoints, summaries, tracking)
    the chief writes (TensorFlow's `should_checkpoint`: worker 0 when the
    cluster has no "chief" task). True on one process, and on other backends.
    """
    if keras.backend.backend() != "tensorflow":
        return True
    return bool(model.distribute_strategy.extended.should_checkpoint)
