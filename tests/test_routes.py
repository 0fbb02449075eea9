"""The three routes against a from-scratch NumPy network and against each other."""

import keras
import numpy as np
import pytest

from keras_l2 import L2DecayOptimizer, select_layers
from tests.helpers import ROUTES, compile_route, data, mlp, reference_gd, reference_loss, reported_rtol, weights

pytestmark = pytest.mark.core

X, Y = data(examples=24)
N = 24  # the note's n: the number of training examples
L2 = 0.05
STEPS = 25
LR = 0.5


def _tolerance() -> float:
    # Keras on torch drifts ~1e-8 per float64 step from NumPy even without
    # any regularization; TensorFlow and JAX (x64) stay at rounding level.
    return 1e-6 if keras.backend.backend() == "torch" else 1e-8


def _train(route, optimizer, layer_names=("hidden", "out"), steps=STEPS, l2=L2):
    model = mlp()
    compile_route(model, route, optimizer, l2, N, select_layers(model, names=list(layer_names)))
    initial = weights(model)
    model.fit(X, Y, batch_size=len(X), epochs=steps, shuffle=False, verbose=0)
    return initial, weights(model)


@pytest.mark.parametrize("route", ROUTES)
def test_route_matches_numpy_reference(float64, route):
    initial, final = _train(route, keras.optimizers.SGD(LR))
    expected = reference_gd(initial, X, Y, LR, N, [L2] * STEPS)
    for got, want in zip(final, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance())
    # The regularization mattered: an unregularized reference is far away.
    plain = reference_gd(initial, X, Y, LR, N, [0.0] * STEPS)
    assert np.max(np.abs(final[0] - plain[0])) > 1e3 * _tolerance()


@pytest.mark.parametrize("route", ROUTES)
def test_route_regularizes_only_chosen_layer_like_reference(float64, route):
    initial, final = _train(route, keras.optimizers.SGD(LR), layer_names=("out",))
    expected = reference_gd(initial, X, Y, LR, N, [L2] * STEPS, chosen=(False, True))
    for got, want in zip(final, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance())


def test_penalty_routes_report_the_regularized_loss(float64):
    model = mlp()
    compile_route(model, "loss", keras.optimizers.SGD(LR), L2, N, select_layers(model))
    data_loss, penalty = reference_loss(weights(model), X, Y, L2, N)
    got = model.evaluate(X, Y, batch_size=len(X), verbose=0)
    np.testing.assert_allclose(got, data_loss + penalty, rtol=reported_rtol())


def test_sgd_all_routes_and_modes_agree(float64):
    results = {route: _train(route, keras.optimizers.SGD(LR))[1] for route in ROUTES}
    for route in ("loss", "coupled"):
        for got, want in zip(results[route], results["regularizer"], strict=True):
            np.testing.assert_array_equal(got, want)  # the same operations: bit for bit
    for got, want in zip(results["decoupled"], results["regularizer"], strict=True):
        # (W - lr*c*W) - lr*g rounds differently from W - lr*(g + c*W).
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
def test_sgd_decoupled_equals_coupled(float64, momentum):
    _, coupled = _train("coupled", keras.optimizers.SGD(LR / 10, momentum=momentum))
    _, decoupled = _train("decoupled", keras.optimizers.SGD(LR / 10, momentum=momentum))
    if momentum == 0.0:
        for got, want in zip(decoupled, coupled, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    else:
        # With momentum the decay no longer passes through the velocity.
        assert max(np.max(np.abs(a - b)) for a, b in zip(decoupled, coupled, strict=True)) > 1e-6


@pytest.mark.parametrize("make", [
    lambda: keras.optimizers.Adam(0.01),
    lambda: keras.optimizers.RMSprop(0.01),
    lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    lambda: keras.optimizers.Adagrad(0.1),
], ids=["adam", "rmsprop", "nesterov", "adagrad"])
def test_coupled_equals_regularizer_route_for_any_optimizer(float64, make):
    _, reg = _train("regularizer", make(), layer_names=("hidden",))
    _, loss = _train("loss", make(), layer_names=("hidden",))
    _, coupled = _train("coupled", make(), layer_names=("hidden",))
    for a, b, c in zip(reg, loss, coupled, strict=True):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(c, a)


def _adamw_restricted(model, layer_names, learning_rate):
    chosen = {id(layer.kernel) for layer in select_layers(model, names=list(layer_names))}
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=2 * ADAMW_L2 / N)
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if id(v) not in chosen])
    return optimizer


# Keras' AdamW on TensorFlow casts `weight_decay` through float32, so the
# test picks 2*l2/n = 1/16, which float32 holds exactly.
ADAMW_L2 = 0.75


@pytest.mark.parametrize("schedule", [False, True], ids=["constant_lr", "lr_schedule"])
def test_adam_decoupled_is_adamw_on_chosen_kernels(float64, schedule):
    lr = keras.optimizers.schedules.ExponentialDecay(0.05, 5, 0.5) if schedule else 0.05
    lr_copy = keras.optimizers.schedules.ExponentialDecay(0.05, 5, 0.5) if schedule else 0.05
    _, decoupled = _train("decoupled", keras.optimizers.Adam(lr), layer_names=("hidden",), l2=ADAMW_L2)

    model = mlp()
    optimizer = _adamw_restricted(model, ("hidden",), lr_copy)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    model.fit(X, Y, batch_size=len(X), epochs=STEPS, shuffle=False, verbose=0)
    for got, want in zip(decoupled, weights(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)

    _, coupled = _train("coupled", keras.optimizers.Adam(lr_copy), layer_names=("hidden",), l2=ADAMW_L2)
    difference = np.max(np.abs(decoupled[0] - coupled[0]))
    assert difference > 1e-3, f"decoupled and coupled Adam should differ; max |diff| = {difference}"


@pytest.mark.parametrize("make", [
    lambda **kw: keras.optimizers.SGD(0.1, **kw),
    lambda **kw: keras.optimizers.SGD(0.1, momentum=0.9, **kw),
    lambda **kw: keras.optimizers.Adam(0.05, **kw),
], ids=["sgd", "momentum", "adam"])
def test_decoupled_is_keras_own_weight_decay_bit_for_bit(float64, make):
    """Keras decays as W - W*wd*lr on TensorFlow and JAX, as W * (1 - wd*lr) on PyTorch: so do we."""
    _, decoupled = _train("decoupled", make(), layer_names=("hidden",), l2=ADAMW_L2)
    model = mlp()
    chosen = {id(layer.kernel) for layer in select_layers(model, names=["hidden"])}
    optimizer = make(weight_decay=2 * ADAMW_L2 / N)
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if id(v) not in chosen])
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    model.fit(X, Y, batch_size=len(X), epochs=STEPS, shuffle=False, verbose=0)
    for got, want in zip(decoupled, weights(model), strict=True):
        np.testing.assert_array_equal(got, want)


def test_unchosen_layers_and_biases_untouched_after_a_step(float64):
    _, plain = _train("none", keras.optimizers.SGD(LR), steps=1)
    for route in ROUTES:
        _, regularized = _train(route, keras.optimizers.SGD(LR), layer_names=("hidden",), steps=1)
        hidden_kernel, hidden_bias, out_kernel, out_bias = regularized
        np.testing.assert_array_equal(hidden_bias, plain[1], err_msg=route)
        np.testing.assert_array_equal(out_kernel, plain[2], err_msg=route)
        np.testing.assert_array_equal(out_bias, plain[3], err_msg=route)
        assert np.max(np.abs(hidden_kernel - plain[0])) > 1e-4, route


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_optimizer_leaves_unchosen_variables_to_inner_optimizer(float64, mode):
    """Over many steps with the same gradients, unchosen variables match Adam bit for bit."""
    model = mlp()
    chosen = select_layers(model, names="hidden")
    wrapped = L2DecayOptimizer(keras.optimizers.Adam(0.01), l2=0.5, n=3, layers=chosen, mode=mode)
    twin = mlp()
    plain = keras.optimizers.Adam(0.01)
    rng = np.random.default_rng(3)
    for _ in range(15):
        grads = [rng.normal(size=v.shape) for v in model.trainable_variables]
        wrapped.apply([keras.ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
        plain.apply([keras.ops.convert_to_tensor(g) for g in grads], twin.trainable_variables)
    ours, theirs = weights(model), weights(twin)
    for index in (1, 2, 3):
        np.testing.assert_array_equal(ours[index], theirs[index])
    assert np.max(np.abs(ours[0] - theirs[0])) > 1e-4


def test_decoupled_stateless_apply_leaves_the_values_it_is_given_untouched(float64):
    """PyTorch decays in place outside a scope; inside `stateless_apply` it must not touch the caller's tensors.

    With zero gradients only the decay could: Keras' own PyTorch optimizers add their update to the
    values in place even in `stateless_apply` (their `_parallel_update_step`), which is theirs to change.
    """
    model = mlp()
    optimizer = L2DecayOptimizer(keras.optimizers.SGD(0.1), l2=0.5, n=3, layers=select_layers(model),
                                 mode="decoupled")
    optimizer.build(model.trainable_variables)
    values = [keras.ops.convert_to_tensor(v) for v in model.trainable_variables]
    before = [keras.ops.convert_to_numpy(v).copy() for v in values]
    grads = [keras.ops.zeros_like(v) for v in values]
    if keras.backend.backend() == "tensorflow":  # Keras has no stateless_apply there, wrapped or not
        with pytest.raises(ValueError, match="stateless_apply is not supported with the TensorFlow backend"):
            optimizer.stateless_apply([v.value for v in optimizer.variables], grads, values)
        return
    new, _ = optimizer.stateless_apply([v.value for v in optimizer.variables], grads, values)
    for value, old in zip(values, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(value), old)
    for variable, old in zip(model.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), old)
    kernel = keras.ops.convert_to_numpy(new[0])
    np.testing.assert_allclose(kernel, before[0] * (1 - 2 * 0.5 / 3 * 0.1), rtol=1e-14)


@pytest.mark.parametrize("scaling", ["loss_scale_factor", "inner_loss_scale_optimizer", "outer_loss_scale_optimizer"])
def test_coupled_under_loss_scaling_equals_regularizer_route(float64, scaling):
    """The penalty's gradient is scaled like the data gradient: never twice, never not at all."""

    def make():
        if scaling == "loss_scale_factor":
            return keras.optimizers.Adam(0.01, loss_scale_factor=64.0)
        if scaling == "inner_loss_scale_optimizer":
            return keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01), initial_scale=64.0)
        return keras.optimizers.Adam(0.01)

    _, reg = _train("regularizer", make(), layer_names=("hidden",))
    model = mlp()
    optimizer = L2DecayOptimizer(make(), l2=L2, n=N, layers=select_layers(model, names="hidden"))
    if scaling == "outer_loss_scale_optimizer":  # what Keras does itself under mixed_float16
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=64.0)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    model.fit(X, Y, batch_size=len(X), epochs=STEPS, shuffle=False, verbose=0)
    for got, want in zip(weights(model), reg, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("make", [lambda: keras.optimizers.RMSprop(0.01), lambda: keras.optimizers.Adagrad(0.1)],
                         ids=["rmsprop", "adagrad"])
def test_adaptive_optimizers_decoupled_differs_from_coupled(float64, make):
    _, coupled = _train("coupled", make(), layer_names=("hidden",), l2=ADAMW_L2)
    _, decoupled = _train("decoupled", make(), layer_names=("hidden",), l2=ADAMW_L2)
    assert np.max(np.abs(decoupled[0] - coupled[0])) > 1e-3


@pytest.mark.parametrize("make", [
    lambda: keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.05, 4, 0.5), use_ema=True),
    lambda: keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=2),
], ids=["adam_schedule_ema", "momentum_accumulation"])
def test_coupled_equals_regularizer_route_with_wrapped_optimizer_features(float64, make):
    """EMA, schedules and gradient accumulation live in the wrapped optimizer and still work."""
    _, reg = _train("regularizer", make(), layer_names=("hidden",), steps=8)
    _, coupled = _train("coupled", make(), layer_names=("hidden",), steps=8)
    for got, want in zip(coupled, reg, strict=True):
        np.testing.assert_array_equal(got, want)
