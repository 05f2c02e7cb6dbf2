"""One measured run of the real pretraining path, for the planner's checks (tests/plan/).

Every rank (under the ``deepspeed`` launcher, or alone) builds :class:`ptft_dist.pretrain.loop.Trainer`
from a config -- the objects ``ptft pretrain`` builds: model, engine (ZeRO template of the stage),
streaming loader -- and takes ``--steps`` optimizer steps with ``Trainer.train_step``. It records:

* memory: resident set size (``VmRSS``) before the Trainer exists (imports done: the baseline), and
  the process's peak (``VmHWM``) after building and after the steps;
* communication: DeepSpeed's comms logger (``comms_logger`` in the DeepSpeed JSON), reset after the
  warm-up steps, so its totals cover the timed steps only: ``{op: {"bytes": .., "count": ..}}``;
* time: wall time of every step (the first ``--warmup`` are not timed).

and writes ``OUT/rank<R>.json``. ``--pause-file PREFIX``: before timing phase k (k = 0, 1, ...) every
rank writes ``PREFIX.k.ready.<rank>`` and waits for ``PREFIX.k.go`` (the test changes the link rate
between phases); ``--phases N`` phases of ``--steps`` steps each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def _comms_totals() -> dict:
    from deepspeed.comm.comm import comms_logger

    out: dict = {}
    for name, sizes in comms_logger.comms_dict.items():
        rec = out.setdefault(name, {"bytes": 0, "count": 0})
        for size, vals in sizes.items():
            rec["bytes"] += int(size) * int(vals[0])
            rec["count"] += int(vals[0])
    return out


def _wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def _trace_one_step(trainer, batches) -> list:
    """(call, VmRSS, VmHWM) after each engine call of one more step: where the peak happens."""
    rows = []
    engine = trainer.engine
    for name in ("forward", "backward", "step"):
        inner = getattr(engine, name)

        def wrapped(*a, _inner=inner, _name=name, **k):
            out = _inner(*a, **k)
            rows.append((_name, round(_status_mb("VmRSS"), 1), round(_status_mb("VmHWM"), 1)))
            return out

        setattr(engine, name, wrapped)
    trainer.train_step(batches)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--phases", type=int, default=1)
    ap.add_argument("--pause-file", default=None)
    ap.add_argument("--trace", action="store_true", help="one more step, RSS/HWM after each engine call")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import deepspeed  # noqa: F401 - imported before the baseline: its import is not the run's memory
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401

    from ptft_dist.config import load_config
    from ptft_dist.pretrain.loop import Trainer

    cfg = load_config(args.config, args.overrides)
    baseline = _status_mb("VmRSS")
    trainer = Trainer(cfg)
    rank = trainer.env.rank
    built_hwm = _status_mb("VmHWM")
    batches = trainer.train_loader.forever()
    for _ in range(args.warmup):
        trainer.train_step(batches)
    from deepspeed.comm.comm import comms_logger

    comms_logger.reset_data()
    phases = []
    for k in range(args.phases):
        if args.pause_file:
            if dist.is_initialized():
                dist.barrier()
            Path(f"{args.pause_file}.{k}.ready.{rank}").write_text("")
            _wait_for(Path(f"{args.pause_file}.{k}.go"))
            if dist.is_initialized():
                dist.barrier()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainer.train_step(batches)
            times.append(time.perf_counter() - t0)
        phases.append(times)
    comms = _comms_totals()
    trace = _trace_one_step(trainer, batches) if args.trace else []
    rec = {
        "rank": rank, "world_size": trainer.env.world_size, "host": trainer.env.host,
        "zero_stage": trainer.cfg.train.zero_stage, "steps": args.steps * args.phases,
        "rss_baseline_mb": baseline, "hwm_after_build_mb": built_hwm, "hwm_mb": _status_mb("VmHWM"),
        "rss_end_mb": _status_mb("VmRSS"), "phases_s": phases, "comms": comms,
        "threads": torch.get_num_threads(), "seq_len": cfg.data.max_seq_len, "trace": trace,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
