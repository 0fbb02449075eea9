"""The main job: a lambda sweep on the digits, tracked in MLflow (see `keras-l2 sweep --help`).

    python experiments/sweep.py                       # the default sweep, embedded store
    python experiments/sweep.py --seeds 3 --workers 2
    python experiments/sweep.py --model my_models:build --layers 'dense.*'   # your own model
"""

import sys

from keras_l2.search import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="experiments/sweep.py"))
