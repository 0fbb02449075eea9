"""Backend adapters the tracking package needs, waiting to move to `keras_l2.backend`.

Until the core contract lands on `main`, these are today's backend branches,
moved here from the old `mlflow_logger.py` unchanged (the only place in
`keras_l2/tracking/` that names a backend or a private Keras attribute).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_l2 import l2_math


def jax_step_norms_at_begin() -> bool:
    """Whether step norms must be read when the next step begins (JAX donates the previous weights)."""
    return keras.backend.backend() == "jax"


def live_kernel_values(model, kernels):
    """The kernels' current values mid-epoch on JAX (they live in the trainer's state), else None."""
    state = getattr(model, "_jax_state", None)
    if not state or getattr(model, "_jax_state_synced", True):
        return None
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    trainable = state["trainable_variables"]
    return [trainable[index[id(k)]] if id(k) in index else k.value for k in kernels]


def norm_function(kernels):
    """`f(values=None) -> np.ndarray` of the kernels' Frobenius norms, compiled for the backend."""
    kernels = list(kernels)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # Captured, not passed: TensorFlow reads the live variables.
        compiled = tf.function(lambda: ops.stack(l2_math.kernel_norms(kernels)))

        def read(values=None):
            return np.asarray(ops.convert_to_numpy(compiled()))

        read.experimental_get_tracing_count = compiled.experimental_get_tracing_count
        return read
    fn = lambda values: ops.stack(l2_math.kernel_norms(values))  # noqa: E731
    if backend == "jax":
        import jax

        fn = jax.jit(fn)

    def read(values=None):
        values = values if values is not None else [k.value for k in kernels]
        return np.asarray(ops.convert_to_numpy(fn(list(values))))

    return read


def describe(model):
    """Route, mode, lambda, n values and chosen kernels (until `keras_l2.inventory.describe`)."""
    from keras_l2.metrics import penalty_terms
    from keras_l2.routes import l2_routes

    routes = l2_routes(model)
    lam = routes.l2  # raises if the routes disagree
    terms = penalty_terms(model)
    modes = {opt.mode for opt in routes.optimizers}
    if routes.regularizers or routes.losses:
        modes.add("penalty")
    return RouteDescription(
        route="+".join(routes.names) if routes.names else "none",
        mode="+".join(sorted(modes)) if modes else "none",
        l2=lam,
        ns=tuple(sorted({n for _, _, n, _ in terms})),
        chosen_kernel_ids=frozenset(id(k) for kernels, *_ in terms for k in kernels),
    )


class RouteDescription:
    def __init__(self, route, mode, l2, ns, chosen_kernel_ids):
        self.route, self.mode, self.l2, self.ns, self.chosen_kernel_ids = route, mode, l2, ns, chosen_kernel_ids
