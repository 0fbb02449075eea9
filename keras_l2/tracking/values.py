"""What `MlflowL2Logger` logs, as MLflow wants it: Keras logs as floats, a fit's params, norm keys.

Example:

>>> from keras_l2.tracking.values import keras_values, norm_metrics
>>> keras_values({"loss": 0.75, "data_loss": 0.5, "l2_penalty": 0.25, "val acc(1)": 1})
{'loss': 0.75, 'data_loss': 0.5, 'l2_penalty': 0.25, 'val acc_1_': 1.0, 'regularized_loss': 0.75}
>>> norm_metrics(["hidden"], [2.0])
{'weight_norm/hidden': 2.0}
"""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
from keras import ops

from keras_l2 import backend
from keras_l2.metrics import DATA_LOSS, PENALTY
from keras_l2.tracking.names import sanitize, unique_keys

NORM_PREFIX = "weight_norm/"
STEP_PREFIX = "step/"
MAX_PARAM_LENGTH = 6000


def keras_values(logs: dict) -> dict:
    """Keras logs and the derived `regularized_loss`, as Python floats under sanitized keys."""
    result = {}
    for name, value in logs.items():
        # Keras hands callbacks Python floats already; anything else must be a scalar.
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            result[name] = float(value)
        elif hasattr(value, "shape") and int(np.prod(value.shape)) == 1:
            result[name] = float(np.asarray(ops.convert_to_numpy(value)).reshape(()))
    for prefix in ("", "val_"):
        if prefix + DATA_LOSS in result and prefix + PENALTY in result:
            result[prefix + "regularized_loss"] = result[prefix + DATA_LOSS] + result[prefix + PENALTY]
    return {sanitize(k): v for k, v in result.items()}


def norm_metrics(keys, norms) -> dict:
    """`weight_norm/<key>` for each kernel norm."""
    return {NORM_PREFIX + key: float(v) for key, v in zip(keys, norms, strict=True)}


def description_params(description, chosen_layer_names) -> dict:
    """`l2.*` params: lambda, n, route, mode and the chosen layers."""
    return {
        "l2.lambda": 0.0 if description.l2 is None else description.l2,
        "l2.n": ",".join(map(str, description.ns)),
        "l2.route": description.route,
        "l2.mode": description.mode,
        "l2.layers": ",".join(chosen_layer_names),
    }


def fit_params(model, optimizers, l2_params: dict, epochs=None) -> dict:
    """The run's params: `l2_params`, the optimizer chain's class and inner config, model size, backend."""
    params = dict(l2_params)
    chain = list(optimizers)
    if chain:
        params["optimizer.class"] = "(".join(type(o).__name__ for o in chain) + ")" * (len(chain) - 1)
        for key, value in chain[-1].get_config().items():
            if key == "name":  # Keras numbers it per process (adam, adam_1, ...): noise between runs
                continue
            simple = value is None or isinstance(value, (int, float, str, bool))
            params[f"optimizer.{sanitize(key)}"] = value if simple else json.dumps(value, default=str)
    params["model.params"] = model.count_params()
    params["model.trainable_params"] = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    params["keras.backend"] = backend.name()
    if epochs is not None:
        params["fit.epochs"] = epochs
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}


@dataclasses.dataclass(frozen=True)
class DenseKernels:
    """The built Dense layers of a model, their kernels, metric keys and whether a route chose each."""

    layers: list
    kernels: list
    keys: list
    regularized: list

    @classmethod
    def of(cls, layers, chosen_kernel_ids) -> DenseKernels:
        dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense) and layer.built]
        kernels = [layer.kernel for layer in dense]
        return cls(dense, kernels, unique_keys(layer.name for layer in dense),
                   [id(k) in chosen_kernel_ids for k in kernels])

    @property
    def chosen_names(self) -> list:
        return [layer.name for layer, flag in zip(self.layers, self.regularized, strict=True) if flag]

    def tags(self) -> dict:
        """`l2.regularized/<layer>`: true or false for every Dense layer."""
        return {f"l2.regularized/{key}": str(flag).lower() for key, flag in zip(self.keys, self.regularized,
                                                                                    strict=True)}
