"""``ptft pretrain``: the MLM + NSP pretraining loop.

The loop only composes named parts, each in its own module::

    dist.py          who am I, process group          data/stream.py  exactly-once, resumable batches
    train/model.py   BERT + sparse MLM head            train/engine.py DeepSpeed ZeRO / Accelerate
    train/schedule.py LR schedule                      train/checkpoint.py atomic checkpoints, signals
    train/metrics.py TensorBoard + JSONL, MFU

It runs unchanged as one process (CPU or GPU), under ``deepspeed``, ``torchrun``,
``accelerate launch``, ``srun`` and ``mpirun``.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ptft_dist import dist
from ptft_dist.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    PreemptionHandler,
    exit_for_requeue,
    restore_rng,
)
from ptft_dist.config import Config, config_hash, save_resolved, to_dict
from ptft_dist.corpus.format import TOKENIZER_DIR, CorpusError, load_manifest
from ptft_dist.engine.deepspeed import build_engine
from ptft_dist.engine.schedule import lr_lambda
from ptft_dist.errors import UserError
from ptft_dist.metrics.throughput import MetricsLogger, Throughput, device_peak_flops, format_progress, memory_stats
from ptft_dist.pretrain.model import build_pretrainer, count_parameters, effective_seq_len, flops_per_token
from ptft_dist.stream.dataset import build_train_loader, build_validation_loader

log = logging.getLogger("ptft.pretrain")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's deprecated calls
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label",
                "cu_seqlens", "indices", "max_seqlen")


class _SampleIdLog:
    """``RUN_DIR/sample_ids/rank{R}.jsonl``: which global samples each step used (data-order debugging)."""

    def __init__(self, run_dir: Path, rank: int):
        (run_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "sample_ids" / f"rank{rank}.jsonl", "a")  # noqa: SIM115 - open for the run

    def write(self, step: int, ids: list[int]) -> None:
        self.file.write(f'{{"step": {step}, "ids": {ids}}}\n')
        self.file.flush()


class PretrainError(UserError, RuntimeError):
    """A run that cannot start or resume as configured; the message says which setting."""


@dataclass
class Window:
    """Sums over the steps since the last log line (tensors stay on the device until then)."""

    loss: list = field(default_factory=list)
    mlm_loss: list = field(default_factory=list)
    nsp_loss: list = field(default_factory=list)
    counts: torch.Tensor | None = None  # mlm_correct, mlm_count, nsp_correct, nsp_count

    def add(self, out) -> None:
        self.loss.append(out.loss.detach())
        self.mlm_loss.append(out.mlm_loss)
        if out.nsp_loss is not None:
            self.nsp_loss.append(out.nsp_loss)
        zero = out.mlm_count.new_zeros(())
        c = torch.stack([out.mlm_correct, out.mlm_count,
                         out.nsp_correct if out.nsp_correct is not None else zero,
                         out.nsp_count if out.nsp_count is not None else zero]).double()
        self.counts = c if self.counts is None else self.counts + c

    def reduce(self) -> dict[str, float]:
        """Means over the window and over all ranks (one all-reduce)."""
        means = [torch.stack(x).double().mean() if x else torch.zeros((), dtype=torch.float64, device=self.counts.device)
                 for x in (self.loss, self.mlm_loss, self.nsp_loss)]
        packed = torch.cat([torch.stack(means), self.counts])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed)
            packed[:3] /= torch.distributed.get_world_size()
        loss, mlm, nsp, mlm_ok, mlm_n, nsp_ok, nsp_n = packed.tolist()
        out = {"loss": loss, "mlm_loss": mlm, "mlm_acc": mlm_ok / max(mlm_n, 1)}
        if nsp_n:
            out.update(nsp_loss=nsp, nsp_acc=nsp_ok / nsp_n)
        return out


def _global_sum(n: int) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([n], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return int(t.item())
    return n


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _check_resume_compatible(client: dict, cfg: Config, bert_cfg: dict, tokenizer_hash: str) -> None:
    """Refuse, with both values named, to resume into a different model or tokenizer."""
    saved = client.get("model_config") or {}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size"):
        if key in saved and saved[key] != bert_cfg.get(key):
            raise PretrainError(f"cannot resume: the checkpoint's model has {key}={saved[key]}, "
                                f"this run's model has {key}={bert_cfg.get(key)} (check model.* settings)")
    if client.get("tokenizer_hash") and client["tokenizer_hash"] != tokenizer_hash:
        raise PretrainError(f"cannot resume: the checkpoint was trained with tokenizer {client['tokenizer_hash']}, "
                            f"data.corpus has tokenizer {tokenizer_hash}")


def evaluate(engine, loader, max_batches: int) -> dict[str, float]:
    """MLM loss/accuracy/perplexity and NSP accuracy on the fixed validation stream."""
    engine.eval()
    window = Window()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            window.add(engine.forward(**_inputs(batch)))
    engine.train()
    if window.counts is None:
        return {}
    m = window.reduce()
    m["perplexity"] = math.exp(min(m["mlm_loss"], 50.0))
    return m


def pretrain(cfg: Config) -> Path:
    """Train until ``train.max_steps``; returns the run directory. Exits with the requeue code on a signal."""
    env = dist.discover()
    dist.init_distributed(env)
    device = dist.device_for(env)
    if not cfg.data.corpus:
        raise PretrainError("data.corpus: required (a directory made by `ptft prepare`, or its URL)")
    manifest = load_manifest(cfg.data.corpus)
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        save_resolved(cfg, run_dir)
        if "://" not in cfg.data.corpus and not (run_dir / TOKENIZER_DIR).exists():
            shutil.copytree(Path(cfg.data.corpus) / TOKENIZER_DIR, run_dir / TOKENIZER_DIR)

    torch.manual_seed(cfg.train.seed)
    model = build_pretrainer(cfg.model, manifest.vocab_size, manifest.special_tokens["pad"], nsp=cfg.data.nsp)
    bert_cfg = model.hf_model.config
    engine = build_engine(model, cfg.train, cfg.optim, lr_lambda(cfg.optim, cfg.train.max_steps),
                          env.world_size, device)
    if env.is_main:
        engine.save_ds_config(run_dir / "ds_config.json")
    train_loader = build_train_loader(cfg.data, cfg.train.micro_batch_size, env.world_size, env.rank,
                                      expected_tokenizer=manifest.tokenizer_hash, pin_memory=device.type == "cuda")
    val_loader = build_validation_loader(cfg.data, cfg.train.micro_batch_size, env.world_size, env.rank,
                                         expected_tokenizer=manifest.tokenizer_hash)
    ckpt = CheckpointManager(run_dir, cfg.checkpoint, env.rank, env.world_size)
    metrics = MetricsLogger(run_dir, enabled=env.is_main)

    peak, peak_source = device_peak_flops(device, engine.precision, cfg.train.device_peak_tflops)
    throughput = Throughput(peak_flops=peak, world_size=env.world_size)
    step = consumed_tokens = 0
    resume_path = ckpt.resolve_resume()
    if resume_path is not None:
        _check_resume_compatible(CheckpointManager.verify(resume_path).get("client", {}), cfg, bert_cfg.to_dict(), manifest.tokenizer_hash)
        client = ckpt.load(engine, resume_path)
        train_loader.load_state_dict(client["data"])
        restore_rng(client)
        step = int(client["step"])
        consumed_tokens = int(client.get("consumed_tokens", 0))
        metrics.resume_from(step)
        if env.is_main:
            print(f"ptft pretrain: resumed from {resume_path} at step {step} "
                  f"(epoch {train_loader.epoch}, {train_loader.consumed} samples into it)", file=sys.stderr)
    elif env.is_main:
        metrics.log_text("config", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        params = count_parameters(model)
        print(f"ptft pretrain: {cfg.model.preset} model, {params['total'] / 1e6:.1f}M parameters "
              f"({params['non_embedding'] / 1e6:.1f}M non-embedding), {env.world_size} rank(s), "
              f"backend {cfg.train.backend}, precision {engine.precision}", file=sys.stderr)

    def client_state() -> dict:
        return {"step": step, "data": train_loader.state_dict(), "config_hash": config_hash(cfg),
                "consumed_tokens": consumed_tokens,
                "model_config": bert_cfg.to_dict(), "tokenizer_hash": manifest.tokenizer_hash,
                "world_size": env.world_size}

    window = Window()
    accum = cfg.train.grad_accum
    batches = train_loader.forever()
    ids_log = _SampleIdLog(run_dir, env.rank) if cfg.train.log_sample_ids else None
    pending_tokens = 0  # this rank's tokens since the last all-reduce into consumed_tokens
    t_start = time.perf_counter()
    with PreemptionHandler() as preemption:
        while step < cfg.train.max_steps:
            tokens = samples = 0
            flops = 0.0
            step_ids = []
            for _ in range(accum):
                with throughput.waiting():
                    batch = next(batches)
                if ids_log:
                    step_ids += batch["sample_ids"].tolist()
                lengths = batch["attention_mask"].sum(dim=1)
                n_tokens = int(lengths.sum())
                masked = int((batch["labels"] != -100).sum())
                tokens += n_tokens
                samples += int((batch["sample_ids"] >= 0).sum())
                flops += n_tokens * flops_per_token(bert_cfg, effective_seq_len(lengths), masked / max(n_tokens, 1),
                                                    cfg.data.nsp)
                out = engine.forward(**_inputs(batch))
                engine.backward(out.loss)
                engine.step()
                window.add(out)
            step += 1
            pending_tokens += tokens
            throughput.end_step(tokens, samples, flops=flops)
            if ids_log:
                ids_log.write(step, step_ids)

            stop = preemption.should_stop()
            save = stop or ckpt.should_save(step) or step == cfg.train.max_steps
            if save or step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                consumed_tokens += _global_sum(pending_tokens)
                pending_tokens = 0
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                m = window.reduce()
                window = Window()
                t = throughput.summary()
                m.update(lr=engine.lr, grad_norm=engine.grad_norm, loss_scale=engine.loss_scale,
                         tokens_per_s=t["tokens_per_s"], samples_per_s=t["samples_per_s"], mfu=t["mfu"],
                         step_time_s=t["step_time_s"], data_wait=t["data_wait"],
                         consumed_samples=train_loader.state_dict()["consumed"], consumed_tokens=consumed_tokens,
                         epoch=train_loader.epoch,
                         **memory_stats(device))
                metrics.log(step, m)
                if env.is_main:
                    print(format_progress(step, cfg.train.max_steps, m["loss"], m["lr"], m["tokens_per_s"], m["mfu"],
                                          m["data_wait"], m["step_time_s"]), file=sys.stderr, flush=True)
                throughput.reset()
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps):
                ev = evaluate(engine, val_loader, cfg.train.eval_batches)
                metrics.log(step, ev, split="eval")
                if env.is_main and ev:
                    print(f"eval step {step}: mlm_loss {ev['mlm_loss']:.4f} mlm_acc {ev['mlm_acc']:.4f} "
                          f"ppl {ev['perplexity']:.1f}" + (f" nsp_acc {ev['nsp_acc']:.4f}" if "nsp_acc" in ev else ""),
                          file=sys.stderr, flush=True)

            if save:
                ckpt.save(engine, step, client_state())
            if stop:
                if env.is_main:
                    print(f"ptft pretrain: signal received; saved step {step}, exiting with "
                          f"{cfg.checkpoint.requeue_exit_code} for requeue", file=sys.stderr)
                metrics.close()
                exit_for_requeue(cfg.checkpoint)
    metrics.close()
    if env.is_main:
        print(f"ptft pretrain: done, {step} steps in {time.perf_counter() - t_start:.0f}s; run dir {run_dir} "
              f"(TensorBoard: {run_dir / 'tb'}; peak FLOPs from {peak_source})", file=sys.stderr)
    return run_dir


__all__ = ["pretrain", "evaluate", "PretrainError", "CheckpointError", "CorpusError"]
