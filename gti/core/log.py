"""Progress messages: one `logging` tree under "gti", printed as `[gti.<command>] message`, by global rank 0 only.

    log = get_logger("ground")
    log.info("padded share %s", share)    # -> [gti.ground] padded share 25% -> 1%

Every DDP process runs the same code; only rank 0 prints, so a run says each thing once. Warnings and errors of
other ranks still print, prefixed with their rank. `GTI_LOG_LEVEL=WARNING` quiets the progress lines.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "gti"


def global_rank() -> int:
    """This process's rank before or without a Trainer: Lightning's launchers, torchrun and SLURM set these.

    Read in Lightning's order (lightning.fabric.utilities.rank_zero._get_rank): LOCAL_RANK before SLURM_PROCID,
    because processes that Lightning starts inside an interactive SLURM allocation inherit SLURM_PROCID=0."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        if rank == 0:
            return True
        if record.levelno >= logging.WARNING:
            record.msg = f"(rank {rank}) {record.msg}"
            return True
        return False


class _Stdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time (pytest's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        handler.addFilter(_RankZero())
        root.addHandler(handler)
        root.setLevel(os.environ.get("GTI_LOG_LEVEL", "INFO").upper())
        root.propagate = False  # a user's root handler would print every line twice
    return root


def get_logger(command: str = "") -> logging.Logger:
    """The logger of one command or part ("ground", "sids", "rows"); its lines read `[gti.<command>] ...`.
    Without a name: the package's own logger, for what belongs to no command (`[gti] ...`)."""
    _configure()
    return logging.getLogger(f"{ROOT}.{command}" if command else ROOT)


def quiet_other_ranks() -> None:
    """Progress bars (tqdm's, `datasets`' map) off in every process but global rank 0, so a DDP run draws each once."""
    if global_rank() != 0:
        os.environ["TQDM_DISABLE"] = "1"  # read by tqdm >= 4.66 when a bar is created
        import datasets

        datasets.disable_progress_bars()
