"""Route 2: L2 added to the categorical cross-entropy."""

from __future__ import annotations

import weakref

import keras

from keras_l2 import backend, l2_math
from keras_l2._checks import check_n
from keras_l2.inventory import check_single_route
from keras_l2.route import L2Route, LambdaAttribute
from keras_l2.selection import check_in_model, check_unique_names, layers_or_names, select_layers


@keras.saving.register_keras_serializable(package="keras_l2")
class L2CategoricalCrossentropy(keras.losses.CategoricalCrossentropy, L2Route):
    """Categorical cross-entropy plus the L2 penalty of the chosen kernels.

    The note's regularized loss, with the penalty over *all* chosen weight
    matrices, not only the output layer's:

        loss = reduce(CCE(y_true, y_pred)) + l2 / n * sum_l ||W_l||_F^2

    The penalty is added once, after the reduction, so the data term keeps its
    meaning (the batch mean under Keras' default `"sum_over_batch_size"`).
    With `reduction=None`/`"none"` the penalty is added to every element, so
    that the mean of the returned vector is the regularized loss.
    `from_logits`, `label_smoothing`, `axis`, `reduction` and `dtype` are
    those of `keras.losses.CategoricalCrossentropy`.

    The gradient of the penalty, `2 * l2 / n * W`, is supplied in closed form
    (see `keras_l2.l2_math`), so the penalty costs no extra autodiff.

    Args:
        l2: lambda, a finite float >= 0. Defaults to 0.01.
        n: the number of training examples, an integer >= 1. Defaults to 1.
        layers: the Dense layers whose kernels are penalised (what
            `keras_l2.select_layers` returns). Layer names are also accepted:
            they are resolved against the model that calls the loss.
        **kwargs: passed to `keras.losses.CategoricalCrossentropy`.

    A loss restored from a config (e.g. by `keras.saving.load_model`) knows
    its layers by name and binds itself to the model that calls it, on its
    first call; `bind(model)` does the same explicitly.

    Example:

    >>> import keras
    >>> from keras_l2 import L2CategoricalCrossentropy, select_layers
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
    ...                           keras.layers.Dense(3, activation="softmax")])
    >>> loss = L2CategoricalCrossentropy(l2=1e-3, n=1000, layers=select_layers(model))
    >>> model.compile(optimizer="sgd", loss=loss)
    """

    kind = "loss"
    l2 = LambdaAttribute()

    def __init__(self, l2: float = 0.01, n: int = 1, layers=None, name="l2_categorical_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.l2 = l2
        self.n = check_n(n)
        self._layer_names, self._layers = layers_or_names(layers)
        self._checked_model = None

    @property
    def layers(self) -> tuple:
        """The chosen Dense layers (empty until bound, for a loss from a config)."""
        return self._layers or ()

    @property
    def layer_names(self) -> tuple:
        return self._layer_names

    def kernels(self, model) -> list:
        # A loss restored from a config knows its layers by name until bound.
        return [layer.kernel for layer in (self.layers or self.bind(model).layers)]

    def covers(self, kernel) -> bool:
        return any(layer.kernel is kernel for layer in self.layers)

    def bind(self, model) -> L2CategoricalCrossentropy:
        """Resolves the chosen layers against `model` and checks they are its own.

        Also refuses a second keras_l2 route on the same kernels (an
        `L2Regularizer` on them, or an `L2DecayOptimizer` in the model's
        optimizer): stacked routes would count the penalty twice.
        """
        if self._layers is None:
            self._layers = tuple(select_layers(model, names=list(self._layer_names)))
        else:
            check_in_model(self._layers, model)
        check_unique_names(self._layers, model)
        check_single_route(model, [layer.kernel for layer in self._layers], route="loss")
        self._checked_model = _binding_key(model)
        return self

    def penalty(self, dtype=None):
        """Returns `l2 / n * sum_l ||W_l||_F^2` for the chosen kernels, on the device."""
        if self._layers is None:
            raise ValueError(
                f"This loss knows its layers only by name ({list(self._layer_names)}) "
                "and has not been bound to a model yet: call `loss.bind(model)`."
            )
        kernels = [layer.kernel for layer in self._layers]
        return l2_math.penalty(kernels, self.step_l2, self.n, dtype=dtype)

    def data_loss(self, y_true, y_pred, sample_weight=None):
        """The reduced cross-entropy alone, without the penalty."""
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def __call__(self, y_true, y_pred, sample_weight=None):
        model = backend.calling_model(self)
        if model is not None and _binding_key(model) != self._checked_model:
            # Checked on every trace, not once: the same loss object compiled
            # into a second model, or recompiled beside an L2DecayOptimizer,
            # must not keep penalising the wrong (or already decayed) kernels.
            self.bind(model)
        value = self.data_loss(y_true, y_pred, sample_weight=sample_weight)
        # Keras' reduction already divided the data term by the replica count.
        return keras.ops.add(value, backend.per_replica(self.penalty(dtype=value.dtype)))

    def __repr__(self) -> str:
        return f"L2CategoricalCrossentropy(l2={self.l2!r}, n={self.n!r}, layers={list(self._layer_names)})"

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"l2": self.l2, "n": self.n, "layers": list(self._layer_names)})
        return config


def _binding_key(model) -> tuple:
    """Identifies a (model, optimizer) pair without holding either.

    Weak references on purpose: Keras' saver walks a loss's attributes, and a
    strong reference to the optimizer here made it save the optimizer's
    variables under the loss, leaving none under the optimizer.
    """
    optimizer = getattr(model, "optimizer", None)
    return weakref.ref(model), None if optimizer is None else weakref.ref(optimizer)
