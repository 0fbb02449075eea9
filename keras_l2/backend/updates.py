"""Weight decay applied in place, in the form Keras' own optimizers use on the backend in use.

Part of the adapter (`keras_l2.backend`). Keras applies `weight_decay` as
`W.assign(W - W * wd * lr)`, one variable at a time, on TensorFlow and JAX,
and on PyTorch as one in-place `torch._foreach_mul_(Ws, 1 - wd * lr)` over
every decayed variable. The decoupled route decays the same way on each, so
that it is Keras' own weight decay bit for bit, and on PyTorch it makes one
pass over the weights with no temporary tensor (the difference form made
three temporaries and a copy per kernel, each a fresh allocation of the
kernel's size).

Example:

>>> import keras
>>> from keras_l2.backend import updates
>>> w = keras.Variable([[1.0, 2.0]])
>>> updates.decay_in_place([w], decayed=lambda v: v - v * 0.5, factor=lambda: 0.5)
>>> keras.ops.convert_to_numpy(w).tolist()
[[0.5, 1.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras


def decay_in_place(variables: Sequence, decayed: Callable, factor: Callable) -> None:
    """Decays `variables` in place as Keras' own `weight_decay` does on this backend.

    Args:
        variables: the `keras.Variable`s to decay.
        decayed: `decayed(W)`, the decayed value of one variable (the form used on TensorFlow and JAX).
        factor: `factor()`, the scalar every weight is multiplied by (the form used on PyTorch).
    """
    if not variables:
        return
    if keras.backend.backend() == "torch":
        import torch

        # In place on the parameters themselves: outside Keras' train step (an `apply` of the
        # user's own) autograd would refuse an in-place change of a leaf that requires grad.
        with torch.no_grad():
            torch._foreach_mul_([variable.value for variable in variables], factor())
        return
    for variable in variables:
        variable.assign(decayed(variable))
