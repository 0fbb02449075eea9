"""A sweep's end, from its runs' results: the table and best λ, the plots, the parent run's metrics and end, and
the report it prints. A sweep in one process (`runner`) and a sweep shared through a study (`study`, by the worker
that finishes last) end the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from keras_l2.search.config import RESULTS_DIR, SweepConfig
from keras_l2.search.parent import end_parent
from keras_l2.search.report import best_lines, draw_plots, summarize, training_notes
from keras_l2.tracking.store import PROBE_TIMEOUT, open_store, short_requests, ui_hint


def conclude(config: SweepConfig, data, store, outbox, parent: str, parent_id: str, train: Callable[[], list],
             started: float) -> dict:
    """Runs `train()` (the runs' results), then ends the sweep; the parent run ends FAILED if anything raises.

    Returns what `run_sweep` returns: {"parent_run_id", "results", "plots", "best", "by_lambda", "table",
    "verdict", "notes", "report"}.
    """
    status, plots, delivered = "FAILED", [], False
    try:
        results = train()
        summary = summarize(config, results)
        plots = draw_plots(config, results, summary, results_dir(config, parent_id))
        metrics = {"best_lambda": summary["best"]["l2"], "best_val_data_loss": summary["best"]["val_data_loss"]}
        if "test_data_loss" in summary["best"]:
            metrics["test_data_loss"] = summary["best"]["test_data_loss"]
        outbox.log(parent, metrics=metrics)
        status = "FINISHED"
    finally:
        delivered = end_parent(outbox, parent, plots, status, config.max_delay)
    steps = config.epochs * data.steps_per_epoch(config.batch_size)
    summary["notes"] = training_notes(config, summary, data.classes, data.n, steps)
    experiment = _experiment_of(store, parent_id) if delivered else None  # a store that answered just now
    summary["report"] = _report_text(summary, config, plots, parent_id, store, experiment,
                                     time.perf_counter() - started)
    if config.verbose:
        print(summary["report"])
    return {"parent_run_id": parent_id, "results": results, "plots": plots, **summary}


def results_dir(config: SweepConfig, parent_id: str) -> Path:
    """Where the plots go: `config.results_dir`, else `mlruns/plots/<parent run id>` (never tracked files)."""
    return Path(config.results_dir) if config.results_dir else Path(RESULTS_DIR) / parent_id


def _report_text(summary: dict, config: SweepConfig, plots: list, parent_id: str, store, experiment: str | None,
                 seconds: float) -> str:
    """What the sweep prints at its end (`--quiet` prints it too): the table, the best lambda, where things are."""
    lines = [summary["table"], *best_lines(summary, config.seeds), *summary["notes"]]
    lines.append(f"Plots: {', '.join(str(p) for p in plots)}")
    lines.append(f"Runs: parent {parent_id} in {store.tracking_uri}. {ui_hint(store, parent_id, experiment)}")
    lines.append(f"There, in experiment {config.experiment!r}, the parent run's + lists its child runs: select them "
                 "and press Compare for their curves side by side.")
    lines.append(f"Took {seconds:.0f} s.")
    return "\n".join(lines)


def _experiment_of(store, run_id: str) -> str | None:
    """The experiment of run `run_id`, for the UI's link; None if the store does not answer at once."""
    try:
        with short_requests(PROBE_TIMEOUT):
            return open_store(store).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - only a link is lost; the sweep's results are printed anyway
        return None
