"""The one exception type for bad input: the entrypoint prints it as a single line and exits non-zero."""


class UsageError(Exception):
    """Something the user asked for cannot be done; the message names the key and how to fix it."""

    exit_code = 2
