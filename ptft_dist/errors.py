"""The one base class of errors a user can fix (bad input, config, corpus, setup).

The CLI reports these as a single ``ptft: error: ...`` line with exit status 2; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input or environment, explained in its message."""
