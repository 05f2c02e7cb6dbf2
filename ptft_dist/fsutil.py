"""Files that are whole or absent: the one implementation of atomic writes, fsync, safe removal.

Every stage promises that a crash never leaves a complete-looking half file where a later stage
would trust it (docs/design.md, guarantee 5 and 7). These helpers are how: write beside the
target, fsync, rename over it, fsync the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where the filesystem refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str | os.PathLike) -> Path:
    """A hidden sibling name, unique per process and call."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Readers see the old file or the whole new one, never a part; durable once it returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:  # not mkstemp: that would make the file 0600 regardless of umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    for cast in (float, str):  # numpy scalars and tensors as numbers, anything else by name
        try:
            return cast(obj)
        except (TypeError, ValueError):
            continue
    return repr(obj)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_tree(path: str | os.PathLike) -> None:
    """Rename first (atomic), then delete: a crash mid-delete never leaves a half directory under
    the name a reader would trust."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """``tmp`` (a finished directory) becomes ``out``; an existing ``out`` is moved aside first and
    removed after, and put back if the rename fails."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    moved = out.exists()
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        out.replace(old)
    try:
        tmp.replace(out)
    except OSError:
        if moved:
            old.replace(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def is_within(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """``inner`` is ``outer`` or lies below it (after resolving links); for refusing outputs that
    would overwrite an input (docs/design.md, guarantee 9)."""
    a, b = Path(inner).resolve(), Path(outer).resolve()
    return a == b or b in a.parents


# --------------------------------------------------------------------------- interrupted writers

# the hidden siblings the helpers above (and the stages' own export code) create beside ``name``:
# temp_name's ".NAME.tmp-PID-HEX" (and ".NAME.tmp-PID"), replace_dir's ".NAME.old-PID",
# remove_tree's ".trash-NAME-PID-NS"
_LEFTOVER_RE = r"^(?:\.{name}\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?|\.trash-{name}-(?P<tpid>\d+)-\d+)$"


def pid_alive(pid: int) -> bool:
    """A process with this id runs on this host (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove what a writer of ``path`` killed without a chance to clean up (kill -9, OOM, node
    loss) left beside it: temporary and trash directories of processes no longer running on this
    host. A ``.old`` copy (replace_dir moved ``path`` aside and died before the rename) is put back
    when ``path`` itself is missing. A process id alive here is never touched (it may be another
    writer, or a reused id: erring towards keeping). Returns what was removed."""
    import re

    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(_LEFTOVER_RE.format(name=re.escape(path.name)))
    removed = []
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if not m or pid_alive(int(m.group("pid") or m.group("tpid"))):
            continue
        if m.group("kind") == "old" and not path.exists():
            os.replace(entry, path)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class Terminated(SystemExit):
    """SIGTERM/SIGHUP turned into an exception, so ``finally`` blocks that remove temporary files
    run (the default action ends the process at once); exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def exit_on_signal(what: str) -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise :class:`Terminated` (main thread only; elsewhere a no-op),
    and one stderr line says that ``what`` was stopped; the previous handlers come back after."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except Terminated as exc:
        print(f"ptft: {what} stopped by {signal.Signals(exc.signum).name}; its unfinished output was removed",
              file=sys.stderr)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
