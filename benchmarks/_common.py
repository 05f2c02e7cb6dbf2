"""Shared helpers of the benchmark scripts (not a benchmark itself).

* a synthetic corpus in the real shard format (BERT-like sentence/document lengths, Zipf tokens,
  a real WordPiece ``tokenizer/``), written in seconds, any vocabulary size;
* the environment every measured subprocess gets (same threads for ptft and its peer);
* launching ``ptft`` (one process, or N ranks under the ``deepspeed`` launcher) and reading its
  ``metrics.jsonl``;
* a machine description (CPU model, cores, RAM, versions, load average) for every report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
SPECIAL = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}  # BERT's uncased vocab layout


# --------------------------------------------------------------------------- corpus


def _write_tokenizer(tok_dir: Path, vocab_size: int) -> None:
    """A real (loadable) WordPiece tokenizer over a synthetic vocabulary; vocab.txt beside it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = [f"[unused{i}]" for i in range(vocab_size)]
    for name, i in SPECIAL.items():
        vocab[i] = f"[{name.upper()}]"
    for i in range(1000, vocab_size):
        vocab[i] = f"##w{i}" if i % 5 == 0 else f"w{i}"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerFast",
                                                               "do_lower_case": False}))


def _shard_arrays(rng: np.random.Generator, tokens: int, vocab_size: int, shard_no: int):
    from ptft_dist.corpus import format as sh

    n_sent = max(4, tokens // 28)
    sent_len = np.clip(rng.normal(28, 12, n_sent), 6, 60).astype(np.int64)
    doc_sizes, left = [], n_sent
    while left > 0:
        k = int(min(left, rng.integers(3, 60)))
        doc_sizes.append(k)
        left -= k
    doc_off = np.concatenate([[0], np.cumsum(doc_sizes)])
    sent_off = np.concatenate([[0], np.cumsum(sent_len)])
    z = rng.zipf(1.3, int(sent_off[-1]))
    toks = (1000 + (z - 1) % (vocab_size - 1000)).astype(np.int64)
    return sh.ShardData(doc_off, sent_off, np.arange(len(doc_sizes), dtype=np.uint64) + (shard_no << 32), toks)


def write_synthetic_corpus(root: Path, n_shards: int = 4, tokens_per_shard: int = 500_000, vocab_size: int = 30522,
                           val_tokens: int = 20_000, seed: int = 0) -> Path:
    """A corpus directory ``ptft pretrain`` reads: Zipf-distributed token ids, sentences of ~6..60
    tokens, documents of 3..60 sentences, ``n_shards`` train shards and one validation shard."""
    from ptft_dist.corpus import format as sh

    if vocab_size < 1100:
        raise ValueError("vocab_size must be >= 1100 (ids below 1000 are special/unused)")
    root = Path(root)
    rng = np.random.default_rng(seed)
    _write_tokenizer(root / sh.TOKENIZER_DIR, vocab_size)
    splits: dict[str, list] = {}
    for split, sizes in (("train", [tokens_per_shard] * n_shards), ("validation", [val_tokens])):
        (root / split).mkdir(parents=True, exist_ok=True)
        infos = []
        for s, n_tok in enumerate(sizes):
            data = _shard_arrays(rng, n_tok, vocab_size, s + (1000 if split == "validation" else 0))
            blob = sh.encode_shard(arrays=data, vocab_size=vocab_size)
            rel = f"{split}/shard-{s:05d}.bin"
            (root / rel).write_bytes(blob)
            infos.append(asdict(sh.ShardInfo(rel, len(blob), hashlib.sha256(blob).hexdigest(), data.num_docs,
                                             data.num_sentences, data.num_tokens)))
        splits[split] = infos
    manifest = sh.Manifest(
        format_version=sh.FORMAT_VERSION, tokenizer_hash=sh.tokenizer_hash(root / sh.TOKENIZER_DIR),
        vocab_size=vocab_size, token_dtype=sh.token_dtype(vocab_size).name, special_tokens=dict(SPECIAL),
        splits=splits, created_by="benchmarks/_common.py",
    )
    sh.write_manifest(root, manifest)
    return root


def replicate_train_shards(src: Path, dst: Path, copies: int) -> Path:
    """A corpus whose train split is ``copies`` hard links of ``src``'s first train shard (same
    bytes, same checksum, no extra disk): an epoch of tens of millions of samples in seconds. The
    tokenizer and the validation split are copied from ``src``."""
    import shutil

    from ptft_dist.corpus import format as sh

    src, dst = Path(src), Path(dst)
    manifest = sh.load_manifest(src)
    base = manifest.splits["train"][0]
    shutil.copytree(src / sh.TOKENIZER_DIR, dst / sh.TOKENIZER_DIR)
    for info in manifest.splits["validation"]:
        (dst / info["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / info["path"], dst / info["path"])
    (dst / "train").mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(copies):
        rel = f"train/shard-{i:05d}.bin"
        os.link(src / base["path"], dst / rel)
        shards.append({**base, "path": rel})
    manifest.splits = {**manifest.splits, "train": shards}
    manifest.created_by = "benchmarks/_common.py (replicated shards)"
    sh.write_manifest(dst, manifest)
    return dst


# --------------------------------------------------------------------------- processes


def bench_env(threads: Optional[int] = None, **extra: str) -> dict[str, str]:
    """The environment of every measured subprocess (ptft and its peer get the same one)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def free_port() -> int:
    from ptft_dist.dist.discover import free_port as _free_port

    return _free_port("127.0.0.1")


def ptft_command(subcommand: str, args: list[str], nproc: int = 1) -> list[str]:
    """``ptft SUBCOMMAND ARGS`` as one process, or ``nproc`` ranks under the deepspeed launcher."""
    if nproc == 1:
        return [PY, "-m", "ptft_dist.cli", subcommand, *args]
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()),
            str(ROOT / "ptft_dist" / "cli.py"), subcommand, *args]


class BenchError(RuntimeError):
    """A measured subprocess failed; the message holds the tail of its output."""


def run_checked(cmd: list[str], env: dict, timeout: float, log: Optional[Path] = None,
                stamp_lines: bool = False) -> dict[str, Any]:
    """Run ``cmd``; raise :class:`BenchError` with its output tail if it fails.

    Returns ``t_start`` (unix time just before the fork), ``t_end``, ``wall_s``, ``output`` and, with
    ``stamp_lines``, ``lines``: [(unix time the line arrived, line)] of stdout+stderr.
    ``max_rss_mb``: the peak resident set of the process itself (``wait4``; not its children).
    """
    lines: list[tuple[float, str]] = []
    t_start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)  # its own process group: a timeout ends all ranks

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    rusage = None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rusage = ru
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.05)
    reader.join(timeout=10)
    t_end = time.time()
    output = "\n".join(line for _, line in lines)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output + "\n")
    if proc.returncode != 0:
        why = "timed out" if rusage is None else f"exit status {proc.returncode}"
        raise BenchError(f"{' '.join(map(str, cmd[:6]))} ...: {why}\n{output[-4000:]}")
    out: dict[str, Any] = {"t_start": t_start, "t_end": t_end, "wall_s": t_end - t_start, "output": output,
                           "max_rss_mb": rusage.ru_maxrss / 1024.0 if rusage else None}
    if stamp_lines:
        out["lines"] = lines
    return out


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    """The run's ``metrics.jsonl`` records of one split, in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("split") == split:
            out.append(rec)
    return out


def last_json(text: str) -> dict:
    """The last JSON object in ``text`` that starts a line (a benchmark's report; log lines around it are skipped)."""
    decoder = json.JSONDecoder()
    starts = [0] if text.startswith("{") else []
    starts += [i + 1 for i in range(len(text) - 1) if text[i] == "\n" and text[i + 1] == "{"]
    for i in reversed(starts):
        try:
            obj, _ = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise ValueError("no JSON object in the output")


# --------------------------------------------------------------------------- machine


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _git_rev() -> Optional[str]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (and how busy it was)."""
    import psutil

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpus_logical": os.cpu_count(),
        "cpus_usable": usable,
        "cpus_physical": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gb": round(psutil.virtual_memory().available / 2**30, 1),
        "load_average_1_5_15": load_average(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "git": _git_rev(),
    }
    for mod in ("torch", "deepspeed", "transformers", "numpy"):
        info[mod] = _version(mod)
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def emit(report: dict, out: Optional[str]) -> dict:
    """Print the report as JSON (the last thing on stdout) and write it to ``out`` if given."""
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return report
