"""One logging setup for every command: ``ptft <component>: message`` on stderr, rank-aware.

Rank 0 (or a single process) prints INFO and above; other ranks print warnings and errors only,
prefixed ``[rank R]``, so an 8-GPU job shows one progress line, not eight. Modules log through
``get_logger("pretrain")`` etc.; nothing prints status with ``print`` (stdout is for results:
JSON lines of ``ptft predict``, ``ptft evaluate``, ``ptft plan --json``).
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "ptft"
_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (pytest's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


class _Format(logging.Formatter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        component = parts[1] if len(parts) > 1 and parts[0] == ROOT else record.name
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        prefix = f"[rank {self.rank}] " if self.rank > 0 else ""
        text = f"{prefix}{ROOT} {component}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _rank_from_env() -> int:
    for name in _RANK_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    if os.environ.get("SLURM_STEP_ID") and (value := os.environ.get("SLURM_PROCID", "")).isdigit():
        return int(value)
    return 0


def setup_logging(rank: int | None = None, verbose: bool = False) -> logging.Logger:
    """(Re)configure the ``ptft`` logger; call again with the real rank once it is known."""
    rank = _rank_from_env() if rank is None else rank
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if isinstance(h, _Stderr):
            logger.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(_Format(rank))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING))
    logger.propagate = False
    return logger


def get_logger(component: str) -> logging.Logger:
    """``get_logger("pretrain").info(...)`` prints ``ptft pretrain: ...``."""
    logger = logging.getLogger(f"{ROOT}.{component}")
    if not logging.getLogger(ROOT).handlers:  # library use without the CLI: still visible
        setup_logging()
    return logger
