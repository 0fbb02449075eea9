"""Weight decay applied in place, in the form Keras' own optimizers use on the backend in use.

Part of the adapter (`keras_l2.backend`). Keras applies `weight_decay` as
`W - W * wd * lr`, one variable at a time, on TensorFlow and JAX, and on
PyTorch as one in-place `torch._foreach_mul_(Ws, 1 - wd * lr)` over every
decayed variable. The decoupled route decays in the same form on each, so
that the two round alike (`tests/test_routes.py` holds them equal bit for
bit where the coefficients themselves are equal), and on PyTorch it makes one
pass over the weights with no temporary tensor (the difference form made
three temporaries and a copy per kernel, each a fresh allocation of the
kernel's size). Inside a `StatelessScope` or an autocast scope PyTorch
assigns the same product instead: nothing outside the scope changes.

Example:

>>> import keras
>>> from keras_l2.backend import updates
>>> w = keras.Variable([[1.0, 2.0]])
>>> updates.decay_in_place([w], decayed=lambda v: v - v * 0.5, factor=lambda dtype: 0.5)
>>> keras.ops.convert_to_numpy(w).tolist()
[[0.5, 1.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.variables import get_autocast_scope


def decay_in_place(variables: Sequence, decayed: Callable, factor: Callable) -> None:
    """Decays `variables` in place as Keras' own `weight_decay` does on this backend.

    Args:
        variables: the `keras.Variable`s to decay.
        decayed: `decayed(W)`, the decayed value of one variable (the form used on TensorFlow and JAX).
        factor: `factor(dtype)`, the scalar every weight of that dtype is multiplied by (the form used on
            PyTorch).
    """
    if keras.backend.backend() != "torch":
        for variable in variables:
            variable.assign(decayed(variable))
        return
    if in_stateless_scope() or get_autocast_scope() is not None:
        # `variable.value` is then the scope's tensor (the caller's own, or a cast copy): change
        # nothing in place; the same product, assigned, rounds the same.
        for variable in variables:
            variable.assign(keras.ops.multiply(variable, factor(variable.dtype)))
        return
    import torch

    by_dtype: dict = {}
    for variable in variables:
        by_dtype.setdefault(variable.dtype, []).append(variable.value)
    # In place on the parameters themselves: outside Keras' train step (an `apply` of the
    # user's own) autograd would refuse an in-place change of a leaf that requires grad.
    with torch.no_grad():
        for dtype, values in by_dtype.items():
            torch._foreach_mul_(values, factor(dtype))
