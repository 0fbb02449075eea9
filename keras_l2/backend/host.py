"""The machine a run shares: free memory where the weights live, the CPU threads Keras' ops may use, the heap.

Part of the adapter (`keras_l2.backend`): the backend branches and framework
calls that size a stack (`keras_l2.search.stacking`) and cap a worker's
threads (`--threads`, `keras_l2.search.runner`), and the Python heap a
sweep's job leaves out of full garbage collections (`frozen_heap`).

Example:

>>> from keras_l2.backend import host
>>> free, where = host.free_memory()
>>> free > 0 and bool(where)
True
"""

from __future__ import annotations

import contextlib
import gc
import os

import keras


def free_memory() -> tuple[int, str]:
    """Bytes free now where the weights live, and where that is: the first GPU (JAX, PyTorch), else the host."""
    if keras.backend.backend() == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0), str(jax.devices()[0])
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[0], "cuda:0"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this host"


@contextlib.contextmanager
def frozen_heap():
    """Leaves what the process holds now out of Python's full garbage collections until the block ends.

    TensorFlow, JAX, PyTorch and MLflow leave millions of long-lived objects
    after import, and every full collection walks them all: about 0.4 s each,
    10 of them in a digits sweep of 7 stacked runs, 4.0-4.4 s of its 38-41 s.
    Frozen (`gc.freeze`), the sweep's collections took 0.3-2.5 s in all
    (TensorFlow, 2-core CPU; the rest walk what the sweep itself made). One
    full collection first, so that garbage left from before (an earlier job's
    model: Keras models are reference cycles) is freed, not frozen with the
    rest. Objects made in the block are collected as always; frozen ones that
    become cyclic garbage in it wait for its end, when all frozen objects
    rejoin the oldest generation (a `gc.freeze` someone makes inside the block
    included). If something else froze objects before (a test runner, a
    server), nothing is done: thawing would undo its freeze.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    try:
        gc.freeze()
        yield
    finally:
        gc.unfreeze()


def limit_threads(count: int) -> None:
    """Caps this process' CPU threads for Keras' ops at `count` (TensorFlow: intra- and inter-op; PyTorch: both).

    For several training processes sharing one machine's cores (the
    README's shared-sweep throughput measures it). Call it before the
    backend's first op: in a process that has already run TensorFlow ops
    (tf.data datasets included) TensorFlow's pools are fixed. A runtime that
    started with another count, JAX (its CPU pool follows the CPUs the
    process may use; XLA's `intra_op_parallelism_threads` flag changed
    nothing with JAX 0.10 here) and other backends get a ValueError saying
    what to do instead.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        threading = tf.config.threading
        try:
            threading.set_intra_op_parallelism_threads(count)
            threading.set_inter_op_parallelism_threads(count)
        except RuntimeError:  # TensorFlow started already: fine only if it runs with `count` threads
            started = (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())
            if started != (count, count):
                shown = "its defaults (all cores)" if started == (0, 0) else f"(intra-op, inter-op) threads {started}"
                raise ValueError(f"--threads: TensorFlow has started with {shown}; set threads={count} before any "
                                 f"TensorFlow op runs in this process (the command line's --threads does)") from None
    elif keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(count)
        with contextlib.suppress(RuntimeError):  # settable once, before parallel work: checked below
            torch.set_num_interop_threads(count)
        if torch.get_num_interop_threads() != count:
            raise ValueError(f"--threads: PyTorch's inter-op pool has started with {torch.get_num_interop_threads()} "
                             f"threads; set threads={count} before PyTorch's first parallel work in this process")
    elif keras.backend.backend() == "jax":
        raise ValueError(f"--threads: JAX sizes its CPU thread pool from the CPUs this process may run on; start the "
                         f"worker with `taskset -c 0-{count - 1} keras-l2 ...` (other CPUs for the other workers) "
                         f"instead. Received: threads={count} on the jax backend")
    else:
        raise ValueError(f"--threads: supported on the tensorflow and torch backends. Received: threads={count} on "
                         f"the {keras.backend.backend()} backend")
