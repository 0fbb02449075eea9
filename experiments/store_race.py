"""Does opening a brand-new MLflow SQLite store from several processes at once fail?

One question: is the lock in `keras_l2.tracking.store.open_store` needed? For
each trial, N processes open the same new store at the same moment, once with a
plain `mlflow.MlflowClient` and once through `open_store`, and each creates or
finds an experiment and logs one run. Prints how many processes failed.

    python experiments/store_race.py            # 3 trials of 4 processes
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = """
import sys
import mlflow
from keras_l2.tracking.store import TrackingStore, experiment_id, open_store
uri = "sqlite:///" + sys.argv[1] + "/mlflow.db"
store = TrackingStore(tracking_uri=uri)
client = open_store(store) if sys.argv[2] == "locked" else mlflow.MlflowClient(tracking_uri=uri)
run = client.create_run(experiment_id(client, "race", store))
client.log_metric(run.info.run_id, "m", 1.0)
client.set_terminated(run.info.run_id)
"""


def failures(processes: int, mode: str) -> int:
    with tempfile.TemporaryDirectory() as root:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, root, mode],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(processes)]
        return sum(proc.wait(timeout=300) != 0 for proc in procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    print(f"{'trial':<7}{'plain client: failed':>22}{'open_store: failed':>20}")
    for trial in range(args.trials):
        plain, locked = failures(args.processes, "plain"), failures(args.processes, "locked")
        print(f"{trial:<7}{f'{plain}/{args.processes}':>22}{f'{locked}/{args.processes}':>20}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
