"""The installed `keras-l2` command: its options are checked before Keras is imported.

`import keras_l2` imports Keras, and Keras imports TensorFlow (seconds, and
log lines on stderr): too slow for `keras-l2 --help` or a mistyped option.
So this module first loads `keras_l2` as a bare package (its `__init__` not
run, as the delivery process does) and lets `keras_l2.cli.check`, which
imports no Keras, parse the command line: `--help` and bad input exit there.
Then it forgets those modules and runs `keras_l2.cli.main` with the library.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras_l2" not in sys.modules:  # already imported (a script, a test): nothing to save
        _check_without_keras(argv)
    return importlib.import_module("keras_l2.cli").main(argv)


def _check_without_keras(argv) -> None:
    spec = importlib.util.find_spec("keras_l2")
    package = types.ModuleType("keras_l2")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["keras_l2"] = package
    try:
        importlib.import_module("keras_l2.cli").check(argv)
    finally:
        for name in [name for name in sys.modules if name == "keras_l2" or name.startswith("keras_l2.")]:
            del sys.modules[name]


if __name__ == "__main__":
    sys.exit(main())
