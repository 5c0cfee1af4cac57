"""Command-line entry points. Each tool turns QosError into one line on stderr and exit status 2."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from ..errors import QosError


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None, prog: str) -> int:
    """Run ``main(argv)``; map QosError to 'prog: error: message' + exit 2, Ctrl-C to exit 130."""
    try:
        return int(main(argv) or 0)
    except QosError as e:
        msg = " ".join(str(e).split()) or e.__class__.__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qos-nets multipliers list | head`
        return 0
