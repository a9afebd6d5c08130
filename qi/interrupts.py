"""Ctrl-C and SIGTERM always stop a command: at once, or at the next checkpoint.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be. When
that is inside a finalizer (a ``__del__`` or ``weakref.finalize`` callback run by the garbage
collector: DataLoader iterators, temporary folders, database connections) the exception is
printed as "Exception ignored in ..." and dropped, and the command runs on as if nothing
happened - a window in which Ctrl-C, or a scheduler's SIGTERM, is lost. Lightning opens
another: it answers ``KeyboardInterrupt`` with ``sys.exit(1)`` and ignores SIGINT from then
on (:func:`qi.fit.callbacks.fit_interruptibly` undoes both).

So :func:`stop_on_signals` installs a handler that *records* the request before it raises,
and every :func:`checkpoint` - each phase of a worker: data preparation, each training and
validation batch, between trials, evaluation, registration - raises again while a request
is pending. A swallowed interrupt stops the command at the next checkpoint, and the command's
exit status comes from the record (130), never from how far the exception got.

Checkpoints are also where tests (and the curious) observe a worker: :func:`listen`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_requested: int | None = None
_listeners: list[Callable[[str], None]] = []


class Interrupted(KeyboardInterrupt):
    """The stop request, raised again at a checkpoint after the first one was swallowed."""


def _record_and_raise(signum: int, frame) -> None:
    global _requested
    _requested = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


def requested() -> int | None:
    """The signal that asked this command to stop, if one did."""
    return _requested


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop the command (see the module docstring); the previous
    handlers come back afterwards. Outside the main thread signals cannot be handled: a
    no-op there."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = None
    previous = {s: signal.signal(s, _record_and_raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def checkpoint(phase: str) -> None:
    """A worker enters ``phase``: stop here if a stop was requested; tell the listeners."""
    if _requested is not None:
        raise Interrupted(f"{signal.Signals(_requested).name}, seen at {phase}")
    for listener in list(_listeners):
        listener(phase)


@contextmanager
def listen(callback: Callable[[str], None]) -> Iterator[None]:
    """Call ``callback(phase)`` at every checkpoint while the block runs."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)
