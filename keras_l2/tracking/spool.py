"""The spool: undelivered records saved as JSON lines, for a later process to send.

One file per outbox, `<spool_dir>/<hex>.jsonl`: a header line (format
version, the writer's pid, the store, the run ids known so far), then one
record per line (`keras_l2.tracking.records.to_json`). A file is rewritten
whole through a temporary file with a unique name, `<file>.<pid>-<hex>.tmp`,
renamed over it atomically and removed if the write fails; a temporary left by
a process that died mid-write is removed by the next `adopt`. A file is
*claimed* (renamed to `<file>.claimed-<pid>-<hex>`) before its records are
taken over, so two processes never adopt one file.

Example:

>>> import pathlib, tempfile
>>> from keras_l2.tracking import spool
>>> from keras_l2.tracking.records import EndRun
>>> with tempfile.TemporaryDirectory() as folder:
...     path = pathlib.Path(folder) / "a.jsonl"
...     spool.write(path, spool.header("sqlite:///x.db", None, {"k": "id1"}), [EndRun("k", "FINISHED", 1)])
...     header, records = spool.read(path)
...     leftovers = sorted(p.name for p in pathlib.Path(folder).iterdir())
>>> header["runs"], records, leftovers
({'k': 'id1'}, [EndRun(key='k', status='FINISHED', end_time=1)], ['a.jsonl'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import uuid
from pathlib import Path

from keras_l2.tracking.records import CreateRun, Record, from_json, to_json

VERSION = 1
SUFFIX = ".jsonl"


def header(tracking_uri: str, artifact_location: str | None, runs: dict) -> dict:
    return {"version": VERSION, "pid": os.getpid(), "tracking_uri": tracking_uri,
            "artifact_location": artifact_location, "runs": dict(runs)}


def write(path: Path, head: dict, records) -> None:
    """Replaces `path` atomically with `head` and `records`; never leaves a temporary behind on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "w") as handle:
            handle.write(json.dumps(head) + "\n")
            for record in records:
                # A run being created may or may not exist once we crash: look it up before creating it again.
                if isinstance(record, CreateRun):
                    record = dataclasses.replace(record, attempted=True)
                handle.write(json.dumps(to_json(record), allow_nan=True) + "\n")
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


class Mirror:
    """The spool file of one outbox: written on demand, then kept following its queue until it empties."""

    def __init__(self, path: Path):
        self.path = path
        self.active = False  # whether the file exists and must follow the queue
        self.written_at = 0.0

    def update(self, head: dict, records) -> None:
        """Rewrites the file with `records`, or removes it when there are none."""
        self.written_at = time.monotonic()
        if records:
            write(self.path, head, records)
            self.active = True
        elif self.active:
            self.path.unlink(missing_ok=True)
            self.active = False

    def due(self, empty: bool, every: float) -> bool:
        """Whether the file should follow the queue now: it emptied, or `every` s passed."""
        return self.active and (empty or time.monotonic() - self.written_at > every)


def read(path: Path) -> tuple[dict, list[Record]]:
    lines = path.read_text().splitlines()
    head = json.loads(lines[0]) if lines else {}
    return head, [from_json(json.loads(line)) for line in lines[1:] if line.strip()]


def waiting(folder: Path) -> dict:
    """How many records the spool files in `folder` hold, per tracking URI (stores in first-seen order)."""
    counts: dict[str, int] = {}
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else ():
        try:  # the header and a count of record lines: the records themselves are read when adopted
            head, *lines = path.read_text().splitlines()
            uri = json.loads(head).get("tracking_uri")
        except (OSError, ValueError):  # claimed or rewritten meanwhile (its writer still has it), or empty
            continue
        if uri:
            counts[uri] = counts.get(uri, 0) + sum(1 for line in lines if line.strip())
    return counts


def claim(path: Path) -> Path | None:
    """Renames `path` to a name only this call knows; None if another process claimed it first."""
    claimed = path.with_name(f"{path.name}.claimed-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        path.rename(claimed)
    except OSError:
        return None
    return claimed


def adopt(folder: Path, tracking_uri: str, skip: Path, busy):
    """Yields `(header, records)` of each spool file in `folder` for `tracking_uri`, claimed for the caller.

    Skips `skip` and files for which `busy(header, path)` says their writer is still delivering them; a
    file is deleted once the caller asks for the next. Stale temporaries are removed first.
    """
    remove_stale_temporaries(folder)
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else ():
        if path == skip or (claimed := claim(path)) is None:
            continue
        head, records = read(claimed)
        if head.get("tracking_uri") != tracking_uri or busy(head, path):
            claimed.rename(path)
            continue
        yield head, records
        claimed.unlink()


def remove_stale_temporaries(folder: Path) -> int:
    """Removes temporaries whose writer process is gone (it died mid-write); returns how many."""
    removed = 0
    for temporary in folder.glob(f"*{SUFFIX}.*.tmp") if folder.is_dir() else ():
        pid = temporary.name.rsplit(".", 2)[-2].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
                removed += 1
    return removed


def pid_alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, OverflowError):
        return pid is not None
    return True
