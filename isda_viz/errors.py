"""The one exception type users see: a message that fits on one line.

Library code raises `IsdaVizError` for bad input (missing data, corrupt
checkpoint, mismatched class counts); the CLI turns it into a click error with
a non-zero exit and no traceback.
"""

import math


class IsdaVizError(Exception):
    """A user-facing error whose message is one line that says what to do."""


def require_finite(values: dict) -> None:
    """Raise `IsdaVizError` for the first option in `{option name: value}` that is an inf or NaN (None is skipped)."""
    for option, value in values.items():
        if value is not None and not math.isfinite(value):
            raise IsdaVizError(f"{option} must be a finite number, not {value}")
