"""One run of a sweep (build the model, put L2 on the chosen layers, compile, fit with the logger), or one stack."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import keras
import numpy as np

from keras_l2 import MlflowL2Logger
from keras_l2.search.config import SweepConfig
from keras_l2.search.data import DatasetData, SweepData
from keras_l2.search.models import build_run, choose_layers, compile_run
from keras_l2.search.stacked import member_logs
from keras_l2.search.stacking import stack_models


@dataclasses.dataclass
class RunPlan:
    """What every run of a sweep shares (sent to the worker processes)."""

    config: SweepConfig
    data: SweepData | DatasetData
    build: Callable
    parent_run_id: str
    store_uri: str
    callbacks: tuple = ()
    tags: tuple = ()  # (key, value) pairs added to every run's tags (a tune's stage)
    log_every_n_steps: int | None = None  # also log every N steps (a single run's logger only: a tune's stage 1)
    run_tags: dict = dataclasses.field(default_factory=dict)  # {(l2, seed): tags} of single runs (a study's trial)


def train_one(plan: RunPlan, l2: float, seed: int, position: str = "", validation_freq: int = 1) -> dict:
    """Trains one model with lambda `l2`; returns its per-epoch history and final norms.

    `validation_freq`: validate every that many epochs, as in `train_stack`.
    """
    config, data = plan.config, plan.data
    model = build_run(plan.build, seed)
    chosen = compile_run(model, l2, route=config.route, n=data.n, layers=config.layers, optimizer=config.optimizer,
                         learning_rate=config.learning_rate)
    logger = _logger(plan, l2, seed)
    progress = _Progress(f"{position} l2={l2:<8g} seed={seed}", config.epochs, config.verbose)
    # The same data order for every lambda of a seed: shuffling draws from Keras' seeded generator.
    keras.utils.set_random_seed(1000 + seed)
    history = model.fit(**data.fit_args(config.batch_size), epochs=config.epochs, verbose=0,
                        validation_freq=validation_freq, callbacks=[logger, progress, *plan.callbacks]).history
    return _result(l2, seed, logger, history, progress, chosen, test_data_loss(model, data))


def train_stack(plan: RunPlan, lambdas: tuple, seed: int, position: str = "", validation_freq: int = 1) -> list:
    """Trains one stack: every lambda in `lambdas` with `seed`, together (see `keras_l2.search.stacked`).

    Returns one result per lambda, each what `train_one` returns for it: every
    member logs to its own child run, exactly as its separate run would.
    `validation_freq`: validate every that many epochs (Keras' option; the
    tuner, which chooses on the last epoch's, makes it divide the epochs).
    """
    config, data = plan.config, plan.data
    stack = stack_models(plan.build, lambdas, seed, route=config.route, n=data.n, layers=config.layers,
                         optimizer=config.optimizer, learning_rate=config.learning_rate)
    loggers = [_logger(plan, l2, seed) for l2 in lambdas]
    progresses = [_Progress("", config.epochs, 0) for _ in lambdas]
    label = f"{position} stack of {len(lambdas)}: l2={','.join(f'{v:g}' for v in lambdas)} seed={seed}"
    keras.utils.set_random_seed(1000 + seed)  # the data order of every separate run of this seed
    history = stack.fit(**data.fit_args(config.batch_size), epochs=config.epochs, verbose=0,
                        validation_freq=validation_freq,
                        callbacks=[_StackProgress(label, config.epochs, config.verbose, lambdas)],
                        member_callbacks=[[logger, progress, *plan.callbacks]
                                          for logger, progress in zip(loggers, progresses, strict=True)]).history
    chosen = [choose_layers(member.model, config.layers) for member in stack.members]
    members = zip(lambdas, loggers, progresses, chosen, stack.members, strict=True)
    return [_result(l2, seed, logger, member_logs(history, index), progress, layers, test_data_loss(member.model, data))
            for index, (l2, logger, progress, layers, member) in enumerate(members)]


def test_data_loss(model, data) -> float | None:
    """The trained model's mean cross-entropy on the test split (None without one): reported, never chosen on."""
    if getattr(data, "x_test", None) is None:
        return None
    # Called directly, not through `predict`: a stack's members would each trace a predict function.
    probabilities = np.concatenate([np.asarray(keras.ops.convert_to_numpy(model(data.x_test[i:i + 512])), "float64")
                                    for i in range(0, len(data.x_test), 512)])
    probabilities = np.clip(probabilities / probabilities.sum(axis=1, keepdims=True), 1e-7, 1 - 1e-7)
    return float(-(data.y_test * np.log(probabilities)).sum(axis=1).mean())


def _logger(plan: RunPlan, l2: float, seed: int) -> MlflowL2Logger:
    config = plan.config
    return MlflowL2Logger(
        tracking_uri=plan.store_uri, experiment_name=config.experiment, run_name=f"l2={l2:g} seed={seed}",
        parent_run_id=plan.parent_run_id, tags={"sweep.seed": seed, "sweep.route": config.route, **dict(plan.tags),
                                   **plan.run_tags.get((l2, seed), {})},
        max_delay=config.max_delay, spool_dir=config.spool_dir, verbose=0,
        log_every_n_steps=plan.log_every_n_steps,
    )


def _result(l2, seed, logger, history, progress, chosen, test_loss) -> dict:
    return {
        "l2": l2, "seed": seed, "run_id": logger.run_id, "history": history, "test_data_loss": test_loss,
        "norms": {layer: trajectory[-1] for layer, trajectory in progress.norm_history.items()},
        "chosen": [layer.name for layer in chosen], "norm_history": progress.norm_history,
    }


class _Progress(keras.callbacks.Callback):
    """Prints one line per run every few epochs: epoch, data losses, ETA; records the norms."""

    def __init__(self, label, epochs, verbose, record_norms=True):
        super().__init__()
        self.label, self.epochs, self.verbose, self.record_norms = label, epochs, verbose, record_norms
        self.norm_history = {}  # layer -> [initial norm, norm after each epoch]
        self.every = max(1, epochs // 4)

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self._record()

    def _record(self):
        if not self.record_norms:
            return
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
            print(f"{self.label} epoch {done:>4}/{self.epochs}  {self._summary(logs)}  ETA {eta:5.1f}s", flush=True)

    def _summary(self, logs) -> str:
        line = f"data_loss {logs['data_loss']:.4f}"
        if "val_data_loss" in logs:  # not on the epochs a `validation_freq` skips
            line += f"  val_data_loss {logs['val_data_loss']:.4f}  val_acc {logs['val_accuracy']:.3f}"
        return line


class _StackProgress(_Progress):
    """One line per stack every few epochs: epoch, the best member's validation data loss, ETA."""

    def __init__(self, label, epochs, verbose, lambdas):
        super().__init__(label, epochs, verbose, record_norms=False)
        self.lambdas = lambdas

    def _summary(self, logs) -> str:
        losses = [(member_logs(logs, k).get("val_data_loss"), l2) for k, l2 in enumerate(self.lambdas)]
        best = min(((v, l2) for v, l2 in losses if v is not None), default=None)
        return f"best val_data_loss {best[0]:.4f} (l2={best[1]:g})" if best else ""


class EpochClock(keras.callbacks.Callback):
    """Seconds of each epoch (Keras reads the logs back at an epoch's end, so queued work is inside)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
