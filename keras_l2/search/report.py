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

from pathlib import Path

import numpy as np

from keras_l2.search.config import SweepConfig


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
