"""Route 1: L2 as a Keras regularizer on the chosen kernels."""

from __future__ import annotations

import keras

from keras_l2 import l2_math
from keras_l2._checks import check_l2, check_n
from keras_l2.inventory import check_single_route
from keras_l2.route import L2Route, LambdaAttribute
from keras_l2.selection import check_layers, select_layers
from keras_l2.steps import retrace


@keras.saving.register_keras_serializable(package="keras_l2")
class L2Regularizer(keras.regularizers.Regularizer, L2Route):
    """L2 penalty `l2 / n * sum(square(W))` on the kernel it is attached to.

    Use it where you would use `keras.regularizers.L2`, when the penalty should
    follow the convention of `docs/math.md` (the study note it comes from) of dividing lambda by the number of training
    examples `n`. With `n=1` it equals `keras.regularizers.L2(l2)` (to the
    last few bits: the squares are summed in another order), but is cheaper
    to train with: its gradient `2 * l2 / n * W` is supplied in closed form
    instead of going through autodiff, and the sum runs over one flat vector,
    which XLA reduces faster.

        loss = l2 / n * reduce_sum(square(x))

    Args:
        l2: lambda, a finite float >= 0. Defaults to 0.01, as Keras' `L2`.
        n: the number of training examples, an integer >= 1. Defaults to 1.

    Example:

    >>> import keras
    >>> from keras_l2 import L2Regularizer
    >>> layer = keras.layers.Dense(3, kernel_regularizer=L2Regularizer(l2=1e-3, n=60000))
    """

    kind = "regularizer"
    l2 = LambdaAttribute()

    def __init__(self, l2: float = 0.01, n: int = 1):
        self.l2 = l2
        self.n = check_n(n)

    def __call__(self, x):
        return l2_math.penalty([x], self.step_l2, self.n)

    def kernels(self, model) -> list:
        return [v for v in model.trainable_variables if v.regularizer is self]

    def covers(self, kernel) -> bool:
        return getattr(kernel, "regularizer", None) is self

    def get_config(self) -> dict:
        return {"l2": self.l2, "n": self.n}

    def __repr__(self) -> str:
        return f"L2Regularizer(l2={self.l2!r}, n={self.n!r})"


def regularize(model, l2: float = 0.01, n: int = 1, layers=None) -> tuple:
    """Attaches an `L2Regularizer(l2, n)` to the kernels of chosen layers.

    Works on an already built model: in Keras 3 the regularizer lives on the
    variable (`layer.kernel.regularizer`), so setting `layer.kernel_regularizer`
    after build silently does nothing. This sets both, so that training sees
    the penalty and `model.save` records it. A kernel that already carries an
    `L2Regularizer` gets a new one with the new lambda; one that carries
    another regularizer is refused rather than silently replaced.

    Args:
        model: a built `keras.Model`.
        l2: lambda, a finite float >= 0.
        n: the number of training examples, an integer >= 1.
        layers: the Dense layers to regularize (see `select_layers`);
            defaults to every Dense layer of the model.

    Returns:
        The tuple of regularized layers.

    Example:

    >>> import keras
    >>> from keras_l2 import regularize, select_layers
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2, name="out")])
    >>> [layer.name for layer in regularize(model, l2=1e-3,
    ...                                     layers=select_layers(model, names="out"))]
    ['out']
    """
    l2, n = check_l2(l2), check_n(n)
    chosen = check_layers(select_layers(model) if layers is None else layers, model)
    check_single_route(model, [layer.kernel for layer in chosen], route="regularizer")
    for layer in chosen:
        existing = layer.kernel.regularizer
        if existing is not None and not isinstance(existing, L2Regularizer):
            raise ValueError(
                f"Layer {layer.name!r} already has a kernel regularizer "
                f"({existing!r}); keras_l2 will not stack a second penalty on it. "
                "Remove it first, or leave this layer out of `layers`."
            )
    for layer in chosen:
        regularizer = L2Regularizer(l2=l2, n=n)
        layer.kernel.regularizer = regularizer
        layer.kernel_regularizer = regularizer
    retrace(model)
    return chosen
