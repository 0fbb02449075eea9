"""Making a compiled model pick up a changed penalty."""

import keras


def retrace(model) -> None:
    """Makes a compiled model pick up a changed penalty at its next step.

    Penalty values are traced into the train/test functions as constants, so
    a change of lambda needs new functions. `fit` reads `model.train_function`
    before every step, so this also works from a callback between epochs.
    """
    forget_jax_traces()
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    if getattr(model, "test_function", None) is not None:
        model.make_test_function(force=True)


def forget_jax_traces() -> None:
    """On JAX, drops cached traces: new step functions alone do not retrace.

    Keras jits the bound method `model.train_step`, and JAX caches a trace by
    that function and the argument shapes, across `jax.jit` objects: while
    anything still holds the previous step function, a "new" one silently
    reuses the old trace, with the old lambda baked in (seen with JAX 0.10).
    """
    if keras.backend.backend() == "jax":
        import jax

        jax.clear_caches()
