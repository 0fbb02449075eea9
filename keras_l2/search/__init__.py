"""λ sweeps and λ tuning of any Keras classifier, tracked in MLflow: `run_sweep` (a table and plots), `run_tune`.

By default the λs of a seed train together, in one compiled model, each
member exactly as its separate run (`stacked`); `stacked=False` trains the
runs one after another.

`run_sweep(config, model=..., data=...)` trains the model the function `model`
builds once per λ in `config.lambdas`, with L2 on the Dense layers named by
`config.layers` through `config.route`, every run of a seed from the same
weights and data order; each run is a child MLflow run of one parent run.
Without `model` it trains the built-in MLP, without `data` the digits (or
`config.data`, an .npz). `keras-l2 sweep` is its command line
(`keras_l2.search.command`).

Modules: `config` (`SweepConfig` and its checks), `data` (.npz, arrays,
`tf.data`, and n), `datasets` (the bundled digits and wine), `models` (the built-in MLP, model functions and
their checks), `stacked` (members trained together), `stacking` (building a
stack), `training` (one run, one stack), `runner` (the sweep), `parent` (the parent run),
`report` (the table and plots), `command` (the command line), and for
`keras-l2 tune`: `hypergradient` (dL_val/dλ through one update), `tuning`
(the two stages) and `tune_command` (its command line); for one sweep shared
by workers on several machines (`SweepConfig(study=..., storage=...)`,
`keras-l2 sweep --study`): `study` (the workers), `study_plan`,
`study_storage`, `study_report` (`report_study`), `pruning`, `outcome` (a
sweep's end, shared), `postgres` and `team_server` (`start_team_server`).
Names are
imported on first use (PEP 562): the command line parses its options with
`config` and `command` only, which import no Keras.

Example: see `keras_l2.search.runner`; in short,

>>> from keras_l2.search import SweepConfig, run_sweep
>>> SweepConfig().route, SweepConfig().layers
('regularizer', 'hidden_.*')
"""

from keras_l2 import _lazy

_EXPORTS = {
    "main": "keras_l2.search.command",
    "DEFAULT_LAMBDAS": "keras_l2.search.config",
    "SweepConfig": "keras_l2.search.config",
    "check_config": "keras_l2.search.config",
    "parse_lambdas": "keras_l2.search.config",
    "DatasetData": "keras_l2.search.data",
    "SweepData": "keras_l2.search.data",
    "all_digits": "keras_l2.search.datasets",
    "bundled": "keras_l2.search.datasets",
    "wine": "keras_l2.search.datasets",
    "as_sweep_data": "keras_l2.search.data",
    "digits": "keras_l2.search.datasets",
    "load_npz": "keras_l2.search.data",
    "build_model": "keras_l2.search.models",
    "check_model": "keras_l2.search.models",
    "choose_layers": "keras_l2.search.models",
    "load_model_spec": "keras_l2.search.models",
    "draw_plots": "keras_l2.search.report",
    "StackedModel": "keras_l2.search.stacked",
    "StackedOptimizer": "keras_l2.search.stacked",
    "member_logs": "keras_l2.search.stacked",
    "stack_models": "keras_l2.search.stacking",
    "summarize": "keras_l2.search.report",
    "PreparedSweep": "keras_l2.search.runner",
    "prepare_sweep": "keras_l2.search.runner",
    "run_sweep": "keras_l2.search.runner",
    "TuneConfig": "keras_l2.search.config",
    "prepare_tune": "keras_l2.search.tuning",
    "run_tune": "keras_l2.search.tuning",
    "report_study": "keras_l2.search.study_report",
    "start_team_server": "keras_l2.search.team_server",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
