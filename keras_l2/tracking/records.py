"""The records an `Outbox` delivers: typed, and one JSON object each on disk and on the pipe.

Four kinds, in the order a run sees them: `CreateRun`, `Log` (metrics,
params, tags), `Artifact`, `EndRun`. Each refers to its run by a *key* the
outbox made up, not by MLflow's run id, which exists only once the creation
reached the store. `to_json`/`from_json` give the form the spool file and the
delivery process read (`op` names the kind).

Example:

>>> from keras_l2.tracking.records import Log, from_json, to_json
>>> record = Log("k1", metrics=(("loss", 0.5, 1700000000000, 3),), params=(("l2.lambda", "0.1"),))
>>> to_json(record)["op"], from_json(to_json(record)) == record
('log', True)
>>> record.size
2
"""

from __future__ import annotations

import dataclasses
import time
import uuid

RUN_KEY_TAG = "keras_l2.run_key"  # the tag by which a run that may already exist is found
# MLflow's limits for one log-batch request.
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTRIES = 1000, 100, 100, 1000


@dataclasses.dataclass(frozen=True)
class CreateRun:
    """Create run `key` in `experiment` (by name). `attempted`: it may already exist (look it up first)."""

    key: str
    experiment: str
    run_name: str | None
    tags: tuple[tuple[str, str], ...]
    start_time: int
    attempted: bool = False


@dataclasses.dataclass(frozen=True)
class Log:
    """Metrics `(key, value, timestamp ms, step)`, params and tags `(key, value)` of run `key`."""

    key: str
    metrics: tuple[tuple[str, float, int, int], ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def size(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def fits_with(self, other: Log) -> bool:
        """Whether `self` and `other` can go in one `log_batch` (same run, MLflow's limits, no key twice)."""
        return (
            self.key == other.key
            and len(self.metrics) + len(other.metrics) <= MAX_METRICS
            and len(self.params) + len(other.params) <= MAX_PARAMS
            and len(self.tags) + len(other.tags) <= MAX_TAGS
            and self.size + other.size <= MAX_ENTRIES
            and not {k for k, _ in self.params} & {k for k, _ in other.params}
            and not {k for k, _ in self.tags} & {k for k, _ in other.tags}
        )

    def merged(self, other: Log) -> Log:
        return Log(self.key, self.metrics + other.metrics, self.params + other.params, self.tags + other.tags)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """Upload the local file or directory `local_path` into run `key`'s artifacts (under `artifact_path`)."""

    key: str
    local_path: str
    artifact_path: str | None = None


@dataclasses.dataclass(frozen=True)
class EndRun:
    """Mark run `key` terminated with `status` at `end_time` (ms)."""

    key: str
    status: str
    end_time: int


Record = CreateRun | Log | Artifact | EndRun
_OPS = {"run": CreateRun, "log": Log, "artifact": Artifact, "end": EndRun}
_NAMES = {kind: op for op, kind in _OPS.items()}
_PAIRS = ("tags", "params", "metrics")


def to_json(record: Record) -> dict:
    """The record as a JSON-ready dict, `op` naming its kind."""
    return {"op": _NAMES[type(record)], **dataclasses.asdict(record)}


def from_json(data: dict) -> Record:
    """The record `to_json` gave `data` for; raises ValueError for an unknown kind."""
    fields = dict(data)
    kind = _OPS.get(fields.pop("op", None))
    if kind is None:
        raise ValueError(f"Unknown record kind. Received: op={data.get('op')!r}; allowed: {sorted(_OPS)}")
    for name in _PAIRS:
        if name in fields:
            value = fields[name]
            items = value.items() if isinstance(value, dict) else value  # old spools wrote run tags as a dict
            fields[name] = tuple(tuple(item) for item in items)
    return kind(**fields)


def now_ms() -> int:
    return int(time.time() * 1000)


def new_run(experiment: str, run_name=None, tags=None, parent_run_id=None) -> CreateRun:
    """A `CreateRun` under a fresh key, tagged with it (and with its parent run, if any)."""
    key = uuid.uuid4().hex
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    tags[RUN_KEY_TAG] = key
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    return CreateRun(key, experiment, run_name, tuple(tags.items()), now_ms())


def logs(run: str, metrics=None, step: int = 0, params=None, tags=None) -> list[Log]:
    """`Log` records of metrics (at `step`, timestamped now), params and tags, split to MLflow's limits."""
    stamp = now_ms()
    items = {"metrics": [(str(k), float(v), stamp, int(step)) for k, v in (metrics or {}).items()],
             "params": [(str(k), str(v)) for k, v in (params or {}).items()],
             "tags": [(str(k), str(v)) for k, v in (tags or {}).items()]}
    limits = {"metrics": MAX_METRICS, "params": MAX_PARAMS, "tags": MAX_TAGS}
    return [Log(run, **{name: tuple(pairs[start:start + limits[name]])})
            for name, pairs in items.items() for start in range(0, len(pairs), limits[name])]


def coalesce(records) -> list[tuple[Record, int]]:
    """`records` with each run's consecutive `Log` records merged into as few `log_batch` calls as fit.

    Returns `(record to deliver, how many of `records` it stands for)` pairs, in order: a record of
    another kind (or of another run) ends a merge.
    """
    merged: list[tuple[Record, int]] = []
    for record in records:
        last, count = merged[-1] if merged else (None, 0)
        if isinstance(record, Log) and isinstance(last, Log) and last.fits_with(record):
            merged[-1] = (last.merged(record), count + 1)
        else:
            merged.append((record, 1))
    return merged
