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

Example: see `tests/test_study.py`; the README's "A sweep on several
machines" gives the commands.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time

from keras_l2.search.config import SweepConfig, TuneConfig, mask_url
from keras_l2.search.outcome import conclude
from keras_l2.search.parent import end_parent, reopen_parent, start_parent
from keras_l2.search.pruning import Pruning
from keras_l2.search.report import summarize
from keras_l2.search.study_plan import (
    PARENT_ATTR,
    PRUNED_TAG,
    REPORTER_ATTR,
    RESULT_ATTR,
    STUDY_TAG,
    SWEEP_ATTR,
    TRIAL_TAG,
    WORKER_ATTR,
    definition,
    point,
    same_sweep,
    sampling,
    startup_lambdas,
    study_params,
    title,
    to_propose,
)
from keras_l2.search.study_report import study_results, table_config
from keras_l2.search.study_storage import open_study_storage, study_lock
from keras_l2.search.training import RunPlan, train_one, train_stack
from keras_l2.tracking.store import experiment_id, open_store

LOG = logging.getLogger("keras_l2")
# How often a worker with nothing to take looks again. A heartbeat's 20 s made a worker whose last run ended
# first wait that long for the others' last runs, and stay after the sweep had ended.
POLL_SECONDS = 1.0


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
        print(f"Study {config.study!r} in {mask_url(config.storage)}: {title(config)} on {prepared.data.name}, "
              f"route {config.route}; this worker "
              f"({worker.name}) takes {worker.stack_size} at a time. MLflow {prepared.store.tracking_uri}, parent "
              f"run {parent_id}", flush=True)
    mine = []
    while True:
        with study_lock(config):
            optuna.storages.fail_stale_trials(study)
            waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            taken = {}  # {storage id: trial}
            for _ in range(min(worker.stack_size, len(waiting)) or to_propose(study, config)):
                trial = study.ask()
                stored = trial_id(storage, config.study, trial.number)
                storage.record_heartbeat(stored)  # at once: a RUNNING trial with no heartbeat is never stale
                taken[stored] = trial
                trial.set_user_attr(WORKER_ATTR, worker.name)
            trials = list(taken.values())
            running = trials or study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            reporter = not running and _claim_report(study, worker)
        if trials:
            mine += _train(worker, study, storage, taken, parent_id, runs)
        elif running:  # another worker's trials: wait for them (then leave at once), or take them over if it dies
            time.sleep(min(config.heartbeat, POLL_SECONDS))
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
    same_sweep(config, study, wanted)
    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id is None:
        tune = isinstance(config, TuneConfig)  # `keras-l2 tune --study`: tagged as the one-machine tune's parent
        outbox, _, parent_id = start_parent(config, worker.data, worker.store,
                                            f"{'tune' if tune else 'sweep'} {config.route} {config.study}",
                                            {STUDY_TAG: config.study, **({"tune": "true"} if tune else {})},
                                            study_params(worker.params, config))
        outbox.close(config.max_delay)
        study.set_user_attr(PARENT_ATTR, parent_id)
    if SWEEP_ATTR not in study.user_attrs:
        for seed in range(config.seeds if config.sampler == "grid" else 0):
            for l2 in config.lambdas:
                study.enqueue_trial({"lambda": l2, "seed": seed}, skip_if_exists=True)
        spread = startup_lambdas(config) if config.sampler == "tpe" else ()
        # The user's own guesses take the spread's place; a creator that died midway left only spread points.
        if spread and all(t.system_attrs.get("fixed_params", {}).get("lambda") in spread
                          for t in study.get_trials(deepcopy=False)):
            for l2 in spread:
                study.enqueue_trial({"lambda": l2}, skip_if_exists=True)
        study.set_user_attr(SWEEP_ATTR, wanted)
    elif config.sampler == "grid":  # points whose every attempt failed (an error, retries used up): once more
        alive = {(t.params.get("lambda"), t.params.get("seed")) for t in study.get_trials(deepcopy=False)
                 if t.state != optuna.trial.TrialState.FAIL}
        alive |= {tuple(t.system_attrs.get("fixed_params", {}).get(k) for k in ("lambda", "seed"))
                  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))}
        for seed in range(config.seeds):
            for l2 in config.lambdas:
                if (l2, seed) not in alive:
                    study.enqueue_trial({"lambda": l2, "seed": seed})
    return study, parent_id


def _claim_report(study, worker: _Worker) -> bool:
    """Under the lock, with no trial waiting or running: whether this worker reports (the first to get here)."""
    if study.user_attrs.get(REPORTER_ATTR):
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
    stop = threading.Event()  # heartbeats from taking the trials to telling their results
    beats = threading.Thread(target=_beat, args=(storage, list(taken), config.heartbeat, stop), daemon=True)
    beats.start()
    told = set()
    try:
        points = [point(trial, config) for trial in trials]
        _end_dead_attempts(worker, storage, taken)
        pruning = Pruning(trials[0]) if config.sampler == "tpe" else None  # TPE takes one trial at a time
        plan = RunPlan(config, worker.data, worker.build, parent_id, worker.store.tracking_uri,
                       worker.callbacks + ((pruning,) if pruning else ()),
                       run_tags={where: {TRIAL_TAG: str(trial.number), STUDY_TAG: config.study}
                                 for where, trial in zip(points, trials, strict=True)})
        results = []
        for seed in sorted({seed for _, seed in points}):
            group = [(trial, l2) for trial, (l2, s) in zip(trials, points, strict=True) if s == seed]
            if config.stacked and len(group) > 1:
                numbers = ",".join(str(trial.number) for trial, _ in group)
                results += train_stack(plan, tuple(l2 for _, l2 in group), seed, f"[trials {numbers} of {runs}]")
            else:
                results += [train_one(plan, l2, seed, f"[trial {trial.number} of {runs}]") for trial, l2 in group]
        for trial, where in zip(trials, points, strict=True):
            (result,) = [r for r in results if (r["l2"], r["seed"]) == where]
            trial.set_user_attr(RESULT_ATTR, json.loads(json.dumps(result, default=float)))
            if pruning is not None and pruning.pruned_at is not None:
                _mark_pruned(worker, result["run_id"], pruning.pruned_at)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, result["history"]["val_data_loss"][-1])
            told.add(trial.number)
    finally:
        for trial in trials:  # an error: FAIL, and the next worker to start enqueues its (λ, seed) again
            if trial.number not in told:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        stop.set()
        beats.join()
    return results


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
        try:
            for stored in trial_ids:
                storage.record_heartbeat(stored)
        except Exception as error:  # noqa: BLE001 - a lost heartbeat is retried; a dead thread would lose them all
            LOG.warning("keras_l2: a heartbeat to the study's database failed (%s); retrying in %g s", error, every)


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


def _finish(worker: _Worker, study, parent_id: str, mine: list, reporter: bool, started: float) -> dict:
    config = worker.config
    if reporter:
        outbox, parent = reopen_parent(config, worker.store, parent_id)
        try:
            try:
                results = study_results(study, config)
            except BaseException:
                end_parent(outbox, parent, [], "FAILED", config.max_delay)
                raise
            return conclude(table_config(config, results), worker.data, worker.store, outbox, parent, parent_id,
                            lambda: results, started)
        except BaseException:
            study.set_user_attr(REPORTER_ATTR, "")  # the parent ended FAILED; a later worker may end it again
            raise
    results = study_results(study, config)
    config = table_config(config, results)
    summary = summarize(config, results)
    who = study.user_attrs.get(REPORTER_ATTR)
    summary["notes"] = []
    summary["report"] = "\n".join([
        summary["table"], f"This worker trained {len(mine)} of the runs; worker {who}, which finished last, ended "
        f"parent run {parent_id} with the best lambda and the plots."])
    if config.verbose:
        print(summary["report"])
    return {"parent_run_id": parent_id, "results": mine, "plots": [], **summary}
