"""The shared L2 math against NumPy, finite differences and Keras' own L2."""

import keras
import numpy as np
import pytest

from keras_l2 import L2Regularizer, l2_math
from tests.helpers import value_and_grad

pytestmark = pytest.mark.core

RNG = np.random.default_rng(42)
KERNELS = [RNG.normal(size=(5, 4)), RNG.normal(size=(4, 3)), RNG.normal(size=(7,))]


@pytest.mark.parametrize("l2,n", [(0.0, 1), (0.01, 1), (0.3, 7), (2.5, 60000)], ids=str)
def test_penalty_equals_numpy(float64, l2, n):
    expected = l2 / n * sum(np.sum(w * w) for w in KERNELS)
    got = keras.ops.convert_to_numpy(l2_math.penalty(KERNELS, l2, n))
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)


def test_penalty_of_no_kernel_is_zero():
    assert float(keras.ops.convert_to_numpy(l2_math.penalty([], 0.5, 3))) == 0.0


@pytest.mark.parametrize("l2,n", [(0.01, 1), (0.3, 7), (4.0, 3)], ids=str)
def test_penalty_gradient_is_two_lambda_over_n_times_w(float64, l2, n):
    w = KERNELS[0]
    value, grad = value_and_grad(lambda x: l2_math.penalty([x], l2, n), w)
    np.testing.assert_allclose(value, l2 / n * np.sum(w * w), rtol=1e-14)
    # The matrix 2*l2/n*W, not the note's scalar "2*lambda*||W||".
    np.testing.assert_array_equal(grad, keras.ops.convert_to_numpy(l2_math.penalty_gradient(w, l2, n)))
    np.testing.assert_allclose(grad, 2 * l2 / n * w, rtol=1e-15, atol=0)


@pytest.mark.parametrize("l2,n", [(0.01, 1), (0.3, 7)], ids=str)
def test_penalty_gradient_agrees_with_finite_differences(float64, l2, n):
    w = KERNELS[1]
    _, grad = value_and_grad(lambda x: l2_math.penalty([x], l2, n), w)

    def p(x):
        return float(keras.ops.convert_to_numpy(l2_math.penalty([x], l2, n)))

    eps = 1e-6
    numeric = np.zeros_like(w)
    for index in np.ndindex(w.shape):
        step = np.zeros_like(w)
        step[index] = eps
        numeric[index] = (p(w + step) - p(w - step)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-10)


def test_gradient_scales_with_upstream(float64):
    """Under loss scaling the upstream gradient is not 1: the term must scale with it."""
    w = KERNELS[0]
    _, grad = value_and_grad(lambda x: 128.0 * l2_math.penalty([x], 0.1, 2), w)
    np.testing.assert_allclose(grad, 128.0 * 0.1 * w, rtol=1e-15)


# Keras' own `L2` turns a Python `l2` into a float32 tensor before it meets a
# float64 kernel on TensorFlow, so in float64 we compare with an `l2` that
# float32 represents exactly. We sum the squares as one flat vector (XLA
# reduces that 2x faster on CPU) where Keras sums a matrix: the order of the
# additions differs, so the values agree to a few units in the last place.
@pytest.mark.parametrize("dtype,l2,rtol", [("float32", 0.037, 1e-6), ("float64", 0.03125, 1e-15)], ids=str)
def test_regularizer_with_n_1_is_keras_l2(dtype, l2, rtol):
    for w in KERNELS:
        w = w.astype(dtype)
        ours = keras.ops.convert_to_numpy(L2Regularizer(l2=l2)(w))
        theirs = keras.ops.convert_to_numpy(keras.regularizers.L2(l2)(w))
        assert ours.dtype == theirs.dtype
        np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=0)


def test_regularizer_gradient_is_keras_l2_gradient(float64):
    w = KERNELS[0]
    _, ours = value_and_grad(lambda x: L2Regularizer(l2=0.03125)(x), w)
    _, theirs = value_and_grad(lambda x: keras.regularizers.L2(0.03125)(x), w)
    np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=0)


def test_norms_are_plain_frobenius(float64):
    got = [float(keras.ops.convert_to_numpy(v)) for v in l2_math.kernel_norms(KERNELS)]
    np.testing.assert_allclose(got, [np.linalg.norm(w) for w in KERNELS], rtol=1e-14)


def test_decayed_is_keras_weight_decay_expression(float64):
    w = KERNELS[0]
    got = keras.ops.convert_to_numpy(l2_math.decayed(w, 0.3, 7, 0.05))
    np.testing.assert_array_equal(got, w - w * (2 * 0.3 / 7) * 0.05)


def test_decay_factor_is_keras_torch_weight_decay_expression(float64):
    got = keras.ops.convert_to_numpy(l2_math.decay_factor(0.3, 7, 0.05, "float64"))
    assert got == 1 - (2 * 0.3 / 7) * 0.05


@pytest.mark.parametrize("dtypes", [("bfloat16", "float32"), ("float32", "float64")], ids=str)
def test_decay_uses_each_variables_own_dtype(dtypes):
    """1 - 1e-3 is 1.0 in bfloat16: a factor computed in the first kernel's dtype would skip the second."""
    first, second = (keras.Variable(np.full((2, 3), 1.5), dtype=dtype) for dtype in dtypes)
    l2_math.decay([first, second], l2=0.25, n=5, learning_rate=0.01)  # (2 * 0.25 / 5) * 0.01 = 1e-3
    want = np.full((2, 3), 1.5, dtype=dtypes[1]) * (1 - np.asarray(1e-3, dtype=dtypes[1]))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(second), want, rtol=2e-7 if dtypes[1] == "float32" else 1e-15)
    assert np.all(keras.ops.convert_to_numpy(second) < 1.5)


def test_float32_kernels_give_float32_penalty():
    w = KERNELS[0].astype("float32")
    value = l2_math.penalty([w], 0.1, 3)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
