"""A shared sweep's results, read back from its study: every (λ, seed)'s result (for the worker that ends the
sweep), and `keras-l2 report --study` (the table and plots so far, from the study alone).

Example: see `tests/test_study.py` (`keras-l2 report` after a study's sweep).
"""

from __future__ import annotations

import dataclasses

from keras_l2.search.config import SweepConfig, mask_url
from keras_l2.search.outcome import results_dir
from keras_l2.search.report import best_lines, draw_plots, summarize
from keras_l2.search.study_plan import PARENT_ATTR, RESULT_ATTR, SWEEP_ATTR
from keras_l2.search.study_storage import open_study_storage


def finished_results(study) -> dict:
    """{(λ, seed): result} of the study's COMPLETE trials (each keeps its run's result as a user attribute)."""
    import optuna

    results = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        result = trial.user_attrs.get(RESULT_ATTR)
        if result is not None:
            results[(result["l2"], result["seed"])] = result
    return results


def study_results(study, config: SweepConfig) -> list:
    """Every (λ, seed)'s result from its COMPLETE trial; a ValueError naming those that have none."""
    results = finished_results(study)
    if config.sampler == "tpe":
        return list(results.values())
    missing = [(l2, seed) for seed in range(config.seeds) for l2 in config.lambdas if (l2, seed) not in results]
    if missing:
        shown = ", ".join(f"lambda {l2:g} seed {seed}" for l2, seed in missing[:5])
        raise ValueError(f"study {config.study!r}: {len(missing)} run(s) did not finish ({shown}); their trials "
                         "failed (see the workers' output). A worker started again enqueues them once more.")
    return [results[(l2, seed)] for seed in range(config.seeds) for l2 in config.lambdas]


def table_config(config: SweepConfig, results: list) -> SweepConfig:
    """`config` with the lambdas of `results`: with TPE its proposals that were not pruned; in a report while
    workers train, the grid's lambdas that have finished."""
    return dataclasses.replace(config, lambdas=tuple(sorted({r["l2"] for r in results})))


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
    finished = finished_results(loaded)
    results = list(finished.values())
    if config.sampler == "grid":  # only lambdas every seed has finished
        results = [r for r in results if sum((r["l2"], seed) in finished for seed in range(config.seeds))
                   == config.seeds]
    if not results:
        raise ValueError(f"--study: no lambda of study {study!r} has finished (on every seed) yet")
    config = table_config(config, results)
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
