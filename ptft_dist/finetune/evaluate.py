"""Running a fine-tuned model over examples: rank-sharded inference with exact gathered metrics, the
choice of the metric that picks the best epoch, and the ``ptft evaluate`` / ``ptft predict`` entry
points (what differs per task type is in finetune/kinds.py).

The same functions serve the training loop's per-epoch validation (through the engine, every
rank a shard, predictions gathered so metrics are computed on exactly the whole split) and a
single-process evaluation of an exported directory, so the numbers in results.json and those of
``ptft evaluate`` on the exported model agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ptft_dist.config import FinetuneConfig
from ptft_dist.dist.collectives import gather_object
from ptft_dist.finetune import kinds
from ptft_dist.finetune.batches import Encoded, batches, collate, encode, eval_shard
from ptft_dist.finetune.kinds import LOWER_IS_BETTER, METRICS, head_output
from ptft_dist.finetune.model import Exported, FinetuneError, load_exported
from ptft_dist.finetune.tasks import SPLITS, TaskData
from ptft_dist.log import get_logger

log = get_logger("evaluate")


# --------------------------------------------------------------------------- logits and metrics


def predict_logits(forward: Callable[[dict], torch.Tensor], enc: Encoded, batch_size: int, pad_id: int,
                   rank: int = 0, world: int = 1, pad_multiple: int = 1) -> np.ndarray | list[np.ndarray]:
    """Outputs of every feature, in order, on every rank: each rank runs its shard, then one gather.

    Per-feature outputs (a sequence task's logits) come back as one array; per-piece outputs (token
    logits, QA start/end logits) as a list of arrays, each cut to its feature's own length (batch
    padding removed, so the numbers do not depend on which rank ran which feature)."""
    mine = eval_shard(len(enc), rank, world, enc.lengths())
    lengths = enc.lengths()
    local: list[np.ndarray] = []
    with torch.no_grad():
        for b in batches(enc, mine, batch_size, pad_id, pad_multiple=pad_multiple):
            out = forward({k: v for k, v in b.items() if k in ("input_ids", "token_type_ids", "attention_mask")})
            local.extend(out.detach().float().cpu().numpy())
    local = [x[:lengths[i]] if x.ndim == 2 else x for i, x in zip(mine, local)]
    parts = gather_object((mine, local)) if world > 1 else [(mine, local)]
    rows: list[Optional[np.ndarray]] = [None] * len(enc)
    for idx, outs in parts:
        for i, x in zip(idx, outs):
            rows[i] = x  # repeated (padding) examples write the same values twice
    if rows and rows[0] is not None and rows[0].ndim == 2:
        return rows
    width = max((len(x) for x in rows if x is not None), default=1)
    return np.stack(rows) if rows else np.zeros((0, width), dtype=np.float32)


def task_metrics(task_type: str, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """A sequence task's metrics plus ``loss`` (kept for callers of the classification-only API)."""
    return kinds.sequence_metrics(task_type, labels, logits)


def is_better(metric: str, value: float, best: Optional[float]) -> bool:
    """Whether ``value`` beats ``best`` for ``finetune.metric_for_best``; a NaN or infinite value
    never does (a diverged epoch must not become the exported model)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def check_metric(task_type: str, metric: str) -> None:
    """Refuse a ``metric_for_best`` the task never reports before training, not after epoch one."""
    if metric and metric not in METRICS[task_type]:
        raise FinetuneError(f"finetune.metric_for_best={metric!r} is not a {task_type} metric "
                            f"(one of {', '.join(METRICS[task_type])})")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def model_forward(model: torch.nn.Module, device: torch.device) -> Callable[[dict], torch.Tensor]:
    def forward(batch: dict) -> torch.Tensor:
        return head_output(model(**{k: v.to(device) for k, v in batch.items()}))

    return forward


# --------------------------------------------------------------------------- entry points


def map_labels(task_labels: np.ndarray, task_names: Sequence[str], model_names: Sequence[str], where: str) -> np.ndarray:
    """Task label ids → the model's ids, by name (the task's id order need not be the model's)."""
    index = {str(n): i for i, n in enumerate(model_names)}
    unknown = sorted({str(n) for n in task_names} - set(index))
    if unknown:
        raise FinetuneError(f"{where}: label(s) {unknown[:5]} are not labels of the model ({list(model_names)})")
    lut = np.asarray([index[str(n)] for n in task_names], dtype=np.int64)
    return lut[task_labels]


def _model_labels(task: TaskData, split: str, ex: Exported, where: str) -> Optional[np.ndarray]:
    """The split's gold labels in the model's label ids (token tags are remapped in place)."""
    data = task.splits[split]
    if ex.task_type == "classification":
        return map_labels(data.labels, task.label_names, ex.label_names, where)
    if ex.task_type == "token_classification":
        lut = map_labels(np.arange(len(task.label_names)), task.label_names, ex.label_names, where)
        task.splits[split] = dataclasses.replace(data, tags=[lut[t] for t in data.tags])
    return None


def evaluate_model(model_dir: str | Path, cfg: FinetuneConfig, split: str = "test",
                   batch_size: Optional[int] = None, device: Optional[torch.device] = None) -> dict:
    """Metrics of an exported model (merged or adapter dir) on ``split`` of the task in ``cfg``.

    Extractive QA with unanswerable questions: the validation split tunes its own no-answer
    threshold (as the training run's validation does); other splits use the one the export was
    chosen with (``ptft_finetune.json``), as the run's test numbers do."""
    if split not in SPLITS:
        raise FinetuneError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    device = device or _device()
    task = kinds.load(cfg)  # the data's refusals first: they need no model loaded
    ex = load_exported(model_dir, device)
    if ex.task_type != cfg.task_type:
        raise FinetuneError(f"{model_dir}: a {ex.task_type} model, but finetune.task_type={cfg.task_type}")
    labels = _model_labels(task, split, ex, str(model_dir))
    enc = kinds.encode_split(ex.tokenizer, cfg, task, split, min(cfg.max_seq_len, ex.max_seq_len))
    outputs = predict_logits(model_forward(ex.model, device), enc, batch_size or cfg.batch_size,
                             ex.tokenizer.pad_token_id)
    threshold = None if split == "validation" else ex.extra.get("null_threshold")
    out = kinds.split_metrics(cfg, task, split, enc, outputs, ex.label_names, labels, threshold)
    out.update(split=split, examples=len(task.splits[split]), model=str(model_dir), kind=ex.kind)
    notes = [w for w in task.warnings if f"the {split} split" in w]
    for note in notes:
        log.warning(note)
    if split in task.empty_skipped:
        log.info(f"{split} split: {task.empty_skipped[split]} empty text(s) skipped")
    out.update(empty_texts_skipped=task.empty_skipped.get(split, 0), warnings=notes)
    return out


def _as_pair(item: str | tuple[str, str]) -> tuple[str, Optional[str]]:
    if isinstance(item, tuple):
        return str(item[0]), str(item[1])
    return str(item), None


def _chunks(texts: Iterable[str | tuple[str, str]], size: int) -> Iterator[list[tuple[str, Optional[str]]]]:
    chunk: list[tuple[str, Optional[str]]] = []
    for item in texts:
        chunk.append(_as_pair(item))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode_inputs(ex: Exported, chunk: list[tuple[str, Optional[str]]]) -> Encoded:
    """Single texts and pairs encoded apart, so a single text gets no empty second segment."""
    enc = Encoded([[]] * len(chunk), [[]] * len(chunk))
    for paired in (False, True):
        rows = [i for i, (_, p) in enumerate(chunk) if (p is not None) == paired]
        if rows:
            part = encode(ex.tokenizer, [chunk[i][0] for i in rows],
                          [chunk[i][1] for i in rows] if paired else None, ex.max_seq_len)
            for j, i in enumerate(rows):
                enc.input_ids[i], enc.token_type_ids[i] = part.input_ids[j], part.token_type_ids[j]
    return enc


def _prediction_rows(ex: Exported, logits: torch.Tensor) -> Iterator[dict]:
    if ex.task_type == "regression":
        for v in logits.reshape(-1).tolist():
            yield {"score": v}
        return
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    for row in probs:
        yield {"label": ex.label_names[int(row.argmax())],
               "probabilities": {n: float(p) for n, p in zip(ex.label_names, row)}}


def _sequence_rows(ex: Exported, chunk: list[tuple[str, Optional[str]]], device: torch.device) -> Iterator[dict]:
    enc = _encode_inputs(ex, chunk)
    with torch.no_grad():
        logits = model_forward(ex.model, device)(collate(enc, range(len(enc)), ex.tokenizer.pad_token_id)).float().cpu()
    yield from _prediction_rows(ex, logits)


def _token_rows(ex: Exported, chunk: list[tuple[str, Optional[str]]], device: torch.device) -> Iterator[dict]:
    from ptft_dist.finetune.token_classification import predict_entities

    texts = [t if p is None else f"{t}\t{p}" for t, p in chunk]  # a TAB is part of the text here
    enc = ex.tokenizer(texts, truncation=True, max_length=ex.max_seq_len, return_offsets_mapping=True,
                       return_token_type_ids=True, return_attention_mask=False)
    feats = Encoded(enc["input_ids"], enc["token_type_ids"])
    with torch.no_grad():
        logits = model_forward(ex.model, device)(collate(feats, range(len(feats)), ex.tokenizer.pad_token_id))
    logits = logits.float().cpu().numpy()
    for i, text in enumerate(texts):
        yield predict_entities(text, enc.word_ids(i), enc["offset_mapping"][i], logits[i, :len(feats.input_ids[i])],
                               ex.label_names)


def _qa_rows(ex: Exported, chunk: list[tuple[str, Optional[str]]], device: torch.device) -> Iterator[dict]:
    from ptft_dist.finetune.qa_postprocess import predict_answers

    yield from predict_answers(ex, chunk, lambda batch: model_forward(ex.model, device)(batch))


ROWS = {"token_classification": _token_rows, "extractive_qa": _qa_rows}


def predict(model_dir: str | Path, texts: Iterable[str | tuple[str, str]], batch_size: int = 32,
            device: Optional[torch.device] = None) -> Iterator[dict]:
    """One dict per input, in order: ``label`` and ``probabilities`` (by label name), or ``score``
    for regression; ``entities`` (type, text, character offsets, score) for token classification;
    ``answer``, offsets and ``score`` for extractive QA, whose inputs are (question, context)
    tuples. Inputs are strings or (text, pair) tuples; streamed in batches, so a file of any length
    runs in constant memory."""
    device = device or _device()
    ex = load_exported(model_dir, device)
    rows = ROWS.get(ex.task_type, _sequence_rows)
    for chunk in _chunks(texts, batch_size):
        yield from rows(ex, chunk, device)
