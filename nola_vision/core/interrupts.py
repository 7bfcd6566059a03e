"""Adapter weights written as one step: Ctrl-C held off while they change, and what a failed step changed undone, so
that an interrupted or failed merge, unmerge or task switch leaves the model wholly as it was or wholly as it was to
be: a weight written with its merged flag not yet set made the cell, run again, add ΔW a second time, for good."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List

__all__ = ["all_or_nothing", "interrupts_deferred", "sigint_kept", "sigterm_raising"]


@contextmanager
def sigint_kept() -> Iterator[None]:
    """Put back the SIGINT handler a block found when the block left SIGINT ignored: Lightning ignores it for its
    shutdown after a Ctrl-C in ``Trainer.fit`` and never restores it, so a later run in the process (a script calling
    ``main`` twice) could no longer be interrupted. Only the main thread sets handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


@contextmanager
def sigterm_raising(exception: Callable[[], BaseException]) -> Iterator[None]:
    """Raise ``exception()`` on SIGTERM (a scheduler's cancel) while the block runs, where no other handler has taken
    SIGTERM over: between Lightning's passes its default action ended the process at once, saying nothing of what
    was kept. Each Lightning pass installs its own handler, which calls this one too: there it does nothing, the
    pass noting the signal and ending itself. Only the main thread sets handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            raise exception()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C, a notebook's interrupt) until the block ends, then deliver it to the handler that was in
    place (Python's raises KeyboardInterrupt there). Only the main thread receives signals: elsewhere, and where the
    handler was not set from Python, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def all_or_nothing(action: str) -> Iterator[List[Callable[[], None]]]:
    """A block of writes with Ctrl-C held (``interrupts_deferred``) that gives a list for the undo of each write done:
    if any exception (out of memory, a failed device) stops the block, the undos run, newest first, and the exception
    goes on to the caller. Should an undo fail as well, the others still run, and a RuntimeError says that ``action``
    left the model partly changed (the first failure is its context)."""
    undo: List[Callable[[], None]] = []
    with interrupts_deferred():
        try:
            yield undo
        except BaseException as failure:
            undo_failures = []
            for step in reversed(undo):
                try:
                    step()
                except Exception as error:  # every other undo still runs; all are reported below
                    undo_failures.append(error)
            if undo_failures:
                raise RuntimeError(
                    f"{action} failed ({type(failure).__name__}: {failure}), and undoing what it had changed failed "
                    f"too ({type(undo_failures[0]).__name__}: {undo_failures[0]}): the model is left partly changed. "
                    "Build or load it again (its weights and adapter files) before using or saving it") from failure
            raise
