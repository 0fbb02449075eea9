"""`keras-l2 tune`: λ follows the validation hypergradient in one run, then fixed-λ runs confirm it.

Two stages:

1. **One run in which λ follows the hypergradient.** λ starts at the
   range's geometric middle (0.1 for the default 1e-4 ... 1e2) and is held
   there for the first half of the epochs. From then on, at the end of
   the last two epochs of every five, it takes the exact one-step
   hypergradient `h = dL_val/dλ` of the route
   (`keras_l2.search.hypergradient`; the whole training set as the batch,
   the whole validation split), and at the fifth `log λ` moves against the
   sign of their mean, by `STEP` at first and 0.7 times the last move after
   that (`HypergradientLambda`). λ̂ is where the last move lands. Keras
   validates this run every fifth epoch (`validation_every`): the
   hypergradient reads the validation split itself. On TensorFlow a new λ
   reaches the compiled step without a retrace; on JAX each move retraces
   (the regularizer and loss routes, and the logged `l2_penalty`, bake λ in
   there).
2. **Confirm.** λ̂ · 10^-1/4 and λ̂ · 10^1/4 (half a decade apart, the
   grid's spacing, around λ̂), trained from scratch at fixed λ through the
   chosen route, together (`keras_l2.search.stacked`). When λ̂ ends at the
   range's edge, the confirmation trains λ̂ too and reaches a decade beyond it
   (and λ = 0 at the lower edge), and the tune says so.

The answer is the λ of the lowest validation data loss among the
confirmation's runs; its test data loss (with a test split) is reported,
never used. Why λ is held for the first half (during underfitting the
one-step hypergradient asks for less λ, the short-horizon bias of Wu et
al. 2018) is in the README, measured.

Every run is an MLflow child run of the tune's parent run, with the sweep's
metrics; stage 1's child logs the λ trajectory as `lambda` (per epoch, and
per step with `log_every_n_steps`). The parent gets `lambda` (λ̂ at step 1,
the answer at step 2), `best_lambda`, `best_val_data_loss`,
`test_data_loss` and `cost_in_runs`: the two stages' wall time over one
plain run of the same model, epochs and batch size, without L2, validated
every epoch like a sweep's run (without tracking), timed in this process after the stages
(its first epoch, plus the median of five more times the rest; that timing
is not counted).

Example (tiny data, one epoch):

>>> import tempfile, keras, numpy as np
>>> from keras_l2.search.tuning import TuneConfig, run_tune
>>> rng = np.random.default_rng(0)
>>> data = (rng.normal(size=(30, 4)), np.arange(30) % 3, rng.normal(size=(9, 4)), np.arange(9) % 3)
>>> with tempfile.TemporaryDirectory() as root:
...     result = run_tune(TuneConfig(hidden=(8,), layers=None, epochs=1, verbose=0, lambda_range=(1e-2, 1e1),
...                                  tracking_uri=f"sqlite:///{root}/mlflow.db", results_dir=root), data=data)
>>> result["best_lambda"] in [r["l2"] for r in result["results"]]
True
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np

from keras_l2.inventory import l2_routes
from keras_l2.routes import make_optimizer, set_l2
from keras_l2.search.config import SweepConfig, TuneConfig, check_tune_config
from keras_l2.search.data import SweepData
from keras_l2.search.hypergradient import hypergradient
from keras_l2.search.models import build_run
from keras_l2.search.parent import end_parent, start_parent
from keras_l2.search.runner import PreparedSweep, prepare_sweep
from keras_l2.search.training import EpochClock, RunPlan, train_one, train_stack

# The confirmation's λ, as multiples of λ̂: a quarter decade either side. λ̂ itself is not trained: in the six
# cases of experiments/tune_quality.py it won once, by 2%, and a third member costs 0.3-0.5 runs (README).
CONFIRM = (10 ** -0.25, 10 ** 0.25)
STEP = 1.5  # stage 1's first move of log λ (nats; a factor 4.5); each next move is 0.7 times the last
__all__ = ["CONFIRM", "HypergradientLambda", "TuneConfig", "as_json", "confirmation", "plain_run_seconds",
           "prepare_tune", "run_tune"]


def prepare_tune(config: TuneConfig | None = None, model=None, data=None) -> PreparedTune | PreparedSweep:
    """Checks everything (the range, data, model, route, store) before any run; `.run()` tunes.

    With `config.study` the tune is the study's shared TPE sweep (`TuneConfig`), and `.run()` returns what
    `run_sweep` returns: the best lambda is `result["best"]["l2"]`.
    """
    config = check_tune_config(config if config is not None else TuneConfig())
    if config.study is not None:
        return prepare_sweep(config, model, data)
    sweep = prepare_sweep(config, model, data)
    if not isinstance(sweep.data, SweepData):
        raise ValueError("data: tune needs NumPy arrays (its hypergradient takes the whole training and validation "
                         "splits); tf.data datasets are for `keras-l2 sweep`")
    return PreparedTune(sweep)


def run_tune(config: TuneConfig | None = None, model=None, data=None) -> dict:
    """Tunes λ (see the module docstring); returns the best λ, its losses, the cost and every run's result.

    Arguments as `keras_l2.search.run_sweep`'s; `config.lambda_range` bounds stage 1's λ. With `config.study`
    it returns what `run_sweep` returns (`prepare_tune`).
    """
    return prepare_tune(config, model, data).run()


@dataclasses.dataclass
class PreparedTune:
    """A checked tune (see `prepare_tune`); nothing is created until `run`."""

    sweep: PreparedSweep

    def run(self) -> dict:
        config, data, store = self.sweep.config, self.sweep.data, self.sweep.store
        started = time.perf_counter()
        say = print if config.verbose else (lambda *args, **kwargs: None)
        low, high = config.lambda_range
        params = {k: v for k, v in self.sweep.params.items() if k not in ("sweep.lambdas", "sweep.stacked")}
        outbox, parent, parent_id = start_parent(config, data, store, f"tune {config.route}", {"tune": "true"}, {
            **params, "tune.range": f"{low:g},{high:g}", "tune.seed": config.seed,
            "tune.confirm": ",".join(f"{f:.4g}" for f in CONFIRM), "tune.step": STEP})
        plan = RunPlan(config, data, self.sweep.build, parent_id, store.tracking_uri)
        status, results = "FAILED", []
        try:
            say(f"Tune: {data.name}, route {config.route}, {config.epochs} epochs; MLflow {store.tracking_uri}, "
                f"parent run {parent_id}", flush=True)
            hyper = HypergradientLambda(data, config.lambda_range, hold=config.epochs // 2, verbose=config.verbose)
            say(f"Stage 1/2: one run, lambda held at {hyper.l2:g} for {hyper.hold} epochs, then following the "
                "validation hypergradient.", flush=True)
            first = train_one(dataclasses.replace(plan, callbacks=(hyper,), log_every_n_steps=config.log_every_n_steps,
                                                  tags=(("tune.stage", "1: lambda follows the hypergradient"),)),
                              hyper.l2, config.seed, "[stage 1/2]", validation_freq=validation_every(config.epochs))
            estimate, note = hyper.estimate()
            say(f"  lambda estimate {estimate:.4g}. {note}", flush=True)
            outbox.log(parent, metrics={"lambda": estimate}, step=1)
            confirm = confirmation(estimate, config.lambda_range)
            say(f"Stage 2/2, confirm: lambda {', '.join(f'{v:g}' for v in confirm)} from scratch, trained together.",
                flush=True)
            confirming = dataclasses.replace(plan, tags=(("tune.stage", "2: confirmation"),))
            results = train_stack(confirming, confirm, config.seed, "[stage 2/2]",
                                  validation_freq=validation_every(config.epochs))
            seconds = time.perf_counter() - started
            plain = plain_run_seconds(self.sweep.build, data, config)
            best = min(results, key=lambda r: r["history"]["val_data_loss"][-1])
            summary = {"best_lambda": best["l2"], "best_val_data_loss": best["history"]["val_data_loss"][-1],
                       "test_data_loss": best["test_data_loss"], "lambda_estimate": estimate, "note": note,
                       "cost_in_runs": seconds / plain, "plain_run_seconds": plain, "seconds": seconds,
                       "trajectory": hyper.trajectory, "stage_one": first}
            metrics = {k: v for k, v in summary.items() if isinstance(v, float) and k != "seconds"}
            outbox.log(parent, metrics=metrics)
            outbox.log(parent, metrics={"lambda": best["l2"]}, step=2)
            status = "FINISHED"
        finally:
            end_parent(outbox, parent, [], status, config.max_delay)
        summary["report"] = report(results, summary, parent_id, store.tracking_uri)
        say(summary["report"])
        return {"parent_run_id": parent_id, "results": results, **summary}


def as_json(result: dict) -> dict:
    """The tune's result for scripts (`keras-l2 tune --json`): the answer, the cost, stage 1's λ path."""
    keep = ("parent_run_id", "best_lambda", "best_val_data_loss", "test_data_loss", "lambda_estimate", "note",
            "cost_in_runs", "plain_run_seconds", "seconds")
    return {**{k: result[k] for k in keep}, "trajectory": [l2 for _, l2, _ in result["trajectory"]],
            "confirmation": {r["l2"]: r["history"]["val_data_loss"][-1] for r in result["results"]}}


def validation_every(epochs: int, most: int = 5) -> int:
    """Validate every this many epochs: the largest divisor of `epochs` up to `most`, so the last one is validated.

    The tune chooses on the last epoch's validation data loss, and stage 1's
    hypergradient reads the validation split itself; validating every epoch
    would cost both stages about a third more (their curves keep every
    `most`-th point).
    """
    return max(d for d in range(1, most + 1) if epochs % d == 0)


class HypergradientLambda(keras.callbacks.Callback):
    """Stage 1's λ: held at the range's geometric middle for `hold` epochs, then moved along the hypergradient.

    After `hold` epochs, in windows of `every` epochs, it takes
    `h = dL_val/dλ` at the end of each window's last `samples` epochs
    (through the next update on the whole training set, validated on the
    whole validation split), and at the window's end moves `log λ` against
    the sign of the mean of `λ h` (the derivative in `log λ`), by `step`
    (`STEP`) nats at first and `decay` times the previous move after
    that (a noisy bisection), clipped to the range; the new λ takes effect
    when the next epoch begins. λ changes only every `every` epochs: the
    mean over a window's last epochs steadies a noisy sign (and on JAX each
    change retraces the step).
    """

    def __init__(self, data: SweepData, lambda_range: tuple, hold: int, every: int = 5, samples: int = 2,
                 step: float | None = None, decay: float = 0.7, verbose: int = 0):
        super().__init__()
        self.data, self.hold, self.every, self.samples, self.verbose = data, hold, every, samples, verbose
        self.decay = decay
        self.low, self.high = (math.log(v) for v in lambda_range)
        self.log_l2 = (self.low + self.high) / 2
        self.l2 = float(f"{math.exp(self.log_l2):.6g}")
        self.trajectory = []  # (epoch, the λ its steps used, h at its end or None)
        self._pending, self._step = [], STEP if step is None else step

    def on_epoch_begin(self, epoch, logs=None):
        # Only when λ changes (the model is compiled with the start): on JAX a change retraces the step.
        if l2_routes(self.model).l2 != self.l2:
            set_l2(self.model, self.l2)

    def on_epoch_end(self, epoch, logs=None):
        h, into = None, (epoch + 1 - self.hold) % self.every  # epochs into the current window; 0: its last
        if epoch + 1 > self.hold and (into == 0 or into > self.every - self.samples):
            _, h = hypergradient(self.model, (self.data.x_train, self.data.y_train), (self.data.x_val, self.data.y_val))
            self._pending.append(self.l2 * h)
        self.trajectory.append((epoch + 1, self.l2, h))
        if epoch + 1 > self.hold and into == 0:
            direction = -1.0 if sum(self._pending) > 0 else 1.0
            self.log_l2 = min(max(self.log_l2 + direction * self._step, self.low), self.high)
            self._pending, self._step = [], self._step * self.decay
            self.l2 = float(f"{math.exp(self.log_l2):.6g}")
            if self.verbose:
                print(f"  epoch {epoch + 1}: mean hypergradient says {'more' if direction > 0 else 'less'} lambda; "
                      f"lambda now {self.l2:.4g}", flush=True)

    def estimate(self) -> tuple[float, str]:
        """λ̂: the λ stage 1 would use next (its last move is the smallest), and what to say about it."""
        estimate = math.exp(self.log_l2)
        if self.log_l2 >= self.high - 1e-9:
            return estimate, "It is at the range's upper end: the confirmation looks a decade beyond it."
        if self.log_l2 <= self.low + 1e-9:
            return estimate, "It is at the range's lower end: the confirmation looks a decade below it, and at 0."
        moves = sum(h is not None for *_, h in self.trajectory) // self.samples
        return estimate, f"From {self.trajectory[0][1]:g}, after {moves} moves along the hypergradient."


def confirmation(estimate: float, lambda_range: tuple) -> tuple:
    """Stage 2's λ: λ̂ times `CONFIRM`; at the range's edge, λ̂ and a decade beyond it too (and 0 at the lower edge)."""
    low, high = (math.log(v) for v in lambda_range)
    factors = CONFIRM
    edge = (10 ** -0.25, 1.0, 10 ** 0.25)
    if math.log(estimate) >= high - 1e-9:
        factors = (*edge, 10 ** 0.5, 10.0)
    elif math.log(estimate) <= low + 1e-9:
        factors = edge
    lambdas = [float(f"{estimate * f:.4g}") for f in factors]
    if math.log(estimate) <= low + 1e-9:
        lambdas = [0.0, float(f"{estimate / 10:.4g}"), float(f"{estimate / 10 ** 0.5:.4g}"), *lambdas]
    return tuple(lambdas)


def plain_run_seconds(build, data: SweepData, config: SweepConfig, sample: int = 5) -> float:
    """Seconds one plain run takes: the model without L2, validated every epoch like a sweep's run.

    Its first epoch (with tracing) is timed, then `sample` more; the estimate
    is the first plus the median of the others times the remaining epochs
    (the median: one epoch slowed by the machine does not move it).
    """
    model = build_run(build, config.seed)
    model.compile(optimizer=make_optimizer(config.optimizer, config.learning_rate), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    keras.utils.set_random_seed(1000 + config.seed)
    start = time.perf_counter()
    model.fit(**data.fit_args(config.batch_size), epochs=1, verbose=0)
    first = time.perf_counter() - start
    if config.epochs == 1:
        return first
    clock = EpochClock()
    model.fit(**data.fit_args(config.batch_size), epochs=min(sample, config.epochs - 1), verbose=0, callbacks=[clock])
    return first + (config.epochs - 1) * float(np.median(clock.seconds))


def report(results: list, summary: dict, parent_id: str, tracking_uri: str) -> str:
    """The tune's table (stage 1's λ path, every confirmation run) and its answer, as text."""
    path = [l2 for _, l2, _ in summary["trajectory"]]
    lines = ["Stage 1, lambda every 5 epochs: " + " ".join(f"{v:.3g}" for v in path[4::5]),
             f"{'lambda':>10} {'val data loss':>14} {'test data loss':>15}"]
    for r in sorted(results, key=lambda r: r["l2"]):
        mark = "  <- best" if r["l2"] == summary["best_lambda"] else ""
        test = f"{r['test_data_loss']:>15.4f}" if r["test_data_loss"] is not None else f"{'-':>15}"
        lines.append(f"{r['l2']:>10.4g} {r['history']['val_data_loss'][-1]:>14.4f} {test}{mark}")
    lines.append(f"Best lambda: {summary['best_lambda']:.4g} (validation data loss "
                 f"{summary['best_val_data_loss']:.4f}; stage 1's estimate {summary['lambda_estimate']:.4g}). "
                 + summary["note"])
    if summary["test_data_loss"] is not None:
        lines.append(f"  Its test data loss: {summary['test_data_loss']:.4f} (the test split was not used to choose).")
    lines.append(f"cost_in_runs {summary['cost_in_runs']:.2f}: {summary['seconds']:.0f} s for both stages over one "
                 f"plain run's {summary['plain_run_seconds']:.1f} s (timed in this process afterwards).")
    lines.append(f"Runs: parent {parent_id} in {tracking_uri}.")
    return "\n".join(lines)
