"""Microbenchmarks of the fused head against the logits-materializing path and the peers that are installed."""
