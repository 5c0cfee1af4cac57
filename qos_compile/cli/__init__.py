"""Command-line entry points. Each tool turns QosError into one line on stderr and exit status 2."""
from __future__ import annotations

import signal
import sys
from typing import Callable, Sequence

from ..errors import QosError

#: What a signal prints and the exit status it gives (128 + the signal number).
_SIGNALS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}
_received: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup (``finally``, ``except BaseException``) runs."""


def _on_signal(signum: int, frame: object) -> None:
    first = not _received
    _received.append(signum)
    if first:      # a repeated signal must not interrupt the cleanup the first one started
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def received_signal() -> int | None:
    """The SIGINT/SIGTERM that reached the running command, if any (even one a library swallowed)."""
    return _received[0] if _received else None


def raise_if_signalled() -> None:
    """Raise KeyboardInterrupt if a signal arrived but the code it interrupted carried on (TVM's
    FFI can turn the exception into an error of its own, or drop it); long jobs call this between
    stages."""
    if _received:
        raise KeyboardInterrupt()


def _install() -> dict[int, object]:
    previous: dict[int, object] = {}
    for sig in _SIGNALS:
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):      # not the main thread: leave the handlers alone
            break
    return previous


def _restore(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        try:
            signal.signal(sig, handler)    # type: ignore[arg-type]
        except (ValueError, OSError, TypeError):
            pass


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None, prog: str) -> int:
    """Run ``main(argv)``; map QosError to 'prog: error: message' + exit 2, Ctrl-C (SIGINT) to
    'prog: interrupted' + exit 130 and SIGTERM to 'prog: terminated' + exit 143.

    SIGINT and SIGTERM raise KeyboardInterrupt (``Terminated``) in the main thread, so temporary
    files and folders are removed by the code that made them. Whatever exception comes back after
    a signal (TVM may wrap the interrupt in an error with an empty message) is reported as the
    signal, in one line.
    """
    _received.clear()
    previous = _install()
    try:
        try:
            return int(main(argv) or 0)
        except BaseException as e:  # noqa: BLE001 - classified below; anything else is re-raised
            if _received or isinstance(e, KeyboardInterrupt):
                word, code = _SIGNALS.get(_received[0] if _received else signal.SIGINT, ("interrupted", 130))
                print(f"{prog}: {word}", file=sys.stderr)
                return code
            if isinstance(e, QosError):
                msg = " ".join(str(e).split()) or e.__class__.__name__
                print(f"{prog}: error: {msg}", file=sys.stderr)
                return 2
            if isinstance(e, BrokenPipeError):  # e.g. `qos-nets multipliers list | head`
                return 0
            raise
    finally:
        _restore(previous)
        _received.clear()
