"""Log set-up for the receiver's own loggers (``dcon.*``)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    logger = logging.getLogger("dcon")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
