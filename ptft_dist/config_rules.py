"""What each config key may hold, and which keys each command reads: the checks ``load_config`` runs.

Two declarative tables (docs/design.md, guarantee 7: bad input fails early, naming the key):

* :data:`RANGES`: the admissible values of every numeric key (``tests/bad_inputs/test_config.py``
  fails when a numeric field of ``ptft_dist/config.py`` has none), plus :data:`CROSS_RULES`, the
  checks between keys that need no model or corpus. docs/configuration.md shows the ranges.
* :data:`SCOPES`: the config sections each command reads. A key of a section the command does not
  read, set to anything but its default, is an error: the user meant it to change something, and
  the command would silently run without it (docs/refusals.md).

This module knows the schema only by its dotted key names, so ``config.py`` can import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

# --------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval (either end may be absent), or a set of allowed values."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def text(self) -> str:
        """How docs/configuration.md and error messages state the range."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"

    def describe(self, integer: bool, many: bool = False) -> str:
        """The range in words: "an integer >= 1", "a finite number in [0, 1)", "numbers in ..."."""
        if self.choices:
            return self.text()
        kind = "numbers" if many else "an integer" if integer else "a finite number"
        return f"{kind} {'in ' if self.lo is not None and self.hi is not None else ''}{self.text()}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


AT_LEAST_0 = Range(lo=0)
AT_LEAST_1 = Range(lo=1)
POSITIVE = Range(lo=0, lo_open=True)
PROBABILITY = Range(lo=0, hi=1)  # [0, 1]
DROPOUT = Range(lo=0, hi=1, hi_open=True)  # [0, 1): 1 would drop everything
SEED = Range(lo=0, hi=2**32 - 1)  # what numpy's generators accept

RANGES: dict[str, Range] = {
    # prepare
    "prepare.clean.min_chars": AT_LEAST_0,
    "prepare.clean.max_chars": AT_LEAST_1,
    "prepare.clean.min_alpha_ratio": PROBABILITY,
    "prepare.clean.max_repeated_line_ratio": PROBABILITY,
    "prepare.dedup.threshold": Range(lo=0, hi=1, lo_open=True),
    "prepare.dedup.ngram": AT_LEAST_1,
    "prepare.dedup.num_perm": AT_LEAST_1,
    "prepare.tokenizer.vocab_size": Range(lo=6),  # the 5 special tokens and at least one more
    "prepare.tokenizer.min_frequency": AT_LEAST_0,
    "prepare.tokenizer.max_train_docs": AT_LEAST_1,
    "prepare.min_sentence_chars": AT_LEAST_0,
    "prepare.shard_size_mb": POSITIVE,
    "prepare.validation_fraction": DROPOUT,  # 1 would leave no training documents
    "prepare.split_seed": SEED,
    "prepare.workers": AT_LEAST_1,
    "prepare.slurm_cpus_per_task": AT_LEAST_1,
    "prepare.slurm_mem_per_cpu_mb": AT_LEAST_1,
    # data
    "data.max_seq_len": Range(lo=3),  # [CLS] token [SEP]; with NSP 5 (CROSS_RULES)
    "data.short_seq_prob": PROBABILITY,
    "data.mlm_probability": Range(lo=0, hi=1, lo_open=True),  # 0 would leave nothing to predict
    "data.mask_replace_prob": PROBABILITY,
    "data.random_replace_prob": PROBABILITY,
    "data.max_predictions_per_seq": AT_LEAST_0,
    "data.pad_to_multiple_of": AT_LEAST_1,
    "data.seed": SEED,
    "data.shuffle_window_shards": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0,
    "data.prefetch_factor": AT_LEAST_1,
    "data.cache_limit_gb": POSITIVE,
    "data.prefetch_shards": AT_LEAST_0,
    "data.fetch_retries": AT_LEAST_0,
    "data.fetch_backoff_s": AT_LEAST_0,
    "data.validation_max_samples": AT_LEAST_0,
    # model
    "model.hidden_size": AT_LEAST_1,
    "model.num_hidden_layers": AT_LEAST_1,
    "model.num_attention_heads": AT_LEAST_1,
    "model.intermediate_size": AT_LEAST_1,
    "model.max_position_embeddings": AT_LEAST_1,
    "model.hidden_dropout_prob": DROPOUT,
    "model.attention_probs_dropout_prob": DROPOUT,
    # optim
    "optim.lr": POSITIVE,
    "optim.weight_decay": AT_LEAST_0,
    "optim.betas": DROPOUT,  # each of the two
    "optim.eps": POSITIVE,
    "optim.warmup_steps": AT_LEAST_0,
    "optim.decay_fraction": PROBABILITY,
    "optim.min_lr_ratio": PROBABILITY,
    "optim.grad_clip": AT_LEAST_0,
    # checkpoint
    "checkpoint.every": AT_LEAST_0,
    "checkpoint.keep_last": AT_LEAST_0,
    "checkpoint.requeue_exit_code": Range(lo=1, hi=255),  # 0 would make a preempted job look finished
    # train
    "train.zero_stage": Range(choices=(0, 1, 2, 3)),
    "train.micro_batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.global_batch_size": AT_LEAST_0,
    "train.max_steps": AT_LEAST_1,
    "train.eval_every": AT_LEAST_0,
    "train.eval_batches": AT_LEAST_0,
    "train.log_every": AT_LEAST_1,
    "train.seed": SEED,
    "train.device_peak_tflops": POSITIVE,
    # finetune
    "finetune.split_seed": SEED,
    "finetune.max_train_samples": AT_LEAST_0,
    "finetune.max_seq_len": Range(lo=3),  # [CLS] token [SEP]
    "finetune.lora_r": AT_LEAST_1,
    "finetune.lora_alpha": AT_LEAST_1,
    "finetune.lora_dropout": DROPOUT,
    "finetune.epochs": AT_LEAST_1,
    "finetune.lr": POSITIVE,
    "finetune.lora_lr": AT_LEAST_0,
    "finetune.warmup_ratio": DROPOUT,
    "finetune.batch_size": AT_LEAST_1,
    "finetune.early_stopping_patience": AT_LEAST_0,
    "finetune.checkpoint_every": AT_LEAST_0,
    "finetune.doc_stride": AT_LEAST_0,
    "finetune.conll_token_column": AT_LEAST_0,
    "finetune.conll_tag_column": Range(lo=-1),  # -1 = the last column, else 0-based
    "finetune.max_answer_length": AT_LEAST_1,
    "finetune.n_best": AT_LEAST_1,
}


def get_key(cfg: Any, dotted: str) -> Any:
    node = cfg
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def range_problems(cfg: Any) -> list[str]:
    """``KEY must be RANGE, got VALUE`` for every numeric key outside its range (None = unset)."""
    problems = []
    for key, rng in RANGES.items():
        value = get_key(cfg, key)
        many = isinstance(value, (list, tuple))
        bad = [v for v in (value if many else [value]) if v is not None and not rng.admits(v)]
        if bad:
            problems.append(f"{key} must be {rng.describe(isinstance(bad[0], int), many)}, got {value!r}")
    return problems


def _cross_rules() -> list[tuple[tuple[str, ...], Callable[[Any], Optional[str]]]]:
    """(the keys involved, check → message or None): rules between keys that need no model or corpus."""

    def seq_vs_positions(c: Any) -> Optional[str]:
        if c.data.max_seq_len > c.model.max_position_embeddings:
            return (f"data.max_seq_len ({c.data.max_seq_len}) is larger than model.max_position_embeddings "
                    f"({c.model.max_position_embeddings}): the model has no position for the extra tokens")
        return None

    def nsp_length(c: Any) -> Optional[str]:
        if c.data.nsp and c.data.max_seq_len < 5:
            return (f"data.max_seq_len ({c.data.max_seq_len}) must be >= 5 with data.nsp=true "
                    "([CLS] A [SEP] B [SEP])")
        return None

    def packing(c: Any) -> Optional[str]:
        if c.data.pack_samples and c.data.nsp:
            return ("data.pack_samples=true needs data.nsp=false: an NSP pair is one sample and fills its own "
                    "row; packing is for MLM-only pretraining")
        if c.data.pack_samples and not c.model.unpad:
            return ("data.pack_samples=true needs model.unpad=true: a row of several samples keeps attention "
                    "within each sample only through the packed (cu_seqlens) attention")
        if c.data.pack_samples and (c.model.attn_implementation in ("eager", "flex_attention")
                                    or c.model.arch == "modernbert"):
            what = "model.arch=modernbert" if c.model.arch == "modernbert" else \
                f"model.attn_implementation={c.model.attn_implementation}"
            return (f"data.pack_samples=true: {what} has no variable-length (cu_seqlens) attention, so a row's "
                    "samples would attend to each other; use sdpa (or a flash attention) on BERT, RoBERTa or DistilBERT")
        return None

    def replace_sum(c: Any) -> Optional[str]:
        total = c.data.mask_replace_prob + c.data.random_replace_prob
        if total > 1 + 1e-9:
            return (f"data.mask_replace_prob ({c.data.mask_replace_prob}) + data.random_replace_prob "
                    f"({c.data.random_replace_prob}) = {total:g} must be <= 1 (they share the chosen tokens)")
        return None

    def chars(c: Any) -> Optional[str]:
        if c.prepare.clean.min_chars > c.prepare.clean.max_chars:
            return (f"prepare.clean.min_chars ({c.prepare.clean.min_chars}) is larger than prepare.clean.max_chars "
                    f"({c.prepare.clean.max_chars}): every document would be dropped")
        return None

    def betas(c: Any) -> Optional[str]:
        if len(c.optim.betas) != 2:
            return f"optim.betas must hold two numbers (beta1, beta2), got {c.optim.betas!r}"
        return None

    return [
        (("data.max_seq_len", "model.max_position_embeddings"), seq_vs_positions),
        (("data.max_seq_len", "data.nsp"), nsp_length),
        (("data.pack_samples", "data.nsp", "model.unpad", "model.attn_implementation", "model.arch"), packing),
        (("data.mask_replace_prob", "data.random_replace_prob"), replace_sum),
        (("prepare.clean.min_chars", "prepare.clean.max_chars"), chars),
        (("optim.betas",), betas),
    ]


CROSS_RULES = _cross_rules()


def value_problems(cfg: Any) -> list[str]:
    """Range problems first; the rules between keys only when every key is in range."""
    problems = range_problems(cfg)
    if not problems:
        problems = [msg for _, rule in CROSS_RULES if (msg := rule(cfg))]
    return problems


# --------------------------------------------------------------------------- which command reads what


# What fine-tuning does not read from the train/optim/checkpoint sections it otherwise honours, and
# what to set instead (ptft_dist/finetune/settings.py; docs/finetuning.md, "Settings").
FINETUNE_NOT_USED: dict[str, str] = {
    "optim.lr": "set finetune.lr (finetune.lora_lr for LoRA)",
    "optim.schedule": "set finetune.warmup_ratio (fine-tuning always warms up linearly, then decays linearly)",
    "optim.warmup_steps": "set finetune.warmup_ratio",
    "optim.decay_fraction": "set finetune.warmup_ratio (fine-tuning always decays linearly after warmup)",
    "train.micro_batch_size": "set finetune.batch_size",
    "train.max_steps": "set finetune.epochs",
    "train.eval_every": "remove it (fine-tuning validates after every epoch)",
    "train.eval_batches": "remove it (fine-tuning validates on the whole validation split)",
    "train.run_dir": "set finetune.output_dir",
    "train.device_peak_tflops": "remove it (fine-tuning reports no MFU)",
    "train.log_sample_ids": "remove it (fine-tuning logs no sample ids)",
    "checkpoint.every": "set finetune.checkpoint_every",
    "checkpoint.resume": "set finetune.resume",
}

# Which command a section is for, for the hint of a refused key.
SECTION_OWNER = {"prepare": "ptft prepare", "data": "ptft pretrain", "model": "ptft pretrain",
                 "optim": "ptft pretrain/finetune", "train": "ptft pretrain/finetune",
                 "checkpoint": "ptft pretrain/finetune", "finetune": "ptft finetune/evaluate"}


@dataclass(frozen=True)
class Scope:
    """The config sections a command reads.

    ``tolerates``: sections a config file written for a sibling command carries, which this command
    accepts from that file without reading them (``ptft inspect -c PRETRAIN.yaml``,
    ``ptft evaluate -c FINETUNE.yaml``); a ``key=value`` for them on its command line is refused.
    ``not_used``: keys inside read sections the command does not honour, each with what to do instead.
    ``reads_keys``: single keys it reads from sections it otherwise does not.
    """

    reads: tuple[str, ...]
    tolerates: tuple[str, ...] = ()
    reads_keys: tuple[str, ...] = ()
    not_used: dict[str, str] = field(default_factory=dict)


SCOPES: dict[str, Scope] = {
    "prepare": Scope(reads=("prepare",)),
    "pretrain": Scope(reads=("data", "model", "optim", "train", "checkpoint")),
    "inspect": Scope(reads=("data",), tolerates=("model", "optim", "train", "checkpoint")),
    "finetune": Scope(reads=("finetune", "optim", "train", "checkpoint"), not_used=FINETUNE_NOT_USED),
    "evaluate": Scope(reads=("finetune",), tolerates=("optim", "train", "checkpoint")),
    # a pretraining config; the vocabulary size stands in for a corpus not prepared yet
    "plan": Scope(reads=("data", "model", "optim", "train"), tolerates=("checkpoint",),
                  reads_keys=("prepare.tokenizer.vocab_size",)),
}
FREE_FORM = ("extra",)  # notes carried into the resolved copy; never read, never refused


def changed_keys(value: Any, default: Any, prefix: str) -> Iterator[str]:
    """Dotted keys under ``prefix`` whose value differs from the default."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from changed_keys(getattr(value, f.name), getattr(default, f.name), f"{prefix}.{f.name}")
    elif value != default:
        yield prefix


def unused_key_problems(cfg: Any, command: str, overrides: Iterable[str] = ()) -> list[str]:
    """Keys ``command`` would silently ignore: set (≠ default) in a section it neither reads nor
    tolerates, given as ``key=value`` for a section it does not read, or one of its ``not_used``."""
    scope = SCOPES[command]
    default = type(cfg)()
    given: dict[str, list[str]] = {}  # section -> refused keys, in the order found
    for f in dataclasses.fields(cfg):
        if f.name in FREE_FORM or f.name in scope.reads or f.name in scope.tolerates:
            continue
        changed = changed_keys(getattr(cfg, f.name), getattr(default, f.name), f.name)
        given.setdefault(f.name, []).extend(k for k in changed if k not in scope.reads_keys)
    for key in overrides:
        section = key.split(".")[0]
        if section in scope.reads or section in FREE_FORM or key in scope.reads_keys:
            continue
        if key not in given.setdefault(section, []):
            given[section].append(key)
    problems = []
    for section, keys in given.items():
        if keys:
            problems.append(f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} not used by ptft {command} "
                            f"(the {section} section is read by {SECTION_OWNER.get(section, 'another command')}); "
                            "remove " + ("it" if len(keys) == 1 else "them"))
    overridden = set(overrides)
    for key, hint in scope.not_used.items():
        if key in overridden or get_key(cfg, key) != get_key(default, key):
            problems.append(f"{key} is not used by ptft {command}; {hint}")
    return problems
