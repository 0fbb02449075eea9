"""λ sweeps of any Keras classifier: one run per λ (and seed), tracked in MLflow, with a table and plots.

`run_sweep(config, model=..., data=...)` trains the model the function `model`
builds once per λ in `config.lambdas`, with L2 on the Dense layers named by
`config.layers` through `config.route`, every run of a seed from the same
weights and data order; each run is a child MLflow run of one parent run.
Without `model` it trains the built-in MLP, without `data` the digits (or
`config.data`, an .npz). `keras-l2 sweep` is its command line
(`keras_l2.search.command`).

Modules: `config` (`SweepConfig` and its checks), `data` (the digits, .npz,
arrays, `tf.data`, and n), `models` (the built-in MLP, model functions and
their checks), `training` (one run), `runner` (the sweep and its parent run),
`report` (the table and plots), `command` (the command line).

Example: see `keras_l2.search.runner`; in short,

>>> from keras_l2.search import SweepConfig, run_sweep
>>> SweepConfig().route, SweepConfig().layers
('regularizer', 'hidden_.*')
"""

from keras_l2.search.command import main
from keras_l2.search.config import DEFAULT_LAMBDAS, SweepConfig, check_config, choose_layers, parse_lambdas
from keras_l2.search.data import DatasetData, SweepData, all_digits, as_sweep_data, digits, load_npz
from keras_l2.search.models import build_model, check_model, load_model_spec
from keras_l2.search.report import draw_plots, summarize
from keras_l2.search.runner import PreparedSweep, prepare_sweep, run_sweep

__all__ = [
    "DEFAULT_LAMBDAS",
    "DatasetData",
    "PreparedSweep",
    "SweepConfig",
    "SweepData",
    "all_digits",
    "as_sweep_data",
    "build_model",
    "check_config",
    "check_model",
    "choose_layers",
    "digits",
    "draw_plots",
    "load_model_spec",
    "load_npz",
    "main",
    "parse_lambdas",
    "prepare_sweep",
    "run_sweep",
    "summarize",
]
