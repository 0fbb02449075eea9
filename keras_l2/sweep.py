"""Lambda sweeps: one model per lambda, same start and data order, tracked in MLflow.

`run_sweep(SweepConfig(...))` trains the same network once per lambda (and per
seed), every run of a seed from the same initial weights and the same data
order, under one MLflow parent run with a nested child run per lambda, each
logged by `MlflowL2Logger`. It prints progress, a final table and the best
lambda (chosen on validation *data* loss, not on Keras' penalized
`val_loss`), and draws the plots the note's claims are read from.

The command line (`keras-l2 sweep`, `python experiments/sweep.py`) is in
`keras_l2.cli`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path

import keras
import numpy as np

from keras_l2._checks import check_l2
from keras_l2.routes import OPTIMIZERS, ROUTES, apply_route, make_optimizer
from keras_l2.selection import select_layers
from keras_l2.tracking.callback import MlflowL2Logger

DEFAULT_LAMBDAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclasses.dataclass
class SweepData:
    """A classification data set: features and one-hot labels, train and validation."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    name: str

    @property
    def classes(self) -> int:
        return self.y_train.shape[1]


@dataclasses.dataclass
class SweepConfig:
    lambdas: tuple = DEFAULT_LAMBDAS
    route: str = "regularizer"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    # The hidden layers only: the free output layer next to them shows what L2 changes.
    layers: str | None = "hidden_.*"  # names (comma-separated) or a regex; None: every Dense layer
    hidden: tuple = (512, 512)
    epochs: int = 60
    batch_size: int = 32
    seeds: int = 1
    workers: int = 1
    train_size: int = 200
    data: str | None = None  # an .npz; None: scikit-learn's digits
    tracking_uri: str | None = None
    experiment: str = "keras_l2-sweep"
    results_dir: str = "experiments/results"
    verbose: int = 1


# ------------------------------------------------------------------ data
def all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 of scikit-learn's digits: pixels scaled to [0, 1] and one-hot labels, float32."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype("float32"), np.eye(10, dtype="float32")[bunch.target]


def digits(train_size: int = 200, seed: int = 0) -> SweepData:
    """scikit-learn's bundled handwritten digits (8x8, 10 classes, 1797 images).

    A small training set (`train_size` images, stratified) and the rest as
    validation: small enough that a wide network overfits without L2.
    """
    from sklearn.model_selection import train_test_split

    x, y = all_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, train_size=train_size, stratify=y.argmax(axis=1), random_state=seed
    )
    return SweepData(x_train, y_train, x_val, y_val, name=f"digits (train {len(x_train)}, val {len(x_val)})")


def load_npz(path) -> SweepData:
    """Reads `x_train, y_train, x_val, y_val` from an .npz, with clear errors.

    Labels may be integer class ids (1-D) or one-hot rows (2-D).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: no such file {str(path)!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"--data: {str(path)!r} is not a readable .npz file ({error})") from None
    required = ("x_train", "y_train", "x_val", "y_val")
    missing = [key for key in required if key not in archive.files]
    if missing:
        raise ValueError(f"--data: {path.name} lacks {missing}; it must hold {list(required)} "
                         f"(found {sorted(archive.files)})")
    arrays = {key: archive[key] for key in required}
    for split in ("train", "val"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"--data: x_{split} must be a 2-D numeric array (examples, features); "
                             f"got shape {x.shape}, dtype {x.dtype}")
        if len(x) != len(y):
            raise ValueError(f"--data: x_{split} has {len(x)} examples but y_{split} has {len(y)}")
        if len(x) == 0:
            raise ValueError(f"--data: x_{split} is empty")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"--data: x_{split} holds NaN or infinite values "
                             f"({int(np.sum(~np.isfinite(x)))} of them)")
    if arrays["x_train"].shape[1] != arrays["x_val"].shape[1]:
        raise ValueError(f"--data: x_train has {arrays['x_train'].shape[1]} features but x_val has "
                         f"{arrays['x_val'].shape[1]}")
    y_train, y_val = _one_hot(arrays["y_train"], arrays["y_val"])
    return SweepData(arrays["x_train"].astype("float32"), y_train, arrays["x_val"].astype("float32"), y_val,
                     name=f"{path.name} (train {len(y_train)}, val {len(y_val)})")


def _one_hot(y_train, y_val):
    if y_train.ndim == 1 and y_val.ndim == 1:
        for split, y in (("train", y_train), ("val", y_val)):
            if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
                raise ValueError(f"--data: y_{split} must hold integer class ids or one-hot rows")
            if y.min() < 0:
                raise ValueError(f"--data: y_{split} has negative class ids")
        classes = int(max(y_train.max(), y_val.max())) + 1
        if len(np.unique(y_train)) < 2:
            raise ValueError(f"--data: y_train holds {len(np.unique(y_train))} class; at least 2 are needed")
        eye = np.eye(classes, dtype="float32")
        return eye[y_train.astype(int)], eye[y_val.astype(int)]
    if y_train.ndim == 2 and y_val.ndim == 2:
        if y_train.shape[1] != y_val.shape[1]:
            raise ValueError(f"--data: y_train has {y_train.shape[1]} classes but y_val has {y_val.shape[1]}")
        for split, y in (("train", y_train), ("val", y_val)):
            if not (np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)):
                raise ValueError(f"--data: y_{split} is 2-D but not one-hot (rows of 0s with a single 1)")
        if y_train.shape[1] < 2 or len(np.unique(y_train.argmax(axis=1))) < 2:
            raise ValueError("--data: y_train holds fewer than 2 classes; at least 2 are needed")
        return y_train.astype("float32"), y_val.astype("float32")
    raise ValueError(f"--data: y_train and y_val must both be 1-D class ids or both 2-D one-hot; got "
                     f"{y_train.ndim}-D and {y_val.ndim}-D")


# ---------------------------------------------------------------- checks
def parse_lambdas(text: str) -> tuple:
    """'0,1e-3,0.01' -> (0.0, 0.001, 0.01): each a finite float >= 0, no repeats."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--lambdas: give at least one lambda, e.g. 0,1e-3,1e-2. Received: {text!r}")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--lambdas: {part!r} is not a number (allowed: finite floats >= 0, "
                             f"comma-separated)") from None
        try:
            values.append(check_l2(value))
        except (TypeError, ValueError) as error:
            raise ValueError(f"--lambdas: {part!r}: {error}") from None
    if len(set(values)) != len(values):
        raise ValueError(f"--lambdas: repeated values in {text!r}")
    return tuple(sorted(values))


def check_config(config: SweepConfig) -> SweepConfig:
    if config.route not in ROUTES:
        raise ValueError(f"--route: unknown route {config.route!r}; choose one of {', '.join(ROUTES)}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer: unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    for name in ("epochs", "seeds", "workers", "batch_size", "train_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be an integer >= 1. Received: {value!r}")
    if not (isinstance(config.learning_rate, float) and math.isfinite(config.learning_rate)
            and config.learning_rate > 0):
        raise ValueError(f"--learning-rate: must be a finite float > 0. Received: {config.learning_rate!r}")
    config.lambdas = tuple(sorted(check_l2(v) for v in config.lambdas))
    return config


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


# -------------------------------------------------------------- training
def build_model(inputs: int, classes: int, hidden: tuple, seed: int):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(width, activation="relu", name=f"hidden_{i + 1}") for i, width in enumerate(hidden)]
    layers.append(keras.layers.Dense(classes, activation="softmax", name="out"))
    return keras.Sequential(layers, name="sweep_mlp")


def train_one(config: SweepConfig, data: SweepData, l2: float, seed: int, parent_run_id: str | None,
              store_uri: str, position: str = "") -> dict:
    """Trains one model with lambda `l2`; returns its per-epoch history and final norms."""
    model = build_model(data.x_train.shape[1], data.classes, tuple(config.hidden), seed)
    chosen = choose_layers(model, config.layers)
    optimizer, loss = apply_route(model, config.route, make_optimizer(config.optimizer, config.learning_rate), l2,
                                  len(data.x_train), chosen)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    logger = MlflowL2Logger(
        tracking_uri=store_uri, experiment_name=config.experiment, run_name=f"l2={l2:g} seed={seed}",
        parent_run_id=parent_run_id, tags={"sweep.seed": seed, "sweep.route": config.route}, verbose=0,
    )
    progress = _Progress(f"{position} l2={l2:<8g} seed={seed}", config.epochs, config.verbose)
    # The same data order for every lambda of a seed: shuffling draws from Keras' seeded generator.
    keras.utils.set_random_seed(1000 + seed)
    history = model.fit(data.x_train, data.y_train, validation_data=(data.x_val, data.y_val),
                        batch_size=config.batch_size, validation_batch_size=512, epochs=config.epochs, verbose=0,
                        callbacks=[logger, progress]).history
    return {
        "l2": l2, "seed": seed, "run_id": logger.run_id, "history": history,
        "norms": {layer: trajectory[-1] for layer, trajectory in progress.norm_history.items()},
        "chosen": [layer.name for layer in chosen], "norm_history": progress.norm_history,
    }


class _Progress(keras.callbacks.Callback):
    """Prints one line per run every few epochs: epoch, data losses, ETA; records the norms."""

    def __init__(self, label, epochs, verbose):
        super().__init__()
        self.label, self.epochs, self.verbose = label, epochs, verbose
        self.norm_history = {}  # layer -> [initial norm, norm after each epoch]
        self.every = max(1, epochs // 4)

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self._record()

    def _record(self):
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.Dense):
                value = float(np.linalg.norm(keras.ops.convert_to_numpy(layer.kernel)))
                self.norm_history.setdefault(layer.name, []).append(value)

    def on_epoch_end(self, epoch, logs=None):
        self._record()
        done = epoch + 1
        if self.verbose and (done % self.every == 0 or done == self.epochs):
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (self.epochs - done)
            print(f"{self.label} epoch {done:>4}/{self.epochs}  data_loss {logs['data_loss']:.4f}  "
                  f"val_data_loss {logs['val_data_loss']:.4f}  val_acc {logs['val_accuracy']:.3f}  "
                  f"ETA {eta:5.1f}s", flush=True)


# ------------------------------------------------------------------ sweep
def run_sweep(config: SweepConfig) -> dict:
    """Runs the sweep; returns {"parent_run_id", "results", "best", "plots", "table"}."""
    from keras_l2.tracking.store import experiment_id, open_store, resolve_store

    config = check_config(config)
    data = load_npz(config.data) if config.data else digits(config.train_size)
    store = resolve_store(config.tracking_uri)
    client = open_store(store)  # creates a new SQLite store once, before any worker opens it
    exp_id = experiment_id(client, config.experiment, store)
    parent = client.create_run(exp_id, run_name=f"sweep {config.route} {len(config.lambdas)} lambdas",
                               tags={"sweep.data": data.name, "sweep.route": config.route})
    parent_id = parent.info.run_id
    for key, value in {"sweep.lambdas": ",".join(f"{v:g}" for v in config.lambdas), "sweep.route": config.route,
                       "sweep.optimizer": config.optimizer, "sweep.learning_rate": config.learning_rate,
                       "sweep.epochs": config.epochs, "sweep.seeds": config.seeds,
                       "sweep.hidden": ",".join(map(str, config.hidden)), "sweep.layers": config.layers or "all",
                       "sweep.data": data.name}.items():
        client.log_param(parent_id, key, str(value))
    jobs = [(l2, seed) for seed in range(config.seeds) for l2 in config.lambdas]
    if config.verbose:
        print(f"Sweep: {len(config.lambdas)} lambdas x {config.seeds} seed(s) = {len(jobs)} runs on {data.name}, "
              f"route {config.route}, {config.workers} worker(s); MLflow {store.tracking_uri}, parent run "
              f"{parent_id}", flush=True)
    started = time.perf_counter()
    status = "FAILED"
    try:
        results = _run_jobs(config, data, jobs, parent_id, store.tracking_uri, started)
        summary = summarize(config, results)
        plots = draw_plots(config, results, summary, Path(config.results_dir))
        for path in plots:
            client.log_artifact(parent_id, str(path), artifact_path="plots")
        client.log_metric(parent_id, "best_lambda", summary["best"]["l2"])
        client.log_metric(parent_id, "best_val_data_loss", summary["best"]["val_data_loss"])
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status=status)
    if config.verbose:
        print(summary["table"])
        best = summary["best"]
        zero = summary["by_lambda"].get(0.0)
        versus = (f" ({best['val_data_loss']:.4f} against {zero['val_data_loss']:.4f} at lambda 0)"
                  if zero and best["l2"] != 0.0 else "")
        print(f"Best lambda on validation data loss: {best['l2']:g}{versus}.")
        print(f"Plots: {', '.join(str(p) for p in plots)}")
        print(f"Runs: parent {parent_id} in {store.tracking_uri}. Open the MLflow UI: make ui "
              f"(or: mlflow ui --backend-store-uri {store.tracking_uri})")
        print(f"Took {time.perf_counter() - started:.0f} s.")
    return {"parent_run_id": parent_id, "results": results, "plots": plots, **summary}


def _run_jobs(config, data, jobs, parent_id, store_uri, started) -> list:
    total = len(jobs)
    if config.workers == 1:
        results = []
        for index, (l2, seed) in enumerate(jobs):
            results.append(train_one(config, data, l2, seed, parent_id, store_uri, f"[{index + 1}/{total}]"))
            _report(config, index + 1, total, started)
        return results
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # never fork a process that has TensorFlow threads
    results = []
    with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=context,
                                                initializer=_quiet_worker) as pool:
        futures = [pool.submit(train_one, config, data, l2, seed, parent_id, store_uri,
                               f"[{index + 1}/{total}]") for index, (l2, seed) in enumerate(jobs)]
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            results.append(future.result())
            _report(config, done, total, started)
    return sorted(results, key=lambda r: (r["seed"], r["l2"]))


def _quiet_worker():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _report(config, done, total, started):
    if config.verbose:
        elapsed = time.perf_counter() - started
        print(f"-- {done}/{total} runs done, {elapsed:.0f} s elapsed, about "
              f"{elapsed / done * (total - done):.0f} s to go", flush=True)


def summarize(config: SweepConfig, results: list) -> dict:
    """Per lambda: final train/val data loss, val accuracy and norms, mean and std over seeds."""
    by_lambda = {}
    for l2 in config.lambdas:
        runs = [r for r in results if r["l2"] == l2]
        final = {
            "data_loss": [r["history"]["data_loss"][-1] for r in runs],
            "val_data_loss": [r["history"]["val_data_loss"][-1] for r in runs],
            "val_accuracy": [r["history"]["val_accuracy"][-1] for r in runs],
            "penalty_share": [r["history"]["l2_penalty"][-1] / (r["history"]["data_loss"][-1]
                                                                 + r["history"]["l2_penalty"][-1]) for r in runs],
        }
        entry = {"l2": l2, **{k: float(np.mean(v)) for k, v in final.items()},
                 **{f"{k}_std": float(np.std(v)) for k, v in final.items()},
                 "norms": {layer: float(np.mean([r["norms"][layer] for r in runs])) for layer in runs[0]["norms"]}}
        by_lambda[l2] = entry
    best = min(by_lambda.values(), key=lambda e: e["val_data_loss"])
    chosen = results[0]["chosen"]
    layers = list(results[0]["norms"])
    header = (f"{'lambda':>9} {'train data loss':>16} {'val data loss':>14} {'val acc':>8} "
              + " ".join(f"{'|W|_F ' + name + ('*' if name in chosen else ''):>16}" for name in layers))
    lines = [header]
    for entry in by_lambda.values():
        mark = "  <- best" if entry is best else ""
        lines.append(f"{entry['l2']:>9g} {entry['data_loss']:>16.4f} {entry['val_data_loss']:>14.4f} "
                     f"{entry['val_accuracy']:>8.3f} " + " ".join(f"{entry['norms'][n]:>16.3f}" for n in layers) + mark)
    lines.append("(* regularized layer; values are means over seeds)")
    return {"by_lambda": by_lambda, "best": best, "table": "\n".join(lines)}


def draw_plots(config: SweepConfig, results: list, summary: dict, directory: Path) -> list:
    """The four PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    entries = list(summary["by_lambda"].values())
    lambdas = np.array([e["l2"] for e in entries])
    nonzero = lambdas[lambdas > 0]
    linthresh = float(nonzero.min()) if len(nonzero) else 1.0
    chosen = set(results[0]["chosen"])
    layers = list(results[0]["norms"])
    paths = []

    def finish(fig, ax, name, xlabel="lambda (symlog: 0 at the left)"):
        if ax is not None:
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.set_xlim(left=-0.5 * linthresh, right=float(lambdas.max()) * 1.5 if lambdas.max() > 0 else 1.0)
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = directory / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label in (("data_loss", "train data loss"), ("val_data_loss", "validation data loss")):
        ax.errorbar(lambdas, [e[key] for e in entries], yerr=[e[key + "_std"] for e in entries], marker="o",
                    capsize=3, label=label)
    best = summary["best"]
    ax.axvline(best["l2"], color="gray", linestyle=":", label=f"best lambda {best['l2']:g}")
    ax.set_ylabel("cross-entropy (no penalty)")
    ax.set_title(f"Data loss vs lambda ({config.route}, {config.seeds} seed(s))")
    finish(fig, ax, "loss_vs_lambda.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for layer in layers:
        style = "-" if layer in chosen else "--"
        ax.plot(lambdas, [e["norms"][layer] for e in entries], style, marker="o",
                label=f"{layer} ({'regularized' if layer in chosen else 'free'})")
    ax.set_ylabel("final ||W||_F")
    ax.set_title("Final weight norm per layer vs lambda")
    finish(fig, ax, "norm_vs_lambda.png")

    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 1, len(lambdas)))
    for ax, layer in zip(axes[0], layers, strict=True):
        for color, l2 in zip(colors, lambdas, strict=True):
            run = next(r for r in results if r["l2"] == l2 and r["seed"] == 0)
            ax.plot(run["norm_history"][layer], color=color, label=f"{l2:g}")
        ax.set_title(f"{layer} ({'regularized' if layer in chosen else 'free'})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("||W||_F")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(title="lambda", fontsize=7)
    finish(fig, None, "norm_trajectories.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(lambdas, [e["penalty_share"] for e in entries], marker="o", label="l2_penalty / (data_loss + l2_penalty)")
    ax.set_ylabel("share of the training objective")
    ax.set_ylim(0, 1)
    ax.set_title("The penalty's share of the loss (last epoch)")
    finish(fig, ax, "penalty_share.png")
    return paths
