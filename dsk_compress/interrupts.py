"""SIGTERM handled like Ctrl-C while a run works, so both end the same way: stage recorded, resume hint, exit 130/143.

Python turns SIGINT into ``KeyboardInterrupt``; SIGTERM's default action kills the process on the spot,
leaving the manifest saying ``running``. :func:`terminate_as_interrupt` makes SIGTERM raise
:class:`Terminated` (a ``KeyboardInterrupt``) instead, so every ``finally`` and the runner's interrupt
handling run. It changes nothing outside the main thread or under torchrun, whose agent stops its
workers with SIGTERM and expects them to go.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives inside :func:`terminate_as_interrupt`."""


def exit_code(exc: BaseException) -> int:
    """The shell's status for a process ended by this interrupt: 128 + the signal number (130 SIGINT, 143 SIGTERM)."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def signal_name(exc: BaseException) -> str:
    return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C (SIGINT)"


@contextlib.contextmanager
def terminate_as_interrupt(enabled: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (when ``enabled``)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
