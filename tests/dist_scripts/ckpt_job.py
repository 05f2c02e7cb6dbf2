"""A miniature pretraining loop using Engine + CheckpointManager + PreemptionHandler exactly as
the real loop should (launched by tests/checkpoint/test_checkpoint.py; every rank runs it).

Fault injection (by the test, never by the library):
  --fail-step N   on rank 1, every file write of checkpoint step_N fails with ENOSPC after a few bytes
  --hang-step N   the first file write of checkpoint step_N writes a few bytes, then hangs (the test
                  kill -9s the process)
Results: OUT/result_rank{r}.json (what happened), OUT/progress_rank{r} (last finished step).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

from ptft_dist.checkpoint.manager import CheckpointError, CheckpointManager, restore_rng
from ptft_dist.checkpoint.preemption import PreemptionHandler, exit_for_requeue
from ptft_dist.config import CheckpointConfig, OptimConfig, TrainConfig
from ptft_dist.engine import build_engine
from tests.dist_scripts.common import batch, dump, lr_lambda, tiny_bert


def install_faults(rank: int, fail_step: int, hang_step: int, out: Path) -> None:
    real_save = torch.save

    def faulty_save(obj, f, *a, **kw):
        path = str(f)
        if fail_step and rank == 1 and f"step_{fail_step}{os.sep}" in path:
            with open(path, "wb") as fh:
                fh.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        if hang_step and f"step_{hang_step}{os.sep}" in path:
            with open(path, "wb") as fh:
                fh.write(b"PK\x03\x04partial")
                fh.flush()
            (out / f"hanging_rank{rank}").write_text(path)
            time.sleep(3600)
        return real_save(obj, f, *a, **kw)

    torch.save = faulty_save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--fail-step", type=int, default=0)
    ap.add_argument("--hang-step", type=int, default=0)
    args, _ = ap.parse_known_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    install_faults(rank, args.fail_step, args.hang_step, out)
    res: dict = {"rank": rank, "pid": os.getpid(), "save_errors": [], "saved": []}

    # --- the loop's call order -------------------------------------------------------------
    tc = TrainConfig(zero_stage=args.stage, micro_batch_size=2, grad_accum=1, max_steps=args.max_steps)
    cc = CheckpointConfig(every=args.every, keep_last=args.keep, resume="auto", requeue_exit_code=124)
    engine = build_engine(tiny_bert(0), tc, OptimConfig(lr=1e-3), lr_lambda, world, torch.device("cpu"))
    ckpt = CheckpointManager(args.run_dir, cc, rank, world)
    start = 0
    resume = ckpt.resolve_resume()  # auto: latest (stale dirs of an interrupted save removed)
    if resume is not None:
        client = ckpt.load(engine, resume)
        restore_rng(client)
        start = client["data"]["consumed_steps"]
        res["resumed_from"] = resume.name
        res["resumed_client"] = {k: v for k, v in client.items() if k != "rng"}
    res["start"] = start

    def state(step: int) -> dict:
        return {"data": {"epoch": 0, "consumed_steps": step}, "config_hash": "abc", "tokenizer_hash": "def"}

    def loss_at(step: int) -> float:
        with torch.no_grad():
            return float(engine.forward(**batch(step, rank, 0, mb=2)).loss)

    res["first_loss"] = loss_at(start)  # what the step after the checkpoint sees (dropout is 0)
    with PreemptionHandler() as pre:
        step = start
        while step < args.max_steps:
            out_ = engine.forward(**batch(step, rank, 0, mb=2))
            engine.backward(out_.loss)
            engine.step()
            step += 1
            (out / f"progress_rank{rank}").write_text(str(step))
            if pre.should_stop():  # collective, every step, every rank
                ckpt.save(engine, step, state(step))
                res.update(stopped_at=step, got_signal=pre.received, latest=ckpt.latest_tag(),
                           next_loss=loss_at(step))
                dump(out / f"result_rank{rank}.json", res)
                exit_for_requeue(cc)
            if ckpt.should_save(step):
                try:
                    ckpt.save(engine, step, state(step))
                    res["saved"].append(step)
                except CheckpointError as exc:
                    res["save_errors"].append({"step": step, "error": str(exc), "latest": ckpt.latest_tag(),
                                               "dir_exists": ckpt.path_for(step).exists()})
            if args.sleep:
                time.sleep(args.sleep)
        ckpt.save(engine, step, state(step))
    res.update(finished_at=step, latest=ckpt.latest_tag(),
               kept=[p.name for _, p in ckpt.checkpoints()])
    dump(out / f"result_rank{rank}.json", res)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
