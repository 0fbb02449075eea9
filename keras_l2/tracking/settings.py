"""`MlflowL2Logger`'s arguments, checked before any training: a bad one is refused with what is allowed.

Example:

>>> from keras_l2.tracking.settings import Settings
>>> Settings(log_every_n_steps=10, tags={"sweep a": 1}).tags
{'sweep a': '1'}
>>> Settings(max_delay=-1)
Traceback (most recent call last):
...
ValueError: `max_delay` must be a finite number of seconds >= 0. Received: max_delay=-1
"""

from __future__ import annotations

import dataclasses
import math

from keras_l2.tracking.names import sanitize


@dataclasses.dataclass(frozen=True)
class Settings:
    """What and where `MlflowL2Logger` logs (see its docstring for each field)."""

    experiment_name: str = "keras_l2"
    run_name: str | None = None
    nested: bool = False
    parent_run_id: str | None = None
    tags: dict | None = None
    log_every_n_steps: int | None = None
    log_params: bool = True
    max_delay: float = 5.0
    verbose: int = 1

    def __post_init__(self):
        name = self.experiment_name
        if not isinstance(name, str) or not name.strip() or len(name) > 500:
            raise ValueError(f"`experiment_name` must be a non-empty string of at most 500 characters. "
                             f"Received: experiment_name={name!r}")
        every = self.log_every_n_steps
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"`log_every_n_steps` must be None (per epoch only) or an integer >= 1. "
                             f"Received: log_every_n_steps={every!r}")
        delay = self.max_delay
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"`max_delay` must be a finite number of seconds >= 0. Received: max_delay={delay!r}")
        if self.tags is not None and not isinstance(self.tags, dict):
            raise TypeError(f"`tags` must be a dict of tag names to values. Received: tags={self.tags!r}")
        parent = self.parent_run_id
        if parent is not None and (not isinstance(parent, str) or not parent):
            raise ValueError(f"`parent_run_id` must be a run id string. Received: parent_run_id={parent!r}")
        object.__setattr__(self, "tags", {sanitize(k): str(v) for k, v in (self.tags or {}).items()})
        object.__setattr__(self, "nested", bool(self.nested))
        object.__setattr__(self, "log_params", bool(self.log_params))
        object.__setattr__(self, "max_delay", float(delay))

    @property
    def request_timeout(self) -> float:
        """Seconds one request to a tracking server may take: within [1, 5], and max_delay if between."""
        return min(5.0, max(1.0, self.max_delay))
