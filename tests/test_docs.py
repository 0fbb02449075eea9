"""The README's example and the docstring examples run as written."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

import keras_l2

README = Path(__file__).resolve().parent.parent / "README.md"
MODULES = [
    "keras_l2.l2_math", "keras_l2.backend", "keras_l2.route", "keras_l2.inventory", "keras_l2.steps",
    "keras_l2.selection", "keras_l2.regularizer", "keras_l2.loss", "keras_l2.optimizer", "keras_l2.routes",
    "keras_l2.schedule", "keras_l2.metrics",
    "keras_l2.tracking", "keras_l2.tracking.names", "keras_l2.tracking.callback", "keras_l2.tracking.outbox",
    "keras_l2.tracking.store", "keras_l2.tracking.records", "keras_l2.tracking.spool", "keras_l2.tracking.worker",
    "keras_l2.tracking.courier", "keras_l2.tracking.cadence", "keras_l2.tracking.norms", "keras_l2.tracking.values",
    "keras_l2.tracking.settings", "keras_l2.tracking.lifecycle", "keras_l2.tracking.notices",
    "keras_l2.tracking.pending", "keras_l2.tracking.step_hooks",
    "keras_l2.search", "keras_l2.search.config", "keras_l2.search.data", "keras_l2.search.datasets",
    "keras_l2.search.models", "keras_l2.search.runner", "keras_l2.search.report", "keras_l2.search.command",
    "keras_l2.search.stacked", "keras_l2.search.stacking", "keras_l2._lazy", "keras_l2.cli", "keras_l2.tracking.resend",
    "keras_l2.backend.autodiff", "keras_l2.backend.lambdas", "keras_l2.backend.host", "keras_l2.backend.updates",
    "keras_l2.backend.traces",
    "keras_l2.search.hypergradient",
    "keras_l2.search.tuning",
    "keras_l2.search.tune_command", "keras_l2.search.study_storage", "keras_l2.search.postgres",
    "keras_l2.search.team_server", "keras_l2.search.study_plan",
]


def test_every_module_with_an_example_is_in_the_list():
    """A new module's `>>>` example runs only if listed above: one forgotten would never be tried."""
    package = Path(keras_l2.__file__).resolve().parent
    with_examples = {".".join(("keras_l2", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
                     for path in package.rglob("*.py") if ">>> " in path.read_text()}
    assert sorted(with_examples - set(MODULES)) == []


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model = namespace["model"]
    assert keras_l2.l2_routes(model).names == ("optimizer",)
    assert keras_l2.l2_routes(model).l2 == 5e-3


def test_readme_tracking_example_logs_to_the_embedded_store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "MlflowL2Logger" in b)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(namespace["logger"].run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["l2.regularized/hidden"] == "true" and run.data.tags["l2.regularized/out"] == "false"
    assert {"val_data_loss", "weight_norm/hidden", "weight_norm/out", "lambda"} <= set(run.data.metrics)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0
