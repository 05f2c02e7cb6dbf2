"""Where a run's numbers go: TensorBoard event files and ``metrics.jsonl`` (rank 0), and the
per-rank log of which samples each step used.

Both sinks are flushed after every record, so a killed run keeps everything it logged; on resume
the records of the steps about to be redone are dropped, so a resumed run's files read like one
uninterrupted run (docs/design.md, guarantee 6).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ptft_dist.fsutil import write_text_atomic


class MetricsLogger:
    """TensorBoard event files (``run_dir/tb``) and ``run_dir/metrics.jsonl``; a no-op unless enabled.

    Enable it on rank 0 only. Every :meth:`log` call is one JSON line
    ``{"step": ..., "split": ..., "time": <unix s>, <metrics>}`` and one scalar per metric tagged
    ``<split>/<name>``; both are flushed at once, so a killed run keeps everything it logged.
    Non-finite values are written as JSON ``NaN``/``Infinity`` (Python's json reads them).

    On resume call :meth:`resume_from` (before logging) with the checkpoint's step: JSONL lines
    of later steps -- which the resumed run is about to redo -- are dropped, and TensorBoard is
    told to purge its events after that step (``SummaryWriter(purge_step=...)``).
    """

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._writer: Any = None
        self._jsonl: Any = None
        self._purge_step: int | None = None

    # -- lazily opened sinks (nothing is created until something is logged)

    def _tb(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import; rank 0 only

            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._purge_step)
        return self._writer

    def _file(self) -> Any:
        if self._jsonl is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
        return self._jsonl

    def resume_from(self, step: int) -> None:
        """Forget what was logged after ``step`` (the resumed run logs those steps again)."""
        if not self.enabled:
            return
        self.close()
        self._purge_step = step + 1
        if self.jsonl_path.exists():
            kept = [line for line in self.jsonl_path.read_text(encoding="utf-8").splitlines()
                    if (s := _step_of(line)) is not None and s <= step]
            write_text_atomic(self.jsonl_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        """One record of scalars; tensors and numpy scalars are converted, None values skipped."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items() if v is not None}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        f = self._file()
        f.write(json.dumps(record) + "\n")
        f.flush()
        writer = self._tb()
        for name, value in values.items():
            writer.add_scalar(f"{split}/{name}", value, global_step=int(step))
        writer.flush()

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """Text shown in TensorBoard's Text tab (resolved config YAML, hparams); rendered as code."""
        if not self.enabled:
            return
        writer = self._tb()
        writer.add_text(tag, "```\n" + text + "\n```", global_step=step)
        writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _step_of(line: str) -> int | None:
    """The step of one JSONL record; None for a line cut short by a kill (or not a record)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    return float(value)


class SampleIdLog:
    """``RUN_DIR/sample_ids/rank{R}.jsonl``: which global samples each step used, per rank.

    For debugging data order: the ids of all ranks for one step are that step's global batch, and a
    resumed run must repeat the uninterrupted run's ids (docs/design.md, guarantees 1 and 2). A
    resumed run appends; readers take the last record of a step."""

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        folder = Path(run_dir) / "sample_ids"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank{rank}.jsonl", "a")  # noqa: SIM115 - open for the run

    def write(self, step: int, ids: list[int]) -> None:
        self.file.write(f'{{"step": {step}, "ids": {ids}}}\n')
        self.file.flush()
