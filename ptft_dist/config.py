"""Typed run configuration: one schema for prepare, pretrain and finetune.

A config is a tree of dataclasses. It is loaded from YAML, then overridden by dotted
``key=value`` arguments; every key is checked against the schema so a typo fails at once with
the closest valid key, instead of being silently ignored half-way through a 64-node job.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from ptft_dist.config_rules import unused_key_problems, value_problems
from ptft_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


# --------------------------------------------------------------------------- prepare


@dataclass
class CleanConfig:
    """Text cleaning and quality filters applied to every document."""

    fix_mojibake: bool = True  # repair text decoded with the wrong codec (ftfy)
    min_chars: int = 50  # shorter documents are dropped
    max_chars: int = 1_000_000  # longer documents are dropped
    min_alpha_ratio: float = 0.6  # share of letters among non-space characters
    max_repeated_line_ratio: float = 0.3  # share of lines that repeat an earlier line


@dataclass
class PIIConfig:
    enabled: bool = True  # replace PII with typed placeholders ([EMAIL], [PHONE], ...)
    email: bool = True
    phone: bool = True  # international and common national formats
    ip: bool = True  # IPv4 and IPv6
    credit_card: bool = True  # Luhn-checked
    iban: bool = True  # mod-97 checked
    us_ssn: bool = True


@dataclass
class DedupConfig:
    exact: bool = True  # drop documents equal after case folding and whitespace collapsing
    near: bool = True  # MinHash LSH near-duplicate removal
    threshold: float = 0.8  # Jaccard similarity of word n-gram shingles
    ngram: int = 5  # words per shingle
    num_perm: int = 128  # max MinHash permutations (bands x rows chosen to fit the threshold)


@dataclass
class TokenizerConfig:
    """Train a WordPiece tokenizer, or reuse an existing one (``path``)."""

    path: Optional[str] = None  # an existing HF tokenizer directory to adopt instead of training
    vocab_size: int = 30522
    lowercase: bool = True
    min_frequency: int = 2  # pairs seen fewer times are not merged
    max_train_docs: int = 1_000_000  # documents fed to the trainer (a fixed-seed subset beyond)


@dataclass
class PrepareConfig:
    text_field: str = "text"  # JSON key / Parquet or HF column holding the text
    txt_doc_boundary: Literal["file", "blank_line"] = "blank_line"  # what ends a document in .txt input
    on_decode_error: Literal["replace", "error"] = "replace"  # invalid UTF-8: repair and count, or stop
    on_bad_json: Literal["error", "skip"] = "error"  # malformed JSON line: stop (file:line), or skip and count
    clean: CleanConfig = field(default_factory=CleanConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    min_sentence_chars: int = 2  # shorter sentences are dropped
    shard_size_mb: float = 64.0  # target size of a shard file
    validation_fraction: float = 0.01  # share of documents (by text hash) in the validation split
    split_seed: int = 1234
    workers: int = 2  # parallel processes (local executor) or array tasks (slurm executor)
    executor: Literal["local", "slurm"] = "local"  # slurm: submit the stages as dependent array jobs
    slurm_partition: Optional[str] = None
    slurm_time: str = "04:00:00"  # per array task
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_mb: int = 2048
    storage_options: dict = field(default_factory=dict)  # fsspec options for remote inputs (s3://, gs://: endpoint_url, key, ...)


# --------------------------------------------------------------------------- stream


@dataclass
class DataConfig:
    """How the corpus becomes training samples (see ptft_dist/stream/samples.py and stream.py)."""

    corpus: str = ""  # corpus dir: a local path or any fsspec URL (s3://, gs://, https://, ...)
    max_seq_len: int = 128
    short_seq_prob: float = 0.1  # share of chunks with a random shorter target length
    nsp: bool = True  # False: MLM only, one contiguous segment per sample (RoBERTa-style)
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8  # of the chosen tokens: [MASK]
    random_replace_prob: float = 0.1  # of the chosen tokens: a random token (the rest stay unchanged)
    whole_word_mask: bool = False  # mask all WordPiece pieces of a word together
    max_predictions_per_seq: int = 0  # cap on masked positions per sequence, a packed row counting as one (0 = none)
    pad_to_multiple_of: int = 1  # pad each micro-batch to the longest sample, rounded up to this
    pack_samples: bool = False  # MLM only: fill each row with consecutive chunks up to max_seq_len, attention kept within each (needs model.unpad)
    seed: int = 42
    shuffle_window_shards: int = 4  # shard order shuffled per epoch; samples shuffled within this many shards
    num_workers: int = 1  # DataLoader worker processes per rank
    prefetch_factor: int = 4  # micro-batches each worker prepares ahead
    cache_dir: Optional[str] = None  # node-local shard cache (default: $PTFT_CACHE_DIR or <tmp>/ptft-cache-<uid>)
    cache_limit_gb: float = 20.0  # LRU eviction beyond this
    prefetch_shards: int = 4  # upcoming shards fetched (remote) or verified (local) in the background
    fetch_retries: int = 3  # attempts after the first for a failing remote read
    fetch_backoff_s: float = 0.5  # first retry delay, doubled each attempt
    verify_checksums: bool = True  # sha256 of every shard when it arrives / is first opened
    expected_tokenizer: Optional[str] = None  # pin the tokenizer: a hash (manifest.json tokenizer_hash) or a tokenizer dir; other corpora refused
    validation_max_samples: int = 0  # evaluate on the first N samples of the fixed validation order (0 = all)
    storage_options: dict = field(default_factory=dict)  # fsspec options for every corpus read (endpoint_url, key, secret, ...; secrets redacted in saved copies)


# --------------------------------------------------------------------------- pretrain


@dataclass
class ModelConfig:
    """An encoder: a size preset, any field overridden (None = the preset's value), or an HF model dir."""

    arch: Optional[Literal["bert", "roberta", "distilbert", "modernbert"]] = None  # from scratch: which encoder (None = bert; with init_from: must match it)
    preset: Literal["tiny", "mini", "small", "medium", "base", "large"] = "tiny"
    hidden_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    attn_implementation: str = "sdpa"
    sparse_mlm_head: bool = True  # run the MLM decoder on masked positions only
    unpad: bool = True  # pack samples and skip pad tokens when the batch allows it
    compile: bool = False  # torch.compile the model (DeepSpeed engine.compile()); compile time logged as compile_s
    init_from: Optional[str] = None  # start from an HF model directory (any AutoModelForMaskedLM encoder) instead of random weights


@dataclass
class OptimConfig:
    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    schedule: Literal["linear", "cosine", "wsd", "constant"] = "linear"
    warmup_steps: int = 100
    decay_fraction: float = 0.1  # wsd: share of steps in the final decay
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 = off


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in run dir, if any) | never | a checkpoint path
    requeue_exit_code: int = 124  # exit status after a signal-triggered save; job scripts requeue on it


@dataclass
class TrainConfig:
    backend: Literal["deepspeed", "accelerate"] = "deepspeed"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed_config: Optional[str] = None  # the user's own DeepSpeed JSON ("auto" fields filled from here)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1
    global_batch_size: int = 0  # 0: micro_batch_size × grad_accum × world size; else checked against it
    max_steps: int = 1000
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    seed: int = 42
    run_dir: str = "runs/pretrain"
    device_peak_tflops: Optional[float] = None  # for MFU; default: the GPU data-sheet table, or the CPU instruction-set peak (cores x clock x FLOP/cycle)
    log_sample_ids: bool = False  # every rank appends the global sample ids of each step to RUN_DIR/sample_ids/


# --------------------------------------------------------------------------- finetune


@dataclass
class FinetuneConfig:
    model: str = ""  # HF model directory (ours from `ptft convert`, or any BERT-family model)
    method: Literal["full", "lora"] = "full"
    task_type: Literal["classification", "regression", "token_classification", "extractive_qa"] = "classification"
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    hf_dataset: Optional[str] = None  # hf:NAME[:CONFIG] instead of files
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    split_seed: int = 13  # used when only a train split is given: fixed-seed 80/10/10
    max_train_samples: int = 0  # train on a fixed-seed subset of this many examples (0 = all)
    max_seq_len: int = 128
    # token_classification: CoNLL column files (.conll/.txt/.iob/.bio) or JSONL with tokens + tags lists
    tokens_column: str = "tokens"  # JSONL: the list of words
    tags_column: str = "tags"  # JSONL: the list of tags, one per word
    conll_token_column: int = 0  # CoNLL: column of the word (0-based)
    conll_tag_column: int = -1  # CoNLL: column of the tag (0-based; -1 = the last)
    tag_scheme: Literal["auto", "IOB2", "BIO", "IOBES"] = "auto"  # auto: IOBES if any E-/S- tag, else IOB2 (= BIO)
    label_subwords: Literal["first", "all"] = "first"  # label the first piece of a word only, or every piece
    # extractive_qa: SQuAD v1.1/v2.0 JSON or JSONL with context, question, answers {text, answer_start}
    doc_stride: int = 128  # tokens shared by consecutive windows of a long context
    max_answer_length: int = 30  # longest answer span, in tokens
    n_best: int = 20  # start and end candidates per window in the span search
    bad_answers: Literal["fail", "skip"] = "fail"  # answer_start not matching the answer text: stop, or count and skip
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    # [] = every attention and feed-forward Linear layer and the word embeddings, under the
    # architecture's own names (finetune/model.py LORA_DEFAULT_TARGETS; BERT: query, key, value, dense,
    # word_embeddings). Without the embeddings LoRA barely moves a weak encoder (demo tiny model,
    # Rotten Tomatoes: test MCC 0.09-0.14 without them, 0.43-0.44 with; docs/finetuning.md)
    lora_target_modules: list[str] = field(default_factory=list)
    epochs: int = 3
    lr: float = 2e-5
    lora_lr: float = 0.0  # peak lr when method=lora (0 = use lr); adapters want ~10x a full fine-tune's
    warmup_ratio: float = 0.06  # linear warmup over this share of the optimizer steps, then linear decay
    batch_size: int = 32
    group_by_length: bool = True  # batch train examples of similar length (less padding; order stays seeded)
    unpad: bool = True  # train on packed real tokens (pads skipped, attention within each example); BERT on sdpa
    compile: bool = False  # torch.compile the model (DeepSpeed engine.compile()); no speed-up measured on CPU
    metric_for_best: str = ""  # "" = the task's own: accuracy, pearson, f1 (entity), f1 (SQuAD)
    early_stopping_patience: int = 0  # epochs without improvement before stopping (0 = off)
    output_dir: str = "runs/finetune"
    export: Literal["merged", "adapter", "both"] = "merged"
    resume: str = "auto"  # auto (OUTPUT_DIR/checkpoints/latest, if any), never (start over), or a checkpoint path
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0 = only on SIGUSR1/SIGTERM, before exiting for requeue)


# --------------------------------------------------------------------------- root


@dataclass
class Config:
    """The whole run; each subcommand reads the sections it needs."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    extra: dict = field(default_factory=dict)  # free-form notes carried into the resolved copy


# --------------------------------------------------------------------------- loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert the lossless cases (int → float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, get_args(tp), key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        return _coerce_list(value, (get_args(tp)[:1] or (Any,))[0], key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, prefix=key + ".")
    scalar = _SCALARS.get(tp)
    return scalar(value, key) if scalar else value


def _coerce_union(value: Any, args: tuple, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")


def _coerce_list(value: Any, item_tp: Any, key: str) -> list:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _as_str(value: Any, key: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {value!r}")


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{prefix}{name}'{hint}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in hints:
            raise _unknown_key(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` the way YAML would (1e-4, true, null, [a, b])."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(cfg: Any, dotted: str, raw_value: Any) -> None:
    """Set ``a.b.c`` on a dataclass tree, type-checked; unknown keys name the closest valid one."""
    parts = dotted.split(".")
    node = cfg
    prefix = ""
    for i, name in enumerate(parts):
        cls = type(node)
        hints = _field_types(cls)
        if name not in hints:
            if isinstance(node, dict):  # free-form mapping (e.g. extra.*)
                node[".".join(parts[i:])] = raw_value
                return
            raise _unknown_key(cls, name, prefix)
        if i == len(parts) - 1:
            value = raw_value
            tp = hints[name]
            if isinstance(value, str) and tp is not str and not (
                get_origin(tp) in (Union, types.UnionType) and str in get_args(tp) and value != "null"
            ):
                value = _parse_scalar(value)
            setattr(node, name, _coerce(value, tp, prefix + name))
            return
        node = getattr(node, name)
        prefix += name + "."
        if isinstance(node, dict):
            _set_free_form(node, parts[i + 1 :], raw_value)
            return


def _set_free_form(mapping: dict, keys: list[str], raw_value: Any) -> None:
    """``data.storage_options.client_kwargs.region_name=x``: nested keys, YAML-parsed value (so
    ``anon=false`` is False, not the string "false")."""
    for key in keys[:-1]:
        if not isinstance(mapping.get(key), dict):
            mapping[key] = {}
        mapping = mapping[key]
    mapping[keys[-1]] = _parse_scalar(raw_value) if isinstance(raw_value, str) else raw_value


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                command: str | None = None) -> Config:
    """YAML file (optional) + dotted overrides → a checked :class:`Config`: every key known, every
    value in its range (config_rules.RANGES, CROSS_RULES) and, given the ``command`` that will run,
    no key set that it would silently ignore (config_rules.SCOPES; docs/refusals.md)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    try:
        cfg = _build(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        apply_override(cfg, key, value)
    problems = unused_key_problems(cfg, command, [k for k, _ in parsed]) if command else []
    problems = problems or value_problems(cfg)
    if problems:
        raise ConfigError(". ".join(problems))  # each names its key, wherever it was set
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


STORAGE_KEY = "storage_options"  # how to reach data, not what the data is
_SECRET_WORDS = ("secret", "password", "token", "credential", "key", "sas")


def _storage_mapped(tree: Any, fn) -> Any:
    """``tree`` (a to_dict result) with ``fn`` applied to every ``storage_options`` mapping."""
    if not isinstance(tree, dict):
        return tree
    return {k: fn(v) if k == STORAGE_KEY and isinstance(v, dict) else _storage_mapped(v, fn) for k, v in tree.items()}


def redact_secrets(options: dict) -> dict:
    """Storage options with the values of secret-looking keys (key, secret, token, ...) replaced;
    endpoints and regions stay readable."""
    return {k: redact_secrets(v) if isinstance(v, dict)
            else "<redacted>" if v not in (None, "", False) and any(w in str(k).lower() for w in _SECRET_WORDS)
            else v for k, v in options.items()}


def public_dict(cfg: Any) -> dict:
    """``to_dict(cfg)`` for copies written to disk or TensorBoard: no credentials."""
    return _storage_mapped(to_dict(cfg), redact_secrets)


def config_hash(section: Any) -> str:
    """Stable short hash of a config (section), for telling runs and corpora apart. Storage
    options are left out: rotated credentials or a new endpoint do not make another run or corpus."""
    blob = json.dumps(_storage_mapped(to_dict(section), lambda _: None), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_resolved(cfg: Config, directory: str | Path, name: str = "resolved_config.yaml") -> Path:
    """Write the fully resolved config next to an output, so every result says how it was made."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(public_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path
