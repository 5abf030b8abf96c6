"""User-facing errors.

Every problem a user can cause (bad request files, bad settings, a tampered adapter, ...) raises a
subclass of `KdpoError`; the CLI prints those as one line and exits non-zero, with no traceback.
Anything else is a bug and keeps its traceback.
"""


class KdpoError(Exception):
    """Base class of every error caused by input, settings or stored files."""


class RequestError(KdpoError):
    """A malformed edit request or request file."""


class ConfigError(KdpoError):
    """Unknown or invalid hyper-parameters."""


class ModelLoadError(KdpoError):
    """A model source that cannot be found or loaded."""


class NumericalError(KdpoError):
    """A NaN or infinite loss or gradient; the edit batch is aborted and nothing is written."""


class StoreError(KdpoError):
    """An adapter-store operation that cannot be carried out (unknown batch, bad name, ...)."""


class IntegrityError(StoreError):
    """A stored adapter that fails verification: tampered, foreign base model, or not safetensors."""


class KdpoWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI shows these as one line)."""
