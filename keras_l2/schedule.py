"""Changing lambda per epoch, for any route."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras

from keras_l2._checks import check_l2
from keras_l2.inventory import l2_routes
from keras_l2.routes import set_l2


class LambdaScheduler(keras.callbacks.Callback):
    """Sets lambda at the start of every epoch, like `LearningRateScheduler` for lr.

    Works with every keras_l2 route (see `set_l2`): on TensorFlow every route
    reads lambda from a variable, so a change costs nothing; on JAX and
    PyTorch the optimizer route does, and the penalty routes retrace once per
    change.
    The lambda used in each epoch is added to the epoch's logs as `"lambda"`,
    so `History`, `CSVLogger` and the MLflow logger record it.

    Args:
        schedule: either a function `schedule(epoch, l2) -> new_l2` (epoch counts
            from 0; `l2` is the current lambda), or a sequence with one lambda
            per epoch (checked when training starts: no shorter than `epochs`).
        verbose: 1 prints the lambda whenever it changes.

    Example:

    >>> import keras
    >>> from keras_l2 import LambdaScheduler, regularize
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> _ = regularize(model, l2=1e-2)
    >>> warm_up = LambdaScheduler(lambda epoch, l2: min(1e-2, 1e-3 * (epoch + 1)))
    >>> per_epoch = LambdaScheduler([0.0, 1e-3, 1e-2])
    """

    def __init__(self, schedule: Callable[[int, float], float] | Sequence[float], verbose: int = 0):
        super().__init__()
        if callable(schedule):
            self._values = None
            self._schedule = schedule
        elif isinstance(schedule, Sequence) and not isinstance(schedule, str) and len(schedule) > 0:
            self._values = []
            for epoch, value in enumerate(schedule):
                try:
                    self._values.append(check_l2(value))
                except (TypeError, ValueError) as error:
                    raise type(error)(f"Bad lambda for epoch {epoch} of the schedule: {error}") from None
            self._schedule = None
        else:
            raise TypeError(
                "`schedule` must be a function `(epoch, l2) -> l2` or a non-empty sequence "
                f"of lambdas, one per epoch. Received: schedule={schedule!r}"
            )
        self.verbose = verbose
        self._current: float | None = None

    def on_train_begin(self, logs=None):
        routes = l2_routes(self.model)
        if not routes.names:
            raise ValueError(
                f"LambdaScheduler: model {self.model.name!r} uses no keras_l2 route, so "
                "there is no lambda to schedule."
            )
        epochs = (self.params or {}).get("epochs")
        if self._values is not None and epochs is not None and len(self._values) < epochs:
            raise ValueError(
                f"LambdaScheduler has {len(self._values)} lambdas but fit runs {epochs} "
                "epochs; give one lambda per epoch."
            )

    def on_epoch_begin(self, epoch, logs=None):
        current = l2_routes(self.model).l2
        if self._values is not None:
            new = self._values[epoch] if epoch < len(self._values) else self._values[-1]
        else:
            raw = self._schedule(epoch, current)
            try:
                new = check_l2(raw)
            except (TypeError, ValueError) as error:
                raise type(error)(
                    f"LambdaScheduler: the schedule returned a bad lambda for epoch {epoch}: {error}"
                ) from None
        if new != current:
            set_l2(self.model, new)
            if self.verbose:
                print(f"\nEpoch {epoch + 1}: LambdaScheduler setting lambda to {new}.")
        self._current = new

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._current is not None:
            logs["lambda"] = self._current
