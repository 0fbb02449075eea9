"""Choosing layers: names, patterns, sizes, nesting; and `regularize` on built models."""

import keras
import numpy as np
import pytest

from keras_l2 import L2Regularizer, regularize, select_layers
from tests.helpers import data, mlp, reported_rtol

pytestmark = pytest.mark.core


def nested_model():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(32, activation="relu", name="wide")(inputs)
    block = keras.Sequential([keras.Input((32,)), keras.layers.Dense(8, name="inner_dense"),
                              keras.layers.Dropout(0.1)], name="block")
    h = block(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="nested")


def names(layers):
    return [layer.name for layer in layers]


def test_default_is_every_dense_layer_including_nested():
    assert names(select_layers(nested_model())) == ["wide", "inner_dense", "head"]


def test_by_name_single_and_list():
    model = nested_model()
    assert names(select_layers(model, names="head")) == ["head"]
    assert names(select_layers(model, names=["head", "inner_dense"])) == ["inner_dense", "head"]


def test_by_path_of_nested_layer():
    assert names(select_layers(nested_model(), names="block/inner_dense")) == ["inner_dense"]


def test_by_pattern_and_min_params_combine():
    model = nested_model()
    assert names(select_layers(model, pattern="^(wide|head)$")) == ["wide", "head"]
    assert names(select_layers(model, min_params=200)) == ["wide", "inner_dense"]
    assert names(select_layers(model, pattern="e", min_params=200)) == ["wide", "inner_dense"]


def test_dense_subclasses_are_dense():
    class MyDense(keras.layers.Dense):
        pass

    model = keras.Sequential([keras.Input((3,)), MyDense(4, name="mine"), keras.layers.Dense(2, name="plain")])
    assert names(select_layers(model)) == ["mine", "plain"]
    assert names(select_layers(model, types=(MyDense,))) == ["mine"]


def test_regularize_attaches_to_variable_and_config():
    model = nested_model()
    chosen = regularize(model, l2=0.2, n=5, layers=select_layers(model, names=["wide", "head"]))
    assert names(chosen) == ["wide", "head"]
    for layer in model._flatten_layers():
        if not isinstance(layer, keras.layers.Dense):
            continue
        if layer.name in ("wide", "head"):
            assert isinstance(layer.kernel.regularizer, L2Regularizer)
            assert layer.get_config()["kernel_regularizer"]["config"] == {"l2": 0.2, "n": 5}
        else:
            assert layer.kernel.regularizer is None
        assert layer.bias.regularizer is None
    assert len(model.losses) == 2


def test_regularize_defaults_to_all_dense_and_updates_existing():
    model = mlp()
    regularize(model, l2=0.1)
    regularize(model, l2=0.3)  # re-regularizing sets the new lambda, never stacks
    assert [v.regularizer.l2 for v in model.trainable_variables if v.regularizer] == [0.3, 0.3]
    assert len(model.losses) == 2


def test_regularize_after_compile_and_fit_takes_effect(float64):
    """A model that already trained (traced step) picks the penalty up at once."""
    model = mlp()
    x, y = data()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    before = model.evaluate(x, y, verbose=0)
    regularize(model, l2=1.0)
    after = model.evaluate(x, y, verbose=0)
    penalty = sum(float(np.sum(np.square(k))) for k in (model.layers[0].kernel, model.layers[1].kernel))
    np.testing.assert_allclose(after, before + penalty, rtol=reported_rtol())
