"""The same lambda through all four routes, with SGD and with Adam: where they coincide, and by how much not.

With plain SGD, L2 in the loss (regularizer, loss), L2 in the gradient
(coupled) and decoupled weight decay are the same update. With Adam they are
not: the penalty's gradient goes through Adam's per-weight scaling in the
first three, while decoupled decay (AdamW) shrinks every weight by the same
factor (Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR
2019). Every run starts from the same weights and sees the same batches, in
float64, so differences are the routes', not noise.

    python experiments/compare_routes.py                  # digits, lambda 0.1, 20 epochs
    python experiments/compare_routes.py --l2 1 --epochs 40
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_l2  # noqa: E402
from keras_l2 import search  # noqa: E402
from keras_l2.routes import ROUTES, apply_route  # noqa: E402


def train(route: str, optimizer: str, l2: float, epochs: int, data: search.SweepData, hidden: tuple, lr: float):
    model = search.build_model(data.x_train.shape[1], data.classes, hidden, seed=0)
    opt = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}[optimizer](lr)
    opt, loss = apply_route(model, route, opt, l2, len(data.x_train), keras_l2.select_layers(model))
    model.compile(optimizer=opt, loss=loss)
    keras_l2.attach_l2_metrics(model)
    history = model.fit(data.x_train, data.y_train, validation_data=(data.x_val, data.y_val), batch_size=32,
                        epochs=epochs, shuffle=False, verbose=0).history
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables], history


def compare(l2: float, epochs: int, hidden: tuple, lrs: dict) -> list:
    keras.config.set_floatx("float64")
    data = search.digits(200)
    data = search.SweepData(*(a.astype("float64") for a in (data.x_train, data.y_train, data.x_val, data.y_val)),
                           name=data.name)
    rows = []
    for optimizer in ("sgd", "adam"):
        runs = {route: train(route, optimizer, l2, epochs, data, hidden, lrs[optimizer]) for route in ROUTES}
        reference, _ = runs["regularizer"]
        scale = max(float(np.abs(w).max()) for w in reference)
        for route, (weights, history) in runs.items():
            gap = max(float(np.abs(a - b).max()) for a, b in zip(weights, reference, strict=True))
            rows.append((optimizer, route, gap, gap / scale, history["data_loss"][-1], history["val_data_loss"][-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l2", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", default="64,64")
    args = parser.parse_args()
    hidden = tuple(int(w) for w in args.hidden.split(","))
    rows = compare(args.l2, args.epochs, hidden, {"sgd": 0.1, "adam": 3e-3})
    print(f"digits, {hidden} hidden, lambda {args.l2:g} (n = 200), {args.epochs} epochs, float64; weights compared "
          "with the regularizer route's after training")
    print(f"{'optimizer':<10}{'route':<13}{'max |dW|':>12}{'relative':>11}{'train data loss':>17}{'val data loss':>15}")
    for optimizer, route, gap, relative, train_loss, val_loss in rows:
        print(f"{optimizer:<10}{route:<13}{gap:>12.2e}{relative:>11.2e}{train_loss:>17.5f}{val_loss:>15.5f}")


if __name__ == "__main__":
    main()
