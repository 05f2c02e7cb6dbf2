"""The task model on an encoder HF dir (BERT, RoBERTa / XLM-R, DistilBERT, ModernBERT), full or
LoRA (PEFT), and its export: a sequence classifier (classification, regression), a token
classifier or a span extractor (extractive QA).

Loading is plain ``AutoModelFor{SequenceClassification,TokenClassification,QuestionAnswering}
.from_pretrained`` (``HEADS``): our own ``ptft convert`` exports (``BertForPreTraining``,
``RobertaForMaskedLM``, ...) and third-party encoders (``BertModel``, e.g. MiniLM) all work;
the classifier head is new, the encoder weights must all come from the directory.

Export (rank 0, CPU, fp32) never reuses the training module: a fresh fp32 model is built from the
same directory (so frozen weights are the original fp32 ones even after bf16 training) and the
trained parameters, gathered in full fp32 from the engine (ZeRO-1/2/3 aware), are loaded into it.
Layout of an export directory::

    merged:  config.json, model.safetensors, tokenizer files, ptft_finetune.json   (plain HF)
    adapter: adapter_config.json, adapter_model.safetensors, tokenizer files, ptft_finetune.json
    both:    merged at the top, the adapter in ``adapter/``

Exports are written into a temporary sibling directory and renamed into place, so a crash never
leaves a half-written model where a later stage would trust it (docs/design.md, guarantee 5); the
merged export is a plain Hugging Face classifier (docs/design.md, guarantee 8).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ptft_dist.config import FinetuneConfig
from ptft_dist.errors import UserError
from ptft_dist.fsutil import remove_stale_temps, replace_dir

META_FILE = "ptft_finetune.json"
ADAPTER_DIR = "adapter"
# Per task type: the transformers auto class and PEFT's task type. Under LoRA the new head (and what an
# architecture puts between encoder and head) trains whole: ``head_modules``.
HEADS: dict[str, tuple[str, str]] = {
    "classification": ("AutoModelForSequenceClassification", "SEQ_CLS"),
    "regression": ("AutoModelForSequenceClassification", "SEQ_CLS"),
    "token_classification": ("AutoModelForTokenClassification", "TOKEN_CLS"),
    "extractive_qa": ("AutoModelForQuestionAnswering", "QUESTION_ANS"),
}
HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.", "qa_outputs.", "bert.pooler.")
ARCH_TASKS = {"ForTokenClassification": "token_classification", "ForQuestionAnswering": "extractive_qa"}
# the encoders `ptft pretrain` trains and exports (pretrain/architectures.py), by config.model_type
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "modernbert")
# LoRA's default targets (finetune.lora_target_modules: []): the same parts of every encoder -- the
# attention projections, the feed-forward layers and the word embeddings -- under each one's names
_BERT_LAYERS = ("query", "key", "value", "dense", "word_embeddings")
LORA_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": _BERT_LAYERS, "roberta": _BERT_LAYERS, "xlm-roberta": _BERT_LAYERS,
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2", "word_embeddings"),
    "modernbert": ("Wqkv", "Wo", "Wi", "tok_embeddings"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "added_tokens.json")


class FinetuneError(UserError, ValueError):
    """A model directory, tokenizer or fine-tuning setting that cannot work; the message names it."""


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """The "newly initialized classifier" load report is expected noise here."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # transformers 5 deprecation warnings raised from inside peft
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()


# --------------------------------------------------------------------------- loading


def check_model_dir(path: str | Path, what: str = "finetune.model") -> Path:
    if not str(path):
        raise FinetuneError(f"{what}: required (a Hugging Face model directory)")
    p = Path(path)
    if not p.is_dir():
        raise FinetuneError(f"{what}: {p}: no such model directory")
    if not (p / "config.json").is_file():
        raise FinetuneError(f"{what}: {p}: no config.json (not a Hugging Face model directory)")
    return p


def load_config(model_dir: str | Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:
        raise FinetuneError(f"{model_dir}/config.json: cannot load ({type(exc).__name__}: {exc})") from None


def load_tokenizer(tok_dir: str | Path, model_config: Any) -> Any:
    """The directory's fast tokenizer, checked against the model: vocab fits, BERT specials present
    and added around every input (a tokenizer.json without a post-processor would silently drop
    [CLS], which the classifier reads)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), use_fast=True)
    except Exception as exc:
        raise FinetuneError(f"{tok_dir}: cannot load a tokenizer ({type(exc).__name__}: {exc})") from None
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    if len(tok) > vocab:
        raise FinetuneError(f"{tok_dir}: the tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}: "
                            f"tokenizer and model do not belong together")
    missing = [n for n in ("pad", "cls", "sep") if getattr(tok, f"{n}_token_id", None) is None]
    if missing:
        raise FinetuneError(f"{tok_dir}: the tokenizer has no {'/'.join(missing)} token (a BERT tokenizer needs "
                            f"[PAD], [CLS] and [SEP])")
    ids = tok("a")["input_ids"]
    if ids[0] != tok.cls_token_id or ids[-1] != tok.sep_token_id:
        raise FinetuneError(f"{tok_dir}: the tokenizer does not add [CLS] ... [SEP] around its input "
                            f"(tokenizer.json has no BERT post-processor)")
    return tok


LORA_LAYERS = (torch.nn.Linear, torch.nn.Embedding)  # peft adapts both (an embedding: A is vocab x r)


def head_modules(model: torch.nn.Module) -> list[str]:
    """The modules LoRA trains whole: the task's new head, and the layers an architecture puts between
    encoder and head (DistilBERT's ``pre_classifier``, ModernBERT's ``head``): every top-level module
    with weights beside the encoder, and the pooler where the model has one (BERT's sequence classifier)."""
    encoder = getattr(model, "base_model_prefix", "")
    whole = {name for name, child in model.named_children() if name != encoder and any(True for _ in child.parameters())}
    if any(n.split(".")[-1] == "pooler" for n, _ in model.named_modules()):
        whole.add("pooler")
    return sorted(whole)


def lora_targets(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Full names of the Linear (or Embedding) layers whose last name is in ``names`` (empty: the
    architecture's defaults, ``LORA_DEFAULT_TARGETS``), outside the modules trained whole (the
    pooler's ``dense`` is trained fully, not through LoRA)."""
    if not names:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in LORA_DEFAULT_TARGETS:
            raise FinetuneError(f"finetune.lora_target_modules: no default for model_type {model_type!r}; "
                                f"name the layers to adapt")
        names = LORA_DEFAULT_TARGETS[model_type]
    wanted, whole = set(names), set(head_modules(model))
    out = []
    for full, module in model.named_modules():
        parts = full.split(".")
        if isinstance(module, LORA_LAYERS) and parts[-1] in wanted and not any(p in whole for p in parts):
            out.append(full)
    if not out:
        layers = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)})
        raise FinetuneError(f"finetune.lora_target_modules={list(names)} matches no Linear or Embedding layer of "
                            f"the model (their names: {', '.join(layers)})")
    return out


def _head_kwargs(task_type: str, label_names: Sequence[str]) -> dict[str, Any]:
    if task_type == "extractive_qa":
        return {}
    regression = task_type == "regression"
    names = [str(n) for n in label_names] if not regression else ["score"]
    kwargs: dict[str, Any] = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                                  label2id={n: i for i, n in enumerate(names)})
    if task_type != "token_classification":
        kwargs["problem_type"] = "regression" if regression else "single_label_classification"
    return kwargs


def auto_class(task_type: str) -> Any:
    import transformers

    return getattr(transformers, HEADS[task_type][0])


def build_model(model_dir: str | Path, label_names: Sequence[str], cfg: FinetuneConfig,
                seed: Optional[int] = None) -> torch.nn.Module:
    """The task's model from ``model_dir`` (sequence classifier, regression: one output; token
    classifier; span extractor), wrapped in LoRA when ``cfg.method == "lora"``. ``seed`` fixes the
    new head's initialisation (same on every rank and for the fresh export copy)."""
    model_dir = check_model_dir(model_dir)
    config = load_config(model_dir)
    if getattr(config, "model_type", None) not in ENCODER_TYPES:
        raise FinetuneError(f"{model_dir}: model_type {getattr(config, 'model_type', None)!r} is not one of the "
                            f"encoders ptft fine-tunes ({', '.join(ENCODER_TYPES)})")
    kwargs = _head_kwargs(cfg.task_type, label_names)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with _quiet_transformers():
            model, info = auto_class(cfg.task_type).from_pretrained(str(model_dir), output_loading_info=True, **kwargs)
    except Exception as exc:
        raise FinetuneError(f"{model_dir}: cannot load as a {cfg.task_type} model ({type(exc).__name__}: {exc})") from None
    model.float()  # fp32 master weights whatever the checkpoint's dtype (transformers 5 loads "auto")
    encoder_missing = [k for k in info.get("missing_keys", []) if not k.startswith(HEAD_PREFIXES)]
    if encoder_missing:
        raise FinetuneError(f"{model_dir}: encoder weights missing from the checkpoint: {sorted(encoder_missing)[:5]} "
                            f"(is it a BERT encoder export?)")
    if cfg.method == "lora":
        model = wrap_lora(model, cfg)
    return model


def wrap_lora(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    peft_task = HEADS[cfg.task_type][1]
    lcfg = LoraConfig(task_type=getattr(TaskType, peft_task), r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(model, cfg.lora_target_modules),
                      modules_to_save=head_modules(model))
    with _quiet_transformers():
        return get_peft_model(model, lcfg)


# --------------------------------------------------------------------------- gathering (collective)


def trainable_state_dict(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full fp32 values of every trainable parameter, on CPU.

    A collective under DeepSpeed (every rank calls it, in the same order): ZeRO-1/2/3 and bf16
    parameters come from the fp32 master copy (``safe_get_full_fp32_param``), other ZeRO-3
    partitions are gathered (``GatheredParameters``). Only ranks with ``keep`` hold the result.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        value: Optional[torch.Tensor] = None
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(p)
        if value is None and hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                value = p.data.detach().float().cpu().clone()
        if value is None:
            value = p.detach()
        if keep:
            out[name] = value.detach().float().cpu().clone()
    return out


# --------------------------------------------------------------------------- export


@dataclass
class ExportMeta:
    """What a later ``evaluate``/``predict`` needs beyond the HF files (``ptft_finetune.json``)."""

    kind: str  # merged | adapter
    method: str
    task_type: str
    label_names: list[str]
    max_seq_len: int
    base_model: str
    extra: dict = field(default_factory=dict)

    def write(self, directory: Path) -> None:
        (directory / META_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Optional[ExportMeta]:
        p = directory / META_FILE
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise FinetuneError(f"{p}: unreadable ({exc})") from None


def copy_tokenizer(src: Path, dst: Path, tokenizer: Any = None) -> None:
    """Tokenizer files byte for byte; ``save_pretrained`` only when the source has none of them."""
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied = True
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(str(dst))


def export_model(model_dir: str | Path, label_names: Sequence[str], cfg: FinetuneConfig,
                 trained: dict[str, torch.Tensor], out_dir: str | Path, seed: int,
                 extra: Optional[dict] = None) -> Path:
    """Write the fine-tuned model (``cfg.export``: merged | adapter | both) to ``out_dir``, atomically.

    ``trained`` is :func:`trainable_state_dict` of the training module (same parameter names).
    """
    model_dir = Path(model_dir).resolve()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    remove_stale_temps(out)  # what a killed export left (kill -9: no cleanup ran)
    model = build_model(model_dir, label_names, cfg, seed=seed)
    names = {n for n, _ in model.named_parameters()}
    unknown = sorted(set(trained) - names)
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in trained)
    if unknown or missing:
        raise RuntimeError(f"trained parameters do not match the export model: unknown {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in trained.items():
            params[name].copy_(value)
    model.eval()
    names_out = {"regression": ["score"], "extractive_qa": []}.get(cfg.task_type, [str(n) for n in label_names])
    meta = dict(method=cfg.method, task_type=cfg.task_type, label_names=names_out, max_seq_len=cfg.max_seq_len,
                base_model=str(model_dir), extra=dict(extra or {}))
    try:
        tmp.mkdir(parents=True)
        lora = cfg.method == "lora"
        if lora and cfg.export in ("adapter", "both"):
            adir = tmp if cfg.export == "adapter" else tmp / ADAPTER_DIR
            adir.mkdir(exist_ok=True)
            with _quiet_transformers():
                model.save_pretrained(str(adir), safe_serialization=True)
            copy_tokenizer(model_dir, adir)
            ExportMeta(kind="adapter", **meta).write(adir)
        if not lora or cfg.export in ("merged", "both"):
            merged = model.merge_and_unload() if lora else model  # fp32, on CPU
            with _quiet_transformers():
                merged.save_pretrained(str(tmp), safe_serialization=True)
            copy_tokenizer(model_dir, tmp)
            ExportMeta(kind="merged", **meta).write(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- loading an export


def require_trained_head(path: Path, missing_keys: Sequence[str]) -> None:
    """A directory without ``ptft_finetune.json`` is used for inference only if its weights hold the
    classification head: a pretrained encoder (a ``ptft convert`` export, MiniLM) would get a freshly
    drawn random head, and so random labels that change from run to run (docs/design.md, guarantee 9)."""
    head = sorted(k for k in missing_keys if k.startswith(("classifier.", "score.", "qa_outputs.")))
    if head:
        what = "a `ptft convert` export" if (path / "ptft_export.json").is_file() else "a pretrained encoder"
        raise FinetuneError(f"{path}: no trained classification head ({what}: {', '.join(head)} not in its weights, "
                            "so every label would be random); fine-tune it first: ptft finetune --model "
                            f"{path} --output-dir OUT ..., then use OUT/best")


@dataclass
class Exported:
    model: torch.nn.Module
    tokenizer: Any
    label_names: list[str]
    task_type: str
    max_seq_len: int
    kind: str  # merged | adapter
    extra: dict = field(default_factory=dict)  # ptft_finetune.json's extra: best epoch, QA no-answer threshold


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> Exported:
    """An export directory (merged, adapter, or a plain HF classifier / token classifier / QA dir)
    ready for inference."""
    p = Path(path)
    if not p.is_dir():
        raise FinetuneError(f"--model: {p}: no such model directory")
    meta = ExportMeta.read(p)
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel

        if meta is None:
            raise FinetuneError(f"{p}: an adapter without {META_FILE} (labels and task type unknown)")
        acfg = json.loads((p / "adapter_config.json").read_text())
        base = Path(acfg.get("base_model_name_or_path") or meta.base_model)
        check_model_dir(base, what=f"{p}/adapter_config.json: base_model_name_or_path")
        fcfg = FinetuneConfig(method="full", task_type=meta.task_type)  # the base alone; the adapter is added below
        base_model = build_model(base, meta.label_names, fcfg, seed=0)
        try:
            with _quiet_transformers():
                model = PeftModel.from_pretrained(base_model, str(p))
        except Exception as exc:
            raise FinetuneError(f"{p}: cannot load the adapter onto {base} ({type(exc).__name__}: {exc})") from None
        kind = "adapter"
        config = base_model.config
    else:
        check_model_dir(p, what="--model")
        head_task = meta.task_type if meta else _architecture_task(p)
        try:
            with _quiet_transformers():
                model, info = auto_class(head_task).from_pretrained(str(p), output_loading_info=True)
            model = model.float()
        except Exception as exc:
            raise FinetuneError(f"{p}: cannot load as a {head_task} model ({type(exc).__name__}: {exc})") from None
        if meta is None:
            require_trained_head(p, info.get("missing_keys", []))
        kind = "merged"
        config = model.config
    task_type = meta.task_type if meta else _architecture_task(p, config)
    labels = meta.label_names if meta else ([] if task_type == "extractive_qa" else
                                            [str(config.id2label[i]) for i in range(config.num_labels)])
    max_len = meta.max_seq_len if meta else int(getattr(config, "max_position_embeddings", 512))
    tokenizer = load_tokenizer(p, config)
    model.to(device).eval()
    return Exported(model, tokenizer, labels, task_type, max_len, kind, dict(meta.extra) if meta else {})


def _architecture_task(p: Path, config: Any = None) -> str:
    """The task of a plain HF directory (no ``ptft_finetune.json``), from its ``architectures``."""
    config = config or load_config(p)
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in ARCH_TASKS.items():
            if arch.endswith(suffix):
                return task
    return "regression" if getattr(config, "problem_type", None) == "regression" else "classification"
