"""One keras_l2 route per kernel: stacked routes would count the penalty twice."""

from __future__ import annotations

import keras


def optimizer_chain(optimizer):
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def check_single_route(model, kernels, route: str) -> None:
    """Raises if any of `kernels` is already regularized by another keras_l2 route.

    Args:
        model: the model the kernels belong to, or None where it is not known
            (an optimizer's `build`): then only regularizers on the kernels count.
        kernels: the kernel variables the `route` is about to regularize.
        route: "regularizer", "loss" or "optimizer": the route being set up.
    """
    from keras_l2.loss import L2CategoricalCrossentropy
    from keras_l2.optimizer import L2DecayOptimizer
    from keras_l2.regularizer import L2Regularizer

    ids = {id(k) for k in kernels}
    clashes = []
    if route != "regularizer":
        clashes += [f"an L2Regularizer on {k.path!r}" for k in kernels if isinstance(k.regularizer, L2Regularizer)]
    losses = [loss for loss in keras.tree.flatten(getattr(model, "loss", None))
              if isinstance(loss, L2CategoricalCrossentropy)]
    covering = [loss for loss in losses if any(id(layer.kernel) in ids for layer in loss.layers)]
    if route != "loss" and covering:
        clashes.append("the compiled L2CategoricalCrossentropy")
    if route == "loss" and len(covering) > 1:
        # One loss per output of a multi-output model: each would add the penalty.
        clashes.append(f"{len(covering)} compiled L2CategoricalCrossentropy losses (one per output)")
    if route != "optimizer":
        for optimizer in optimizer_chain(getattr(model, "optimizer", None)):
            if isinstance(optimizer, L2DecayOptimizer) and any(optimizer.covers(k) for k in kernels):
                clashes.append("the compiled L2DecayOptimizer")
    if clashes:
        raise ValueError(
            f"These kernels are already regularized by {', '.join(sorted(set(clashes)))}; "
            f"adding the {route} route would count the penalty twice. Use one keras_l2 "
            "route per kernel."
        )
