"""Every bad input fails before training, naming the bad value and what is allowed."""

import keras
import numpy as np
import pytest

from keras_l2 import (
    L2CategoricalCrossentropy,
    L2DecayOptimizer,
    L2Regularizer,
    regularize,
    select_layers,
    set_l2,
)
from tests.helpers import data, mlp

pytestmark = pytest.mark.core


def assert_fit_refused(model, x, y, error: type, match: str) -> None:
    """`model.fit(x, y)` raises `error` before a single weight changes."""
    before = model.get_weights()
    with pytest.raises(error, match=match):
        model.fit(x, y, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "l2,error,fragment",
    [
        (-0.1, ValueError, "l2=-0.1"),
        (float("nan"), ValueError, "l2=nan"),
        (float("inf"), ValueError, "l2=inf"),
        (-float("inf"), ValueError, "l2=-inf"),
        ("0.01", TypeError, "l2='0.01'"),
        (True, TypeError, "l2=True"),
        (None, TypeError, "l2=None"),
        ([0.1], TypeError, "l2=[0.1]"),
    ],
    ids=["negative", "nan", "inf", "-inf", "string", "bool", "none", "list"],
)
@pytest.mark.parametrize("route", ["regularizer", "loss", "optimizer", "regularize", "set_l2"])
def test_bad_l2(route, l2, error, fragment):
    model = mlp()
    layers = select_layers(model)
    with pytest.raises(error, match="finite float >= 0") as info:
        if route == "regularizer":
            L2Regularizer(l2=l2)
        elif route == "loss":
            L2CategoricalCrossentropy(l2=l2, layers=layers)
        elif route == "optimizer":
            L2DecayOptimizer(keras.optimizers.SGD(), l2=l2, layers=layers)
        elif route == "regularize":
            regularize(model, l2=l2)
        else:
            regularize(model, l2=0.1)
            set_l2(model, l2)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "n,error,fragment",
    [(0, ValueError, "n=0"), (-3, ValueError, "n=-3"), (2.5, TypeError, "n=2.5"),
     (2.0, TypeError, "n=2.0"), ("10", TypeError, "n='10'"), (True, TypeError, "n=True")],
    ids=["zero", "negative", "float", "integral-float", "string", "bool"],
)
@pytest.mark.parametrize("route", ["regularizer", "loss", "optimizer"])
def test_bad_n(route, n, error, fragment):
    layers = select_layers(mlp())
    with pytest.raises(error, match="integer >= 1") as info:
        if route == "regularizer":
            L2Regularizer(l2=0.1, n=n)
        elif route == "loss":
            L2CategoricalCrossentropy(l2=0.1, n=n, layers=layers)
        else:
            L2DecayOptimizer(keras.optimizers.SGD(), l2=0.1, n=n, layers=layers)
    assert fragment in str(info.value)


def test_unknown_mode():
    with pytest.raises(ValueError, match=r'one of \{"coupled", "decoupled"\}. Received: mode=\'decoupeld\''):
        L2DecayOptimizer(keras.optimizers.SGD(), layers=select_layers(mlp()), mode="decoupeld")


# Explicit ids: objects' default ids hold addresses, which differ between pytest-xdist workers.
@pytest.mark.parametrize("thing", ["adam", keras.losses.MeanSquaredError(), None, object()],
                         ids=["string", "a_loss", "None", "object"])
def test_wrapping_something_that_is_not_an_optimizer(thing):
    with pytest.raises(TypeError, match="must be a `keras.optimizers.Optimizer` instance") as info:
        L2DecayOptimizer(thing, layers=select_layers(mlp()))
    assert repr(thing) in str(info.value)


def test_wrapping_twice():
    layers = select_layers(mlp())
    once = L2DecayOptimizer(keras.optimizers.SGD(), layers=layers)
    with pytest.raises(ValueError, match="already an L2DecayOptimizer"):
        L2DecayOptimizer(once, layers=layers)


def test_decoupled_with_gradient_accumulation():
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        L2DecayOptimizer(keras.optimizers.SGD(gradient_accumulation_steps=4), layers=select_layers(mlp()),
                         mode="decoupled")


def test_unknown_layer_name_lists_dense_layers():
    with pytest.raises(ValueError, match="no layer named 'hiden'") as info:
        select_layers(mlp(), names=["hiden"])
    assert "Its Dense layers are: ['hidden', 'out']" in str(info.value)


def test_selection_matching_nothing():
    with pytest.raises(ValueError, match="matched no Dense layer") as info:
        select_layers(mlp(), pattern="^conv")
    assert "pattern='^conv'" in str(info.value) and "'hidden', 'out'" in str(info.value)


def test_min_params_matching_nothing():
    with pytest.raises(ValueError, match="min_params=10000"):
        select_layers(mlp(), min_params=10_000)


@pytest.mark.parametrize("value", [-1, 1.5, True], ids=str)
def test_bad_min_params(value):
    with pytest.raises(ValueError, match="`min_params` must be an integer >= 0"):
        select_layers(mlp(), min_params=value)


def test_bad_pattern():
    with pytest.raises(ValueError, match="valid regular expression. Received: pattern='\\(dense'"):
        select_layers(mlp(), pattern="(dense")


def test_chosen_layer_is_not_dense():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="out")])
    with pytest.raises(ValueError, match="Layer 'conv' is a Conv2D, not a Dense layer") as info:
        select_layers(model, names="conv")
    assert "['out']" in str(info.value)
    with pytest.raises(TypeError, match="must be a `keras.layers.Dense` layer"):
        regularize(model, layers=[model.get_layer("conv")])
    with pytest.raises(TypeError, match="Conv2D"):
        L2CategoricalCrossentropy(layers=[model.get_layer("conv")])
    with pytest.raises(TypeError, match="Conv2D"):
        L2DecayOptimizer(keras.optimizers.SGD(), layers=[model.get_layer("conv")])


def test_types_must_be_dense_classes():
    with pytest.raises(ValueError, match="`types` may only name Dense layer classes"):
        select_layers(mlp(), types=(keras.layers.Conv2D,))


def test_select_layers_needs_a_model():
    with pytest.raises(TypeError, match="Expected a `keras.Model`. Received: model='net'"):
        select_layers("net")


def test_layer_of_another_model_regularize():
    model, other = mlp(), mlp(seed=2)
    with pytest.raises(ValueError, match="Layer 'hidden' is not a layer of model") as info:
        regularize(model, layers=select_layers(other, names="hidden"))
    assert "belongs to another model" in str(info.value)


def test_layer_of_another_model_loss_fails_before_training():
    model, other = mlp(), mlp(seed=2)
    x, y = data()
    model.compile(optimizer="sgd", loss=L2CategoricalCrossentropy(layers=select_layers(other)))
    assert_fit_refused(model, x, y, ValueError, "not a layer of model")


def test_layer_of_another_model_optimizer_fails_before_training():
    model, other = mlp(), mlp(seed=2)
    x, y = data()
    model.compile(optimizer=L2DecayOptimizer(keras.optimizers.SGD(), layers=select_layers(other)),
                  loss="categorical_crossentropy")
    assert_fit_refused(model, x, y, ValueError, "Layer 'hidden' is not part of the model this optimizer trains")


def test_unbuilt_model_where_weights_are_needed():
    model = keras.Sequential([keras.layers.Dense(3, name="hidden"), keras.layers.Dense(2, name="out")])
    layers = select_layers(model)  # names exist before build
    for make in (lambda: regularize(model, layers=layers),
                 lambda: L2CategoricalCrossentropy(layers=layers),
                 lambda: L2DecayOptimizer(keras.optimizers.SGD(), layers=layers),
                 lambda: select_layers(model, min_params=1)):
        with pytest.raises(ValueError, match="Layer 'hidden' is not built") as info:
            make()
        assert "model.build(input_shape)" in str(info.value)


@pytest.mark.parametrize("layers", [None, []], ids=["none", "empty"])
def test_loss_and_optimizer_need_layers(layers):
    with pytest.raises(ValueError, match="select_layers|at least one"):
        L2CategoricalCrossentropy(layers=layers)
    with pytest.raises(ValueError, match="select_layers|at least one"):
        L2DecayOptimizer(keras.optimizers.SGD(), layers=layers)


def test_regularize_refuses_to_stack_on_another_regularizer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_regularizer="l1", name="d")])
    with pytest.raises(ValueError, match="Layer 'd' already has a kernel regularizer"):
        regularize(model, l2=0.1)


def test_set_l2_on_model_without_route():
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    with pytest.raises(ValueError, match="uses no keras_l2 route"):
        set_l2(model, 0.1)


def test_unknown_layer_name_after_restore():
    """A restored optimizer whose layer names the model lacks says which kernels exist."""
    model = mlp()
    optimizer = L2DecayOptimizer(keras.optimizers.SGD(), layers=["hiddn"])
    with pytest.raises(ValueError, match="'hiddn' has no trainable kernel") as info:
        optimizer.build(model.trainable_variables)
    assert "hidden/kernel" in str(info.value)


def test_unexpected_keyword():
    with pytest.raises(TypeError, match="learning_rate"):
        L2DecayOptimizer(keras.optimizers.SGD(), layers=select_layers(mlp()), learning_rate=0.1)


def test_frozen_layer_is_refused():
    model = mlp()
    model.get_layer("out").trainable = False
    layers = [model.get_layer("out")]
    for make in (lambda: regularize(model, layers=layers),
                 lambda: L2CategoricalCrossentropy(layers=layers),
                 lambda: L2DecayOptimizer(keras.optimizers.SGD(), layers=layers)):
        with pytest.raises(ValueError, match="Layer 'out' is frozen"):
            make()


def test_loss_reused_in_another_model_is_refused():
    first, second = mlp(), mlp(seed=2)
    x, y = data()
    loss = L2CategoricalCrossentropy(layers=select_layers(first))
    first.compile(optimizer="sgd", loss=loss)
    first.fit(x, y, epochs=1, verbose=0)
    second.compile(optimizer="sgd", loss=loss)
    assert_fit_refused(second, x, y, ValueError, "not a layer of model")


@pytest.mark.parametrize("pair", ["regularizer+loss", "regularizer+optimizer", "loss+optimizer"])
def test_two_routes_on_one_kernel_are_refused(pair):
    model = mlp()
    x, y = data()
    layers = select_layers(model)
    optimizer, loss = keras.optimizers.SGD(), "categorical_crossentropy"
    if "regularizer" in pair:
        regularize(model, l2=0.1, layers=layers)
    if "loss" in pair:
        loss = L2CategoricalCrossentropy(layers=layers)
    if "optimizer" in pair:
        optimizer = L2DecayOptimizer(optimizer, layers=layers)
    model.compile(optimizer=optimizer, loss=loss)
    assert_fit_refused(model, x, y, ValueError, "count the penalty twice")


def test_regularize_refuses_kernels_of_a_compiled_loss_route():
    model = mlp()
    model.compile(optimizer="sgd", loss=L2CategoricalCrossentropy(layers=select_layers(model)))
    with pytest.raises(ValueError, match="L2CategoricalCrossentropy; adding the regularizer route"):
        regularize(model, l2=0.1)


def test_decoupled_cannot_wrap_loss_scale_optimizer():
    inner = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    with pytest.raises(ValueError, match=r"LossScaleOptimizer\(L2DecayOptimizer\(...\)\)"):
        L2DecayOptimizer(inner, layers=select_layers(mlp()), mode="decoupled")


def _duplicate_names_model():
    def block(name):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="dense")], name=name)

    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="head")(block("b")(block("a")(inputs)))
    return keras.Model(inputs, outputs)


def test_ambiguous_layer_names_are_refused_before_training():
    model = _duplicate_names_model()
    chosen = select_layers(model, names="a/dense")
    x, y = np.ones((4, 4)), np.eye(2)[[0, 1, 0, 1]]
    model.compile(optimizer="sgd", loss=L2CategoricalCrossentropy(layers=chosen))
    with pytest.raises(ValueError, match="Layer name 'dense' occurs 2 times"):
        model.fit(x, y, epochs=1, verbose=0)
    optimizer = L2DecayOptimizer(keras.optimizers.SGD(), layers=chosen)
    with pytest.raises(ValueError, match="Layer name 'dense' occurs 2 times"):
        optimizer.build(model.trainable_variables)


def test_names_mixed_with_layers():
    model = mlp()
    with pytest.raises(TypeError, match="Received: 'out' of type str"):
        L2CategoricalCrossentropy(layers=[model.get_layer("hidden"), "out"])


def test_loss_recompiled_beside_an_optimizer_route_is_refused():
    model = mlp()
    x, y = data()
    loss = L2CategoricalCrossentropy(layers=select_layers(model))
    model.compile(optimizer="sgd", loss=loss)
    model.fit(x, y, epochs=1, verbose=0)
    model.compile(optimizer=L2DecayOptimizer(keras.optimizers.SGD(), layers=select_layers(model)), loss=loss)
    with pytest.raises(ValueError, match="count the penalty twice"):
        model.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("shared", [True, False], ids=["same_object", "two_objects"])
def test_one_penalty_per_kernel_across_outputs(shared):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    outputs = [keras.layers.Dense(3, activation="softmax", name=f"head{i}")(hidden) for i in (1, 2)]
    model = keras.Model(inputs, outputs)
    layers = select_layers(model, names="hidden")
    first = L2CategoricalCrossentropy(layers=layers)
    second = first if shared else L2CategoricalCrossentropy(layers=layers)
    model.compile(optimizer="sgd", loss=[first, second])
    x, y = data()
    with pytest.raises(ValueError, match="2 compiled L2CategoricalCrossentropy losses"):
        model.fit(x, [y, y], epochs=1, verbose=0)
