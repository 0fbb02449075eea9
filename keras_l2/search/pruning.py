"""A Keras callback that reports each epoch's validation data loss to an Optuna trial and stops the run when
the study's pruner says so (`keras-l2 sweep --sampler tpe`)."""

from __future__ import annotations

import keras


class Pruning(keras.callbacks.Callback):
    """Reports each epoch's validation data loss to the trial and stops the run when the pruner says so."""

    def __init__(self, trial):
        super().__init__()
        self.trial, self.pruned_at = trial, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_data_loss")
        if value is None:
            return
        self.trial.report(float(value), epoch + 1)
        if self.trial.should_prune():
            self.pruned_at = epoch + 1
            self.model.stop_training = True
