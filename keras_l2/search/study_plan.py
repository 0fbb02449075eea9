"""What a shared sweep's study is: its definition (what every worker must agree on), its parent run's params,
its sampler and pruner, a trial's (λ, seed), and the names keras_l2 gives its attributes and tags.

Example:

>>> from keras_l2.search import SweepConfig
>>> from keras_l2.search.study_plan import definition, title
>>> config = SweepConfig(lambdas=(0.0, 0.1), seeds=2, study="demo", storage="sqlite:///optuna.db")
>>> title(config)
'4 runs (2 lambdas x 2 seed(s))'
>>> definition({"sweep.lambdas": "0,0.1", "sweep.stacked": True}, config)["sweep.lambdas"]
'0,0.1'
"""

from __future__ import annotations

import math

from keras_l2.search.config import SweepConfig, mask_url
from keras_l2.search.study_storage import open_study_storage

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

    storage = open_study_storage(config)
    try:
        study = optuna.load_study(study_name=config.study, storage=storage)
    except KeyError:
        return  # created by the first worker to run
    finally:
        storage.engine.dispose()
    same_sweep(config, study, definition(params, config))


def definition(params: dict, config: SweepConfig) -> dict:
    """What every worker of a study must agree on: the parent run's params and the batch size, as strings (not
    how a worker trains: stacked or not, its runs are the same)."""
    kept = {k: str(v) for k, v in study_params(params, config).items()
            if k not in ("sweep.stacked", "sweep.stack_size", "sweep.study")}
    # Every worker fails others' trials after 3 of its own heartbeats: a shorter one would take over live trials.
    # The experiment too: child runs follow their worker's, and must sit beside their parent run.
    return {**kept, "sweep.batch_size": str(config.batch_size), "study.heartbeat": f"{config.heartbeat:g}",
            "sweep.train_size": str(config.train_size), "study.experiment": config.experiment}


def study_params(params: dict, config: SweepConfig) -> dict:
    """The parent run's params of a study: the sweep's, its name, and with TPE its sampler, trials and range
    instead of the lambdas."""
    params = {**params, "sweep.study": config.study}
    if config.sampler == "tpe":
        del params["sweep.lambdas"]
        params.update({"sweep.sampler": "tpe", "sweep.trials": config.trials,
                       "sweep.range": ",".join(f"{v:g}" for v in config.lambda_range)})
    return params


def title(config: SweepConfig) -> str:
    if config.sampler == "tpe":
        low, high = config.lambda_range
        return f"{config.trials} trials of TPE in lambda [{low:g}, {high:g}]"
    return f"{len(config.lambdas) * config.seeds} runs ({len(config.lambdas)} lambdas x {config.seeds} seed(s))"


def same_sweep(config: SweepConfig, study, wanted: dict) -> None:
    recorded = study.user_attrs.get(SWEEP_ATTR)
    if recorded is None:
        return  # its creator is still setting it up (or died doing so): set-up completes under the lock
    different = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
    if different:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} here" for k in different[:4])
        raise ValueError(f"--study: study {config.study!r} in {mask_url(config.storage)} was created for another "
                         f"sweep ({shown}). Run the same options as its other workers, or another --study name.")


def sampling(config: SweepConfig) -> dict:
    """The study's sampler and pruner: a grid is enqueued (no sampler asked, nothing pruned); TPE proposes
    (counting the trials still running, so two workers rarely get the same lambda) and a median pruner stops a
    trial whose validation data loss is above the median of earlier trials at the same epoch, once three have
    finished and from its second epoch on."""
    import optuna

    if config.sampler == "grid":
        return {"pruner": optuna.pruners.NopPruner()}
    return {"sampler": optuna.samplers.TPESampler(constant_liar=True, n_startup_trials=len(startup_lambdas(config))),
            "pruner": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)}


def startup_lambdas(config: SweepConfig) -> tuple:
    """TPE's first lambdas: the centres of equal parts of the range on a log scale (3, or a quarter of the trials
    up to 10), enqueued when the study is created, before TPE models anything.

    TPE draws its first `n_startup_trials` (10 by default) at random: a budget
    of 8 would never leave random search, and random draws may all miss a
    decade. Spread points cover the range at once; a user's own guesses,
    enqueued before the first worker starts, take their place.
    """
    low, high = (math.log10(v) for v in config.lambda_range)
    count = min(config.trials, max(3, min(10, config.trials // 4)))
    return tuple(10 ** (low + (high - low) * (i + 0.5) / count) for i in range(count))


def to_propose(study, config: SweepConfig) -> int:
    """Under the lock, with no trial waiting: 1 if the sampler should propose a new trial (TPE, under its count)."""
    import optuna

    if config.sampler == "grid":
        return 0
    proposed = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    return int(len(proposed) < config.trials)


def point(trial, config: SweepConfig) -> tuple:
    """The trial's (lambda, seed): a grid point enqueued, or TPE's proposal on a log scale (seed 0)."""
    if config.sampler == "grid":
        return trial.suggest_categorical("lambda", list(config.lambdas)), trial.suggest_int("seed", 0,
                                                                                            config.seeds - 1)
    low, high = config.lambda_range
    return trial.suggest_float("lambda", low, high, log=True), 0
