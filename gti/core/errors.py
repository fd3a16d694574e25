"""Exceptions that carry a message meant for the user (file, line or key named)."""


class GtiError(Exception):
    """Base class: the CLI prints these without a traceback."""

    @classmethod
    def listing(cls, problems: list[str], heading: str = "invalid config") -> "GtiError":
        """One error naming every problem found: inputs are validated all at once, not first-fail.

        The one builder of such messages, for every subclass; `heading` says what was checked:
            raise ConfigError.listing(problems)  # invalid config:\n  - optim.lr: ...\n  - seed: ...
            raise DataError.listing(missing, "missing input files")
        """
        return cls(f"{heading}:\n  - " + "\n  - ".join(problems))


class ConfigError(GtiError, ValueError):
    pass


class DataError(GtiError, ValueError):
    pass


class AssetError(GtiError, FileNotFoundError):
    pass


class TrainingError(GtiError, FloatingPointError):
    """Training diverged (NaN/inf loss); the last good checkpoint stays in the .partial folder."""
