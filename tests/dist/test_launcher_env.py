"""ptft_dist.dist.launcher_env: the .deepspeed_env allow-list and merge, and the --exec-b64 shim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ptft_dist.dist.launcher_env import DEEPSPEED_ENV_USER_KEYS, encode_argv, write_deepspeed_env

REPO = Path(__file__).resolve().parents[2]


def test_write_deepspeed_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", "/data/hf")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("PTFT_CACHE", "/c")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/ext")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("SOME_SECRET", "x")
    monkeypatch.setenv("PTFT_WEIRD", 'a"b')
    path = tmp_path / ".deepspeed_env"
    written = write_deepspeed_env(path, extra={"PTFT_EXTRA": "1"})
    lines = path.read_text().splitlines()
    assert all("=" in ln for ln in lines) and lines == sorted(lines)
    got = dict(ln.split("=", 1) for ln in lines)
    assert got == written
    for key, value in {
        "HF_HOME": "/data/hf",
        "NCCL_DEBUG": "INFO",
        "GLOO_SOCKET_IFNAME": "eth0",
        "PTFT_CACHE": "/c",
        "OMP_NUM_THREADS": "4",
        "TORCH_EXTENSIONS_DIR": "/ext",
        "PTFT_EXTRA": "1",
    }.items():
        assert got[key] == value
    assert "CUDA_VISIBLE_DEVICES" not in got and "SOME_SECRET" not in got and "PTFT_WEIRD" not in got
    assert "not forwarding PTFT_WEIRD" in capsys.readouterr().err
    assert got["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    if sys.prefix != sys.base_prefix:
        assert got["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")

    # a hand-written file is merged, its values winning, and they stay the user's on later rewrites
    path.write_text("HF_HOME=/mine\nMY_VAR=1\n")
    got = write_deepspeed_env(path)
    assert got["HF_HOME"] == "/mine" and got["MY_VAR"] == "1"
    monkeypatch.setenv("HF_HOME", "/new")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    got = write_deepspeed_env(path)
    assert (got["HF_HOME"], got["MY_VAR"], got["NCCL_DEBUG"]) == ("/mine", "1", "WARN")
    assert got[DEEPSPEED_ENV_USER_KEYS] == "HF_HOME,MY_VAR"


def test_exec_shim_keeps_arguments_intact(tmp_path):
    script = tmp_path / "argv.py"
    script.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    weird = ["a b", "it's", 'say "hi"', "$HOME", "back\\slash", "", "--flag=x y"]
    for argv in ([str(script), *weird], [sys.executable, str(script), *weird]):
        proc = subprocess.run(
            [sys.executable, str(REPO / "ptft_dist" / "dist" / "__main__.py"), "--exec-b64", encode_argv(argv)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == weird
