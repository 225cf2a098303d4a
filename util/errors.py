"""The error every module raises for a flag, file or folder a run cannot use. It sits below the rest of util/ so that
imports run one way: entry points print it as one line and exit (util.misc.run_main)."""


class UsageError(ValueError):
    """A flag, file or folder the run cannot use; the message says what to pass instead."""
