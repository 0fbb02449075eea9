"""The keras_l2 routes on a model: the only code that finds them.

`l2_routes(model)` looks in the three places a route can sit (a kernel's
regularizer, the compiled loss, the optimizer chain) and returns them as
`L2Routes`. The one-route-per-kernel check, the penalty terms the metrics
compute, `set_l2`, the compiled-step cache key and the logger's description
all ask it, through the `keras_l2.route.L2Route` interface.

Example:

>>> import keras
>>> from keras_l2 import regularize
>>> from keras_l2.inventory import l2_routes
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
>>> _ = regularize(model, l2=1e-3)
>>> l2_routes(model)
L2Routes(regularizer: L2Regularizer(l2=0.001, n=1) on ['d'])
>>> from keras_l2 import L2DecayOptimizer
>>> other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="e")])
>>> other.compile(optimizer=L2DecayOptimizer(keras.optimizers.SGD(0.1), l2=0.5, n=8, layers=other.layers,
...                                          mode="decoupled"), loss="mse")
>>> l2_routes(other)
L2Routes(optimizer: L2DecayOptimizer(SGD, mode='decoupled', l2=0.5, n=8, layers=['e']))
"""

from __future__ import annotations

import dataclasses

import keras

from keras_l2.route import L2Route


def _is(obj, kind: str) -> bool:
    return isinstance(obj, L2Route) and obj.kind == kind


def optimizer_chain(optimizer):
    """The optimizer and every optimizer it wraps (`inner_optimizer`), outermost first."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


@dataclasses.dataclass(frozen=True)
class L2Routes:
    """The keras_l2 routes found on a model.

    Attributes:
        regularizers: `(kernel_variable, L2Regularizer)` pairs.
        losses: the `L2CategoricalCrossentropy` losses the model is compiled with.
        optimizers: the `L2DecayOptimizer`s in the model's optimizer chain.
    """

    regularizers: tuple = ()
    losses: tuple = ()
    optimizers: tuple = ()

    @property
    def names(self) -> tuple:
        """The route kinds in use: a subset of ("regularizer", "loss", "optimizer")."""
        found = (("regularizer", self.regularizers), ("loss", self.losses), ("optimizer", self.optimizers))
        return tuple(name for name, objects in found if objects)

    @property
    def routes(self) -> tuple:
        """Every route object once, regularizers first."""
        unique = {}
        for route in (*(reg for _, reg in self.regularizers), *self.losses, *self.optimizers):
            unique.setdefault(id(route), route)
        return tuple(unique.values())

    @property
    def l2(self) -> float | None:
        """The lambda of the routes in use (None if none is); they must agree."""
        values = {route.l2 for route in self.routes}
        if len(values) > 1:
            raise ValueError(f"The model's keras_l2 routes use different lambdas: {sorted(values)}")
        return values.pop() if values else None

    def __repr__(self) -> str:
        if not self.names:
            return "L2Routes(none)"
        parts = []
        if self.regularizers:
            by_route: dict = {}
            for kernel, reg in self.regularizers:
                by_route.setdefault(id(reg), (reg, []))[1].append(kernel.path.split("/")[-2])
            parts += [f"regularizer: {reg!r} on {layers}" for reg, layers in by_route.values()]
        parts += [f"loss: {loss!r}" for loss in self.losses]
        parts += [f"optimizer: {opt!r}" for opt in self.optimizers]
        return "L2Routes(" + "; ".join(parts) + ")"


def l2_routes(model) -> L2Routes:
    """Finds the keras_l2 regularizers, losses and optimizers on `model`."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a `keras.Model`. Received: model={model!r} of type {type(model).__name__}")
    regularizers = tuple((v, v.regularizer) for v in model.trainable_variables if _is(v.regularizer, "regularizer"))
    losses = tuple(loss for loss in keras.tree.flatten(getattr(model, "loss", None)) if _is(loss, "loss"))
    optimizers = tuple(opt for opt in optimizer_chain(getattr(model, "optimizer", None)) if _is(opt, "optimizer"))
    return L2Routes(regularizers, losses, optimizers)


def penalty_terms(model, in_step: bool = False) -> list:
    """`(kernels, l2, n, in_loss)` for each keras_l2 route on `model`.

    `in_loss` says whether the route puts its penalty into Keras' loss (the
    regularizer and loss routes) or applies it in the update (the optimizer).
    With `in_step`, `l2` is as a traced step reads it (`L2Route.step_l2`).
    """
    routes = l2_routes(model)
    pairs = [([v], reg) for v, reg in routes.regularizers]
    pairs += [(route.kernels(model), route) for route in (*routes.losses, *routes.optimizers)]
    return [(kernels, route.step_l2 if in_step else route.l2, route.n, route.in_loss) for kernels, route in pairs]


@dataclasses.dataclass(frozen=True)
class RouteDescription:
    """How a model is regularized, in the words of the logger's params.

    Attributes:
        route: "regularizer", "loss", "optimizer", several joined by "+", or "none".
        mode: "penalty", "coupled", "decoupled", several joined by "+", or "none".
        l2: the routes' lambda, None without a route.
        ns: the distinct n of the routes, sorted; (1,) without a route.
        chosen_kernel_ids: `id()` of every regularized kernel.
    """

    route: str
    mode: str
    l2: float | None
    ns: tuple
    chosen_kernel_ids: frozenset


def describe(model) -> RouteDescription:
    """The `RouteDescription` of `model`; raises if its routes disagree on lambda."""
    routes = l2_routes(model)
    lam = routes.l2
    terms = penalty_terms(model)
    modes = sorted({route.mode for route in routes.routes})
    return RouteDescription(
        route="+".join(routes.names) or "none",
        mode="+".join(modes) or "none",
        l2=lam,
        ns=tuple(sorted({n for _, _, n, _ in terms})) or (1,),
        chosen_kernel_ids=frozenset(id(k) for kernels, *_ in terms for k in kernels),
    )


def check_single_route(model, kernels, route: str) -> None:
    """Raises if any of `kernels` is already regularized by another keras_l2 route.

    Args:
        model: the model the kernels belong to, or None where it is not known
            (an optimizer's `build`): then only regularizers on the kernels count.
        kernels: the kernel variables the `route` is about to regularize.
        route: "regularizer", "loss" or "optimizer": the route being set up.
    """
    clashes = []
    if route != "regularizer":
        clashes += [f"an L2Regularizer on {k.path!r}" for k in kernels if _is(k.regularizer, "regularizer")]
    losses = [loss for loss in keras.tree.flatten(getattr(model, "loss", None)) if _is(loss, "loss")]
    covering = [loss for loss in losses if any(loss.covers(k) for k in kernels)]
    if route != "loss" and covering:
        clashes.append("the compiled L2CategoricalCrossentropy")
    if route == "loss" and len(covering) > 1:
        # One loss per output of a multi-output model: each would add the penalty.
        clashes.append(f"{len(covering)} compiled L2CategoricalCrossentropy losses (one per output)")
    if route != "optimizer":
        for optimizer in optimizer_chain(getattr(model, "optimizer", None)):
            if _is(optimizer, "optimizer") and any(optimizer.covers(k) for k in kernels):
                clashes.append("the compiled L2DecayOptimizer")
    if clashes:
        raise ValueError(
            f"These kernels are already regularized by {', '.join(sorted(set(clashes)))}; "
            f"adding the {route} route would count the penalty twice. Use one keras_l2 "
            "route per kernel."
        )
