"""SLURM's own syntax and tools: host lists, tasks-per-node counts, ``scontrol``, node addresses, GPUs.

Used by ``discover.py`` (a rank inside an ``srun`` step) and, through ``python -m ptft_dist.dist``
and ``slurm/pretrain.sbatch``, by the shell side (launch.sh writing a deepspeed hostfile, one srun
task per GPU), so the batch script and the ranks expand a node list the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence

from ptft_dist.dist.layout import LayoutError


def expand_hostlist(spec: str) -> list[str]:
    """SLURM host list syntax -> names: ``n[1-3,7],gpu[01-02]-a`` -> n1 n2 n3 n7 gpu01-a gpu02-a."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    out: list[str] = []
    for item in (s.strip() for s in items):
        if item:
            out.extend(_expand_one(item))
    return out


def _expand_one(item: str) -> list[str]:
    lb = item.find("[")
    if lb < 0:
        return [item]
    rb = item.find("]", lb)
    if rb < 0:
        raise LayoutError(f"malformed SLURM host list entry {item!r}")
    head, body, tail = item[:lb], item[lb + 1 : rb], item[rb + 1 :]
    values: list[str] = []
    for part in body.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise LayoutError(f"malformed SLURM host list range {part!r} in {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        values.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
    return [head + v + rest for v in values for rest in _expand_one(tail)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` syntax -> per node counts: ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LayoutError(f"malformed SLURM tasks-per-node value {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _scontrol(args: Sequence[str], environ: Mapping[str, str]) -> str | None:
    exe = shutil.which("scontrol", path=environ.get("PATH", os.defpath))
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=10, env=dict(environ), stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def slurm_hostnames(nodelist: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Expand a SLURM node list with ``scontrol show hostnames`` (the authority), else in Python."""
    environ = os.environ if environ is None else environ
    out = _scontrol(["show", "hostnames", nodelist], environ)
    if out is not None:
        names = out.split()
        if names:
            return names
    return expand_hostlist(nodelist)


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        return True
    except (socket.gaierror, UnicodeError, OSError):
        return False


def slurm_node_address(name: str, environ: Mapping[str, str] | None = None) -> str:
    """How other nodes reach node ``name``: the name when it resolves, else its SLURM ``NodeAddr``."""
    environ = os.environ if environ is None else environ
    if _resolves(name):
        return name
    out = _scontrol(["show", "node", "-o", name], environ)
    if out:
        m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out)
        if m and m.group(1) not in ("(null)", ""):
            return m.group(1)
    return name


def slurm_gpus_per_node(environ: Mapping[str, str] | None = None) -> int | None:
    """GPUs per node of the SLURM allocation (``SLURM_GPUS_ON_NODE``, else the first count in
    ``SLURM_GPUS_PER_NODE`` such as ``a100:4``), or None. launch.sh asks for it too (one task per
    GPU), through ``python ptft_dist/dist/__main__.py --gpus-per-node``, so both read it alike."""
    environ = os.environ if environ is None else environ
    value = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if not value:
        spec = environ.get("SLURM_GPUS_PER_NODE", "").strip()
        if not spec:
            return None
        value = spec.split(",")[0].split(":")[-1]
        value = re.sub(r"\(.*\)$", "", value)
    try:
        return int(value)
    except ValueError:
        return None
