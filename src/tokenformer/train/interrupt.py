"""Ctrl-C during training: finish the step, save a checkpoint, say how to resume.

A ``KeyboardInterrupt`` can land anywhere, between the optimizer's update and the step counter
too, and the state saved then would not be one step's. Inside :func:`deferred_interrupt` the
first Ctrl-C only asks the loop to stop at the next step boundary, where it saves a
checkpoint and raises :class:`TrainingInterrupted`; a second one stops at once, unsaved.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C; the message says at which step, what was saved and how to resume."""


class StopRequest:
    """Whether Ctrl-C was pressed inside :func:`deferred_interrupt`."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def deferred_interrupt(enabled: bool = True) -> Iterator[StopRequest]:
    """While inside, the first SIGINT sets ``requested`` (and says so on stderr) instead of
    raising; a second raises ``KeyboardInterrupt``. Only the main thread can handle signals:
    elsewhere, or unless ``enabled``, Ctrl-C raises as usual."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame) -> None:
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again: stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)
