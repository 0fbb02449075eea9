"""Metric, param and tag keys MLflow accepts, made from arbitrary Keras names.

MLflow accepts keys made of letters, digits, `_ - . /` and spaces (and `:` except on Windows), at most
250 characters, that stay the same under path normalisation (no `a//b`,
`./a`, `..`). Keras layer names may hold anything else; instead of letting
MLflow reject a whole batch mid-training, every key is sanitized once, when
training starts, and distinct names are kept distinct.

Example:

>>> from keras_l2.tracking.names import sanitize, unique_keys
>>> sanitize("weight_norm/dense(1)")
'weight_norm/dense_1_'
>>> unique_keys(["a b", "a?b", "a!b"])
['a b', 'a_b', 'a_b_2']
"""

from __future__ import annotations

import functools
import posixpath
import re

MAX_KEY_LENGTH = 250
_FORBIDDEN = re.compile(r"[^\w\-. /]", flags=re.ASCII)


@functools.lru_cache(maxsize=4096)  # the same few keys, at every logging step
def sanitize(key: str) -> str:
    """Returns `key` with every character MLflow forbids replaced by `_`."""
    text = _FORBIDDEN.sub("_", str(key))
    # Path normalisation must be the identity: no empty, "." or ".." segments,
    # no leading slash.
    segments = [s if s not in ("", ".", "..") else s.replace(".", "_") or "_" for s in text.split("/")]
    text = "/".join(segments)
    if len(text) > MAX_KEY_LENGTH:
        text = text[:MAX_KEY_LENGTH].rstrip("/")
    assert posixpath.normpath(text) == text, text
    return text


def unique_keys(names) -> list:
    """Sanitizes `names`, suffixing `_2`, `_3`, ... where two would collide."""
    keys, seen = [], set()
    for name in names:
        base = key = sanitize(name)
        index = 1
        while key in seen:
            index += 1
            suffix = f"_{index}"
            key = base[: MAX_KEY_LENGTH - len(suffix)] + suffix
        seen.add(key)
        keys.append(key)
    return keys
