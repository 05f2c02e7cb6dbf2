"""What differs between task types, in one place: reading the data, encoding a split, the model
output the evaluation gathers, and the metrics computed from it.

The training loop, ``ptft evaluate`` and ``ptft predict`` call these and nothing task-specific:

=====================  =========================  ===========================  ==========================
task_type              data                       a feature is                 metrics
=====================  =========================  ===========================  ==========================
classification         CSV/TSV/JSONL/HF, label    one text (pair)              accuracy, macro F1, MCC
regression             same, numeric target       one text (pair)              Pearson, Spearman, MSE
token_classification   CoNLL columns or JSONL     one sentence                 entity P/R/F1, accuracy
extractive_qa          SQuAD JSON or JSONL        one window of a context      exact match, F1 (SQuAD)
=====================  =========================  ===========================  ==========================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from ptft_dist.config import FinetuneConfig
from ptft_dist.finetune.batches import Encoded, encode
from ptft_dist.finetune.scores import classification_metrics, regression_metrics
from ptft_dist.finetune.tasks import Split, TaskData, load_task

METRICS = {"classification": ("accuracy", "macro_f1", "mcc", "loss"),
           "regression": ("pearson", "spearman", "mse", "loss"),
           "token_classification": ("f1", "precision", "recall", "accuracy", "loss"),
           "extractive_qa": ("f1", "exact_match", "has_answer_f1", "no_answer_accuracy")}
LOWER_IS_BETTER = frozenset({"loss", "mse"})
SEQUENCE_TASKS = ("classification", "regression")


def default_metric(task_type: str) -> str:
    """``finetune.metric_for_best`` when left empty: the task's headline metric."""
    return METRICS[task_type][0]


def load(cfg: FinetuneConfig) -> TaskData:
    """The task's splits (raises a UserError naming file and record)."""
    if cfg.task_type == "token_classification":
        from ptft_dist.finetune.token_data import load_token_splits

        splits, names, scheme = load_token_splits(cfg)
        return TaskData(splits, names, info={"tag_scheme": scheme})
    if cfg.task_type == "extractive_qa":
        from ptft_dist.finetune.qa_data import load_qa_splits

        splits, info = load_qa_splits(cfg)
        return TaskData(splits, [], info=info)
    return load_task(cfg)


def encode_split(tokenizer: Any, cfg: FinetuneConfig, task: TaskData, split: str, max_seq_len: int,
                 train: bool = False) -> Encoded:
    """The split's features; ``train`` adds the per-feature targets the loss needs (token labels,
    answer positions); a sequence task's labels travel apart (``train_labels``)."""
    data = task.splits[split]
    if cfg.task_type == "token_classification":
        from ptft_dist.finetune.token_classification import encode_words

        return encode_words(tokenizer, data, max_seq_len, cfg.label_subwords if train else None, task.label_names)
    if cfg.task_type == "extractive_qa":
        from ptft_dist.finetune.qa_data import answers_outside_windows, encode_qa

        enc = encode_qa(tokenizer, data, max_seq_len, cfg.doc_stride, train=train)
        if train:
            task.info["answers_outside_windows"] = answers_outside_windows(data, enc)
        return enc
    return encode(tokenizer, data.texts, data.pairs, max_seq_len)


def train_labels(task_type: str, data: Any) -> Optional[np.ndarray]:
    """Per-example labels a sequence task's batches carry (other tasks carry ``Encoded.targets``)."""
    return data.labels if task_type in SEQUENCE_TASKS and isinstance(data, Split) else None


def head_output(out: Any) -> torch.Tensor:
    """The tensor evaluation gathers: logits, or (start, end) logits stacked on a last axis."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    return torch.stack([out.start_logits, out.end_logits], dim=-1)


def split_metrics(cfg: FinetuneConfig, task: TaskData, split: str, enc: Encoded, outputs: Any,
                  label_names: Optional[Sequence[str]] = None, labels: Optional[np.ndarray] = None,
                  null_threshold: Optional[float] = None) -> dict:
    """The task's metrics on ``split`` from the gathered ``outputs`` of every feature.

    ``label_names`` / ``labels``: the model's label names and the split's labels in the model's ids
    (an export's id order may differ from the task's); ``null_threshold``: SQuAD v2's no-answer
    threshold to apply instead of tuning one (the test split uses validation's)."""
    data = task.splits[split]
    if cfg.task_type == "token_classification":
        from ptft_dist.finetune.token_classification import token_metrics

        return token_metrics(data, enc, outputs, label_names or task.label_names)
    if cfg.task_type == "extractive_qa":
        from ptft_dist.finetune.qa_postprocess import qa_metrics

        return qa_metrics(data, enc, outputs, cfg.n_best, cfg.max_answer_length,
                          bool(task.info.get("no_answer")) or null_threshold is not None, null_threshold)
    return sequence_metrics(cfg.task_type, data.labels if labels is None else labels, outputs)


def sequence_metrics(task_type: str, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Classification/regression metrics plus ``loss`` (mean cross-entropy / MSE over all examples)."""
    if task_type == "regression":
        m = regression_metrics(labels.astype(np.float64), logits.reshape(-1).astype(np.float64))
        m["loss"] = m["mse"]
        return m
    m = classification_metrics(labels, logits)
    lg = torch.as_tensor(logits, dtype=torch.float64)
    m["loss"] = float(torch.nn.functional.cross_entropy(lg, torch.as_tensor(labels, dtype=torch.long))) if len(labels) else 0.0
    return m


def describe(task_type: str, task: TaskData) -> str:
    """What the run trains on, for its first log line."""
    if task_type == "regression":
        return "regression"
    if task_type == "token_classification":
        return f"{len(task.label_names)} tags, {task.info.get('tag_scheme')}"
    if task_type == "extractive_qa":
        return "extractive QA" + (", with unanswerable questions" if task.info.get("no_answer") else "")
    return f"{task.num_labels} labels"
