"""`prefuse train-rm`: the reward models the judges read, and their data."""
