"""The README's example and the docstring examples run as written."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

import keras_l2

README = Path(__file__).resolve().parent.parent / "README.md"
MODULES = ["keras_l2.l2_math", "keras_l2.selection", "keras_l2.regularizer", "keras_l2.loss",
           "keras_l2.optimizer", "keras_l2.routes", "keras_l2.schedule"]


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model = namespace["model"]
    assert keras_l2.l2_routes(model).names == ("optimizer",)
    assert keras_l2.l2_routes(model).l2 == 5e-3


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0
