"""The one error type for the user's mistakes.

Settings out of range, a file that is not a usable text or checkpoint, a device the machine lacks:
the core raises UserError (or a subclass) with one sentence that says what to change. The CLI
prints that sentence and exits with status 2, and the app shows it beside the widget. Every other
exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input; the message is one sentence for the user."""
