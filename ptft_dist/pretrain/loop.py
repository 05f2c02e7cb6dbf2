"""``ptft pretrain``: the MLM + NSP pretraining loop.

:func:`pretrain` builds the parts, resumes, and then repeats a few named calls (one optimizer
step, log, evaluate, save); every concern lives in its own module::

    dist/discover.py, dist/rendezvous.py   who am I, the process group, my device
    corpus/format.py                       the corpus manifest (vocabulary, tokenizer hash)
    pretrain/model.py                      the encoder (BERT, RoBERTa, ...) + sparse MLM head, FLOPs
    engine/ (base.py, deepspeed.py, ...)   DeepSpeed ZeRO / Accelerate: forward, backward, step
    engine/schedule.py                     the LR schedule
    stream/loader.py                       exactly-once, resumable batches
    checkpoint/manager.py                  atomic checkpoints, finding the one to resume
    checkpoint/preemption.py               signal → save → exit with the requeue code
    metrics/logger.py                      TensorBoard + metrics.jsonl, sample-id log
    metrics/throughput.py                  tokens/s, MFU, memory, the progress line
    pretrain/evaluate.py                   metric windows, the validation pass

What a checkpoint carries is declared by the object that owns it (``state_dict()`` /
``load_state_dict()``, torchtitan's ``Stateful``): :class:`TrainState` (step, tokens), the train
loader (data position), :class:`RunIdentity` (what a resume must match); the checkpoint manager
adds the RNG states. It runs unchanged as one process (CPU or GPU), under ``deepspeed``,
``torchrun``, ``accelerate launch``, ``srun`` and ``mpirun``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import PretrainedConfig

from ptft_dist.checkpoint.manager import CheckpointError, CheckpointManager, restore_rng
from ptft_dist.checkpoint.preemption import PreemptionHandler, exit_for_requeue, preemption_save
from ptft_dist.config import Config, config_hash, public_dict, save_resolved
from ptft_dist.corpus.format import CorpusError, Manifest, load_manifest
from ptft_dist.corpus.tokenizer import check_tokenizer
from ptft_dist.dist.collectives import agree_on_error, all_sum
from ptft_dist.dist.discover import discover
from ptft_dist.dist.rendezvous import device_for, init_distributed
from ptft_dist.engine import build_engine, model_build_context
from ptft_dist.engine.compile import compile_engine, compile_seconds
from ptft_dist.engine.schedule import lr_lambda
from ptft_dist.errors import UserError
from ptft_dist.log import get_logger
from ptft_dist.metrics.logger import MetricsLogger, SampleIdLog
from ptft_dist.metrics.parameters import count_parameters
from ptft_dist.metrics.throughput import Throughput, device_peak_flops, format_progress, memory_stats
from ptft_dist.pretrain import probe
from ptft_dist.pretrain.evaluate import Window, evaluate, format_eval
from ptft_dist.pretrain.guard import NonFiniteGuard
from ptft_dist.pretrain.model import (
    MaskedLMPretrainer,
    build_pretrainer,
    check_model_fits,
    micro_batch_work,
    model_inputs,
    planned_config,
)
from ptft_dist.pretrain.run_dir import check_checkpoint_tokenizers, check_run_dir, sync_run_tokenizer
from ptft_dist.stream.loader import build_train_loader, build_validation_loader

log = get_logger("pretrain")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's deprecated calls

# The checkpoint's client state, in the order it has always been written.
CLIENT_STATE_KEYS = ("step", "data", "config_hash", "consumed_tokens", "model_config", "tokenizer_hash", "world_size")
# Model settings a resumed run must share with its checkpoint.
MODEL_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size")


class PretrainError(UserError, RuntimeError):
    """A run that cannot start or resume as configured; the message says which setting."""


@dataclass
class TrainState:
    """How far the run is: the optimizer steps taken and the real tokens consumed by all ranks."""

    step: int = 0
    consumed_tokens: int = 0
    pending_tokens: int = 0  # this rank's tokens since the last sync_tokens(); never saved (synced before saves)

    def sync_tokens(self) -> None:
        """Fold every rank's pending tokens into ``consumed_tokens`` (a collective: all ranks call it)."""
        self.consumed_tokens += int(all_sum(self.pending_tokens))
        self.pending_tokens = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consumed_tokens = int(state.get("consumed_tokens", 0))
        self.pending_tokens = 0


@dataclass
class RunIdentity:
    """What the run is: saved with every checkpoint so a resume (and ``ptft convert``) can check
    the model shape and the tokenizer before a tensor is loaded. The config hash and world size
    are recorded, not enforced: a resume may change settings or ranks (docs/design.md, guarantee 4)."""

    cfg: Config
    model_config: PretrainedConfig
    tokenizer_hash: str
    world_size: int

    def state_dict(self) -> dict:
        return {"config_hash": config_hash(self.cfg), "model_config": self.model_config.to_dict(),
                "tokenizer_hash": self.tokenizer_hash, "world_size": self.world_size}

    def check_resume(self, saved: dict) -> None:
        """Refuse, with both values named, to resume into a different model or tokenizer."""
        ours = self.model_config.to_dict()
        model = saved.get("model_config") or {}
        for key in MODEL_SHAPE_KEYS:
            if key in model and model[key] != ours.get(key):
                where = ("the vocabulary comes from data.corpus's tokenizer: resume with the corpus the checkpoint "
                         "was trained on, or start a new train.run_dir" if key == "vocab_size"
                         else "check model.* settings")
                raise PretrainError(f"cannot resume: the checkpoint's model has {key}={model[key]}, "
                                    f"this run's model has {key}={ours.get(key)} ({where})")
        if saved.get("tokenizer_hash") and saved["tokenizer_hash"] != self.tokenizer_hash:
            raise PretrainError(f"cannot resume: the checkpoint was trained with tokenizer {saved['tokenizer_hash']}, "
                                f"data.corpus has tokenizer {self.tokenizer_hash}")


def _corpus_manifest(cfg: Config) -> Manifest:
    """The corpus manifest, read with ``data.storage_options``; a corpus tokenized otherwise than
    ``data.expected_tokenizer`` pins is refused here, before a model is built (docs/design.md, guarantee 7)."""
    if not cfg.data.corpus:
        raise PretrainError("data.corpus: required (a directory made by `ptft prepare`, or its URL)")
    manifest = load_manifest(cfg.data.corpus, cfg.data.storage_options)
    check_tokenizer(manifest, cfg.data.expected_tokenizer, cfg.data.corpus)
    return manifest


class Trainer:
    """One pretraining run on this rank: the parts, built once, and the steps that use them."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.env = discover()
        init_distributed(self.env)
        self.is_main = self.env.is_main
        self.device = device_for(self.env)
        self.manifest = _corpus_manifest(cfg)
        self.run_dir = Path(cfg.train.run_dir)
        check_run_dir(cfg)

        self.model = self._build_model()
        self.engine = build_engine(self.model, cfg.train, cfg.optim, lr_lambda(cfg.optim, cfg.train.max_steps),
                                   self.env.world_size, self.device)
        self.compiled = bool(cfg.model.compile) and bool(compile_engine(self.engine))
        self.compile_s = 0.0  # seconds spent compiling (model.compile), kept out of step time
        self.train_loader, self.val_loader = self._build_loaders()
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint, self.env.rank, self.env.world_size)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main)
        peak, self.peak_source = device_peak_flops(self.device, self.engine.precision, cfg.train.device_peak_tflops)
        self.throughput = Throughput(peak_flops=peak, world_size=self.env.world_size)

        self.state = TrainState()
        self.identity = RunIdentity(cfg, self.model.hf_model.config, self.manifest.tokenizer_hash, self.env.world_size)
        self.window = Window()
        self.guard = NonFiniteGuard()
        self.sample_ids: SampleIdLog | None = None

    def _build_model(self) -> MaskedLMPretrainer:
        """The model, built the way the engine needs it (ZeRO-3: partitioned while it is created, so no
        rank ever holds it whole), then every rank's RNG re-seeded: under ZeRO-3 only rank 0 draws the
        initial weights, and dropout must not depend on how the model was built."""
        cfg, vocab, specials = self.cfg, self.manifest.vocab_size, self.manifest.special_tokens
        torch.manual_seed(cfg.train.seed)
        planned = planned_config(cfg.model, vocab, specials["pad"], specials)
        check_model_fits(planned, cfg.data.nsp, cfg.data.max_seq_len, specials, vocab)  # before a weight exists
        with model_build_context(cfg.train, cfg.optim, self.env.world_size, self.device, planned.hidden_size):
            model = build_pretrainer(cfg.model, vocab, specials["pad"], nsp=cfg.data.nsp, special_ids=specials,
                                     packed_rows=cfg.data.pack_samples)
        torch.manual_seed(cfg.train.seed)
        return model

    def _build_loaders(self) -> tuple:
        cfg, env, manifest = self.cfg, self.env, self.manifest
        train = build_train_loader(cfg.data, cfg.train.micro_batch_size, env.world_size, env.rank,
                                   pin_memory=self.device.type == "cuda", manifest=manifest)
        val = build_validation_loader(cfg.data, cfg.train.micro_batch_size, env.world_size, env.rank,
                                      manifest=manifest)
        return train, val

    # -- before the first step

    def resume(self) -> Path | None:
        """Load the checkpoint ``checkpoint.resume`` names (None: a fresh start). Every rank calls it."""
        path = self.checkpoints.resolve_resume()
        if path is None:
            return None
        self.identity.check_resume(CheckpointManager.verify(path).get("client", {}))
        check_checkpoint_tokenizers(self.checkpoints, self.manifest.tokenizer_hash)
        client = self.checkpoints.load(self.engine, path)
        self.train_loader.load_state_dict(client["data"])
        restore_rng(client)
        self.state.load_state_dict(client)
        if self.state.step > self.cfg.train.max_steps:  # exit 0 would claim a run of max_steps (guarantee 9)
            raise PretrainError(f"train.max_steps={self.cfg.train.max_steps} is below the step of the checkpoint to "
                                f"resume ({path}: step {self.state.step}): nothing to train; raise train.max_steps "
                                "or use a new train.run_dir")
        self.metrics.resume_from(self.state.step)
        return path

    def write_run_files(self) -> None:
        """The resolved config, the corpus tokenizer (local or remote: ``ptft convert`` exports it)
        and the DeepSpeed config, beside the checkpoints. Written only now, once the config, the
        corpus and any resume have been checked."""
        cfg = self.cfg
        error = ""
        if self.is_main:
            try:
                sync_run_tokenizer(cfg, self.run_dir, self.manifest.tokenizer_hash)  # the corpus's, always
                save_resolved(cfg, self.run_dir)
                self.engine.save_ds_config(self.run_dir / "ds_config.json")
            except (OSError, UserError) as err:  # every rank stops, none waits in the first step's collective
                error = f"cannot write the run files into {self.run_dir}: {err}"
        error = agree_on_error(error)
        if error:
            raise PretrainError(error)
        if cfg.train.log_sample_ids:
            self.sample_ids = SampleIdLog(self.run_dir, self.env.rank)

    def announce(self, resumed_from: Path | None) -> None:
        if not self.is_main:
            return
        if resumed_from is not None:
            log.info(f"resumed from {resumed_from} at step {self.state.step} "
                     f"(epoch {self.train_loader.epoch}, {self.train_loader.consumed} samples into it)")
            return
        cfg = self.cfg
        self.metrics.log_text("config", yaml.safe_dump(public_dict(cfg), sort_keys=False))
        params = count_parameters(self.model)
        what = f"{self.identity.model_config.model_type} model from {cfg.model.init_from}" if cfg.model.init_from \
            else f"{cfg.model.preset} {self.identity.model_config.model_type} model"
        log.info(f"{what}, {params['total'] / 1e6:.1f}M parameters "
                 f"({params['non_embedding'] / 1e6:.1f}M non-embedding), {self.env.world_size} rank(s), "
                 f"backend {cfg.train.backend}, precision {self.engine.precision}")

    # -- the loop

    def train(self) -> Path:
        """Steps until ``train.max_steps``; returns the run directory. Exits with the requeue code on a signal."""
        t_start = time.perf_counter()
        batches = self.train_loader.forever()
        with PreemptionHandler() as preemption:
            while self.state.step < self.cfg.train.max_steps:
                self.train_step(batches)
                self.guard.check_step(self.state.step, self.engine, self.checkpoints.latest_tag)  # collective
                stop = preemption.should_stop()  # a collective: every rank, every step
                save = stop or self.checkpoints.should_save(self.state.step) or self._last_step()
                if save or self._log_due():
                    self.state.sync_tokens()
                if self._log_due():
                    self.log_step()
                if self._eval_due():
                    self.run_eval()
                if stop:
                    self.exit_for_requeue()  # saves first; exits with the requeue code even if the save failed
                if save:
                    self.save_checkpoint()
        self.metrics.close()
        if self.is_main:
            log.info(f"done, {self.state.step} steps in {time.perf_counter() - t_start:.0f}s; run dir {self.run_dir} "
                     f"(TensorBoard: {self.run_dir / 'tb'}; peak FLOPs from {self.peak_source})")
        return self.run_dir

    def _last_step(self) -> bool:
        return self.state.step == self.cfg.train.max_steps

    def _log_due(self) -> bool:
        return self.state.step % self.cfg.train.log_every == 0 or self._last_step()

    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and (self.state.step % every == 0 or self._last_step())

    def train_step(self, batches: Iterator[dict]) -> None:
        """One optimizer step: ``train.grad_accum`` micro-batches, forward and backward each (the
        engine steps the optimizer at the accumulation boundary)."""
        tokens = samples = 0
        flops = 0.0
        step_ids: list[int] = []
        compiling_since = compile_seconds() if self.compiled else 0.0
        for _ in range(self.cfg.train.grad_accum):
            with self.throughput.waiting():
                batch = next(batches)
            if self.sample_ids:
                step_ids += batch["sample_ids"].tolist()
            n_tokens, n_samples, n_flops = micro_batch_work(batch, self.identity.model_config, self.cfg.data.nsp)
            tokens, samples, flops = tokens + n_tokens, samples + n_samples, flops + n_flops
            out = self.engine.forward(**model_inputs(batch))
            self.guard.add(out.loss)
            self.engine.backward(out.loss)
            self.engine.step()
            self.window.add(out)
        self.state.step += 1
        self.state.pending_tokens += tokens
        if self.compiled:
            spent = compile_seconds() - compiling_since
            self.compile_s += spent
            self.throughput.exclude(spent)
        self.throughput.end_step(tokens, samples, flops=flops)
        if self.sample_ids:
            self.sample_ids.write(self.state.step, step_ids)

    def log_step(self) -> None:
        """Reduce the window over ranks, log it with the throughput, print the progress line."""
        step, m = self.state.step, self.window.reduce()
        self.window = Window()
        t = self.throughput.summary()
        m.update(lr=self.engine.lr, grad_norm=self.engine.grad_norm, loss_scale=self.engine.loss_scale,
                 tokens_per_s=t["tokens_per_s"], samples_per_s=t["samples_per_s"], mfu=t["mfu"],
                 step_time_s=t["step_time_s"], data_wait=t["data_wait"],
                 consumed_samples=self.train_loader.state_dict()["consumed"],
                 consumed_tokens=self.state.consumed_tokens, epoch=self.train_loader.epoch,
                 **memory_stats(self.device))
        if self.compiled:
            m["compile_s"] = self.compile_s
        self.metrics.log(step, m)
        if self.is_main:
            log.info(format_progress(step, self.cfg.train.max_steps, m["loss"], m["lr"], m["tokens_per_s"], m["mfu"],
                                     m["data_wait"], m["step_time_s"]))
        self.throughput.reset()  # the logging time stays out of the next window

    def run_eval(self) -> None:
        ev = evaluate(self.engine, self.val_loader, self.cfg.train.eval_batches)
        self.metrics.log(self.state.step, ev, split="eval")
        if self.is_main and ev:
            log.info(format_eval(self.state.step, ev))

    def save_checkpoint(self) -> Path:
        """Every rank: the checkpoint, with the engine's probe logits in it (:meth:`probe_files`)."""
        self.guard.check_weights(self.state.step, self.engine.module, self.checkpoints.latest_tag)
        return self.checkpoints.save(self.engine, self.state.step, self.client_state(), self.probe_files())

    def probe_files(self) -> Callable[[Path], list[Path]]:
        """Every rank: the engine's logits on the probe batch now (a collective under ZeRO-3); returns
        the writer the checkpoint manager calls, with which rank 0 puts them into the checkpoint
        (``ptft convert`` checks its export against them: pretrain/probe.py)."""
        recorded = probe.record(self.engine)
        return lambda step_dir: probe.write(recorded, step_dir, self.is_main)

    def client_state(self) -> dict:
        """The checkpoint's client state, gathered from the objects that own it."""
        owned = {**self.state.state_dict(), "data": self.train_loader.state_dict(), **self.identity.state_dict()}
        return {key: owned[key] for key in CLIENT_STATE_KEYS}

    def exit_for_requeue(self) -> None:
        """Save, then exit with the requeue code, also when the save failed: the rerun then resumes
        from the previous checkpoint (docs/design.md, guarantee 6)."""
        self.guard.check_weights(self.state.step, self.engine.module, self.checkpoints.latest_tag)
        saved = preemption_save(self.checkpoints, self.engine, self.state.step, self.client_state(),
                                self.probe_files())
        if self.is_main:
            what = f"saved step {self.state.step}" if saved else \
                f"could not save step {self.state.step} (latest is still {self.checkpoints.latest_tag()})"
            log.info(f"signal received; {what}, exiting with {self.cfg.checkpoint.requeue_exit_code} for requeue")
        self.metrics.close()
        exit_for_requeue(self.cfg.checkpoint)


def pretrain(cfg: Config) -> Path:
    """Train until ``train.max_steps``; returns the run directory. Exits with the requeue code on a signal."""
    trainer = Trainer(cfg)
    resumed_from = trainer.resume()
    trainer.write_run_files()
    trainer.announce(resumed_from)
    return trainer.train()


__all__ = ["pretrain", "evaluate", "Trainer", "TrainState", "RunIdentity", "PretrainError", "CheckpointError",
           "CorpusError"]
