"""Stacked sweeps: every λ (of one seed) trained together, in one compiled step, each exactly as alone.

`keras_l2.search.stacking.stack_models(build, lambdas, seed=..., route=..., n=...)` builds the user's
model once per λ, each copy (a *member*) exactly as its separate run would
build it (`keras.utils.clear_session()`, `keras.utils.set_random_seed(seed)`,
then `build()`), puts L2 on it through the route with its own λ, compiles it
with its own optimizer, and joins the members in one `StackedModel`: K towers
side by side that see the same batches.

Why it is exact: the stack's training objective is the **sum** of the members' objectives and no weight is
shared, so each member's gradient is exactly the gradient of its own objective; `StackedOptimizer` hands each
member's gradients to that member's own optimizer (Adam, SGD, an `L2DecayOptimizer`, ...), which updates exactly
as in a separate run. So a member's weights and logs equal its separate run's (to float rounding: a compiler may
order the same arithmetic differently in a larger graph) when both start from the same seed and see the same
data order. Dropout is exact too on TensorFlow and JAX: each member's layers draw from their own seed
generators, made when the member was built. On PyTorch Keras draws an unseeded `Dropout`'s masks from torch's
global generator, which the members share: there a member equals its run only in distribution, unless its
Dropout has a `seed`. Members are towers, so `BatchNormalization` only ever sees its own member's activations
(nothing is mixed).

What would couple members is refused before training (by `stack_models`):
`global_clipnorm` (one norm over every member's gradients) and loss scaling
(`LossScaleOptimizer`, `loss_scale_factor`: one scale, skipped steps, for
all).

Logs: the stack's `loss` is the sum; member k's logs are Keras' own under
`member_<k>/` (`member_0/loss`, `val_member_0/accuracy`, ...).
`member_logs(logs, k)` takes them back out, and
`StackedModel.fit(member_callbacks=...)` gives each member its own callbacks
(an `MlflowL2Logger` per member logs exactly a separate run's params and
metrics), called at epoch level with that member's logs and the member as
their model.

Example:

>>> import keras, numpy as np
>>> from keras_l2.search.stacked import member_logs
>>> from keras_l2.search.stacking import stack_models
>>> def my_model():
...     inputs = keras.Input((4,))
...     hidden = keras.layers.Dense(8, activation="relu", name="features")(inputs)
...     return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(hidden))
>>> stack = stack_models(my_model, lambdas=[0.0, 1.0], seed=0, route="regularizer", n=30, layers="features")
>>> x, y = np.random.default_rng(0).normal(size=(30, 4)), np.eye(3)[np.arange(30) % 3]
>>> logs = stack.fit(x, y, epochs=1, verbose=0).history
>>> sorted(member_logs(logs, 1))
['accuracy', 'loss']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
from keras import ops

from keras_l2 import backend, steps

PREFIX = "member_{}/"


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a stack: its λ, its seed and the compiled Keras model (its own weights and route)."""

    l2: float
    seed: int
    model: keras.Model


def member_logs(logs: dict, index: int) -> dict:
    """Member `index`'s own logs (Keras' names: `loss`, `val_loss`, ...) out of a stack's logs or history."""
    prefix, val_prefix = PREFIX.format(index), "val_" + PREFIX.format(index)
    out = {}
    for key, value in (logs or {}).items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif key.startswith(val_prefix):
            out["val_" + key[len(val_prefix):]] = value
    return out


class StackedOptimizer(keras.optimizers.Optimizer):
    """Hands each member's gradients to that member's own optimizer (shaped like Keras' `LossScaleOptimizer`).

    Args:
        optimizers: one optimizer per member.
        variables: per member, the trainable variables its optimizer updates.
    """

    def __init__(self, optimizers: Sequence, variables: Sequence, name: str = "stacked_optimizer"):
        super().__init__(learning_rate=0.0, name=name)
        self.member_optimizers = list(optimizers)
        # Identities, not the variables: Keras' tracker would adopt the model's weights as optimizer state.
        self._member_ids = [tuple(id(v) for v in member) for member in variables]

    def build(self, var_list):
        by_id = {id(v): v for v in var_list}
        for optimizer, ids in zip(self.member_optimizers, self._member_ids, strict=True):
            if not optimizer.built:  # (`compile_run` builds a member's own on the same variables)
                optimizer.build([by_id[i] for i in ids])
        super().build(var_list)

    @property
    def variables(self):
        own = backend.own_optimizer_variables(self)
        return own + [v for optimizer in self.member_optimizers for v in optimizer.variables]

    def _positions(self, variables) -> list:
        where = {id(v): i for i, v in enumerate(variables)}
        return [[where[i] for i in ids] for ids in self._member_ids]

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        variables = backend.optimizer_trainable_variables(self) if trainable_variables is None \
            else list(trainable_variables)
        grads = list(grads)
        for optimizer, positions in zip(self.member_optimizers, self._positions(variables), strict=True):
            optimizer.apply([grads[i] for i in positions], [variables[i] for i in positions])

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        # The JAX trainer's entry point: each member's optimizer gets its own `stateless_apply`.
        offset = len(backend.own_optimizer_variables(self))
        new_trainable, new_state = list(trainable_variables), list(optimizer_variables[:offset])
        model_variables = backend.optimizer_trainable_variables(self)
        for optimizer, positions in zip(self.member_optimizers, self._positions(model_variables), strict=True):
            count = len(optimizer.variables)
            updated, state = optimizer.stateless_apply(optimizer_variables[offset:offset + count],
                                                       [grads[i] for i in positions],
                                                       [trainable_variables[i] for i in positions])
            offset += count
            for i, value in zip(positions, updated, strict=True):
                new_trainable[i] = value
            new_state.extend(state)
        return new_trainable, new_state

    @property
    def iterations(self):
        return self.member_optimizers[0].iterations

    def finalize_variable_values(self, var_list):
        for optimizer in self.member_optimizers:
            optimizer.finalize_variable_values(backend.optimizer_trainable_variables(optimizer))

    def get_config(self):
        raise NotImplementedError("A StackedOptimizer is not saved; save each member's model (stack.members).")


class StackedModel(keras.Model):
    """K compiled member models trained side by side in one step (see the module's docstring).

    Build it with `keras_l2.search.stacking.stack_models`; `members` holds each member's λ, seed and
    model. `compile` it once more only to change `jit_compile` or
    `steps_per_execution` (`stack_models` compiles it).
    """

    def __init__(self, members: Sequence[Member], name: str = "stacked"):
        super().__init__(name=name)
        self.members = tuple(members)
        self.towers = [member.model for member in self.members]
        self.__dict__["_traced_hooks"] = (None,) * len(self.towers)  # see _match_hooks

    def call(self, inputs, training=False):
        return [tower(inputs, training=training) for tower in self.towers]

    @property
    def metrics(self):
        # Keras leaves the metrics of nested compiled models out; here they are the members' logs.
        return list(super().metrics) + [m for tower in self.towers for m in tower.metrics]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        first = next(v for v in keras.tree.flatten(x) if v is not None)
        batch = ops.shape(first)[0]
        total = None
        for tower, prediction in zip(self.towers, y_pred, strict=True):
            # The member's own `compute_loss` (and any metrics hook on it): its compiled loss plus its
            # regularizers' terms, exactly its separate run's loss.
            loss = tower.compute_loss(x=x, y=y, y_pred=prediction, sample_weight=sample_weight, training=training)
            backend.loss_tracker(tower).update_state(backend.all_replicas(loss), sample_weight=batch)
            total = loss if total is None else ops.add(total, loss)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        for tower, prediction in zip(self.towers, y_pred, strict=True):
            backend.update_compiled_metrics(tower, y, prediction, sample_weight)
        return self.get_metrics_result()

    def get_metrics_result(self):
        logs = {"loss": _python(backend.loss_tracker(self).result())}
        for index, tower in enumerate(self.towers):
            prefix = PREFIX.format(index)
            logs.update({prefix + key: value for key, value in tower.get_metrics_result().items()})
        return logs

    def fit(self, *args, callbacks=None, member_callbacks: Sequence | None = None, **kwargs):
        """Keras' `fit`; `member_callbacks[k]`: callbacks that see member k as their model and its own logs."""
        callbacks = list(callbacks or [])
        if member_callbacks is not None:
            if len(member_callbacks) != len(self.members):
                raise ValueError(f"member_callbacks: one list per member ({len(self.members)}). "
                                 f"Received: {len(member_callbacks)} lists")
            callbacks += [MemberCallbacks(self, k, list(c)) for k, c in enumerate(member_callbacks) if c]
        # Once the members' callbacks attached (or not) their metrics hooks:
        match = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: self._match_hooks())
        return super().fit(*args, callbacks=[*callbacks, match], **kwargs)

    def evaluate(self, *args, **kwargs):
        self._match_hooks()  # a member's metrics attached since (inside `fit`: nothing changed)
        return super().evaluate(*args, **kwargs)

    def _match_hooks(self):
        """The stack's step calls its members' metrics hooks: steps traced with others must not serve."""
        hooks = tuple(map(steps.metrics_hook, self.towers))
        if any(now is not then for now, then in zip(hooks, self.__dict__["_traced_hooks"], strict=True)):
            steps.renew(self)
        self.__dict__["_traced_hooks"] = hooks  # in __dict__: Keras would track the hooks' metrics

    def get_config(self):
        raise NotImplementedError("A StackedModel is not saved; save each member's model (stack.members).")


class MemberCallbacks(keras.callbacks.Callback):
    """Runs callbacks for one member of a stack: the member is their model, its own logs their logs.

    Epoch-level hooks only (train, epoch and test begin and end): per-batch
    work belongs on the stack's own callbacks, and a callback with batch hooks
    (an `MlflowL2Logger` with `log_every_n_steps`) is refused here rather than
    silently never called.
    """

    def __init__(self, stack: StackedModel, index: int, callbacks: list):
        super().__init__()
        for callback in callbacks:
            if _batch_level(callback):
                raise ValueError(f"member_callbacks: {type(callback).__name__} works per batch, and a stack calls its "
                                 "members' callbacks once per epoch (an MlflowL2Logger: leave log_every_n_steps "
                                 "unset). Put per-batch callbacks on the stack's own fit(callbacks=...).")
        self.stack, self.index, self.callbacks = stack, index, callbacks

    def set_model(self, model):
        super().set_model(model)
        for callback in self.callbacks:
            callback.set_model(self.stack.towers[self.index])

    def set_params(self, params):
        super().set_params(params)
        for callback in self.callbacks:
            callback.set_params(params)

    def _call(self, hook: str, *args, logs=None):
        backend.sync_training_state(self.stack)  # JAX: the members' variables hold the live weights
        own = member_logs(logs, self.index) if logs is not None else None
        for callback in self.callbacks:
            getattr(callback, hook)(*args, logs=own)

    def on_train_begin(self, logs=None):
        self._call("on_train_begin", logs=logs)

    def on_train_end(self, logs=None):
        self._call("on_train_end", logs=logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._call("on_epoch_begin", epoch, logs=logs)

    def on_epoch_end(self, epoch, logs=None):
        self._call("on_epoch_end", epoch, logs=logs)

    def on_test_begin(self, logs=None):
        self._call("on_test_begin", logs=logs)

    def on_test_end(self, logs=None):
        self._call("on_test_end", logs=logs)


_BATCH_HOOKS = ("on_batch_begin", "on_batch_end", "on_train_batch_begin", "on_train_batch_end",
                "on_test_batch_begin", "on_test_batch_end")


def _batch_level(callback) -> bool:
    settings = getattr(callback, "settings", None)
    if hasattr(settings, "log_every_n_steps"):  # MlflowL2Logger: its batch hooks work only with steps to log
        return settings.log_every_n_steps is not None
    base = keras.callbacks.Callback
    return any(getattr(type(callback), hook, None) is not getattr(base, hook) for hook in _BATCH_HOOKS)


def _python(value):
    try:
        return float(value)
    except (TypeError, ValueError):  # a symbolic tensor inside a traced step
        return value


__all__ = ["PREFIX", "Member", "MemberCallbacks", "StackedModel", "StackedOptimizer", "member_logs"]
