"""Build DeepSpeed's JIT ops once, before any test or run starts several ranks at a time.

DeepSpeed compiles ``deepspeed_shm_comm`` (CPU collectives), ``fused_adam`` and ``cpu_adam`` on
first use into ``TORCH_EXTENSIONS_DIR``. Two ranks racing to build, or a build killed half-way,
leave a stale lock that makes every later run hang at init: building here, alone, avoids both.
"""

import os
import time

os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29517")

import deepspeed
import torch


def remove_stale_locks() -> None:
    """A lock left by a killed build makes every later build wait forever. Nothing else may be
    building while this script runs (it runs first, alone), so any lock here is stale."""
    from pathlib import Path

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    for lock in root.glob("*/lock"):
        print(f"build_ds_ops: removing stale build lock {lock}")
        lock.unlink()


def main() -> None:
    remove_stale_locks()
    t0 = time.time()
    for offload in (False, True):
        model = torch.nn.Linear(8, 8)
        config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                  "zero_optimization": {"stage": 2 if offload else 1}}
        if offload:
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        loss = engine(torch.ones(1, 8)).sum()
        engine.backward(loss)
        engine.step()
    from ptft_dist.engine.deepspeed import release_shm_names

    release_shm_names()  # DeepSpeed never unlinks its 67 MB CPU all-reduce segment
    print(f"build_ds_ops: DeepSpeed ops ready in {os.environ.get('TORCH_EXTENSIONS_DIR', '~/.cache')} "
          f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
