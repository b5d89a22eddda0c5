"""User-facing errors: each carries a one-line message that says what to do.

The CLI prints ``error: <message>`` and exits non-zero without a traceback for these; anything else
is a bug and keeps its traceback.
"""


class StatpruneError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class ModelError(StatpruneError):
    """The model is missing, unreadable, unsupported or contains non-finite weights."""


class DataError(StatpruneError):
    """Calibration or evaluation data is missing, malformed, or too small."""


class BudgetError(StatpruneError):
    """The requested budget is invalid or cannot be met."""


class OutputError(StatpruneError):
    """The output location is unusable (exists, equals the input, not writable, disk full)."""


class DeviceError(StatpruneError):
    """The requested device is not available."""


class OptionsError(BudgetError, ValueError):
    """An option is unknown, out of range or contradicts another one.

    A ``BudgetError`` (and a ``ValueError``) too, so that callers written when bad options raised
    those keep catching them."""
