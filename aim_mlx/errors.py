"""The errors aim-mlx raises. Each message says what was wrong and what to do about it."""


class AimMlxError(Exception):
    """Base class: the CLI prints these as one line and exits 1."""


class ModelNotFoundError(AimMlxError, FileNotFoundError):
    """A model id or folder that cannot be resolved (unknown id, not cached while offline, no such folder)."""


class WeightsError(AimMlxError, ValueError):
    """A checkpoint that cannot be loaded: unsafe format, corrupt file, or keys/shapes that do not match."""


class ConfigError(AimMlxError, ValueError):
    """A config.json or a user option that does not describe a model aim-mlx can build."""


class ImageError(AimMlxError, ValueError):
    """An input image that cannot be used (missing, empty, not an image, truncated, too large)."""
