"""SIGINT / SIGTERM during training: the loop finishes the optimizer step under way, saves a checkpoint of it (as
every other, atomically), says so in one line and exits with 128 + the signal's number (130, 143).

    with StopSignals() as stop:       # the main thread's handlers, restored on exit
        ... one optimizer step ...
        if stop.stop(world): save, then raise stop.exit(step, path)

A second signal while the first is handled acts as the default handler would (Ctrl-C twice: KeyboardInterrupt).
"""
from __future__ import annotations

import signal
import threading
from typing import Self

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Records the first SIGINT or SIGTERM instead of dying mid-step (installed only in the main thread)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        self.received = number
        for other, previous in self._previous.items():  # a second signal: what it did before
            signal.signal(other, previous)

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def stop(self, world) -> bool:
        """Whether the run stops after this step: a signal came to this process or, under torchrun, to any rank
        (every rank then stops at the same step; one all-reduce per step)."""
        if not world.distributed:
            return self.received is not None
        return bool(world.total(int(self.received is not None)))

    def exit(self, step: int, path, say: bool = True) -> SystemExit:
        """The exit of a run stopped by the signal (a rank that did not get it: as by SIGTERM), its line printed
        when `say`."""
        number = self.received or signal.SIGTERM
        if say:
            print(f"{signal.Signals(number).name} at step {step}: checkpoint saved to {path}; "
                  f"--resume_from_checkpoint latest continues the run", flush=True)
        return SystemExit(128 + number)


__all__ = ["SIGNALS", "StopSignals"]
