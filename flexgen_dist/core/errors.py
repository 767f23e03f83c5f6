"""The one exception type users see as a one-line message (the CLI prints it and exits non-zero),
and the few subclasses more than one floor raises."""
from __future__ import annotations


class FlexGenError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class StoreError(FlexGenError):
    pass
