"""The drivers of single CLI commands (demo, export, generate) above the engine."""
