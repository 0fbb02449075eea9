"""Weight decay applied in place, in the form Keras' own optimizers use on the backend in use.

Part of the adapter (`keras_l2.backend`). Keras applies `weight_decay` as
`W - W * wd * lr`, one variable at a time, on TensorFlow and JAX, and on
PyTorch as one in-place `torch._foreach_mul_(Ws, 1 - wd * lr)` over every
decayed variable. The decoupled route decays in the same form on each, so
that the two round alike (`tests/test_routes.py` holds them equal bit for
bit where the coefficients themselves are equal), and on PyTorch it makes one
pass over the weights with no temporary tensor (the difference form made
three temporaries and a copy per kernel, each a fresh allocation of the
kernel's size). Inside a `StatelessScope` PyTorch assigns the same product
instead, so nothing outside the scope changes; an autocast scope changes
neither the tensors decayed nor the dtype of their factor.

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
from keras.src.backend.common.stateless_scope import get_stateless_scope, in_stateless_scope


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
    import torch

    # The variables' own tensors and dtypes (`_value`, `_dtype`): `variable.value` and
    # `variable.dtype` would give an autocast scope's cast copy and dtype.
    if in_stateless_scope():
        # The scope's values are the caller's tensors: change nothing in place; the
        # same product, assigned to the scope, rounds the same.
        scope = get_stateless_scope()
        for variable in variables:
            value = scope.get_current_value(variable)
            value = variable._value if value is None else value
            variable.assign(torch.mul(value, factor(variable._dtype)))
        return
    by_dtype: dict = {}
    for variable in variables:
        by_dtype.setdefault(variable._dtype, []).append(variable._value)
    # In place on the parameters themselves: outside Keras' train step (an `apply` of the
    # user's own) autograd would refuse an in-place change of a leaf that requires grad.
    with torch.no_grad():
        for dtype, values in by_dtype.items():
            torch._foreach_mul_(values, factor(dtype))
