"""User-facing errors.

Every error a user can cause (bad path, bad flag value, too little calibration text, NaN weights, ...)
is raised as an :class:`A3Error` whose message is ONE line that names the problem and the fix.
Command-line entry points catch it, print ``error: <message>`` to stderr and exit with status 2.
Anything else escaping is a bug and keeps its traceback.
"""


class A3Error(Exception):
    """A problem the user can fix; ``str(err)`` is one line naming the problem and the fix."""

    exit_code = 2


class InputError(A3Error):
    """The source model, a path, or a flag value is unusable."""


class UnsupportedArchitectureError(InputError):
    """The source model uses a feature A3 export does not cover (q/k norms, sliding window, MoE, ...)."""


class BudgetError(A3Error):
    """The requested compression ratio cannot be met under the head-size / MLP-width constraints."""


class CalibrationError(A3Error):
    """The calibration (or evaluation) text is missing or too short for what was asked."""


class NumericalError(A3Error):
    """NaN or Inf in weights, activations or statistics."""


class EngineError(A3Error):
    """An inference engine failed or timed out while measuring (exit status 1: not the user's input)."""

    exit_code = 1


class SystemFailure(A3Error):
    """The operating system refused an operation on a path (disk full, permission denied, read-only, ...);
    the message names the path and the fix (exit status 1)."""

    exit_code = 1
