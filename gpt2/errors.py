"""The one exception type for bad input, and how every command turns it into a single line and an exit code."""

import functools
import sys
from typing import Callable, Optional


class UsageError(Exception):
    """Something the user asked for cannot be done; the message names the key and how to fix it."""

    exit_code = 2


def print_error(e: Exception) -> int:
    """`error: <message>` on stderr, one line; the exit code for it (2, bad input)."""
    print(f"error: {e}", file=sys.stderr)
    return getattr(e, "exit_code", UsageError.exit_code)


def command(interrupted: Optional[str] = None) -> Callable:
    """Decorate a command's `main(argv) -> int`: a UsageError anywhere in it becomes one line on stderr and
    exit 2, never a traceback; with `interrupted`, Ctrl-C prints that line and exits 130 (else it propagates)."""
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except UsageError as e:
                return print_error(e)
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                print(interrupted, file=sys.stderr)
                return 130
        return run
    return wrap
