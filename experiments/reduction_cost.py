"""What summing the squares of a kernel costs under XLA on CPU: as a matrix, or flattened.

The one-off measurement behind `l2_math.squared_frobenius_norm` summing a flat
vector: XLA's CPU reduction of a 2-D tensor to a scalar was 2-2.5x slower
than of the same numbers flattened. Times the penalty's value for the
784-1024-1024 kernels, one TensorFlow thread, with and without XLA.

    python experiments/reduction_cost.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

CALLS = 300


def main() -> None:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    kernels = [tf.Variable(tf.random.normal(shape)) for shape in ((784, 1024), (1024, 1024))]
    forms = {
        "matrix: sum(square(W))": lambda w: tf.reduce_sum(tf.square(w)),
        "flat: sum(square(reshape(W, -1)))": lambda w: tf.reduce_sum(tf.square(tf.reshape(w, (-1,)))),
    }
    print(f"{'form':<38}{'XLA':<6}{'ms/call':>9}")
    for name, form in forms.items():
        for jit in (True, False):
            fn = tf.function(lambda form=form: tf.add_n([form(w) for w in kernels]), jit_compile=jit)
            fn()
            start = time.perf_counter()
            for _ in range(CALLS):
                value = fn()
            value.numpy()
            print(f"{name:<38}{'on' if jit else 'off':<6}{(time.perf_counter() - start) / CALLS * 1e3:>9.3f}")


if __name__ == "__main__":
    main()
