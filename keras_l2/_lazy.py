"""Names a package imports on first use (PEP 562): importing the package itself then imports nothing.

`keras_l2.tracking` and `keras_l2.search` use it: the delivery process and the
command line's check import their Keras-free modules without the others.

Example:

>>> import sys, types
>>> from keras_l2 import _lazy
>>> demo = types.ModuleType("demo")
>>> sys.modules["demo"] = demo
>>> demo.__getattr__, demo.__dir__ = _lazy.exports("demo", {"dumps": "json"})
>>> demo.dumps([1])
'[1]'
"""

from __future__ import annotations

import importlib
import sys


def exports(package: str, names: dict):
    """`(__getattr__, __dir__)` for `package`, whose name `n` comes from module `names[n]` when first asked."""

    def __getattr__(name: str):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # asked once: later lookups are plain attributes
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
