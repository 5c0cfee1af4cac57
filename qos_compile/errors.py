"""The one exception type that reaches users as a clear message."""


class QosError(Exception):
    """Bad input or an unusable environment.

    The command-line tools print ``str(error)`` as one line on stderr and exit
    with status 2; library callers can catch it like any exception.
    """
