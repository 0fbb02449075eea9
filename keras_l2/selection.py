"""Choosing which Dense layers are regularized.

Only the kernels (weight matrices) of the chosen `Dense` layers are ever
touched; biases and layers that were not chosen never are.

Example:

>>> import keras
>>> from keras_l2 import select_layers
>>> model = keras.Sequential([
...     keras.Input((8,)),
...     keras.layers.Dense(32, name="hidden"),
...     keras.layers.Dense(4, name="out"),
... ])
>>> [layer.name for layer in select_layers(model)]
['hidden', 'out']
>>> [layer.name for layer in select_layers(model, min_params=200)]
['hidden']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import keras

from keras_l2.backend import all_layers

Dense = keras.layers.Dense


def _describe(layers: Iterable) -> str:
    names = [layer.name for layer in layers]
    return "[" + ", ".join(repr(name) for name in names) + "]" if names else "none"


def _check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected a `keras.Model`. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )


def _check_types(types) -> tuple:
    types = tuple(types) if isinstance(types, (list, tuple)) else (types,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, Dense)):
            raise ValueError(
                "`types` may only name Dense layer classes (keras_l2 regularizes "
                f"Dense kernels only). Received: types={types!r}"
            )
    return types


def select_layers(
    model,
    names: str | Sequence[str] | None = None,
    pattern: str | None = None,
    min_params: int | None = None,
    types=(Dense,),
) -> list:
    """Returns the Dense layers of `model` to regularize.

    With no criteria, every Dense layer (nested models included) is chosen.
    Criteria combine with AND.

    Args:
        model: a `keras.Model`.
        names: a layer name or a list of names (a name may also be the layer's
            full `path`, e.g. `"encoder/dense"`, to tell apart nested layers of
            the same name). Every name must exist in the model.
        pattern: a regular expression searched (`re.search`) in each layer's
            name, as Keras' `exclude_from_weight_decay(var_names=...)` does.
        min_params: keep only layers with at least this many parameters
            (requires a built model).
        types: the Dense classes to consider (`Dense` and its subclasses).

    Returns:
        A list of Dense layers, in the model's order, without duplicates.

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: a name the model does not have, a chosen layer that is not
            Dense, a bad `pattern` or `min_params`, or a selection that
            matches nothing. The message lists the Dense layers the model has.
    """
    _check_model(model)
    types = _check_types(types)
    layers = all_layers(model)
    candidates = [layer for layer in layers if isinstance(layer, types)]

    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names)
        chosen = []
        for name in wanted:
            if not isinstance(name, str):
                raise TypeError(
                    f"Layer names must be strings. Received: {name!r} in names={names!r}"
                )
            matches = [layer for layer in layers if name in (layer.name, getattr(layer, "path", None))]
            if not matches:
                raise ValueError(
                    f"Model {model.name!r} has no layer named {name!r}. "
                    f"Its Dense layers are: {_describe(candidates)}"
                )
            for layer in matches:
                if not isinstance(layer, types):
                    raise ValueError(
                        f"Layer {name!r} is a {type(layer).__name__}, not a Dense "
                        "layer; keras_l2 regularizes Dense kernels only. "
                        f"The model's Dense layers are: {_describe(candidates)}"
                    )
                if layer not in chosen:
                    chosen.append(layer)
        candidates = [layer for layer in candidates if layer in chosen]

    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(
                f"`pattern` must be a valid regular expression. Received: "
                f"pattern={pattern!r} ({error})"
            ) from None
        candidates = [layer for layer in candidates if regex.search(layer.name)]

    if min_params is not None:
        if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 0:
            raise ValueError(
                f"`min_params` must be an integer >= 0. Received: min_params={min_params!r}"
            )
        for layer in candidates:
            require_built(layer)
        candidates = [layer for layer in candidates if layer.count_params() >= min_params]

    if not candidates:
        raise ValueError(
            "The selection matched no Dense layer "
            f"(names={names!r}, pattern={pattern!r}, min_params={min_params!r}). "
            f"Model {model.name!r} has these Dense layers: "
            f"{_describe(layer for layer in layers if isinstance(layer, types))}"
        )
    return candidates


def require_built(layer) -> None:
    """Raises a clear error if `layer` has no kernel yet."""
    if not layer.built:
        raise ValueError(
            f"Layer {layer.name!r} is not built, so it has no kernel to "
            "regularize yet. Build the model first: give it a `keras.Input`, "
            "call `model.build(input_shape)`, or call it once on data."
        )


def check_layers(layers, model=None) -> tuple:
    """Returns `layers` as a tuple of built Dense layers, checked.

    Args:
        layers: a Dense layer or a sequence of them (what `select_layers`
            returns).
        model: when given, every layer must belong to it.

    Raises:
        TypeError: an element is not a Dense layer.
        ValueError: an empty selection, an unbuilt layer, or a layer of
            another model.
    """
    if layers is None:
        raise ValueError(
            "`layers` is required: pass the Dense layers to regularize, e.g. "
            "`layers=keras_l2.select_layers(model)`."
        )
    if isinstance(layers, keras.layers.Layer):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` is empty: choose at least one Dense layer to regularize.")
    result = []
    for layer in layers:
        if not isinstance(layer, Dense):
            raise TypeError(
                "Every chosen layer must be a `keras.layers.Dense` layer (what "
                f"`select_layers` returns). Received: {layer!r} of type "
                f"{type(layer).__name__}"
            )
        require_built(layer)
        if not layer.trainable:
            # Keras collects no penalty from frozen weights and no optimizer
            # updates them: the choice would silently do nothing.
            raise ValueError(
                f"Layer {layer.name!r} is frozen (trainable=False), so L2 on it would "
                "do nothing. Unfreeze it or leave it out of `layers`."
            )
        if layer not in result:
            result.append(layer)
    if model is not None:
        check_in_model(result, model)
    return tuple(result)


def check_unique_names(layers: Iterable, model) -> None:
    """Raises if a chosen layer shares its name with another layer of `model`.

    Configs record chosen layers by name, and Keras drops the nesting prefix
    of variable paths on reload: with two layers of one name, a restored loss
    or optimizer could pick the wrong kernel.
    """
    counts: dict[str, int] = {}
    for layer in all_layers(model):
        counts[layer.name] = counts.get(layer.name, 0) + 1
    for layer in layers:
        if counts.get(layer.name, 0) > 1:
            raise ValueError(
                f"Layer name {layer.name!r} occurs {counts[layer.name]} times in model "
                f"{model.name!r} (in nested models); a saved choice of it would be "
                "ambiguous. Give the layers distinct names (`name=...`)."
            )


def check_in_model(layers: Iterable, model) -> None:
    """Raises if any of `layers` is not a layer of `model`."""
    _check_model(model)
    own = {id(layer) for layer in all_layers(model)}
    for layer in layers:
        if id(layer) not in own:
            dense = [layer for layer in all_layers(model) if isinstance(layer, Dense)]
            raise ValueError(
                f"Layer {layer.name!r} is not a layer of model {model.name!r} "
                f"(it belongs to another model). Model {model.name!r} has these "
                f"Dense layers: {_describe(dense)}"
            )


def layers_or_names(layers) -> tuple[tuple, tuple | None]:
    """Splits a `layers=` argument into `(names, layers)`.

    Layer objects are checked now and give `(their names, the layers)`.
    Names (what a config stores) give `(names, None)`: they are resolved later,
    against the model that uses the loss or optimizer.
    """
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(item, str) for item in layers):
        return tuple(layers), None
    chosen = check_layers(layers)
    return tuple(layer.name for layer in chosen), chosen


def kernel_layer_name(variable) -> str | None:
    """`"dense_1"` for a variable whose path ends in `dense_1/kernel`, else None."""
    parts = variable.path.split("/")
    if len(parts) >= 2 and parts[-1] == "kernel":
        return parts[-2]
    return None


def resolve_kernels(layer_names: tuple, kernel_ids: tuple | None, variables) -> list:
    """The kernels of the chosen layers among `variables` (what an optimizer is built with).

    Args:
        layer_names: the chosen layers' names.
        kernel_ids: `id()` of their kernels, or None when only names are known (a config).
        variables: the trainable variables to choose from.

    Raises:
        ValueError: a chosen kernel not among `variables`, or a name matching no kernel or
            several (configs record names, and Keras drops the nesting prefix on reload).
    """
    known, kernels = {id(v): v for v in variables}, [v.path for v in variables if kernel_layer_name(v) is not None]
    if kernel_ids is not None:
        for layer_name, kernel_id in zip(layer_names, kernel_ids, strict=True):
            if kernel_id not in known:
                raise ValueError(
                    f"Layer {layer_name!r} is not part of the model this optimizer "
                    "trains (its kernel is not among the trainable variables, "
                    "so it belongs to another model or is frozen). Trainable "
                    f"Dense kernels: {kernels}"
                )
    by_name: dict[str, list] = {}
    for v in variables:
        by_name.setdefault(kernel_layer_name(v), []).append(v)
    for name in layer_names:
        matches = by_name.get(name, [])
        if len(matches) > 1:
            raise ValueError(
                f"Layer name {name!r} occurs {len(matches)} times among the model's "
                "kernels (in nested models); a saved choice of it would be ambiguous. "
                "Give the layers distinct names (`name=...`)."
            )
        if not matches:
            raise ValueError(
                f"Layer name {name!r} has no trainable kernel among the variables this "
                f"optimizer is built with. Trainable kernels: {kernels}"
            )
    if kernel_ids is not None:
        return [known[kernel_id] for kernel_id in kernel_ids]
    return [by_name[name][0] for name in layer_names]
