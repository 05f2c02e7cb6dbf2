"""Run several ``ptft`` command lines through the real entry point (``ptft_dist.cli.main``) in ONE
process, each with its own log file: the heavy imports (torch, DeepSpeed, transformers; ~15 s on
2 busy cores) are paid once instead of per command, which keeps a test that walks every shipped
config affordable.

    python -m tests.cli_batch RUNS.json RESULTS.json

RUNS.json: ``{"name": ["pretrain", "-c", ...], ...}``. For each run, file descriptors 1 and 2 are
pointed at ``<RESULTS dir>/<name>.log`` (Python logging and C++ output alike), then ``main(argv)``
runs; RESULTS.json maps each name to ``{"rc": exit status, "seconds": wall time}``. An exception
that escapes ``main`` is logged with its traceback and recorded as rc 1; later runs still go.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def _run_one(argv: list[str], log: Path) -> int:
    from ptft_dist.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        return int(main(argv) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception:  # recorded, so that the remaining runs still go
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def main(runs_file: str, results_file: str) -> int:
    runs = json.loads(Path(runs_file).read_text())
    out = Path(results_file)
    results = {}
    for name, argv in runs.items():
        t0 = time.perf_counter()
        rc = _run_one(argv, out.parent / f"{name}.log")
        results[name] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"cli_batch: {name}: exit {rc} in {results[name]['seconds']} s", file=sys.stderr, flush=True)
        out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
