"""The training layer: the trainer, its state, the meta-weighted step, optimisers and loggers."""
