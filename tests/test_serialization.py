"""Configs round-trip, and a saved model continues on exactly the same trajectory."""

import keras
import numpy as np
import pytest

from keras_l2 import L2CategoricalCrossentropy, L2DecayOptimizer, L2Regularizer, l2_routes, select_layers
from tests.helpers import ROUTES, compile_route, data, mlp, weights

pytestmark = pytest.mark.core

X, Y = data(examples=32)


def test_regularizer_config_round_trip():
    reg = L2Regularizer(l2=0.25, n=9)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(reg))
    assert isinstance(again, L2Regularizer) and again.get_config() == {"l2": 0.25, "n": 9}
    assert L2Regularizer.from_config(reg.get_config()).get_config() == reg.get_config()


def test_loss_config_round_trip_keeps_cce_options():
    model = mlp()
    loss = L2CategoricalCrossentropy(l2=0.1, n=3, layers=select_layers(model, names="out"),
                                     from_logits=True, label_smoothing=0.2, reduction="sum")
    config = loss.get_config()
    assert config["layers"] == ["out"] and config["from_logits"] and config["label_smoothing"] == 0.2
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(again, L2CategoricalCrossentropy)
    assert again.get_config() == config
    assert again.layers == ()  # knows its layers by name until bound
    again.bind(model)
    assert again.layers == (model.get_layer("out"),)


def test_optimizer_config_round_trip_nests_inner_optimizer():
    model = mlp()
    inner = keras.optimizers.Adam(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))
    opt = L2DecayOptimizer(inner, l2=0.2, n=7, layers=select_layers(model, names="hidden"), mode="decoupled")
    config = opt.get_config()
    assert config["layers"] == ["hidden"] and config["mode"] == "decoupled" and config["optimizer"]
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert isinstance(again, L2DecayOptimizer) and isinstance(again.inner_optimizer, keras.optimizers.Adam)
    assert again.get_config() == config
    again.build(model.trainable_variables)
    assert [v.path for v in again.chosen_variables] == [model.get_layer("hidden").kernel.path]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("make_optimizer", [lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                                            lambda: keras.optimizers.Adam(0.01)], ids=["momentum", "adam"])
def test_save_load_continues_same_trajectory(float64, tmp_path, route, make_optimizer):
    def build():
        model = mlp()
        compile_route(model, route, make_optimizer(), 0.3, len(X), select_layers(model, names="hidden"))
        return model

    uninterrupted = build()
    uninterrupted.fit(X, Y, batch_size=8, epochs=4, shuffle=False, verbose=0)

    first = build()
    first.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    path = tmp_path / f"{route}.keras"
    first.save(path)
    restored = keras.saving.load_model(path)
    routes = l2_routes(restored)
    assert routes.names == (route if route in ("regularizer", "loss") else "optimizer",)
    assert routes.l2 == 0.3
    restored.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    for got, want in zip(weights(restored), weights(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, want)  # exactly the same trajectory
    # Only the chosen kernel is regularized after the restore as well.
    if route == "regularizer":
        assert [v.regularizer is not None for v in restored.trainable_variables] == [True, False, False, False]


def test_restored_loss_refuses_to_guess_without_a_model():
    loss = L2CategoricalCrossentropy.from_config(
        L2CategoricalCrossentropy(layers=select_layers(mlp())).get_config())
    with pytest.raises(ValueError, match="has not been bound to a model yet"):
        loss(np.eye(3)[:2], np.full((2, 3), 1 / 3))


def test_layer_names_are_accepted_and_resolved_on_use(float64):
    """A single name is one name, not a string of one-letter names."""
    model = mlp()
    loss = L2CategoricalCrossentropy(l2=0.5, n=4, layers="out")
    optimizer = L2DecayOptimizer(keras.optimizers.SGD(0.1), l2=0.5, n=4, layers="hidden")
    assert loss.layer_names == ("out",) and optimizer.layer_names == ("hidden",)
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(X, Y, epochs=1, verbose=0)
    assert loss.layers == (model.get_layer("out"),)
    assert optimizer.chosen_variables == [model.get_layer("hidden").kernel]
