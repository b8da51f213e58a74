"""The drift monitor: a new batch compared with the training data and the served model."""
