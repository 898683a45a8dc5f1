"""`prefuse train`: its settings, the run built from them, the loop, torchrun's world and the CPU allocator."""
