"""Signal handlers that only take note; the save and the stop happen later, at a step boundary.

Saving inside a handler is the known trap (it runs between two bytecodes of whatever the main
thread was doing, maybe half-way through an optimizer step or a collective). The handler here
records the first signal, calls the handler that was installed before it if that was a Python
function (so a launcher's or the user's own handler still sees every signal), and returns.
After the final checkpoint, `SignalWatch.stop` restores the previous handlers and stops the run
as the signal would have without us:

- a default disposition (SIGTERM, SIGUSR1, ...): the signal is raised again and ends the process
  (exit status -15 / 143 for SIGTERM);
- Python's SIGINT handler: `KeyboardInterrupt`;
- a Python function installed before: it ran when the signal came; the run ends with
  ``SystemExit(128 + signum)``, the status a shell gives a process ended by that signal.

A second SIGINT (Ctrl-C pressed again while waiting for the save) interrupts at once. Signals
whose disposition is "ignore" (``nohup``) are left alone. Handlers can only be installed from the
main thread; elsewhere (a Trainer in a worker thread, a notebook kernel thread) nothing is
installed and a warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterable
from typing import Any, NoReturn

__all__ = ["SignalWatch", "signal_name"]

logger = logging.getLogger("ckpt_callback")


def signal_name(signum: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(signum).name
    return f"signal {signum}"


class SignalWatch:
    """Notes the first of ``signals`` received while installed.

    Example:
        >>> import os, signal
        >>> watch = SignalWatch([signal.SIGUSR1]); watch.install()
        >>> os.kill(os.getpid(), signal.SIGUSR1)
        >>> watch.received == signal.SIGUSR1
        True
        >>> watch.restore()
    """

    def __init__(self, signals: Iterable[int]) -> None:
        try:
            self.signals = tuple(dict.fromkeys(signal.Signals(s) for s in signals))
        except (TypeError, ValueError) as exc:
            from ._errors import InvalidArgumentError

            raise InvalidArgumentError(f"save_on_signals must be signal numbers (signal.SIGTERM, ...): {exc}") from exc
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._interrupts = 0

    def install(self) -> None:
        """Install the handlers (again after `restore`); a no-op outside the main thread, with a warning."""
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("save_on_signals: signal handlers can only be installed from the main thread; %s will "
                           "end this run without a final checkpoint (install the hook/callback in the main "
                           "thread, or save from your own handler's aftermath with save())",
                           ", ".join(s.name for s in self.signals))
            return
        for sig in self.signals:
            current = signal.getsignal(sig)
            if current == self._handle:
                continue
            while isinstance(getattr(current, "__self__", None), SignalWatch):  # left by an earlier hook: skip it
                current = current.__self__._previous.get(sig, signal.SIG_DFL)  # type: ignore[union-attr]
            if current == signal.SIG_IGN:  # ignored on purpose (nohup, a launcher): not ours to change
                logger.info("save_on_signals: %s is ignored in this process; left alone", sig.name)
                continue
            try:
                signal.signal(sig, self._handle)
            except (OSError, ValueError) as exc:
                logger.warning("save_on_signals: cannot handle %s: %s", sig.name, exc)
                continue
            self._previous[sig] = current

    def restore(self) -> None:
        """Put back the handlers found at `install` (unless the user replaced ours meanwhile)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():  # kept: `stop` still needs to know them
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        # No logging or I/O here: this runs between two bytecodes of whatever the main thread does.
        previous = self._previous.get(signum)
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # Ctrl-C again: interrupt now, as without us
                self.restore()
                _redeliver(signum, previous, frame)
                return
        if self.received is None:
            self.received = signum
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def stop(self, signum: int) -> NoReturn:
        """After the final checkpoint: restore the handlers and end the run as ``signum`` would have."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if previous is signal.default_int_handler:
            raise KeyboardInterrupt
        if callable(previous):  # it ran when the signal came; end as a process ended by the signal would
            raise SystemExit(128 + signum)
        _redeliver(signum, signal.SIG_DFL, None)
        raise SystemExit(128 + signum)  # a signal whose default is not to end the process (SIGCHLD, ...)


def _redeliver(signum: int, previous: Any, frame: Any) -> None:
    """Give ``signum`` to the disposition that was there before ours."""
    if callable(previous):
        previous(signum, frame)
    elif previous in (signal.SIG_DFL, None):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
