"""Building a stack: the user's model once per λ, each member exactly as its separate run, in one `StackedModel`.

`stack_models` refuses, before any training, what would couple the members
or what cannot be stacked (see `keras_l2.search.stacked` for why members are
exact); `default_stack_size` says how many members fit in memory.

Example:

>>> import keras
>>> from keras_l2.search.stacking import stack_models
>>> def my_model():
...     inputs = keras.Input((4,))
...     return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(inputs))
>>> stack = stack_models(my_model, lambdas=[0.0, 0.1, 1.0], seed=0, route="coupled", n=100)
>>> [(m.l2, m.seed) for m in stack.members]
[(0.0, 0), (0.1, 0), (1.0, 0)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras

from keras_l2 import backend
from keras_l2._checks import check_lambdas
from keras_l2.backend import host
from keras_l2.inventory import optimizer_chain
from keras_l2.search.models import build_run, compile_run
from keras_l2.search.stacked import PREFIX, Member, StackedModel, StackedOptimizer

MEMORY_SHARE = 0.25  # of the free memory, what the default stack size may plan to use


def stack_models(build: Callable, lambdas: Sequence, seed: int = 0, *, route: str, n: int, layers: str | None = None,
                 optimizer: str | Callable = "adam", learning_rate: float = 1e-3, metrics: Sequence = ("accuracy",),
                 jit_compile="auto") -> StackedModel:
    """Builds one member per λ in `lambdas`, all from `seed`, and compiles them into one `StackedModel`.

    Args:
        build: a function that builds the user's uncompiled model (see `keras_l2.search.models`).
        lambdas: the members' λ values: finite, >= 0, no repeats.
        seed: every member's seed, as `keras.utils.set_random_seed(seed)` before `build()`. Members of
            one stack see the same batches, so a sweep stacks the λ values of one seed together.
        route: one of `keras_l2.ROUTES`, for every member.
        n: the number of training examples (the penalty's `λ/n`).
        layers: the Dense layers to regularize (names or a regex; None: all).
        optimizer: an optimizer's name (`keras_l2.OPTIMIZERS`, with `learning_rate`), or a function
            returning a fresh `keras.optimizers.Optimizer`, called once per member.
        metrics: each member's `compile(metrics=...)`.
        jit_compile: the stack's `compile(jit_compile=...)`.

    Raises:
        ValueError: no λ, a bad or repeated λ, a build function whose models differ in architecture,
            an optimizer that would couple the members (`global_clipnorm`, loss scaling).
    """
    lambdas = check_lambdas(lambdas)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: an integer. Received: {seed!r}")
    members, shape = [], None
    for index, l2 in enumerate(lambdas):
        # Each member exactly as its separate run is built and compiled (`train_one` does the same). Layer
        # names repeat across members, variable paths must not: PyTorch registers a model's parameters by path,
        # and a member left out would keep last step's gradients (they accumulate).
        model = build_run(build, seed, scope=PREFIX.format(index).rstrip("/"))
        signature = _architecture(model)
        if shape is None:
            shape = signature
        elif signature != shape:
            raise ValueError(f"model: the build function returned another architecture for λ={l2:g} than for "
                             f"λ={lambdas[0]:g} ({_difference(shape, signature)}); stacked members must be copies "
                             "of one model. Build the same layers on every call.")
        compile_run(model, l2, route=route, n=n, layers=layers, optimizer=optimizer, learning_rate=learning_rate,
                    metrics=metrics)
        for member_optimizer in optimizer_chain(model.optimizer):
            _check_uncoupled(member_optimizer)
        members.append(Member(l2, seed, model))
    stack = StackedModel(members)
    variables = [m.model.trainable_variables for m in members]
    stack.compile(optimizer=StackedOptimizer([m.model.optimizer for m in members], variables),
                  jit_compile=jit_compile)
    # Its variables are its members', whose optimizers `compile_run` built: built now, the stack's train step
    # creates no variable and is traced once (`steps.build_step_state`; the stack itself is built by Keras).
    stack.optimizer.build(stack.trainable_variables)
    return stack


def default_stack_size(build: Callable, members: int, optimizer: str, batch_size: int) -> tuple[int, str]:
    """How many members one stack holds, from one member's size and the free memory; and why, in words.

    A member needs its weights, their gradients and the optimizer's slots
    (Adam 2 per weight, SGD with momentum and RMSprop 1), plus its activations for one
    batch; a stack may plan on `MEMORY_SHARE` of the memory free now.
    """
    keras.utils.clear_session()
    model = build()
    width = sum(_width(layer) for layer in backend.all_layers(model))
    item = 8 if keras.backend.floatx() == "float64" else 4
    slots = {"sgd": 1, "rmsprop": 1}.get(optimizer, 2)
    per_member = (model.count_params() * (2 + slots) + 3 * batch_size * width) * item
    free, where = host.free_memory()
    fits = int(free * MEMORY_SHARE // per_member)
    size = max(1, min(members, fits))
    reason = (f"{size} of {members} members per stack: each needs about {per_member / 2**20:.1f} MiB, and "
              f"{MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {where} holds {fits}")
    return size, reason


def _width(layer) -> int:
    """Activations per example a layer keeps for the backward pass (0 if its output is not known)."""
    try:
        return sum(int(math.prod(t.shape[1:])) for t in keras.tree.flatten(layer.output))
    except (AttributeError, ValueError, TypeError):
        return 0


def _check_uncoupled(optimizer) -> None:
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or optimizer.loss_scale_factor is not None:
        raise ValueError("optimizer: loss scaling (LossScaleOptimizer, loss_scale_factor) scales the stack's summed "
                         "loss and skips steps for every member at once; stacked members cannot use it. "
                         "Use --no-stacked (stacked=False) for mixed precision.")
    if optimizer.global_clipnorm is not None:
        raise ValueError(f"optimizer: global_clipnorm={optimizer.global_clipnorm!r} clips by one norm over the "
                         "gradients it is given, which would couple the members; use clipnorm (per variable) or "
                         "--no-stacked (stacked=False).")


def _architecture(model) -> tuple:
    return tuple((type(layer).__name__, layer.name, tuple(tuple(w.shape) for w in layer.weights))
                 for layer in backend.all_layers(model))


def _difference(first: tuple, other: tuple) -> str:
    for a, b in zip(first, other, strict=False):  # (the lengths may differ too)
        if a != b:
            return f"layer {a[1]!r} {a[0]} {list(a[2])} against {b[1]!r} {b[0]} {list(b[2])}"
    return f"{len(first)} layers against {len(other)}"
