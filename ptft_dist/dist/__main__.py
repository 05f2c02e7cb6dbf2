"""``python -m ptft_dist.dist``: check a distributed setup, and the helpers launch.sh calls.

Also runs as a file, ``python ptft_dist/dist/__main__.py``, for launchers that cannot run ``-m``
(DeepSpeed's slurm runner) and for launch.sh. Modes:

    --selftest               every rank inits the process group and prints one JSON line with the
                             all-reduced sum of rank+1 (does the launcher + network work?)
    --discover               this rank's DistEnv as JSON (no connection)
    --hostnames NODELIST     a SLURM node list, one name a line
    --gpus-per-node          GPUs per node of the SLURM allocation (nothing when none)
    --write-deepspeed-env [PATH] [--set KEY=VALUE ...]
    --encode-argv ARGS...    the --exec-b64 word for ARGS
    --forward-env            NUL-separated KEY=VALUE of what remote ranks need (mpirun -x)
    --exec-b64 WORD          run the program line WORD encodes

Known failures print one ``ptft dist: error: ...`` line and exit 2 (no traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the checkout importable, and not this folder's modules
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
import os

from ptft_dist.dist.discover import discover
from ptft_dist.dist.launcher_env import decode_argv, deepspeed_env, encode_argv, exec_argv, write_deepspeed_env
from ptft_dist.dist.layout import DistError, LayoutError
from ptft_dist.dist.rendezvous import device_for, init_distributed
from ptft_dist.dist.slurm import slurm_gpus_per_node, slurm_hostnames
from ptft_dist.log import get_logger

log = get_logger("dist")


def _selftest(args: argparse.Namespace) -> int:
    env = discover()
    init_distributed(env, backend=args.backend, timeout_s=args.timeout)
    import torch
    import torch.distributed as tdist

    backend = tdist.get_backend() if tdist.is_initialized() else "none"
    device = device_for(env) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(env.rank + 1)], device=device)
    if tdist.is_initialized():
        tdist.all_reduce(t)
    result = {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "local_world_size": env.local_world_size,
        "node_rank": env.node_rank,
        "sum": int(t.item()),
        "host": env.host,
        "backend": backend,
        "launcher": env.launcher,
        "master": f"{env.master_addr}:{env.master_port}",
    }
    if args.echo is not None:
        result["echo"] = args.echo
    sys.stdout.write(json.dumps(result) + "\n")  # one write: ranks sharing a pipe do not interleave within it
    sys.stdout.flush()
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    return 0


def _hostnames(nodelist: str) -> int:
    names = slurm_hostnames(nodelist)
    if not names:
        raise LayoutError(f"empty SLURM node list {nodelist!r}")
    print("\n".join(names))
    return 0


def _gpus_per_node() -> int:
    gpus = slurm_gpus_per_node()
    if gpus:  # 0 (a CPU-only job) prints nothing, like no GPUs at all: launch.sh then picks no task count
        print(gpus)
    return 0


def _write_deepspeed_env(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    extra = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        extra[k] = v
    written = write_deepspeed_env(args.write_deepspeed_env, extra)
    log.info("wrote %d variables to %s", len(written), args.write_deepspeed_env)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ptft_dist.dist", description="Distributed setup: who am I, and does it work?"
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--selftest",
        action="store_true",
        help="init the process group, all_reduce rank+1, print one JSON line per rank",
    )
    mode.add_argument("--discover", action="store_true", help="print this rank's DistEnv as JSON (no connection)")
    mode.add_argument("--hostnames", metavar="NODELIST", help="expand a SLURM node list, one name a line")
    mode.add_argument(
        "--gpus-per-node", action="store_true", help="GPUs per node of the SLURM allocation (nothing when none)"
    )
    mode.add_argument(
        "--forward-env",
        action="store_true",
        help="NUL-separated KEY=VALUE a remote rank needs (the .deepspeed_env allow-list; launch.sh mpirun -x)",
    )
    mode.add_argument(
        "--write-deepspeed-env",
        nargs="?",
        const=".deepspeed_env",
        metavar="PATH",
        help="write the variables multi-node deepspeed forwards (default .deepspeed_env)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra variable for --write-deepspeed-env"
    )
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    p.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("PTFT_INIT_TIMEOUT", "60")),
        help="preflight timeout in seconds (default $PTFT_INIT_TIMEOUT or 60)",
    )
    p.add_argument(
        "--echo", default=None, metavar="TEXT", help="--selftest: copy TEXT into the JSON (argument quoting check)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # before argparse: the program line after these may look like this command's own options
    if argv[:1] == ["--exec-b64"]:
        if len(argv) != 2:
            print("ptft dist: --exec-b64 takes exactly one argument", file=sys.stderr)
            return 2
        return exec_argv(decode_argv(argv[1]))
    if argv[:1] == ["--encode-argv"]:
        print(encode_argv(argv[1:]))
        return 0
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.selftest:
            return _selftest(args)
        if args.hostnames is not None:
            return _hostnames(args.hostnames)
        if args.gpus_per_node:
            return _gpus_per_node()
        if args.discover:
            print(json.dumps(discover().to_dict()), flush=True)
            return 0
        if args.forward_env:
            sys.stdout.write("".join(f"{k}={v}\0" for k, v in sorted(deepspeed_env().items())))
            return 0
        return _write_deepspeed_env(args, parser)
    except DistError as exc:
        # the command's final word, alike on every rank: a plain line, not a rank-prefixed log record
        print(f"ptft dist: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
