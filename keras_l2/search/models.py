"""The model a sweep trains: the built-in MLP, or the user's own, built by a function.

A model function takes no arguments and returns a new, uncompiled
`keras.Model` with one input of shape `(features,)` and one output: a softmax
over the classes. The sweep calls it once per run, after
`keras.utils.clear_session()` (so auto-named layers, `dense`, `dense_1`, ...,
get the same names in every run) and `keras.utils.set_random_seed(seed)` (so
every run of a seed starts from the same weights); it then puts L2 on the
chosen Dense layers through the route and compiles the model itself. On the
command line, `--model module:function` names such a function (the module is
imported from the current directory or `sys.path`). With `workers > 1` the
function must be importable (defined at a module's top level).

Example:

>>> import keras
>>> from keras_l2.search import check_model
>>> def my_model():
...     inputs = keras.Input((4,))
...     hidden = keras.layers.Dense(8, activation="relu", name="features")(inputs)
...     return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(hidden))
>>> [layer.name for layer in check_model(my_model, features=4, classes=3, layers="features")]
['features']
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import sys

import keras

from keras_l2 import steps
from keras_l2.routes import apply_route, make_optimizer
from keras_l2.selection import select_layers

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def build_model(inputs: int, classes: int, hidden: tuple, seed: int):
    """The built-in MLP (ReLU layers `hidden_1`, ... and a softmax `out`), from the weights of `seed`."""
    keras.utils.set_random_seed(seed)
    return _mlp(inputs, classes, hidden)


def _mlp(inputs: int, classes: int, hidden: tuple):
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(width, activation="relu", name=f"hidden_{i + 1}") for i, width in enumerate(hidden)]
    layers.append(keras.layers.Dense(classes, activation="softmax", name="out"))
    return keras.Sequential(layers, name="sweep_mlp")


def mlp_function(inputs: int, classes: int, hidden: tuple):
    """The built-in MLP as a model function (picklable, for worker processes)."""
    return functools.partial(_mlp, inputs, classes, tuple(hidden))


def load_model_spec(spec: str):
    """The function `"module:function"` names, imported from the current directory or `sys.path`."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ValueError(f"--model: expected module:function (e.g. my_models:build). Received: {spec!r}")
    module_name, name = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not module_name.startswith(error.name):
            raise  # the module exists; something it imports does not
        raise ValueError(f"--model: no module {module_name!r} in the current directory ({os.getcwd()}) or on "
                         f"sys.path. Received: {spec!r}") from None
    function = getattr(module, name, None)
    if function is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"--model: module {module_name!r} has no attribute {name!r} (its functions: {public}). "
                         f"Received: {spec!r}")
    if not callable(function):
        raise ValueError(f"--model: {spec!r} is a {type(function).__name__}, not a function")
    return function


def check_model(function, features: int, classes: int, layers: str | None) -> list:
    """Builds the model once and checks it against the data and `layers`; returns the chosen Dense layers.

    Raises:
        ValueError: `function` raises or returns something other than a
            `keras.Model`; its input or output does not fit the data; `layers`
            names none of its Dense layers.
    """
    label = getattr(function, "__qualname__", None) or repr(function)
    keras.utils.clear_session()
    try:
        model = function()
    except Exception as error:
        raise ValueError(f"model: calling the model function {label} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"model: the model function {label} must return a keras.Model. "
                         f"Received: {type(model).__name__} {model!r:.80}")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"model: {model.name!r} must have one known input and one output (start it with "
                         f"keras.Input((features,))). Received: inputs={inputs}, outputs={outputs}")
    if tuple(inputs[0].shape[1:]) != (features,):
        raise ValueError(f"model: {model.name!r} takes inputs of shape {tuple(inputs[0].shape[1:])}, but the data "
                         f"has {features} features (allowed: a model whose input shape is ({features},))")
    if tuple(outputs[0].shape[1:]) != (classes,):
        raise ValueError(f"model: {model.name!r} outputs shape {tuple(outputs[0].shape[1:])}, but the data has "
                         f"{classes} classes (allowed: a softmax output of {classes} units)")
    return choose_layers(model, layers)


def build_run(build, seed: int, scope: str | None = None) -> keras.Model:
    """One run's model, built exactly as every run of `seed` is: after `clear_session()` and `set_random_seed(seed)`.

    `scope`: a name scope for its variables' paths (a stack's members), which changes no value.
    """
    keras.utils.clear_session()  # the same auto-generated layer names in every run
    keras.utils.set_random_seed(seed)
    with keras.name_scope(scope) if scope else contextlib.nullcontext():
        model = build()
    steps.mark_fresh(model)  # built here for this run alone: no compiled model holds its layers
    return model


def compile_run(model, l2: float, *, route: str, n: int, layers: str | None, optimizer="adam",
                learning_rate: float = 1e-3, metrics=("accuracy",)) -> list:
    """Puts L2 with `l2` on the chosen layers through `route` and compiles `model`; returns the chosen layers.

    `optimizer`: a name in `keras_l2.OPTIMIZERS` (with `learning_rate`), or a function returning a fresh one.
    Its metrics and optimizer are built here, so the train step is traced once (`steps.build_step_state`).
    """
    fresh = make_optimizer(optimizer, learning_rate) if isinstance(optimizer, str) else optimizer()
    if not isinstance(fresh, keras.optimizers.Optimizer):
        raise ValueError(f"optimizer: the function must return a keras.optimizers.Optimizer. Received: {fresh!r:.80}")
    chosen = choose_layers(model, layers)
    fresh, loss = apply_route(model, route, fresh, l2, n, chosen)
    model.compile(optimizer=fresh, loss=loss, metrics=list(metrics))
    steps.build_step_state(model)
    return chosen


def choose_layers(model, spec: str | None) -> list:
    """The Dense layers named in `spec` (comma-separated names, or a regex); all by default."""
    dense = [layer.name for layer in select_layers(model)]
    if spec is None or spec.strip() == "":
        return select_layers(model)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if all(name in dense for name in names):
        return select_layers(model, names=names)
    try:
        pattern = re.compile(spec)
    except re.error as error:
        raise ValueError(f"--layers: {spec!r} is neither Dense layer names ({dense}) nor a valid regex "
                         f"({error})") from None
    chosen = [name for name in dense if pattern.fullmatch(name)]
    if not chosen:
        raise ValueError(f"--layers: {spec!r} matches none of the Dense layers {dense}")
    return select_layers(model, names=chosen)
