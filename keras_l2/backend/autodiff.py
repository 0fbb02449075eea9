"""Gradients of a plain function, and an optimizer's per-variable state, on the backend in use.

Part of the adapter (`keras_l2.backend`): Keras has no backend-agnostic
`grad`, so the hypergradient of `keras-l2 tune` asks here, once per backend
(`tf.GradientTape`, `jax.value_and_grad`, `torch.autograd.grad`).

Example:

>>> from keras import ops
>>> from keras_l2.backend import autodiff
>>> value, (grad,) = autodiff.value_and_gradients(lambda v: ops.sum(ops.square(v[0])), [ops.ones((3,))])
>>> float(value), [float(g) for g in ops.convert_to_numpy(grad)]
(3.0, [2.0, 2.0, 2.0])
"""

from __future__ import annotations

import keras


def value_and_gradients(fn, values: list):
    """Returns `fn(values)` (a scalar) and its gradients with respect to each tensor in `values`.

    `fn` must use only `keras.ops` (and `stateless_call`s) on `values`; it
    runs eagerly, once.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        values = [tf.convert_to_tensor(v) for v in values]
        with tf.GradientTape() as tape:
            for v in values:
                tape.watch(v)
            value = fn(values)
        return value, tape.gradient(value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if backend == "jax":
        import jax

        value, grads = jax.value_and_grad(lambda vs: fn(vs))(list(values))
        return value, list(grads)
    import torch

    leaves = [torch.as_tensor(v).detach().requires_grad_(True) for v in values]
    value = fn(leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves, strict=True)]


def optimizer_slots(optimizer, variable) -> dict:
    """The state a Keras `Adam`, `SGD` or `RMSprop` keeps for `variable`: {"momentum": ..., "velocity": ...}.

    Keras keeps them in private per-optimizer lists, indexed by the
    variable's position; only the slots the optimizer's settings use are
    present.
    """
    index = optimizer._get_variable_index(variable)
    slots = {}
    for slot, attribute in (("momentum", "_momentums"), ("velocity", "_velocities"), ("momentum", "momentums")):
        held = getattr(optimizer, attribute, None)
        if held:
            slots[slot] = held[index]
    return slots
