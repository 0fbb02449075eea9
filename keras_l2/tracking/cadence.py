"""Which global steps `MlflowL2Logger(log_every_n_steps=k)` logs.

A step is logged when it crosses a multiple of k since the last logged one,
not when `step % k == 0`: with `steps_per_execution` > 1 Keras reports only
every few steps, and may skip the multiple itself.

Example:

>>> from keras_l2.tracking.cadence import Cadence
>>> every3 = Cadence(3)
>>> [step for step in (1, 2, 4, 5, 7, 9) if every3.take(step)]  # 3 and 6 are never reported
[4, 7, 9]
"""

from __future__ import annotations

import threading


class Cadence:
    """Picks the logged steps among reported ones, once each, from any thread.

    Args:
        every: k, log every this many optimizer steps (an integer >= 1).
    """

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an integer >= 1. Received: every={every!r}")
        self.every = every
        self.last = 0  # the last logged step
        self.highest = 0  # the highest step reported
        self._lock = threading.Lock()

    def is_logged(self, step: int, last: int) -> bool:
        """Whether global step `step` crosses a multiple of k since step `last`."""
        return step > last and step // self.every != last // self.every

    def take(self, step: int) -> bool:
        """Whether to log `step`; if so, it becomes the last logged step."""
        with self._lock:
            self.highest = max(self.highest, step)
            if not self.is_logged(step, self.last):
                return False
            self.last = step
            return True

    def reset(self) -> None:
        with self._lock:
            self.last = self.highest = 0
