"""The run's core, shared by every command: what an objective needs, batch sources and their
shards, the training step, reference caches, metrics and per-method defaults."""
