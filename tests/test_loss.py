"""L2CategoricalCrossentropy against NumPy: every CCE option, then + P once."""

import keras
import numpy as np
import pytest

from keras_l2 import L2CategoricalCrossentropy, select_layers
from tests.helpers import mlp, reported_rtol

pytestmark = pytest.mark.core

RNG = np.random.default_rng(7)
Y_TRUE = np.eye(3)[RNG.integers(0, 3, 5)]
LOGITS = RNG.normal(size=(5, 3))
WEIGHTS = RNG.uniform(0.5, 2.0, size=5)


def reference(from_logits, label_smoothing, reduction, sample_weight, penalty):
    y = Y_TRUE * (1 - label_smoothing) + label_smoothing / 3
    if from_logits:
        shifted = LOGITS - LOGITS.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    else:
        probs = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
        log_p = np.log(probs / probs.sum(axis=1, keepdims=True))
    per_example = -(y * log_p).sum(axis=1)
    w = np.ones(5) if sample_weight is None else sample_weight
    weighted = per_example * w
    if reduction in (None, "none"):
        return weighted + penalty  # P on every element: the vector's mean is the regularized loss
    if reduction == "sum":
        return weighted.sum() + penalty
    if reduction == "mean_with_sample_weight":
        return weighted.sum() / w.sum() + penalty
    return weighted.sum() / len(weighted) + penalty  # sum_over_batch_size


@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["hard", "smoothed"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight", None])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_value_is_reduced_cce_plus_penalty(float64, from_logits, label_smoothing, reduction, weighted):
    model = mlp()
    l2, n = 0.3, 7
    kernels = [keras.ops.convert_to_numpy(layer.kernel) for layer in select_layers(model)]
    penalty = l2 / n * sum(float(np.sum(k * k)) for k in kernels)
    loss = L2CategoricalCrossentropy(l2=l2, n=n, layers=select_layers(model), from_logits=from_logits,
                                     label_smoothing=label_smoothing, reduction=reduction)
    y_pred = LOGITS if from_logits else np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
    sample_weight = WEIGHTS if weighted else None
    got = keras.ops.convert_to_numpy(loss(Y_TRUE, y_pred, sample_weight=sample_weight))
    want = reference(from_logits, label_smoothing, reduction, sample_weight, penalty)
    np.testing.assert_allclose(got, want, rtol=reported_rtol())
    data_only = keras.ops.convert_to_numpy(loss.data_loss(Y_TRUE, y_pred, sample_weight=sample_weight))
    np.testing.assert_allclose(data_only, want - penalty, rtol=reported_rtol())


def test_penalty_covers_all_chosen_matrices_not_only_the_output(float64):
    model = mlp()
    both = L2CategoricalCrossentropy(l2=1.0, layers=select_layers(model))
    out_only = L2CategoricalCrossentropy(l2=1.0, layers=select_layers(model, names="out"))
    hidden = keras.ops.convert_to_numpy(model.get_layer("hidden").kernel)
    difference = float(keras.ops.convert_to_numpy(both.penalty() - out_only.penalty()))
    np.testing.assert_allclose(difference, np.sum(hidden**2), rtol=1e-12)
