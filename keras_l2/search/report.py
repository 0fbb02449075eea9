"""What a sweep shows: the table of final values per lambda, the best lambda, and the plots.

Example (two hand-made runs, as `run_sweep` returns them in `results`):

>>> from keras_l2.search import SweepConfig, summarize
>>> def run(l2, val):
...     history = {"data_loss": [0.1], "val_data_loss": [val], "val_accuracy": [0.9], "l2_penalty": [0.0]}
...     return {"l2": l2, "seed": 0, "history": history, "norms": {"out": 1.0}, "chosen": ["out"]}
>>> summary = summarize(SweepConfig(lambdas=(0.0, 0.1)), [run(0.0, 0.5), run(0.1, 0.4)])
>>> summary["best"]["l2"]
0.1
>>> summary["table"].splitlines()[0].split()
['lambda', 'train', 'data', 'loss', 'val', 'data', 'loss', 'val', 'acc', '|W|_F', 'out*']
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from keras_l2 import l2_math
from keras_l2.search.config import SweepConfig

# With one seed there is no spread to compare against: two lambdas whose validation data losses differ by
# less than this share of the best one's are called a tie (about the epoch-to-epoch noise of a settled run).
TIE_TOLERANCE = 0.01
BARELY_TRAINED = 0.8  # a train data loss above this share of log(classes) (chance level) is barely trained
NEGLIGIBLE_DECAY = 0.05  # decoupled decay that takes less than this share of a weight over the run is negligible


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
        tests = [r.get("test_data_loss") for r in runs]
        if all(t is not None for t in tests):
            final["test_data_loss"] = tests
        entry = {"l2": l2, **{k: float(np.mean(v)) for k, v in final.items()},
                 **{f"{k}_std": float(np.std(v)) for k, v in final.items()},
                 "norms": {layer: float(np.mean([r["norms"][layer] for r in runs])) for layer in runs[0]["norms"]}}
        by_lambda[l2] = entry
    best = min(by_lambda.values(), key=lambda e: e["val_data_loss"])
    verdict = judge_best(by_lambda, best, config.seeds)
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
    return {"by_lambda": by_lambda, "best": best, "verdict": verdict, "table": "\n".join(lines)}


def _tied(a: dict, b: dict, seeds: int) -> bool:
    """Whether lambdas `a` and `b` cannot be told apart on validation data loss (see `judge_best`)."""
    difference = abs(a["val_data_loss"] - b["val_data_loss"])
    if seeds > 1:
        return difference <= a["val_data_loss_std"] + b["val_data_loss_std"]
    return difference < TIE_TOLERANCE * min(a["val_data_loss"], b["val_data_loss"])


def judge_best(by_lambda: dict, best: dict, seeds: int) -> dict:
    """How far to trust the best lambda: ties with lambda 0 or its neighbours, and the grid's edge.

    Two lambdas are tied when, with seeds, their mean validation data losses
    differ by no more than the sum of their standard deviations over seeds;
    with one seed, by less than `TIE_TOLERANCE` (1%) of the smaller one.
    The best sits at the edge when it is the grid's largest lambda, or its
    smallest non-zero one while lambda 0 is clearly worse: the minimum may
    lie beyond, and `suggest` names lambdas to add.
    """
    grid = sorted(by_lambda)
    at = grid.index(best["l2"])
    neighbours = [grid[i] for i in (at - 1, at + 1) if 0 <= i < len(grid)]
    zero = by_lambda.get(0.0)
    verdict = {
        "tied_with_zero": bool(zero is not None and best["l2"] != 0.0 and _tied(best, zero, seeds)),
        "tied_with": [l2 for l2 in neighbours if _tied(best, by_lambda[l2], seeds)],
        "edge": None, "suggest": [],
    }
    nonzero = [l2 for l2 in grid if l2 > 0]
    if best["l2"] > 0 and best["l2"] == grid[-1]:
        verdict["edge"], verdict["suggest"] = "largest", [3 * best["l2"], 10 * best["l2"]]
    elif best["l2"] > 0 and best["l2"] == nonzero[0] and not verdict["tied_with_zero"]:
        verdict["edge"], verdict["suggest"] = "smallest", [best["l2"] / 10, best["l2"] / 3]
    return verdict


def best_lines(summary: dict, seeds: int) -> list:
    """The best lambda, and what to make of it, as lines for people."""
    best, verdict, by_lambda = summary["best"], summary["verdict"], summary["by_lambda"]
    zero = by_lambda.get(0.0)
    versus = (f" ({best['val_data_loss']:.4f} against {zero['val_data_loss']:.4f} at lambda 0)"
              if zero and best["l2"] != 0.0 else "")
    lines = [f"Best lambda on validation data loss: {best['l2']:g}{versus}."]
    if "test_data_loss" in best:
        lines.append(f"  Its test data loss: {best['test_data_loss']:.4f} (the test split was not used to choose).")
    noise = "the seeds' spread" if seeds > 1 else f"{TIE_TOLERANCE:.0%} (one seed; more seeds measure the spread)"
    if verdict["tied_with_zero"]:
        lines.append(f"  Not distinguishable from lambda 0: the difference is within {noise}.")
    if verdict["tied_with"]:
        lines.append(f"  Not distinguishable from its neighbour(s) {', '.join(f'{v:g}' for v in verdict['tied_with'])}"
                     f": the difference is within {noise}.")
    if verdict["edge"]:
        lines.append(f"  It is the {verdict['edge']} non-zero lambda of the grid: the best may lie beyond; add "
                     + ", ".join(f"{v:.3g}" for v in verdict["suggest"]) + " to --lambdas.")
    return lines


def training_notes(config: SweepConfig, summary: dict, classes: int, n: int, steps: int) -> list:
    """Warnings about a sweep whose runs say little about lambda: a model that barely trained, inert decay."""
    notes = []
    weakest = summary["by_lambda"][min(summary["by_lambda"])]
    chance = math.log(classes)
    if weakest["data_loss"] > BARELY_TRAINED * chance:
        notes.append(f"Warning: at lambda {weakest['l2']:g} the training data loss is still {weakest['data_loss']:.3f},"
                     f" near chance level log({classes}) = {chance:.3f}: the model barely trained, so lambda's effect "
                     "cannot show. Raise --learning-rate or --epochs.")
    if config.route == "decoupled":
        largest = max(config.lambdas)
        taken = 1.0 - l2_math.decay_left(largest, n, config.learning_rate, steps)
        notes.append(f"Decoupled decay per step at lambda {largest:g}: 2*lambda/n*lr = "
                     f"{l2_math.gradient_coefficient(largest, n) * config.learning_rate:.3g}; over the run's {steps} "
                     f"steps it alone would take {taken:.1%} of a weight.")
        if taken < NEGLIGIBLE_DECAY:
            # (1 - 2 lambda/n lr)^steps = 1/2  ->  lambda ~ n ln 2 / (2 lr steps)
            half = n * math.log(2) / (2 * config.learning_rate * steps)
            notes.append(f"Warning: that is negligible: this grid barely regularizes. Lambdas around {half:.3g} "
                         "would halve an unused weight over the run.")
    return notes


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
    bars = f"error bars: std over {config.seeds} seeds" if config.seeds > 1 else "one seed: no error bars"
    ax.set_title(f"Data loss vs lambda ({config.route}; {bars})", fontsize=10)
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

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot(lambdas, [e["penalty_share"] for e in entries], marker="o", label="l2_penalty / (data_loss + l2_penalty)")
    ax.set_ylabel("share of the training objective")
    ax.set_ylim(0, 1)
    ax.set_title("How much of the final objective is the penalty\n(high at small lambda once the data is fitted;"
                 " falls as lambda keeps the fit coarse)", fontsize=9)
    if len(entries) > 2:  # the two ends, with the numbers that explain them
        peak, last = max(entries[1:], key=lambda e: e["penalty_share"]), entries[-1]
        for entry, offset, why in ((peak, (-20, -110), "data nearly fitted"), (last, (-150, -90), "fit held back")):
            ax.annotate(f"lambda {entry['l2']:g}: {why}\ntrain data loss {entry['data_loss']:.3g}, penalty "
                        f"{entry['penalty_share']:.0%}", (entry["l2"], entry["penalty_share"]),
                        textcoords="offset points", xytext=offset, fontsize=8,
                        arrowprops={"arrowstyle": "->", "color": "gray"})
    finish(fig, ax, "penalty_share.png")
    return paths


def as_json(result: dict) -> dict:
    """The sweep's result for scripts (`keras-l2 sweep --json`): plain JSON types, no per-epoch histories."""
    return {
        "parent_run_id": result["parent_run_id"],
        "best_lambda": result["best"]["l2"], "best_val_data_loss": result["best"]["val_data_loss"],
        "test_data_loss": result["best"].get("test_data_loss"),
        "verdict": result["verdict"], "notes": result["notes"],
        "by_lambda": [dict(entry) for entry in result["by_lambda"].values()],
        "plots": [str(path) for path in result["plots"]],
    }
