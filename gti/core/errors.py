"""Exceptions that carry a message meant for the user (file, line or key named)."""


class GtiError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(GtiError, ValueError):
    @classmethod
    def listing(cls, problems: list[str]) -> "ConfigError":
        """One error naming every problem found (configs are validated all at once, not first-fail)."""
        return cls("invalid config:\n  - " + "\n  - ".join(problems))


class DataError(GtiError, ValueError):
    pass


class AssetError(GtiError, FileNotFoundError):
    pass


class TrainingError(GtiError, FloatingPointError):
    """Training diverged (NaN/inf loss); the last good checkpoint stays in the .partial folder."""
