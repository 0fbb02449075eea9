"""A serving process: loads SavedModels with TensorFlow alone and predicts.

Run by test_export.py. It must work without keras_l2 (regularization is a
training concern), so keras_l2 is made unimportable here: any attempt to
load it fails loudly instead of passing by accident.
Prints, as JSON, each model's predictions.
"""

import json
import sys

sys.modules["keras_l2"] = None  # `import keras_l2` now raises ImportError

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

inputs = np.load(sys.argv[1])
result = {}
for path in sys.argv[2:]:
    served = tf.saved_model.load(path)
    result[path] = np.asarray(served.serve(tf.constant(inputs))).tolist()
print(json.dumps(result))
