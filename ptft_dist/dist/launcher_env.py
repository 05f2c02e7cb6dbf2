"""The parent side: what a launcher must carry to ranks it starts on other hosts.

Ranks started by pdsh, OpenMPI or srun on another host get neither this shell's environment nor
its argument quoting. ``write_deepspeed_env`` writes the variables (an allow-list) to the
``.deepspeed_env`` file DeepSpeed's multi-node runners forward; ``encode_argv`` / ``exec_argv``
carry a program line through a remote shell, or a runner that cannot run ``-m``, as one base64
word (``python ptft_dist/dist/__main__.py --exec-b64 WORD``, written by launch.sh).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ptft_dist.fsutil import write_text_atomic
from ptft_dist.log import get_logger

log = get_logger("dist")

# What multi-node deepspeed (pdsh/openmpi/slurm runners) must forward to every rank.
DEEPSPEED_ENV_NAMES = (
    "PATH",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
)
DEEPSPEED_ENV_PREFIXES = ("HF_", "NCCL_", "GLOO_", "TORCH_", "PTFT_")
# Never forwarded: each host has its own devices, and a launcher sets the rank variables itself.
DEEPSPEED_ENV_NEVER = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PTFT_LAUNCHER",
    }
)
DEEPSPEED_ENV_MARKER = "PTFT_DEEPSPEED_ENV_GENERATED"  # marks a .deepspeed_env this module wrote
DEEPSPEED_ENV_USER_KEYS = "PTFT_DEEPSPEED_ENV_USER_KEYS"  # ... and which of its values came from a hand-written file
# pdsh puts each value inside "..." in a remote shell: these characters would be expanded there.
_UNSAFE_ENV_VALUE = re.compile(r'["`$\\\n\r]')

_REPO = str(Path(__file__).resolve().parents[2])


# --------------------------------------------------------------------------- .deepspeed_env


def _venv_bin() -> str | None:
    venv = os.environ.get("VIRTUAL_ENV") or (sys.prefix if sys.prefix != sys.base_prefix else None)
    return str(Path(venv) / "bin") if venv else None


def _prepend_path(value: str, first: str) -> str:
    parts = [p for p in value.split(os.pathsep) if p and p != first]
    return os.pathsep.join([first, *parts])


def deepspeed_env(extra: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables multi-node deepspeed must forward (allow-list), with the venv first on PATH and
    this repository first on PYTHONPATH, so remote ranks run this checkout with this interpreter."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, value in environ.items():
        if key in DEEPSPEED_ENV_NEVER:
            continue
        if key in DEEPSPEED_ENV_NAMES or key.startswith(DEEPSPEED_ENV_PREFIXES):
            out[key] = value
    venv_bin = _venv_bin()
    if venv_bin:
        out["PATH"] = _prepend_path(out.get("PATH", os.defpath), venv_bin)
        out.setdefault("VIRTUAL_ENV", str(Path(venv_bin).parent))
    out["PYTHONPATH"] = _prepend_path(out.get("PYTHONPATH", ""), _REPO)
    out.update(extra or {})
    return out


def write_deepspeed_env(
    path: str | os.PathLike = ".deepspeed_env", extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Write ``KEY=VALUE`` lines (DeepSpeed's ``.deepspeed_env`` format) atomically; returns what was written.

    Values a remote shell would mangle (quotes, ``$``, backslashes, newlines) are left out with a
    warning on stderr: DeepSpeed's pdsh runner pastes them into ``export K="V"``. A file already at
    ``path`` that this function did not write (no ``PTFT_DEEPSPEED_ENV_GENERATED=1`` line) was
    written by hand: its values are kept and win over the environment, now and on every later
    rewrite (their names are listed in ``PTFT_DEEPSPEED_ENV_USER_KEYS``); the rest is regenerated.
    """
    path = Path(path)
    user = _user_values(path)
    values = deepspeed_env({**user, **(extra or {})})
    values[DEEPSPEED_ENV_MARKER] = "1"
    values.pop(DEEPSPEED_ENV_USER_KEYS, None)
    if user:
        values[DEEPSPEED_ENV_USER_KEYS] = ",".join(sorted(user))
    good = _shell_safe(values)
    write_text_atomic(path, "".join(f"{k}={v}\n" for k, v in good.items()))
    return good


def _user_values(path: Path) -> dict[str, str]:
    """The values in ``path`` that the user wrote (never overwritten: docs/design.md, guarantee 9)."""
    if not path.is_file():
        return {}
    lines = [ln.strip() for ln in path.read_text().splitlines() if "=" in ln]
    existing = dict(ln.split("=", 1) for ln in lines)
    if existing.get(DEEPSPEED_ENV_MARKER) == "1":
        user_keys = [k for k in existing.get(DEEPSPEED_ENV_USER_KEYS, "").split(",") if k]
    else:  # written by hand: every value in it is the user's
        user_keys = [k for k in existing if k not in (DEEPSPEED_ENV_MARKER, DEEPSPEED_ENV_USER_KEYS)]
        log.info("keeping the %d variables already in %s", len(user_keys), path)
    return {k: existing[k] for k in user_keys if k in existing}


def _shell_safe(values: Mapping[str, str]) -> dict[str, str]:
    """The entries that survive ``export K="V"`` in a remote shell, sorted by name."""
    good: dict[str, str] = {}
    for key in sorted(values):
        value = values[key]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or _UNSAFE_ENV_VALUE.search(value):
            log.warning("not forwarding %s (its value cannot pass a remote shell)", key)
            continue
        good[key] = value.strip()
    return good


# --------------------------------------------------------------------------- the --exec-b64 shim


def encode_argv(argv: Sequence[str]) -> str:
    """The ``--exec-b64`` payload for ``argv``: one word no shell or launcher splits or expands."""
    return base64.urlsafe_b64encode(json.dumps(list(argv)).encode()).decode()


def decode_argv(payload: str) -> list[str]:
    return json.loads(base64.urlsafe_b64decode(payload.encode()))


def exec_argv(argv: Sequence[str]) -> int:
    """Run ``[-m MODULE | SCRIPT.py | EXECUTABLE] ARGS`` in this process (or exec it), as
    ``python -m MODULE ARGS`` / ``python SCRIPT.py ARGS`` / ``EXECUTABLE ARGS`` would."""
    import runpy

    argv = list(argv)
    if _REPO not in sys.path:
        sys.path.insert(0, _REPO)
    if argv[:1] == ["-m"] and len(argv) >= 2:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    if argv and argv[0].endswith(".py"):
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")
        return 0
    if not argv:
        raise SystemExit("ptft dist: --exec-b64: empty command")
    os.execvp(argv[0], argv)
    return 127  # not reached
