"""A sweep shared by workers on several machines: `keras-l2 sweep --study NAME --storage URL`, run on each.

Optuna coordinates: the study (in `storage`, PostgreSQL for several machines)
holds one trial per (λ, seed) of the grid, enqueued once, and each worker
takes waiting trials until none is left. MLflow records: the first worker
creates the sweep's parent run and the study keeps its id; every worker's
child runs sit under it, each tagged with its trial's number. The worker that
finishes last ends the parent run with the best λ, the table and the plots.

Workers that die are covered by Optuna's heartbeats: a worker signs of life
for its trials every `heartbeat` seconds; a trial silent for three heartbeats
is failed by a live worker and enqueued again
(`RetryHeartbeatStaleTrialCallback`), and the worker that takes it over marks
the dead attempt's MLflow run KILLED. A worker never leaves while a trial is
running: only a live worker can fail a stale one.

Three facts shape the loop, each checked against Optuna 5:
- `ask()` with no trial waiting creates a new trial of the sampler, not a grid
  point: so workers ask only under the study's lock, after seeing one waiting;
- heartbeats are sent by `optimize` only: this loop sends its own;
- enqueuing the grid once needs a guard when workers start together: the same
  lock (a PostgreSQL advisory lock, or a file lock for SQLite on one machine).

Example: see `tests/test_study.py`; the README's "Run a sweep on several
machines" gives the commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time

import keras

from keras_l2.search.config import SweepConfig, mask_url
from keras_l2.search.outcome import conclude, results_dir
from keras_l2.search.parent import reopen_parent, start_parent
from keras_l2.search.report import best_lines, draw_plots, summarize
from keras_l2.search.study_storage import open_study_storage, study_lock
from keras_l2.search.training import RunPlan, train_one, train_stack
from keras_l2.tracking.store import experiment_id, open_store

SWEEP_ATTR = "keras_l2.sweep"  # the study's user attributes: what the sweep is, its parent run, its reporter
PARENT_ATTR = "keras_l2.parent_run_id"
REPORTER_ATTR = "keras_l2.reported_by"
RESULT_ATTR = "keras_l2.result"  # a trial's: its run's result (history, norms), for the report
WORKER_ATTR = "keras_l2.worker"  # a trial's: the worker (host:pid) that took it
TRIAL_TAG = "keras_l2.trial"  # a child run's MLflow tags: its trial and study
STUDY_TAG = "keras_l2.study"
PRUNED_TAG = "keras_l2.pruned"  # a pruned run's: the epoch it stopped at


def check_study(config: SweepConfig, params: dict) -> None:
    """Refuses, before any training, a storage that does not open or a study created for another sweep."""
    import optuna

    try:
        study = optuna.load_study(study_name=config.study, storage=open_study_storage(config))
    except KeyError:
        return  # created by the first worker to run
    _same_sweep(config, study, definition(params, config))


def definition(params: dict, config: SweepConfig) -> dict:
    """What every worker of a study must agree on: the parent run's params and the batch size, as strings (not
    how a worker trains: stacked or not, its runs are the same)."""
    kept = {k: str(v) for k, v in study_params(params, config).items()
            if k not in ("sweep.stacked", "sweep.stack_size", "sweep.study")}
    return {**kept, "sweep.batch_size": str(config.batch_size),
            "sweep.train_size": str(config.train_size)}


def study_params(params: dict, config: SweepConfig) -> dict:
    """The parent run's params of a study: the sweep's, its name, and with TPE its sampler, trials and range
    instead of the lambdas."""
    params = {**params, "sweep.study": config.study}
    if config.sampler == "tpe":
        del params["sweep.lambdas"]
        params.update({"sweep.sampler": "tpe", "sweep.trials": config.trials,
                       "sweep.range": ",".join(f"{v:g}" for v in config.lambda_range)})
    return params


def _title(config: SweepConfig) -> str:
    if config.sampler == "tpe":
        low, high = config.lambda_range
        return f"{config.trials} trials of TPE in lambda [{low:g}, {high:g}]"
    return f"{len(config.lambdas) * config.seeds} runs ({len(config.lambdas)} lambdas x {config.seeds} seed(s))"


def _same_sweep(config: SweepConfig, study, wanted: dict) -> None:
    recorded = study.user_attrs.get(SWEEP_ATTR)
    if recorded is None:
        return  # its creator is still setting it up (or died doing so): set-up completes under the lock
    different = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
    if different:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} here" for k in different[:4])
        raise ValueError(f"--study: study {config.study!r} in {mask_url(config.storage)} was created for another "
                         f"sweep ({shown}). Run the same options as its other workers, or another --study name.")


@dataclasses.dataclass
class _Worker:
    config: SweepConfig
    data: object
    build: object
    store: object
    params: dict
    stack_size: int
    callbacks: tuple
    name: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def run_study(prepared, callbacks=()) -> dict:
    """Works on `prepared.config.study` until no trial is left (see the module docstring).

    Returns what `run_sweep` returns. The worker that finishes last ends the
    parent run and draws the plots (`plots`); the others return the same table
    and best λ, with `plots` empty.
    """
    import optuna

    config = prepared.config
    worker = _Worker(config, prepared.data, prepared.build, prepared.store, prepared.params, prepared.stack_size,
                     tuple(callbacks))
    storage = open_study_storage(config)
    started = time.perf_counter()
    with study_lock(config):
        study, parent_id = _set_up(worker, storage)
    runs = config.trials or len(config.lambdas) * config.seeds
    if config.verbose:
        print(f"Study {config.study!r} in {mask_url(config.storage)}: {_title(config)} on {prepared.data.name}, "
              f"route {config.route}; this worker "
              f"({worker.name}) takes {worker.stack_size} at a time. MLflow {prepared.store.tracking_uri}, parent "
              f"run {parent_id}", flush=True)
    mine = []
    while True:
        with study_lock(config):
            optuna.storages.fail_stale_trials(study)
            waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            trials = [study.ask() for _ in range(min(worker.stack_size, len(waiting)) or _to_propose(study, config))]
            ids = [trial_id(storage, config.study, trial.number) for trial in trials]
            for trial, stored in zip(trials, ids, strict=True):
                storage.record_heartbeat(stored)  # stale-checked from now on
                trial.set_user_attr(WORKER_ATTR, worker.name)
            running = trials or study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            reporter = not running and _claim_report(study, worker)
        if trials:
            mine += _train(worker, study, storage, dict(zip(ids, trials, strict=True)), parent_id, runs)
        elif running:
            time.sleep(config.heartbeat)  # another worker's trials: wait for them, or take them over if it dies
        else:
            break
    return _finish(worker, study, parent_id, mine, reporter, started)


def _set_up(worker: _Worker, storage) -> tuple:
    """Under the lock: loads the study, or creates it; whatever its creator did not finish (the parent run, the
    grid) is done now. Returns `(study, parent_run_id)`."""
    import optuna

    config = worker.config
    wanted = definition(worker.params, config)
    study = optuna.create_study(study_name=config.study, storage=storage, load_if_exists=True,
                                direction="minimize", **sampling(config))
    _same_sweep(config, study, wanted)
    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id is None:
        outbox, _, parent_id = start_parent(config, worker.data, worker.store, f"sweep {config.route} {config.study}",
                                            {STUDY_TAG: config.study}, study_params(worker.params, config))
        outbox.close(config.max_delay)
        study.set_user_attr(PARENT_ATTR, parent_id)
    if SWEEP_ATTR not in study.user_attrs:
        for seed in range(config.seeds if config.sampler == "grid" else 0):
            for l2 in config.lambdas:
                study.enqueue_trial({"lambda": l2, "seed": seed}, skip_if_exists=True)
        study.set_user_attr(SWEEP_ATTR, wanted)
    return study, parent_id


def sampling(config: SweepConfig) -> dict:
    """The study's sampler and pruner: a grid is enqueued (no sampler asked, nothing pruned); TPE proposes
    (counting the trials still running, so two workers rarely get the same lambda) and a median pruner stops a
    trial whose validation data loss is above the median of earlier trials at the same epoch, once three have
    finished and after its first epoch."""
    import optuna

    if config.sampler == "grid":
        return {"pruner": optuna.pruners.NopPruner()}
    return {"sampler": optuna.samplers.TPESampler(constant_liar=True),
            "pruner": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)}


def _to_propose(study, config: SweepConfig) -> int:
    """Under the lock, with no trial waiting: 1 if the sampler should propose a new trial (TPE, under its count)."""
    import optuna

    if config.sampler == "grid":
        return 0
    proposed = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    return int(len(proposed) < config.trials)


def _claim_report(study, worker: _Worker) -> bool:
    """Under the lock, with no trial waiting or running: whether this worker reports (the first to get here)."""
    if REPORTER_ATTR in study.user_attrs:
        return False
    study.set_user_attr(REPORTER_ATTR, worker.name)
    return True


def trial_id(storage, study: str, number: int) -> int:
    """The storage's id of trial `number` of `study` (what heartbeats name), through the storage's public API."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study), number)


def _train(worker: _Worker, study, storage, taken: dict, parent_id: str, runs: int) -> list:
    """Trains the trials taken ({storage id: trial}; a stack per seed, or one by one) while sending their
    heartbeats; tells Optuna."""
    import optuna

    config, trials = worker.config, list(taken.values())
    points = [_point(trial, config) for trial in trials]
    _end_dead_attempts(worker, storage, taken)
    pruning = _Pruning(trials[0]) if config.sampler == "tpe" else None  # TPE takes one trial at a time
    plan = RunPlan(config, worker.data, worker.build, parent_id, worker.store.tracking_uri,
                   worker.callbacks + ((pruning,) if pruning else ()),
                   run_tags={point: {TRIAL_TAG: str(trial.number), STUDY_TAG: config.study}
                             for point, trial in zip(points, trials, strict=True)})
    stop = threading.Event()
    beats = threading.Thread(target=_beat, args=(storage, list(taken), config.heartbeat, stop),
                             daemon=True)
    beats.start()
    results = []
    try:
        for seed in sorted({seed for _, seed in points}):
            group = [(trial, l2) for trial, (l2, s) in zip(trials, points, strict=True) if s == seed]
            if config.stacked and len(group) > 1:
                numbers = ",".join(str(trial.number) for trial, _ in group)
                results += train_stack(plan, tuple(l2 for _, l2 in group), seed, f"[trials {numbers} of {runs}]")
            else:
                results += [train_one(plan, l2, seed, f"[trial {trial.number} of {runs}]") for trial, l2 in group]
    finally:
        stop.set()
        beats.join()
    for trial, point in zip(trials, points, strict=True):
        (result,) = [r for r in results if (r["l2"], r["seed"]) == point]
        trial.set_user_attr(RESULT_ATTR, json.loads(json.dumps(result, default=float)))
        if pruning is not None and pruning.pruned_at is not None:
            _mark_pruned(worker, result["run_id"], pruning.pruned_at)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, result["history"]["val_data_loss"][-1])
    return results


def _point(trial, config: SweepConfig) -> tuple:
    """The trial's (lambda, seed): a grid point enqueued, or TPE's proposal on a log scale (seed 0)."""
    if config.sampler == "grid":
        return trial.suggest_categorical("lambda", list(config.lambdas)), trial.suggest_int("seed", 0,
                                                                                            config.seeds - 1)
    low, high = config.lambda_range
    return trial.suggest_float("lambda", low, high, log=True), 0


class _Pruning(keras.callbacks.Callback):
    """Reports each epoch's validation data loss to the trial and stops the run when the pruner says so."""

    def __init__(self, trial):
        super().__init__()
        self.trial, self.pruned_at = trial, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_data_loss")
        if value is None:
            return
        self.trial.report(float(value), epoch + 1)
        if self.trial.should_prune():
            self.pruned_at = epoch + 1
            self.model.stop_training = True


def _mark_pruned(worker: _Worker, run_id: str | None, epoch: int) -> None:
    """A pruned trial's MLflow run ends KILLED (stopped early, on purpose) with the tag `keras_l2.pruned`."""
    if run_id is None:  # the run is still on its way to a server that is down: the trial says it all
        return
    client = open_store(worker.store)
    client.set_tag(run_id, PRUNED_TAG, f"epoch {epoch} of {worker.config.epochs}")
    client.set_terminated(run_id, "KILLED")
    if worker.config.verbose:
        print(f"Run {run_id} pruned after epoch {epoch}: its validation data loss was above the median of the "
              "earlier trials'.", flush=True)


def _beat(storage, trial_ids: list, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        for stored in trial_ids:
            storage.record_heartbeat(stored)


def _end_dead_attempts(worker: _Worker, storage, taken: dict) -> None:
    """The MLflow runs of a retried trial's earlier attempts, left RUNNING by a dead worker, end KILLED."""
    import optuna

    earlier = {}
    for stored, trial in taken.items():
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(storage.get_trial(stored))
        earlier.update({number: trial.number for number in history})
    if not earlier:
        return
    client = open_store(worker.store)
    experiment = experiment_id(client, worker.config.experiment, worker.store)
    for number, retry in earlier.items():
        for run in client.search_runs([experiment], f"tags.`{STUDY_TAG}` = '{worker.config.study}' and "
                                                    f"tags.`{TRIAL_TAG}` = '{number}' and "
                                                    "attributes.status = 'RUNNING'"):
            client.set_tag(run.info.run_id, "keras_l2.retried_as_trial", str(retry))
            client.set_terminated(run.info.run_id, "KILLED")
            if worker.config.verbose:
                print(f"Trial {number}'s worker died: its run {run.info.run_id} ends KILLED; trial {retry} "
                      "trains it again.", flush=True)


def study_results(study, config: SweepConfig) -> list:
    """Every (λ, seed)'s result from its COMPLETE trial; a ValueError naming those that have none."""
    import optuna

    results = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        result = trial.user_attrs.get(RESULT_ATTR)
        if result is not None:
            results[(result["l2"], result["seed"])] = result
    if config.sampler == "tpe":
        return list(results.values())
    missing = [(l2, seed) for seed in range(config.seeds) for l2 in config.lambdas if (l2, seed) not in results]
    if missing:
        shown = ", ".join(f"lambda {l2:g} seed {seed}" for l2, seed in missing[:5])
        raise ValueError(f"study {config.study!r}: {len(missing)} run(s) did not finish ({shown}); their trials "
                         "failed (see the workers' output). Run a worker again to retry them.")
    return [results[(l2, seed)] for seed in range(config.seeds) for l2 in config.lambdas]


def _finish(worker: _Worker, study, parent_id: str, mine: list, reporter: bool, started: float) -> dict:
    config = worker.config
    results = study_results(study, config)
    if config.sampler == "tpe":  # the table's lambdas: the proposals that were not pruned
        config = dataclasses.replace(config, lambdas=tuple(sorted(r["l2"] for r in results)))
    if reporter:
        outbox, parent = reopen_parent(config, worker.store, parent_id)
        return conclude(config, worker.data, worker.store, outbox, parent, parent_id, lambda: results, started)
    summary = summarize(config, results)
    who = study.user_attrs.get(REPORTER_ATTR)
    summary["notes"] = []
    summary["report"] = "\n".join([
        summary["table"], f"This worker trained {len(mine)} of the runs; worker {who}, which finished last, ended "
        f"parent run {parent_id} with the best lambda and the plots."])
    if config.verbose:
        print(summary["report"])
    return {"parent_run_id": parent_id, "results": mine, "plots": [], **summary}


def report_study(study: str, storage: str, plots_dir: str | None = None) -> dict:
    """`keras-l2 report --study NAME --storage URL`: the table, best λ and plots of a study's finished runs, from
    the study alone (no MLflow needed); it can run while workers still train. Returns {"table", "best",
    "plots", "report", "parent_run_id", "finished"}."""
    import optuna

    config = SweepConfig(study=study, storage=storage, results_dir=plots_dir)
    try:
        loaded = optuna.load_study(study_name=study, storage=open_study_storage(config))
    except KeyError:
        raise ValueError(f"--study: there is no study {study!r} in {mask_url(storage)}") from None
    recorded = loaded.user_attrs.get(SWEEP_ATTR)
    if recorded is None:
        raise ValueError(f"--study: study {study!r} in {mask_url(storage)} is not a keras_l2 sweep (or its first "
                         "worker is still setting it up)")
    config.seeds, config.route = int(recorded["sweep.seeds"]), recorded["sweep.route"]
    config.sampler = recorded.get("sweep.sampler", "grid")
    finished = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE and RESULT_ATTR in t.user_attrs]
    results = [t.user_attrs[RESULT_ATTR] for t in finished]
    if not results:
        raise ValueError(f"--study: no run of study {study!r} has finished yet")
    config.lambdas = tuple(sorted({r["l2"] for r in results}))
    if config.sampler == "grid":  # only lambdas every seed has finished
        config.lambdas = tuple(l2 for l2 in config.lambdas
                               if sum(r["l2"] == l2 for r in results) == config.seeds)
        results = [r for r in results if r["l2"] in config.lambdas]
    summary = summarize(config, results)
    parent_id = loaded.user_attrs.get(PARENT_ATTR, "unknown")
    plots = draw_plots(config, results, summary, results_dir(config, parent_id))
    total = (int(recorded["sweep.trials"]) if config.sampler == "tpe"
             else len(recorded["sweep.lambdas"].split(",")) * config.seeds)
    lines = [summary["table"], *best_lines(summary, config.seeds),
             f"{len(finished)} of {total} runs finished{_pruned(loaded)}; parent run {parent_id}.",
             f"Plots: {', '.join(str(p) for p in plots)}"]
    return {**summary, "plots": plots, "parent_run_id": parent_id, "finished": len(finished),
            "report": "\n".join(lines)}


def _pruned(study) -> str:
    import optuna

    count = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return f" ({count} pruned)" if count else ""
