"""Route 3: L2 applied by hand in the optimizer's update."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_l2 import backend, l2_math
from keras_l2._checks import check_l2, check_mode, check_n
from keras_l2.backend import lambdas
from keras_l2.inventory import check_single_route
from keras_l2.route import L2Route
from keras_l2.selection import kernel_layer_name, layers_or_names, resolve_kernels


@keras.saving.register_keras_serializable(package="keras_l2")
class L2DecayOptimizer(keras.optimizers.Optimizer, L2Route):
    """Wraps any Keras optimizer and applies L2 to chosen kernels by hand.

    Two modes, following `docs/math.md`:

    - `"coupled"`: L2 in the gradient. Each chosen kernel's gradient becomes
      `g + 2 * l2 / n * W` before the wrapped optimizer sees it. For every
      optimizer this is exactly what `L2Regularizer` / `L2CategoricalCrossentropy`
      give.
    - `"decoupled"`: weight decay. The wrapped optimizer updates with the plain
      gradient, and each chosen kernel also decays:
      `W <- W - W * (2 * l2 / n) * lr`, with `lr` the wrapped optimizer's current
      learning rate (schedules included). This weight decay is multiplied by
      the learning rate, as in Keras and AdamW. It is applied before the
      wrapped update, from the weights of the start of the step, exactly as
      Keras applies its own `weight_decay`. With plain SGD both modes are the
      same update; with Adam, `"decoupled"` is AdamW with
      `weight_decay = 2 * l2 / n` on the chosen kernels only.

    Biases and layers that were not chosen are left to the wrapped optimizer
    alone. Lambda lives in an optimizer variable (`optimizer.l2` reads and
    sets it), so it can change during training without a retrace, on every
    backend.

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap.
        l2: lambda, a finite float >= 0. Defaults to 0.01.
        n: the number of training examples, an integer >= 1. Defaults to 1.
        layers: the Dense layers whose kernels decay (what
            `keras_l2.select_layers` returns). Layer names are accepted too
            (used when restoring from a config): they are matched against the
            variables the optimizer is built with.
        mode: `"coupled"` (default) or `"decoupled"`.
        name: the optimizer's name.

    Example:

    >>> import keras
    >>> from keras_l2 import L2DecayOptimizer, select_layers
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
    ...                           keras.layers.Dense(3, activation="softmax")])
    >>> optimizer = L2DecayOptimizer(keras.optimizers.Adam(1e-3), l2=1e-4, n=1000,
    ...                              layers=select_layers(model), mode="decoupled")
    >>> model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    """

    kind = "optimizer"

    def __init__(self, optimizer, l2: float = 0.01, n: int = 1, layers=None, mode: str = "coupled", name=None):
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`optimizer` must be a `keras.optimizers.Optimizer` instance "
                "(e.g. `keras.optimizers.Adam(1e-3)`). Received: "
                f"optimizer={optimizer!r} of type {type(optimizer).__name__}"
            )
        if isinstance(optimizer, L2DecayOptimizer):
            raise ValueError(
                "`optimizer` is already an L2DecayOptimizer; wrapping it twice "
                "would apply the decay twice."
            )
        l2, n, mode = check_l2(l2), check_n(n), check_mode(mode)
        if mode == "decoupled" and isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "mode='decoupled' cannot wrap a LossScaleOptimizer: the decay would "
                "still apply on the steps it skips for non-finite gradients. Wrap the "
                "other way round, LossScaleOptimizer(L2DecayOptimizer(...)), as Keras "
                "does itself under the mixed_float16 policy."
            )
        if mode == "decoupled" and optimizer.gradient_accumulation_steps:
            raise ValueError(
                "mode='decoupled' does not support a wrapped optimizer with "
                "`gradient_accumulation_steps` (the decay would be applied on "
                "every micro-batch). Received: gradient_accumulation_steps="
                f"{optimizer.gradient_accumulation_steps!r}. Use mode='coupled'."
            )
        layer_names, chosen = layers_or_names(layers)
        kernel_ids = None if chosen is None else tuple(id(layer.kernel) for layer in chosen)
        super().__init__(learning_rate=0.0, name=name or "l2_decay_optimizer")
        self.inner_optimizer = optimizer
        self._initial_l2, self.n, self.mode = l2, n, mode
        lambdas.hold_lambda(self, l2)  # what the in-step `l2_penalty` metric reads on TensorFlow
        self._layer_names = layer_names
        # Identities, not the variables: Keras' tracker would adopt the model's
        # kernels as optimizer variables (and JAX would donate them twice).
        self._chosen_kernel_ids = kernel_ids
        self._chosen_ids: frozenset = frozenset()

    @property
    def layer_names(self) -> tuple:
        """Names of the layers whose kernels decay."""
        return self._layer_names

    @property
    def chosen_variables(self) -> list:
        """The kernel variables that decay (known once the optimizer is built)."""
        return [v for v in self._own_trainable() if id(v) in self._chosen_ids]

    def kernels(self, model) -> list:
        # `covers` also answers before the optimizer is built (TensorFlow's fit
        # builds it at the first step, after `on_train_begin`).
        return [k for k in model.trainable_variables if self.covers(k)]

    def covers(self, kernel) -> bool:
        """Whether `kernel` is one of the kernels this optimizer decays."""
        if self.built:
            return id(kernel) in self._chosen_ids
        if self._chosen_kernel_ids is not None:
            return id(kernel) in self._chosen_kernel_ids
        return kernel_layer_name(kernel) in self._layer_names

    @property
    def l2(self) -> float:
        """Lambda, as last set (or loaded): a Python float, usable while tracing.

        Once built, lambda lives in `l2_variable`; this returns the Python float
        it was set from (a float32 variable rounds 1e-3 to 0.0010000000475).
        During `fit`, change it with `keras_l2.set_l2(model, value)` or
        `LambdaScheduler`: on JAX the trainer keeps the live state outside the
        variables mid-epoch, and a direct assignment here would be overwritten
        when the epoch ends.
        """
        return self._initial_l2

    @l2.setter
    def l2(self, value: float) -> None:
        value = check_l2(value)
        self._initial_l2 = value
        lambdas.hold_lambda(self, value)
        if self.built:
            self._l2_variable.assign(value)

    @property
    def l2_variable(self):
        """The optimizer variable that holds lambda (for in-graph use)."""
        return self._l2_variable

    def build(self, var_list):
        # Keras' LossScaleOptimizer builds the same way: own state, then the
        # wrapped optimizer on the same variables.
        chosen = resolve_kernels(self._layer_names, self._chosen_kernel_ids, var_list)
        # No model here: only the regularizer route can be checked from the kernels.
        check_single_route(None, chosen, route="optimizer")
        self._chosen_ids = frozenset(id(v) for v in chosen)
        initial = self._initial_l2

        def exact_constant(shape, dtype=None):
            # Not `initializers.Constant`: on TensorFlow it rounds the Python
            # float through float32 before a float64 variable sees it. (And no
            # `assign` here: TensorFlow may build inside a traced function.)
            return ops.convert_to_tensor(initial, dtype=dtype)

        self._l2_variable = self.add_variable(
            shape=(), initializer=exact_constant, aggregation="only_first_replica", name="l2"
        )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return backend.own_optimizer_variables(self) + self.inner_optimizer.variables

    def _own_trainable(self) -> list:
        return backend.optimizer_trainable_variables(self)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        # A checkpoint may hold another lambda than the config; keep `l2` (the
        # Python float the penalty metrics trace with, or on TensorFlow the
        # variable they read) in step with it.
        loaded = ops.convert_to_numpy(self._l2_variable)
        if loaded != np.asarray(self._initial_l2, dtype=loaded.dtype):
            self._initial_l2 = float(loaded)
            lambdas.hold_lambda(self, self._initial_l2)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError("Call `build(variables)` or pass `trainable_variables` first.")
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        variables = self._own_trainable() if trainable_variables is None else list(trainable_variables)
        grads = self._apply_l2(list(grads), variables)
        self.inner_optimizer.apply(grads, variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        # The JAX trainer's entry point. The wrapped optimizer gets its own
        # `stateless_apply` (not `apply` inside our scope), because some, like
        # LossScaleOptimizer, only trace correctly through theirs.
        if not self.built:
            raise ValueError("L2DecayOptimizer must be built before `stateless_apply`.")
        # An outer LossScaleOptimizer passes our variables themselves, to be
        # read in its own stateless scope: read them now.
        optimizer_variables = [v.value if isinstance(v, keras.Variable) else v for v in optimizer_variables]
        own_variables, model_variables = backend.own_optimizer_variables(self), self._own_trainable()
        own_values, inner_values = optimizer_variables[:len(own_variables)], optimizer_variables[len(own_variables):]
        mapping = (
            list(zip(model_variables, trainable_variables, strict=True))
            + list(zip(own_variables, own_values, strict=True))
            + list(zip(self.inner_optimizer.variables, inner_values, strict=True))
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            grads = self._apply_l2(list(grads), model_variables)
            # Decoupled mode assigned decayed kernels in the scope.
            trainable_variables = [scope.get_current_value(v) for v in model_variables]
        new_trainable, new_inner = self.inner_optimizer.stateless_apply(inner_values, grads, trainable_variables)
        return new_trainable, own_values + list(new_inner)

    def _apply_l2(self, grads: list, variables: list) -> list:
        """Coupled: returns grads with `2*l2/n*W` added. Decoupled: decays W, returns grads."""
        if self.mode == "coupled":
            scale = self._inner_loss_scale()
            return [
                self._coupled(g, v, scale) if g is not None and id(v) in self._chosen_ids else g
                for g, v in zip(grads, variables, strict=True)
            ]
        chosen = [v for g, v in zip(grads, variables, strict=True) if g is not None and id(v) in self._chosen_ids]
        l2_math.decay(chosen, self._l2_variable, self.n, self.inner_optimizer.learning_rate)
        return grads

    def _coupled(self, grad, variable, scale):
        term = l2_math.penalty_gradient(variable, self._l2_variable, self.n)
        if scale is not None:
            # The wrapped optimizer divides the gradients by its loss scale; the
            # penalty's gradient must arrive scaled like the data gradient.
            term = ops.multiply(term, ops.cast(scale, grad.dtype))
        # Replicas' gradients are summed: each contributes its share.
        return ops.add(grad, backend.per_replica(term))

    def _inner_loss_scale(self):
        inner = self.inner_optimizer
        if isinstance(inner, keras.optimizers.LossScaleOptimizer):
            return inner.dynamic_scale
        return inner.loss_scale_factor

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def __repr__(self) -> str:
        return (f"L2DecayOptimizer({type(self.inner_optimizer).__name__}, mode={self.mode!r}, l2={self.l2!r}, "
                f"n={self.n!r}, layers={list(self._layer_names)})")

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "l2": self.l2,
            "n": self.n,
            "layers": list(self._layer_names),
            "mode": self.mode,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
