"""Validation of user input, shared by every public entry point.

Each check raises before any training starts, with a message that names the
bad value and what is allowed (Keras' own convention).
"""

from __future__ import annotations

import math
import numbers

MODES = ("coupled", "decoupled")
# The names the command line and `keras_l2.routes.apply_route` / `make_optimizer` accept. Kept here, free
# of Keras, so that `keras-l2 --help` and its argument errors need no Keras (whose import takes seconds).
ROUTES = ("regularizer", "loss", "coupled", "decoupled")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
DATASETS = ("digits", "wine")  # scikit-learn's bundled data sets a sweep or tune can train on (`--dataset`)


def check_l2(l2: object) -> float:
    """Returns `l2` as a float after checking that it is a finite number >= 0."""
    if isinstance(l2, bool) or not isinstance(l2, numbers.Real):
        raise TypeError(
            "`l2` must be a finite float >= 0 (the regularization strength "
            f"lambda). Received: l2={l2!r} of type {type(l2).__name__}"
        )
    value = float(l2)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            "`l2` must be a finite float >= 0 (the regularization strength "
            f"lambda). Received: l2={l2!r}"
        )
    return value


def check_lambdas(values, name: str = "lambdas") -> tuple:
    """Returns `values` as a tuple of floats (same order): at least one, each a valid lambda, none repeated.

    `name` starts each message (`--lambdas` on the command line). One lambda is
    one run (a stack's member) per seed, so a repeat would train it twice.
    """
    values = tuple(values) if not isinstance(values, (numbers.Real, str)) else (values,)
    if not values:
        raise ValueError(f"{name}: give at least one lambda, e.g. 0,1e-3,1e-2. Received: {values!r}")
    checked = []
    for value in values:
        try:
            checked.append(check_l2(value))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: {value!r}: {error}") from None
    repeated = sorted({v for v in checked if checked.count(v) > 1})
    if repeated:
        raise ValueError(f"{name}: repeated (λ, seed) members {[f'{v:g}' for v in repeated]}: each is trained "
                         "once. Received: " + ",".join(f"{v:g}" for v in checked))
    return tuple(checked)


def check_n(n: object) -> int:
    """Returns `n` after checking that it is an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(
            "`n` must be an integer >= 1 (the number of training examples). "
            f"Received: n={n!r} of type {type(n).__name__}"
        )
    if n < 1:
        raise ValueError(
            "`n` must be an integer >= 1 (the number of training examples). "
            f"Received: n={n!r}"
        )
    return int(n)


def check_dataset(name: object) -> str:
    """Returns `name` after checking that it is one of `DATASETS`."""
    if name not in DATASETS:
        raise ValueError(f"--dataset: unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return str(name)


def check_mode(mode: object) -> str:
    """Returns `mode` after checking that it is one of `MODES`."""
    if mode not in MODES:
        raise ValueError(
            f'Expected `mode` to be one of {{"coupled", "decoupled"}}. '
            f"Received: mode={mode!r}"
        )
    return str(mode)
