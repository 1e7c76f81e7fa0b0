"""Errors a user can cause. Each carries one sentence that says what to do.

The CLI prints ``str(error)`` and exits non-zero; the Slicer module shows it in
its status line. Anything else escaping is a bug in the project.
"""


class FINEError(Exception):
    """Base class: an error caused by input the user can fix."""


class InputError(FINEError):
    """An image, label map or point that cannot be used (wrong file, wrong dimensionality, NaNs...)."""


class CheckpointError(FINEError):
    """A checkpoint that is missing, unknown, tampered with, or not a FINE checkpoint."""


class DeviceError(FINEError):
    """A compute device that was asked for but is not available."""


class CancelledError(FINEError):
    """The user cancelled a running job; nothing was written."""
