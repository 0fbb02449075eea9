"""Making a compiled model pick up a changed penalty."""


def retrace(model) -> None:
    """Makes a compiled model pick up a changed penalty at its next step.

    Penalty values are traced into the train/test functions as constants, so
    a change of lambda needs new functions. `fit` reads `model.train_function`
    before every step, so this also works from a callback between epochs.
    """
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    if getattr(model, "test_function", None) is not None:
        model.make_test_function(force=True)
