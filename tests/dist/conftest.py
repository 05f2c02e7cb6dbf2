"""Fixtures for tests/dist: a fake ``scontrol`` on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


@pytest.fixture
def fake_scontrol(tmp_path: Path) -> str:
    """A PATH whose ``scontrol`` knows nodes nx1/nx2 (NodeAddr 127.0.0.1/127.0.0.2) and expands lists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "scontrol"
    exe.write_text(
        "#!/bin/bash\n"
        "if [[ $1 == show && $2 == hostnames ]]; then echo nx1; echo nx2; exit 0; fi\n"
        'if [[ $1 == show && $2 == node ]]; then n=${4:-$3}; echo "NodeName=$n Arch=x86_64 '
        'NodeAddr=127.0.0.${n#nx} NodeHostName=box State=IDLE"; exit 0; fi\n'
        "exit 1\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
