"""aim-mlx's logger, and warnings said once per process. The library logs and never prints; the CLI shows
warnings on stderr."""

import logging

logger = logging.getLogger("aim_mlx")
_said: set[str] = set()


def warn_once(message: str) -> None:
    """Log `message` as a warning the first time it is given in this process."""
    if message not in _said:
        _said.add(message)
        logger.warning(message)
