"""The Keras internals `keras_l2.backend` relies on, checked against the installed Keras.

A Keras release that moves one of them fails here, with a message naming
what moved, rather than somewhere deep inside a route or the logger.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_l2 import backend
from keras_l2.backend import host
from tests.helpers import data, mlp

pytestmark = pytest.mark.core


class _Recording(keras.losses.CategoricalCrossentropy):
    """Records which model `backend.calling_model` finds while Keras calls the loss."""

    found = ()

    def __call__(self, y_true, y_pred, sample_weight=None):
        self.found = (*self.found, backend.calling_model(self))
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)


@pytest.mark.parametrize("how", ["fit", "evaluate"])
def test_a_compiled_loss_finds_its_model_among_its_callers(how):
    model = mlp()
    loss = _Recording()
    model.compile(optimizer="sgd", loss=loss)
    x, y = data()
    getattr(model, how)(x, y, verbose=0)
    assert loss.found and all(found is model for found in loss.found), (
        f"Keras {keras.__version__} no longer calls a compiled loss from `Model.compute_loss` with the model "
        "as `self`; `keras_l2.backend.calling_model` (how L2CategoricalCrossentropy finds its model) must follow."
    )


def test_a_loss_called_outside_keras_finds_no_model():
    loss = _Recording()
    loss(np.eye(3), np.full((3, 3), 1 / 3))
    assert loss.found == (None,)


def test_all_layers_reaches_into_nested_models():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="inner_dense")], name="inner")
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2, name="outer_dense")], name="outer")
    names = [layer.name for layer in backend.all_layers(outer)]
    assert {"inner", "inner_dense", "outer_dense"} <= set(names)
    assert backend.all_layers(outer, include_self=True)[0] is outer


def test_a_model_metric_is_reported_and_removed():
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    metric = keras.metrics.Mean(name="extra")
    backend.add_model_metric(model, metric)
    assert metric in model.metrics
    backend.remove_model_metric(model, metric)
    assert metric not in model.metrics


def test_compiled_identity_changes_with_a_recompile():
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    first = backend.compiled_identity(model)
    assert first == backend.compiled_identity(model)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    assert backend.compiled_identity(model) != first


def test_optimizer_variables_split_into_own_and_model_variables():
    model = mlp()
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    own = backend.own_optimizer_variables(optimizer)
    assert [id(v) for v in backend.optimizer_trainable_variables(optimizer)] == [
        id(v) for v in model.trainable_variables]
    assert own and not {id(v) for v in own} & {id(v) for v in model.trainable_variables}
    assert [id(v) for v in own] == [id(v) for v in optimizer.variables]


def test_compiled_read_matches_numpy_and_reads_live_values():
    model = mlp()
    kernels = [layer.kernel for layer in model.layers]
    read = backend.CompiledRead(lambda values: keras.ops.stack([keras.ops.sum(v) for v in values]), kernels)
    expected = [float(np.sum(keras.ops.convert_to_numpy(k))) for k in kernels]
    np.testing.assert_allclose(read(), expected, rtol=1e-6)
    kernels[0].assign(keras.ops.zeros(kernels[0].shape))
    assert read()[0] == 0.0  # the variables as they are now, not as traced
    assert backend.CompiledRead(lambda values: values, []).__call__().shape == (0,)


def test_live_values_are_none_outside_fit():
    model = mlp()
    assert backend.live_values(model, [model.layers[0].kernel]) is None


def test_the_loss_tracker_and_compiled_metrics_are_what_keras_logs():
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy"])
    x, y = data()
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    tracker = backend.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean), (
        f"Keras {keras.__version__} keeps a model's `loss` log elsewhere than `Model._loss_tracker`; "
        "`keras_l2.backend.loss_tracker` (how a stack updates each member's loss) must follow.")
    np.testing.assert_allclose(float(tracker.result()), logs["loss"], rtol=1e-6)
    model.reset_metrics()
    prediction = model(x)
    backend.update_compiled_metrics(model, y, prediction, None)
    expected = np.mean(np.argmax(y, 1) == np.argmax(keras.ops.convert_to_numpy(prediction), 1))
    assert float(model.get_metrics_result()["accuracy"]) == pytest.approx(expected)


def test_free_memory_is_a_positive_number_of_bytes_and_a_place():
    free, where = host.free_memory()
    assert isinstance(free, int) and free > 0 and where


def test_a_frozen_heap_thaws_at_its_end_and_leaves_an_earlier_freeze_alone():
    import gc

    outer = gc.get_freeze_count()  # (this test process' own freeze, from conftest, if any)
    gc.unfreeze()
    try:
        held = [object()]
        with host.frozen_heap():
            frozen = gc.get_freeze_count()
            assert frozen >= len(held)
            made_here = [[] for _ in range(10)]  # made in the block: collected as always, never frozen
            assert gc.get_freeze_count() == frozen and made_here
        assert gc.get_freeze_count() == 0
        with pytest.raises(RuntimeError, match="stop"), host.frozen_heap():
            raise RuntimeError("stop")
        assert gc.get_freeze_count() == 0  # thawed on an error too
        gc.freeze()
        before = gc.get_freeze_count()
        with host.frozen_heap():
            assert gc.get_freeze_count() == before
        assert gc.get_freeze_count() == before  # someone else's freeze: not thawed
    finally:
        gc.unfreeze()
        if outer:
            gc.collect()
            gc.freeze()


def test_a_frozen_heap_frees_garbage_left_from_before_instead_of_freezing_it():
    import gc
    import weakref

    class Cyclic:
        pass

    outer = gc.get_freeze_count()
    gc.unfreeze()
    try:
        gc.collect()
        garbage = Cyclic()
        garbage.me = garbage  # a reference cycle (as a Keras model is): only a full collection frees it
        alive = weakref.ref(garbage)
        del garbage
        with host.frozen_heap():
            gc.collect()
            assert alive() is None
    finally:
        gc.unfreeze()
        if outer:
            gc.collect()
            gc.freeze()


LIMIT_THREADS = """
from keras_l2 import backend
from keras_l2.backend import host
try:
    host.limit_threads(1)
except ValueError as error:
    print("refused:", error)
    raise SystemExit
import keras
keras.ops.sum(keras.ops.ones((64, 64)) @ keras.ops.ones((64, 64)))  # the runtime starts with its threads
if backend.name() == "tensorflow":
    import tensorflow as tf
    print("threads:", tf.config.threading.get_intra_op_parallelism_threads(),
          tf.config.threading.get_inter_op_parallelism_threads())
else:
    import torch
    print("threads:", torch.get_num_threads(), torch.get_num_interop_threads())
host.limit_threads(1)  # the same count again: fine
try:
    host.limit_threads(2)
except ValueError as error:
    print("later:", error)
"""


def test_limit_threads_caps_the_backends_threads_or_says_what_to_do(tmp_path):
    """In a fresh process (the runtime's pools are fixed when it starts): TensorFlow and PyTorch run with the cap;
    a later, different cap on TensorFlow and any cap on JAX are refused with what to do instead."""
    script = tmp_path / "limit.py"
    script.write_text(LIMIT_THREADS)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True).stdout
    if backend.name() == "jax":
        assert "refused: --threads: JAX sizes its CPU thread pool" in out and "taskset -c 0-0" in out
        return
    assert "threads: 1 1" in out
    later = {"tensorflow": "later: --threads: TensorFlow has started with (intra-op, inter-op) threads (1, 1)",
             "torch": "later: --threads: PyTorch's inter-op pool has started with 1 threads"}
    assert later[backend.name()] in out, out


def test_the_decay_in_place_internals_are_there():
    """`backend.updates`: Keras' stateless scope, a variable's own tensor and dtype, PyTorch's multi-tensor multiply."""
    from keras.src.backend.common.stateless_scope import get_stateless_scope, in_stateless_scope
    from keras.src.backend.common.variables import AutocastScope

    from keras_l2.backend import updates

    variable = keras.Variable(np.full((2,), 1.5, dtype="float32"))
    assert not in_stateless_scope() and get_stateless_scope() is None
    with keras.StatelessScope() as scope:
        assert in_stateless_scope() and get_stateless_scope() is scope
        assert scope.get_current_value(variable) is None
    assert variable._dtype == "float32" and variable._value is not None
    # In an autocast scope the variable reads as float16; the decay must still be float32's.
    with AutocastScope("float16"):
        assert variable.dtype == "float16"
        updates.decay_in_place([variable], decayed=lambda v: v * (1 - np.float32(1e-3)),
                               factor=lambda dtype: keras.ops.convert_to_tensor(1 - 1e-3, dtype=dtype))
    assert variable.dtype == "float32"
    if keras.backend.backend() == "torch":  # (TensorFlow and JAX decay through `decayed`, read in float16)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), np.float32(1.5) * np.float32(1 - 1e-3))
        import torch

        values = [torch.ones(2)]
        torch._foreach_mul_(values, torch.tensor(0.5))
        assert values[0].tolist() == [0.5, 0.5]


def test_renewed_step_methods_call_what_was_there_and_leave_nothing_behind():
    """`traces.renewed_step_methods`: on JAX new keys in front of the same steps, for what is made inside only."""
    from keras_l2.backend import traces

    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x, y = data(6)
    before = model.evaluate(x, y, verbose=0)
    with traces.renewed_step_methods(model):
        inside = model.train_step
        model.make_test_function(force=True)
    assert "train_step" not in vars(model) and "test_step" not in vars(model)
    assert model.evaluate(x, y, verbose=0) == before
    if keras.backend.backend() != "jax":
        assert inside == type(model).train_step.__get__(model)
        return
    assert inside.func == type(model).train_step.__get__(model)

    def mine(data):
        return type(model).train_step(model, data)

    model.train_step = mine  # one the user set on the model is called behind the new key, and kept
    with traces.renewed_step_methods(model):
        assert model.train_step.func is mine
    assert model.train_step is mine
