"""The one exception type for user mistakes.

A `KrrstError` carries a one-line message naming the culprit (a file, an
option, a name) and what was expected. The CLI catches this type only and
prints the message; anything else is a bug and keeps its traceback.
"""


class KrrstError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name."""
