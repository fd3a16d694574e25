"""Exceptions that carry a message meant for the user (file, line or key named)."""


class GtiError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(GtiError, ValueError):
    pass


class DataError(GtiError, ValueError):
    pass


class AssetError(GtiError, FileNotFoundError):
    pass


class TrainingError(GtiError, FloatingPointError):
    """Training diverged (NaN/inf loss); the last good checkpoint stays in the .partial folder."""
