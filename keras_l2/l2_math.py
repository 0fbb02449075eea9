"""The L2 math of keras_l2, in one place: every route and callback calls it.

Conventions (the math contract, `docs/math.md`):

    ||W||_F^2   = sum_ij w_ij^2                 (squared Frobenius norm)
    P(W)        = (l2 / n) * sum_l ||W_l||_F^2   (the penalty)
    dP/dW_l     = (2 * l2 / n) * W_l             (a matrix, not the scalar
                                                  "2 lambda ||W||" of the note)
    decoupled:  W <- W - W * (2 * l2 / n) * lr   (lr: the current learning rate,
                                                  the same expression as Keras'
                                                  own `weight_decay`)

`l2` is lambda and `n` the number of training examples. `l2` may be a Python
float or a scalar tensor (the optimizer route keeps it in a variable, and on
TensorFlow every route reads a float64 one, so that it can change without a
retrace); the coefficients are computed with the same
operations in the same order either way, so the routes agree bit for bit in
float64.

Example:

>>> import numpy as np
>>> from keras_l2 import l2_math
>>> w = np.array([[1.0, 2.0], [3.0, 4.0]])
>>> float(l2_math.penalty([w], l2=0.5, n=2))
7.5
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import ops

from keras_l2 import backend
from keras_l2.backend import updates


def _as_dtype(value, dtype):
    """`value` as a tensor of `dtype`; Python floats go straight to `dtype`.

    `ops.cast(0.01, "float64")` on TensorFlow first makes a float32 tensor and
    loses half the digits; `convert_to_tensor(..., dtype)` does not.
    """
    if isinstance(value, (int, float)):
        return ops.convert_to_tensor(value, dtype=dtype)
    return ops.cast(value, dtype)


def penalty_coefficient(l2, n):
    """Returns `l2 / n`, the factor in front of the squared norms."""
    return l2 / n


def gradient_coefficient(l2, n):
    """Returns `2 * l2 / n`, the factor of `W` in the penalty's gradient."""
    return (l2 * 2.0) / n


def squared_frobenius_norm(w):
    """Returns `sum(square(w))`, the squared Frobenius norm `||W||_F^2`.

    Summed as one flat vector: XLA on CPU reduces a 2-D tensor to a scalar
    2-2.5x slower than the same numbers flattened (2.1-2.4 ms against
    0.9-1.3 ms for the 784-1024-1024 kernels, one thread, in
    `experiments/reduction_cost.py`), which made the penalty routes cost
    about 4% more of a training step under `jit_compile=True`. The backend
    adapter sums the squares (on PyTorch in one pass, without a temporary).
    """
    return backend.sum_of_squares(ops.reshape(w, (-1,)))


def frobenius_norm(w):
    """Returns `sqrt(sum(square(w)))`, the plain Frobenius norm `||W||_F`."""
    return ops.sqrt(squared_frobenius_norm(w))


def penalty_gradient(w, l2, n):
    """Returns `dP/dW = (2 * l2 / n) * W`, the gradient of the penalty."""
    return ops.multiply(_as_dtype(gradient_coefficient(l2, n), w.dtype), w)


def decayed(w, l2, n, learning_rate):
    """Returns `W - W * (2 * l2 / n) * lr`, one step of decoupled weight decay.

    The order of operations is that of Keras' own `weight_decay` on
    TensorFlow and JAX, so that with `weight_decay = 2 * l2 / n` the two
    round alike.
    """
    coefficient = _as_dtype(gradient_coefficient(l2, n), w.dtype)
    lr = _as_dtype(learning_rate, w.dtype)
    return ops.subtract(w, ops.multiply(ops.multiply(w, coefficient), lr))


def decay_factor(l2, n, learning_rate, dtype):
    """Returns `1 - (2 * l2 / n) * lr`: what one step of decoupled decay multiplies a weight by.

    The same step as `decayed`, in the form Keras' own `weight_decay` takes
    on PyTorch (the two round differently, by about one unit in the last place).
    """
    coefficient = _as_dtype(gradient_coefficient(l2, n), dtype)
    return ops.subtract(_as_dtype(1.0, dtype), ops.multiply(coefficient, _as_dtype(learning_rate, dtype)))


def decay(variables: Sequence, l2, n, learning_rate) -> None:
    """Applies one step of decoupled decay to `variables`, in place.

    In the form Keras' own `weight_decay` takes on the backend in use
    (`decayed` on TensorFlow and JAX, `decay_factor` on PyTorch, all
    variables of a dtype at once there), so that the two round alike.
    """
    updates.decay_in_place(variables, decayed=lambda w: decayed(w, l2, n, learning_rate),
                           factor=lambda dtype: decay_factor(l2, n, learning_rate, dtype))


def decay_left(l2, n, learning_rate, steps: int) -> float:
    """Returns `(1 - (2 * l2 / n) * lr) ** steps`: the share of a weight that `steps` of decoupled decay leave.

    What the decay alone does to a weight that no gradient moves, in plain
    Python floats: the sweep uses it to say when a grid of lambdas is too
    small to matter over a run.
    """
    return float((1.0 - gradient_coefficient(float(l2), n) * float(learning_rate)) ** steps)


def _scaled_squared_norm(w, value_scale, grad_scale):
    """`value_scale * ||W||_F^2`, whose gradient is `grad_scale * W`.

    Autodiff of `sum(square(W))` materialises `square(W)`'s backward pass and
    a broadcast of the upstream scalar: several extra passes over every weight
    per step (Keras' built-in `L2` costs 8-11% of a step on a wide MLP for
    that). The gradient is known in closed form, so we hand it over directly:
    one multiply, the same cost as adding `2 * l2 / n * W` to the gradient.
    """

    @ops.custom_gradient
    def forward(x):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # `upstream * grad_scale` is a scalar; with upstream == 1 this is
            # exactly `grad_scale * W`, the coupled route's term.
            scale = ops.multiply(upstream, _as_dtype(grad_scale, upstream.dtype))
            return ops.multiply(ops.cast(scale, x.dtype), x)

        value = ops.multiply(_as_dtype(value_scale, x.dtype), squared_frobenius_norm(x))
        return value, grad

    return forward(w)


def penalty(kernels: Sequence, l2, n, dtype=None):
    """Returns `P = (l2 / n) * sum_l ||W_l||_F^2` over `kernels`.

    Differentiable: its gradient with respect to each kernel is
    `(2 * l2 / n) * W_l`, supplied in closed form (see `_scaled_squared_norm`).

    Args:
        kernels: the weight matrices (variables or tensors) to penalise.
        l2: lambda, a float >= 0.
        n: the number of training examples, an int >= 1.
        dtype: the dtype of the result; defaults to the first kernel's dtype.
    """
    if len(kernels) == 0:
        return ops.zeros((), dtype=dtype or "float32")
    value_scale = penalty_coefficient(l2, n)
    grad_scale = gradient_coefficient(l2, n)
    terms = []
    for kernel in kernels:
        w = backend.differentiable_read(kernel)
        term = _scaled_squared_norm(w, value_scale, grad_scale)
        terms.append(term if dtype is None else ops.cast(term, dtype))
    total = terms[0]
    for term in terms[1:]:
        total = ops.add(total, term)
    return total


def kernel_norms(kernels: Sequence) -> list:
    """Returns `[||W_l||_F for W_l in kernels]`, computed on the device."""
    return [frobenius_norm(ops.convert_to_tensor(k)) for k in kernels]
