"""The one-step hypergradient: how the validation loss after the next update changes with λ.

For weights `w`, a training batch's data gradient `g` and the optimizer's
state, one update of `L2DecayOptimizer` gives new weights `w'(λ)`:

    coupled:   w' = U(w, g + (2λ/n) w)          on the chosen kernels
               (the regularizer and loss routes give the same update)
    decoupled: w' = U(w - w (2λ/n) lr, g)       (decay first, as Keras does)

with `U` the wrapped optimizer's update (SGD with or without momentum, Adam,
RMSprop), written out below with Keras' own formulas. The hypergradient is

    h = d L_val(w'(λ)) / dλ = <∇_w L_val(w'), ∂w'/∂λ>

computed exactly by differentiating that one update with respect to λ (first
order only: `g` does not depend on λ). It is exact for every route and every
one of these optimizers, Adam with coupled L2 included, for the one step;
what it does not see is every later step (the greedy, short-horizon bias of
Luketina et al. 2016 and Wu et al. 2018), which `keras_l2.search.tuning`
corrects by confirming λ with fixed-λ runs. `tests/test_tune.py` checks `h`
against a central finite difference of the real update in float64, on every
backend.

Example:

>>> import keras, numpy as np
>>> from keras_l2 import L2DecayOptimizer, select_layers
>>> from keras_l2.search.hypergradient import hypergradient
>>> keras.utils.set_random_seed(0)
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
>>> optimizer = L2DecayOptimizer(keras.optimizers.SGD(0.1), l2=0.5, n=8, layers=select_layers(model))
>>> model.compile(optimizer=optimizer, loss="categorical_crossentropy")
>>> x, y = np.ones((8, 4), "float32"), np.eye(3, dtype="float32")[np.arange(8) % 3]
>>> loss, h = hypergradient(model, (x, y), (x, y))
>>> bool(np.isfinite(h))
True
"""

from __future__ import annotations

import keras
from keras import ops

from keras_l2 import l2_math
from keras_l2.backend import autodiff, sync_training_state
from keras_l2.inventory import describe
from keras_l2.optimizer import L2DecayOptimizer

TUNABLE = ("Adam", "SGD", "RMSprop")  # the wrapped optimizers whose update is written out below


def check_tunable(model) -> tuple:
    """Refuses what the hypergradient cannot follow exactly: no keras_l2 route or several, an optimizer other
    than Adam, SGD or RMSprop, or one with clipping, EMA, gradient accumulation, AMSGrad, a centered RMSprop
    or its own weight decay. Returns the model's `RouteDescription` and the optimizer that makes the update."""
    description = describe(model)
    if description.mode not in ("penalty", "coupled", "decoupled") or len(description.ns) != 1:
        raise ValueError(f"tune: the model must use exactly one keras_l2 route (regularizer, loss, coupled or "
                         f"decoupled). Received: route {description.route!r}, mode {description.mode!r}")
    inner = inner_optimizer(model)
    if type(inner).__name__ not in TUNABLE:
        raise ValueError(f"tune: the hypergradient follows {', '.join(TUNABLE)} updates; received "
                         f"{type(inner).__name__}")
    settings = {"clipnorm": None, "clipvalue": None, "global_clipnorm": None, "weight_decay": None,
                "use_ema": False, "gradient_accumulation_steps": None, "amsgrad": False, "centered": False}
    odd = {k: getattr(inner, k) for k, plain in settings.items() if getattr(inner, k, plain) not in (plain, 0)}
    if odd:
        raise ValueError(f"tune: the hypergradient follows plain updates; the optimizer sets {odd} (allowed: "
                         f"{ {k: v for k, v in settings.items() if k in odd} })")
    return description, inner


def inner_optimizer(model):
    """The Keras optimizer that makes the update (inside an `L2DecayOptimizer`, if any)."""
    optimizer = model.optimizer
    return optimizer.inner_optimizer if isinstance(optimizer, L2DecayOptimizer) else optimizer


def _update(inner, w, g, slots, lr):
    """`U(w, g)`: one update of Keras' `inner` for one variable, as a function (Keras' formulas and order)."""
    kind = type(inner).__name__
    if kind == "SGD":
        if "momentum" not in slots:
            return ops.subtract(w, ops.multiply(g, lr))
        mu = ops.cast(inner.momentum, w.dtype)
        m = ops.subtract(ops.multiply(slots["momentum"], mu), ops.multiply(g, lr))
        step = ops.subtract(ops.multiply(m, mu), ops.multiply(g, lr)) if inner.nesterov else m
        return ops.add(w, step)
    if kind == "Adam":
        t = ops.cast(inner.iterations + 1, w.dtype)
        b1, b2 = ops.cast(inner.beta_1, w.dtype), ops.cast(inner.beta_2, w.dtype)
        alpha = lr * ops.sqrt(1 - ops.power(b2, t)) / (1 - ops.power(b1, t))
        m = ops.add(slots["momentum"], ops.multiply(ops.subtract(g, slots["momentum"]), 1 - inner.beta_1))
        v = ops.add(slots["velocity"], ops.multiply(ops.subtract(ops.square(g), slots["velocity"]), 1 - inner.beta_2))
        return ops.subtract(w, ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), inner.epsilon)))
    velocity = ops.add(ops.multiply(inner.rho, slots["velocity"]), ops.multiply(1 - inner.rho, ops.square(g)))
    increment = ops.divide(ops.multiply(lr, g), ops.sqrt(ops.add(velocity, inner.epsilon)))
    if inner.momentum > 0:
        return ops.subtract(w, ops.add(ops.multiply(inner.momentum, slots["momentum"]), increment))
    return ops.subtract(w, increment)


def updated_weights(inner, mode: str, chosen: frozenset, n: int, variables: list, weights: list, grads: list, l2):
    """`w'(λ)`: the weights after one update of `inner` from `weights` with data gradients `grads`.

    `mode`: "penalty" or "coupled" (`2λ/n W` added to the chosen kernels'
    gradients) or "decoupled" (the chosen kernels decay first); `chosen`: the
    `id()`s of the chosen kernel variables. `l2` may be a traced scalar: the
    result is differentiable in it.
    """
    new = []
    for variable, w, g in zip(variables, weights, grads, strict=True):
        lr = ops.cast(inner.learning_rate, w.dtype)
        g = ops.cast(g, w.dtype)
        if id(variable) in chosen:
            if mode == "decoupled":
                # The difference form, differentiable in l2 (PyTorch's real step multiplies in place,
                # `l2_math.decay`: the same function of l2, rounded differently by about an ulp).
                w = l2_math.decayed(w, l2, n, lr)
            else:
                g = ops.add(g, l2_math.penalty_gradient(w, l2, n))
        slots = {k: ops.convert_to_tensor(v) for k, v in autodiff.optimizer_slots(inner, variable).items()}
        new.append(_update(inner, w, g, slots, lr))
    return new


def data_loss(y_true, y_pred):
    """The mean categorical cross-entropy of probabilities, computed in their dtype.

    Keras' own cross-entropy rounds float64 inputs through float32 on JAX and
    torch (0.7572180032730103 where NumPy and TensorFlow give
    0.757218045101127), and so does `ops.mean` on JAX; written out with a sum,
    the hypergradient stays float64 there too. The same clipping as Keras'
    (to `epsilon()`).
    """
    y_true = ops.cast(y_true, y_pred.dtype)
    eps = keras.config.epsilon()
    probabilities = ops.clip(y_pred / ops.sum(y_pred, axis=-1, keepdims=True), eps, 1.0 - eps)
    total = ops.sum(ops.multiply(y_true, ops.log(probabilities)))
    return ops.divide(ops.negative(total), ops.cast(ops.shape(y_pred)[0], y_pred.dtype))


def hypergradient(model, train_batch, val_batch) -> tuple[float, float]:
    """Returns `(L_val(w'), dL_val(w')/dλ)` for one update on `train_batch`, validated on `val_batch`.

    `model` is compiled with one keras_l2 route (see `check_tunable`) and a
    categorical cross-entropy; `L_val` is the mean cross-entropy of
    `val_batch = (x, one-hot y)`, without any penalty (the data loss). The
    update is the one `fit` would make next on `train_batch`, with the
    model's own losses (`model.losses`) in it.
    """
    description, inner = check_tunable(model)
    sync_training_state(model)
    if not model.optimizer.built:  # before the first step: its state is what `fit` would build
        model.optimizer.build(model.trainable_variables)
    (n,), chosen = description.ns, description.chosen_kernel_ids
    variables = list(model.trainable_variables)
    weights = [ops.convert_to_tensor(v) for v in variables]
    frozen = [ops.convert_to_tensor(v) for v in model.non_trainable_variables]
    (x, y), (x_val, y_val) = train_batch, val_batch

    def train_loss(values):
        y_pred, _, losses = model.stateless_call(values, frozen, x, training=True, return_losses=True)
        loss = data_loss(y, y_pred)
        return loss if not losses else ops.add(loss, ops.sum(ops.stack(losses)))

    _, grads = autodiff.value_and_gradients(train_loss, weights)
    if description.route == "regularizer":  # its penalty is among `model.losses`: keep the data gradient only
        grads = [ops.subtract(g, l2_math.penalty_gradient(w, description.l2, n)) if id(v) in chosen else g
                 for g, w, v in zip(grads, weights, variables, strict=True)]

    def val_loss(l2_values):
        new = updated_weights(inner, description.mode, chosen, n, variables, weights, grads, l2_values[0])
        y_pred, _ = model.stateless_call(new, frozen, x_val, training=False)
        return data_loss(y_val, y_pred)

    l2 = ops.convert_to_tensor(description.l2, dtype=weights[0].dtype)
    value, (h,) = autodiff.value_and_gradients(val_loss, [l2])
    return float(ops.convert_to_numpy(value)), float(ops.convert_to_numpy(h))
