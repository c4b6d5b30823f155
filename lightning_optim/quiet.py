"""Keep a run's output to what matters: Lightning's advertising tips, its device inventory and warnings
about its own internals are dropped; real warnings, the model summary and the progress bar stay."""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_lightning"]

_NOISE_WARNINGS = (
    r".*configure_optimizers` will be overridden",  # the CLI replaces it on purpose: the config's optimizer wins
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning, nothing a user can act on
    r"No seed found, seed set to",  # LightningCLI seeds every run (seed_everything: true); nothing to act on
)
_NOISE_INFO = ("💡 Tip", "GPU available", "TPU available", "HPU available")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_NOISE_INFO)


_FILTER = _DropNoise()


def quiet_lightning() -> None:
    """Install the filters (idempotent). Call it before building the Trainer."""
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
