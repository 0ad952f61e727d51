"""The one exception type users see: a message that fits on one line.

Library code raises `IsdaVizError` for bad input (missing data, corrupt
checkpoint, mismatched class counts); the CLI turns it into a click error with
a non-zero exit and no traceback.
"""


class IsdaVizError(Exception):
    """A user-facing error whose message is one line that says what to do."""
