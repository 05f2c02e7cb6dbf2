"""Running a classifier over examples: rank-sharded inference with exact gathered metrics, the
choice of the metric that picks the best epoch, and the ``ptft evaluate`` / ``ptft predict`` entry
points.

The same functions serve the training loop's per-epoch validation (through the engine, every
rank a shard, predictions gathered so metrics are computed on exactly the whole split) and a
single-process evaluation of an exported directory, so the numbers in results.json and those of
``ptft evaluate`` on the exported model agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ptft_dist.config import FinetuneConfig
from ptft_dist.dist.collectives import gather_object
from ptft_dist.finetune.batches import Encoded, batches, collate, encode, eval_shard
from ptft_dist.finetune.model import Exported, FinetuneError, load_exported
from ptft_dist.finetune.scores import classification_metrics, regression_metrics
from ptft_dist.finetune.tasks import SPLITS, load_task
from ptft_dist.log import get_logger

METRICS = {"classification": ("accuracy", "macro_f1", "mcc", "loss"),
           "regression": ("pearson", "spearman", "mse", "loss")}
LOWER_IS_BETTER = frozenset({"loss", "mse"})

log = get_logger("evaluate")


# --------------------------------------------------------------------------- logits and metrics


def predict_logits(forward: Callable[[dict], torch.Tensor], enc: Encoded, batch_size: int, pad_id: int,
                   rank: int = 0, world: int = 1, pad_multiple: int = 1) -> np.ndarray:
    """Logits of every example, in order, on every rank: each rank runs its shard, then one gather."""
    mine = eval_shard(len(enc), rank, world, enc.lengths())
    with torch.no_grad():
        chunks = [forward(b).detach().float().cpu().numpy()
                  for b in batches(enc, mine, batch_size, pad_id, pad_multiple=pad_multiple)]
    local = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    parts = gather_object((mine, local)) if world > 1 else [(mine, local)]
    width = max((p[1].shape[1] for p in parts if p[1].size), default=1)
    out = np.zeros((len(enc), width), dtype=np.float32)
    for idx, logits in parts:
        if len(idx):
            out[idx] = logits  # repeated (padding) examples write the same values twice
    return out


def task_metrics(task_type: str, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """The task's metrics plus ``loss`` (mean cross-entropy / MSE over all examples)."""
    if task_type == "regression":
        m = regression_metrics(labels.astype(np.float64), logits.reshape(-1).astype(np.float64))
        m["loss"] = m["mse"]
        return m
    m = classification_metrics(labels, logits)
    lg = torch.as_tensor(logits, dtype=torch.float64)
    m["loss"] = float(torch.nn.functional.cross_entropy(lg, torch.as_tensor(labels, dtype=torch.long))) if len(labels) else 0.0
    return m


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
    if metric not in METRICS[task_type]:
        raise FinetuneError(f"finetune.metric_for_best={metric!r} is not a {task_type} metric "
                            f"(one of {', '.join(METRICS[task_type])})")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def model_forward(model: torch.nn.Module, device: torch.device) -> Callable[[dict], torch.Tensor]:
    def forward(batch: dict) -> torch.Tensor:
        return model(**{k: v.to(device) for k, v in batch.items()}).logits

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


def evaluate_model(model_dir: str | Path, cfg: FinetuneConfig, split: str = "test",
                   batch_size: Optional[int] = None, device: Optional[torch.device] = None) -> dict:
    """Metrics of an exported model (merged or adapter dir) on ``split`` of the task in ``cfg``."""
    if split not in SPLITS:
        raise FinetuneError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    device = device or _device()
    task = load_task(cfg)  # the data's refusals first: they need no model loaded
    ex = load_exported(model_dir, device)
    if ex.task_type != cfg.task_type:
        raise FinetuneError(f"{model_dir}: a {ex.task_type} model, but finetune.task_type={cfg.task_type}")
    data = task.splits[split]
    labels = data.labels
    if ex.task_type == "classification":
        labels = map_labels(labels, task.label_names, ex.label_names, f"{model_dir}")
    enc = encode(ex.tokenizer, data.texts, data.pairs, min(cfg.max_seq_len, ex.max_seq_len))
    logits = predict_logits(model_forward(ex.model, device), enc, batch_size or cfg.batch_size,
                            ex.tokenizer.pad_token_id)
    out = task_metrics(ex.task_type, labels, logits)
    out.update(split=split, examples=len(data), model=str(model_dir), kind=ex.kind)
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


def predict(model_dir: str | Path, texts: Iterable[str | tuple[str, str]], batch_size: int = 32,
            device: Optional[torch.device] = None) -> Iterator[dict]:
    """One dict per input, in order: ``label`` and ``probabilities`` (by label name), or ``score``
    for regression. Inputs are strings or (text, pair) tuples; streamed in batches, so a file of
    any length runs in constant memory."""
    device = device or _device()
    ex = load_exported(model_dir, device)
    forward = model_forward(ex.model, device)
    pad = ex.tokenizer.pad_token_id
    for chunk in _chunks(texts, batch_size):
        enc = _encode_inputs(ex, chunk)
        with torch.no_grad():
            logits = forward(collate(enc, range(len(enc)), pad)).float().cpu()
        yield from _prediction_rows(ex, logits)
