"""The run loop: one model per lambda (and seed), under one MLflow parent run.

`run_sweep(config, model=..., data=...)` trains the model once per lambda and
seed, every run of a seed from the same initial weights and the same data
order, in this process or in `config.workers` worker processes. With
`config.stacked` (the default) the lambdas of a seed train together in
stacks of `config.stack_size` members (default: what the free memory holds),
each member exactly its separate run (`keras_l2.search.stacked`). Each run is a
child of the sweep's parent run, logged by `MlflowL2Logger`; the parent run
goes through the same delivery (`Outbox`): a tracking server that dies during
the sweep costs its end at most `config.max_delay` seconds, and what could
not be sent is saved in the spool directory and sent later
(`keras-l2 send-pending`). A tracking server that is down when the sweep
starts is refused at once, before any run is created.

Example (a one-epoch sweep of the user's own model on tiny data):

>>> import tempfile, keras, numpy as np
>>> from keras_l2.search import SweepConfig, run_sweep
>>> def my_model():
...     inputs = keras.Input((4,))
...     hidden = keras.layers.Dense(8, activation="relu", name="features")(inputs)
...     return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(hidden))
>>> rng = np.random.default_rng(0)
>>> data = (rng.normal(size=(30, 4)), np.arange(30) % 3, rng.normal(size=(9, 4)), np.arange(9) % 3)
>>> with tempfile.TemporaryDirectory() as root:
...     result = run_sweep(SweepConfig(lambdas=(0.0, 1.0), layers="features", epochs=1, verbose=0,
...                                    tracking_uri=f"sqlite:///{root}/mlflow.db", results_dir=root),
...                        model=my_model, data=data)
>>> sorted(result["by_lambda"]), result["results"][0]["chosen"]
([0.0, 1.0], ['features'])
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

from keras_l2.backend import host
from keras_l2.search.config import SweepConfig, check_config
from keras_l2.search.data import DatasetData, SweepData, as_sweep_data, check_classes, load_npz
from keras_l2.search.datasets import bundled
from keras_l2.search.models import check_model, load_model_spec, mlp_function
from keras_l2.search.outcome import conclude
from keras_l2.search.parent import start_parent
from keras_l2.search.stacking import default_stack_size
from keras_l2.search.study import run_study
from keras_l2.search.study_plan import check_study
from keras_l2.search.training import RunPlan, train_one, train_stack
from keras_l2.tracking.store import TrackingStore, check_reachable, resolve_store


def run_sweep(config: SweepConfig | None = None, model: Callable | None = None, data=None,
              callbacks: Sequence = ()) -> dict:
    """Runs the sweep; returns {"parent_run_id", "results", "best", "by_lambda", "plots", "table"}.

    Args:
        config: the options (`SweepConfig()` by default).
        model: a function building the model (see `keras_l2.search.models`);
            None: `config.model` ("module:function"), else the built-in MLP.
        data: `(x_train, y_train, x_val, y_val[, x_test, y_test])` NumPy arrays
            (labels as class ids or one-hot rows), or `(train, val)` batched `tf.data` datasets
            of `(x, one-hot y)` (see `keras_l2.search.data` for n);
            None: `config.data` (an .npz), else `config.dataset` (the digits).
        callbacks: Keras callbacks added to every run's `fit` (after the
            logger); with `workers > 1`, each worker gets a copy. In a stack
            each is called for every member, at epoch level, with that member
            as its model and that member's logs.

    Raises:
        ValueError: bad options, data, or a model that does not fit them; a
            tracking server that does not answer. All before any run is created.
    """
    return prepare_sweep(config, model, data).run(callbacks)


def prepare_sweep(config: SweepConfig | None = None, model: Callable | None = None, data=None) -> PreparedSweep:
    """Checks everything `run_sweep` takes (same arguments) and creates nothing; `.run()` runs the sweep."""
    config = check_config(config if config is not None else SweepConfig())
    if config.threads is not None:  # before the data and the model: the backend's first ops fix its thread pools
        host.limit_threads(config.threads)
    data = _resolve_data(config, data)
    build = _resolve_model(config, model, data)
    if config.workers > 1 and isinstance(data, DatasetData):
        raise ValueError(f"workers: tf.data datasets cannot be sent to worker processes; use workers=1 or "
                         f"NumPy arrays. Received: workers={config.workers}")
    stack_size, reason = _stack_size(config, build)
    store = resolve_store(config.tracking_uri)
    check_reachable(store)
    params = _parent_params(config, data, model)
    if config.stacked:
        params["sweep.stack_size"] = stack_size
    if config.study is not None:
        check_study(config, params)
    return PreparedSweep(config, data, build, store, params, stack_size, reason)


@dataclasses.dataclass
class PreparedSweep:
    """A checked sweep (see `prepare_sweep`); nothing is created until `run`."""

    config: SweepConfig
    data: SweepData | DatasetData
    build: Callable
    store: TrackingStore
    params: dict
    stack_size: int = 1  # members per stack (with config.stacked)
    stack_reason: str = ""  # how the stack size was chosen, in words

    def run(self, callbacks: Sequence = ()) -> dict:
        """Runs the sweep (see `run_sweep`)."""
        config, data, store = self.config, self.data, self.store
        if config.study is not None:
            return run_study(self, callbacks)
        outbox, parent, parent_id = start_parent(
            config, data, store, f"sweep {config.route} {len(config.lambdas)} lambdas", {}, self.params)
        plan = RunPlan(config, data, self.build, parent_id, store.tracking_uri, tuple(callbacks))
        jobs = _jobs(config, self.stack_size)
        if config.verbose:
            runs = len(config.lambdas) * config.seeds
            how = (f"in {len(jobs)} stack(s) ({self.stack_reason})" if config.stacked
                   else "one by one")
            print(f"Sweep: {len(config.lambdas)} lambdas x {config.seeds} seed(s) = {runs} runs on "
                  f"{data.name}, route {config.route}, trained {how}, {config.workers} worker(s); "
                  f"MLflow {store.tracking_uri}, parent run {parent_id}", flush=True)
        started = time.perf_counter()
        return conclude(config, data, store, outbox, parent, parent_id, lambda: _run_jobs(plan, jobs, started),
                        started)


def _stack_size(config: SweepConfig, build) -> tuple[int, str]:
    """Members per stack: `config.stack_size`, else what the memory allows (all of a seed's lambdas here)."""
    if not config.stacked:
        return 1, "not stacked"
    if config.study is not None:  # workers join as they come: each takes one trial at a time unless told more
        size = min(config.stack_size or 1, len(config.lambdas)) if config.sampler == "grid" else 1  # TPE: 1
        return size, f"{size} trial(s) at a time, from --stack-size" if config.stack_size else "one trial at a time"
    if config.stack_size is not None:
        size = min(config.stack_size, len(config.lambdas))
        return size, f"{size} members per stack, from --stack-size {config.stack_size}"
    size, reason = default_stack_size(build, len(config.lambdas), config.optimizer, config.batch_size)
    share = -(-len(config.lambdas) * config.seeds // config.workers)  # every worker gets a stack to train
    if share < size:
        return share, f"{share} members per stack, so that each of the {config.workers} workers trains one"
    return size, reason


def _resolve_data(config: SweepConfig, data) -> SweepData | DatasetData:
    if data is not None:
        data = as_sweep_data(data)
    else:
        data = load_npz(config.data) if config.data else bundled(config.dataset, config.train_size)
    if isinstance(data, SweepData):  # a tf.data dataset is not read twice to check it
        check_classes(data, config.allow_unseen_classes)
    return data


def _resolve_model(config: SweepConfig, model, data) -> Callable:
    """The model function, checked against the data and `config.layers` by building it once."""
    if model is None and config.model:
        model = load_model_spec(config.model)
    if model is None:
        model = mlp_function(data.features, data.classes, config.hidden)
    elif not callable(model):
        raise ValueError(f"model: expected a function that builds a keras.Model. Received: {model!r:.80}")
    check_model(model, data.features, data.classes, config.layers)
    return model


def _parent_params(config: SweepConfig, data, model) -> dict:
    params = {"sweep.lambdas": ",".join(f"{v:g}" for v in config.lambdas), "sweep.route": config.route,
              "sweep.optimizer": config.optimizer, "sweep.learning_rate": config.learning_rate,
              "sweep.epochs": config.epochs, "sweep.seeds": config.seeds, "sweep.layers": config.layers or "all",
              "sweep.data": data.name, "sweep.stacked": config.stacked}
    if getattr(data, "class_names", None):  # string labels: which class id is which label
        mapping = ",".join(f"{i}={name}" for i, name in enumerate(data.class_names))
        params["sweep.classes"] = mapping if len(mapping) <= 500 else mapping[:497] + "..."
    if model is None and not config.model:
        params["sweep.hidden"] = ",".join(map(str, config.hidden))
    else:
        params["sweep.model"] = config.model if model is None else getattr(model, "__qualname__", repr(model))
    return params


def _jobs(config: SweepConfig, stack_size: int) -> list:
    """What one worker trains at a time: `(lambdas, seed)`, a stack of one seed's lambdas or a single run."""
    size = stack_size if config.stacked else 1
    return [(config.lambdas[i:i + size], seed) for seed in range(config.seeds)
            for i in range(0, len(config.lambdas), size)]


def _train(plan: RunPlan, lambdas: tuple, seed: int, position: str) -> list:
    with host.frozen_heap():  # (a worker's job; in this process, `_run_jobs` froze the heap once for all)
        if plan.config.stacked:
            return train_stack(plan, lambdas, seed, position)
        (l2,) = lambdas
        return [train_one(plan, l2, seed, position)]


def _run_jobs(plan: RunPlan, jobs: list, started: float) -> list:
    total, verbose = sum(len(lambdas) for lambdas, _ in jobs), plan.config.verbose
    results = []
    if plan.config.workers == 1:
        with host.frozen_heap():  # once: a full collection before each job cost 0.4 s each here
            for index, (lambdas, seed) in enumerate(jobs):
                results += _train(plan, lambdas, seed, f"[{index + 1}/{len(jobs)}]")
                _report(verbose, len(results), total, started)
        return results
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # never fork a process that has TensorFlow threads
    with concurrent.futures.ProcessPoolExecutor(plan.config.workers, mp_context=context,
                                                initializer=_quiet_worker, initargs=(plan.config.threads,)) as pool:
        futures = [pool.submit(_train, plan, lambdas, seed, f"[{index + 1}/{len(jobs)}]")
                   for index, (lambdas, seed) in enumerate(jobs)]
        for future in concurrent.futures.as_completed(futures):
            results += future.result()
            _report(verbose, len(results), total, started)
    return sorted(results, key=lambda r: (r["seed"], r["l2"]))


def _quiet_worker(threads: int | None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if threads is not None:
        host.limit_threads(threads)


def _report(verbose, done, total, started):
    if verbose:
        elapsed = time.perf_counter() - started
        print(f"-- {done}/{total} runs done, {elapsed:.0f} s elapsed, about "
              f"{elapsed / done * (total - done):.0f} s to go", flush=True)
