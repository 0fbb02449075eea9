"""keras_l2: L2 regularization exactly where you want it, for Keras 3.

Three interchangeable routes apply the same math (see `keras_l2.l2_math`) to
the kernels of chosen Dense layers only:

- `L2Regularizer` / `regularize`: a Keras regularizer on each chosen kernel;
- `L2CategoricalCrossentropy`: cross-entropy plus the penalty of all chosen kernels;
- `L2DecayOptimizer`: the decay applied by hand in any optimizer's update,
  coupled (L2 in the gradient) or decoupled (AdamW-style weight decay).

`MlflowL2Logger` records what lambda did to every layer in MLflow.
"""

from keras_l2 import l2_math
from keras_l2.inventory import L2Routes, l2_routes
from keras_l2.loss import L2CategoricalCrossentropy
from keras_l2.metrics import attach_l2_metrics, detach_l2_metrics
from keras_l2.optimizer import L2DecayOptimizer
from keras_l2.regularizer import L2Regularizer, regularize
from keras_l2.route import L2Route
from keras_l2.routes import OPTIMIZERS, ROUTES, apply_route, make_optimizer, set_l2
from keras_l2.schedule import LambdaScheduler
from keras_l2.selection import select_layers
from keras_l2.tracking.callback import MlflowL2Logger
from keras_l2.tracking.resend import send_pending

__version__ = "0.1.0"

__all__ = [
    "OPTIMIZERS",
    "ROUTES",
    "L2CategoricalCrossentropy",
    "L2DecayOptimizer",
    "L2Regularizer",
    "L2Route",
    "L2Routes",
    "LambdaScheduler",
    "MlflowL2Logger",
    "apply_route",
    "attach_l2_metrics",
    "detach_l2_metrics",
    "l2_math",
    "l2_routes",
    "make_optimizer",
    "regularize",
    "select_layers",
    "send_pending",
    "set_l2",
]
