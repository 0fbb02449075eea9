"""What a sweep runs: `SweepConfig`, and the checks of its values (free of Keras: the command line parses
and checks its options before Keras is imported).

Example:

>>> from keras_l2.search import SweepConfig, check_config, parse_lambdas
>>> check_config(SweepConfig(lambdas=parse_lambdas("0.1,0,1e-3"))).lambdas
(0.0, 0.001, 0.1)
"""

from __future__ import annotations

import dataclasses
import math
import re

from keras_l2._checks import OPTIMIZERS, ROUTES, check_dataset, check_lambdas

DEFAULT_LAMBDAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
# Each optimizer's default step size: plain SGD at Adam's 1e-3 barely trains the digits MLP in 60 epochs
# (val acc 0.375), which hides lambda's effect; see the README's sweep section for the measurement.
DEFAULT_LEARNING_RATES = {"adam": 1e-3, "sgd": 0.1, "rmsprop": 1e-3}
RESULTS_DIR = "mlruns/plots"  # under the working directory, beside the embedded store; one folder per sweep


@dataclasses.dataclass
class SweepConfig:
    """The options of a sweep; `keras-l2 sweep --help` describes each (`layers`: `--layers`, ...).

    `model` ("module:function") and `data` (an .npz path) name the user's model
    and data for the command line; `run_sweep(config, model=..., data=...)`
    takes a function and arrays or datasets directly. `hidden` and
    `train_size` apply to the built-in MLP and the bundled data sets only.
    """

    lambdas: tuple = DEFAULT_LAMBDAS
    route: str = "regularizer"
    optimizer: str = "adam"
    learning_rate: float | None = None  # None: the optimizer's default (DEFAULT_LEARNING_RATES)
    # The hidden layers only: the free output layer next to them shows what L2 changes.
    layers: str | None = "hidden_.*"  # names (comma-separated) or a regex; None: every Dense layer
    hidden: tuple = (512, 512)
    epochs: int = 60
    batch_size: int = 32
    seeds: int = 1
    workers: int = 1
    threads: int | None = None  # CPU threads per training process; None: the backend's own (all cores)
    stacked: bool = True  # every lambda of a seed trained together, in one compiled model (see search.stacked)
    stack_size: int | None = None  # members per stack; None: as many as the free memory allows
    train_size: int | None = None  # bundled data set examples to train on; None: its default (digits 200, wine 60)
    dataset: str = "digits"  # which bundled data set (DATASETS), without `data`
    data: str | None = None  # an .npz; None: the bundled `dataset`
    model: str | None = None  # "module:function" building the model; None: the built-in MLP
    tracking_uri: str | None = None
    experiment: str = "keras_l2-sweep"
    results_dir: str | None = None  # None: mlruns/plots/<parent run id>/ under the working directory
    allow_unseen_classes: bool = False  # validation classes the training split lacks are refused unless True
    max_delay: float = 5.0  # the most seconds a run's end waits on the tracking store (then: spooled)
    spool_dir: str | None = None  # where undelivered records go; None: mlruns/keras_l2_pending/
    verbose: int = 1
    # A sweep shared by workers on several machines through an Optuna study (see keras_l2.search.study).
    study: str | None = None  # the study's name; with `storage`
    storage: str | None = None  # Optuna's storage: postgresql://... (several machines) or sqlite:///... (one)
    heartbeat: float = 20.0  # seconds between a worker's signs of life; 3 missed and its runs are retried
    sampler: str = "grid"  # "grid": every lambda of `lambdas`; "tpe": Optuna's TPE proposes `trials` lambdas
    trials: int | None = None  # with sampler="tpe": how many lambdas it tries (the study's workers together)
    lambda_range: tuple = (1e-4, 1e2)  # with sampler="tpe" (and `keras-l2 tune`): where lambda is sought, log scale


def parse_lambdas(text: str) -> tuple:
    """'0,1e-3,0.01' -> (0.0, 0.001, 0.01): each a finite float >= 0, no repeats."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--lambdas: give at least one lambda, e.g. 0,1e-3,1e-2. Received: {text!r}")
    values = []
    for part in parts:
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"--lambdas: {part!r} is not a number (allowed: finite floats >= 0, "
                             f"comma-separated)") from None
    return tuple(sorted(check_lambdas(values, "--lambdas")))


def check_config(config: SweepConfig) -> SweepConfig:
    if config.route not in ROUTES:
        raise ValueError(f"--route: unknown route {config.route!r}; choose one of {', '.join(ROUTES)}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer: unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    check_dataset(config.dataset)
    for name in ("epochs", "seeds", "workers", "batch_size", "train_size", "threads"):
        value = getattr(config, name)
        if name in ("train_size", "threads") and value is None:  # None: the default
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be an integer >= 1. Received: {value!r}")
    if not isinstance(config.stacked, bool):
        raise ValueError(f"stacked: True or False. Received: {config.stacked!r}")
    if config.stack_size is not None and (isinstance(config.stack_size, bool) or not isinstance(
            config.stack_size, int) or config.stack_size < 1):
        raise ValueError(f"--stack-size: must be an integer >= 1 (members per stack). Received: {config.stack_size!r}")
    if config.learning_rate is None:
        config.learning_rate = DEFAULT_LEARNING_RATES[config.optimizer]
    if isinstance(config.learning_rate, int) and not isinstance(config.learning_rate, bool):
        config.learning_rate = float(config.learning_rate)
    if not (isinstance(config.learning_rate, float) and math.isfinite(config.learning_rate)
            and config.learning_rate > 0):
        raise ValueError(f"--learning-rate: must be a finite float > 0. Received: {config.learning_rate!r}")
    if isinstance(config.max_delay, bool) or not isinstance(config.max_delay, (int, float)) or not (
            math.isfinite(config.max_delay) and config.max_delay >= 0):
        raise ValueError(f"max_delay: must be a finite number of seconds >= 0. Received: {config.max_delay!r}")
    config.lambdas = tuple(sorted(check_lambdas(config.lambdas, "--lambdas")))
    check_study_options(config)
    return config


STORAGE_SCHEMES = ("postgresql", "sqlite")
# A shared tune's default budget: 3 lambdas spread over the range, then 5 of TPE (see study_plan.startup_lambdas).
SHARED_TUNE_TRIALS = 8
SAMPLERS = ("grid", "tpe")


def check_study_options(config: SweepConfig) -> None:
    """`study` and `storage` come together; the storage is PostgreSQL (or SQLite on one machine)."""
    if (config.study is None) != (config.storage is None):
        given, missing = ("--study", "--storage") if config.storage is None else ("--storage", "--study")
        raise ValueError(f"{given} needs {missing}: a shared sweep is a study name and the database that holds it, "
                         "e.g. --study my-sweep --storage postgresql://user@host/optuna")
    if config.study is None:
        if config.sampler != "grid" or config.trials is not None:
            raise ValueError(f"--sampler {config.sampler}: proposals are shared through a study; add --study NAME "
                             "--storage URL (sqlite:///optuna.db on one machine)")
        return
    if not isinstance(config.study, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", config.study):
        raise ValueError(f"--study: a name of 1 to 200 letters, digits, '.', '_' or '-'. Received: {config.study!r}")
    scheme = str(config.storage).split(":", 1)[0].split("+", 1)[0]
    if "://" not in str(config.storage) or scheme not in STORAGE_SCHEMES:
        raise ValueError(f"--storage: {mask_url(str(config.storage))!r} is not a database URL Optuna's workers can "
                         "share; use postgresql://user:password@host/db (several machines) or sqlite:///path.db "
                         "(one machine)")
    if isinstance(config.heartbeat, bool) or not isinstance(config.heartbeat, (int, float)) or not (
            math.isfinite(config.heartbeat) and config.heartbeat >= 1):
        raise ValueError(f"--heartbeat: seconds >= 1 between a worker's signs of life. Received: {config.heartbeat!r}")
    if config.workers != 1:
        raise ValueError(f"--workers: with --study, run the same command once per worker (on this machine or "
                         f"others); each is one worker. Received: --workers {config.workers}")
    if config.sampler not in SAMPLERS:
        raise ValueError(f"--sampler: {config.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if config.sampler == "grid":
        if config.trials is not None:
            raise ValueError("--trials: a grid trains every --lambdas value; --trials counts --sampler tpe's "
                             f"proposals. Received: --trials {config.trials}")
        return
    if isinstance(config.trials, bool) or not isinstance(config.trials, int) or config.trials < 1:
        raise ValueError(f"--trials: TPE needs the number of lambdas to try, an integer >= 1. "
                         f"Received: {config.trials!r}")
    if config.seeds != 1:
        raise ValueError(f"--seeds: --sampler tpe proposes one lambda per trial, trained with seed 0; use "
                         f"--seeds 1 (a grid repeats seeds). Received: --seeds {config.seeds}")
    config.lambda_range = check_range(config.lambda_range)


def mask_url(url: str) -> str:
    """`url` with its password replaced by *** (for anything printed or logged)."""
    head, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")  # a password may hold an @ that was not escaped
    if not sep or not at or ":" not in credentials:
        return url
    return f"{head}://{credentials.split(':', 1)[0]}:***@{host}"


@dataclasses.dataclass
class TuneConfig(SweepConfig):
    """A sweep's options (data, model, route, layers, optimizer, epochs, tracking) and the range λ is sought in.

    `lambdas`, `seeds`, `workers`, `stacked` and `stack_size` are the tuner's
    own: it sets them. With `study` and `storage` the tune is shared by
    workers on several machines: Optuna's TPE proposes `trials` lambdas in
    the range (default `SHARED_TUNE_TRIALS`), each trained with seed 0 (see
    `keras_l2.search.study`), instead of the two stages, which are one
    machine's sequence of runs.
    """

    seed: int = 0
    experiment: str = "keras_l2-tune"
    log_every_n_steps: int | None = None  # stage 1's run also logs per step (its λ included); None: per epoch


def check_range(lambda_range) -> tuple:
    """`(low, high)`: two finite floats with 0 < low < high, else a ValueError naming the value."""
    try:
        low, high = (float(v) for v in lambda_range)
    except (TypeError, ValueError):
        raise ValueError(f"--range: two numbers low,high with 0 < low < high. Received: {lambda_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or high <= low:
        why = "it is empty" if high <= low else "lambda must be > 0 on a log scale"
        raise ValueError(f"--range: {low:g},{high:g} is not a range to search ({why}; allowed: finite numbers "
                         f"0 < low < high, e.g. 1e-4,1e2)")
    return low, high


def check_tune_config(config: TuneConfig) -> TuneConfig:
    """Checks a tune's options (its range and seed, then the sweep's) and sets what the tuner decides itself."""
    if not isinstance(config, TuneConfig):
        raise ValueError(f"tune: expected a TuneConfig. Received: {type(config).__name__}")
    config = dataclasses.replace(config)  # what the tuner sets (its lambdas, a study's sampler) stays off the caller's
    config.lambda_range = check_range(config.lambda_range)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"--seed: an integer >= 0. Received: {config.seed!r}")
    steps = config.log_every_n_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"--log-every-n-steps: an integer >= 1. Received: {steps!r}")
    if config.study is None and config.trials is not None:
        raise ValueError(f"--trials: counts the lambdas a shared tune (--study NAME --storage URL) tries; a tune on "
                         f"one machine chooses its own runs. Received: --trials {config.trials}")
    if config.study is not None:
        if config.seed != 0:
            raise ValueError(f"--seed: a shared tune (--study) trains every lambda with seed 0, as `keras-l2 sweep "
                             f"--sampler tpe` does (allowed: 0, or leave it out). Received: --seed {config.seed}")
        if steps is not None:
            raise ValueError(f"--log-every-n-steps: logs the one-machine tune's first stage, which a shared tune "
                             f"(--study) does not have (its runs log per epoch). Received: --log-every-n-steps {steps}")
        config.sampler = "tpe"
        config.trials = SHARED_TUNE_TRIALS if config.trials is None else config.trials
    # The tuner chooses its lambdas as it goes; this one (its start) stands for them in the sweep's checks.
    middle = float(f"{math.sqrt(config.lambda_range[0] * config.lambda_range[1]):.6g}")
    config.lambdas, config.seeds, config.workers, config.stacked = (middle,), 1, 1, True
    return check_config(config)
