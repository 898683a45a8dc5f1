"""prefuse.engine: the training engine (data, model, loop, checkpoints)."""
