"""From start/end logits of context windows to one answer per question, and the SQuAD metrics.

Per question, every window is searched: the ``finetune.n_best`` highest start and end logits of
each window, pairs inside the context, end not before start, at most ``max_answer_length`` tokens;
the best pair over all windows wins (score = start + end logit), its text cut from the context
through the tokenizer's character offsets. The no-answer score is the lowest [CLS] start + end
logit over the windows (Devlin et al. 2019, SQuAD v2.0). With unanswerable questions in the task,
a question is answered "" when no-answer score - best span score > a threshold tuned on the
validation split to maximise F1 (the official ``find_best_thresh``); the test split and ``ptft
predict`` use the threshold of the exported epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ptft_dist.errors import UserError
from ptft_dist.finetune.batches import Encoded, batches
from ptft_dist.finetune.qa_data import QASplit, encode_qa
from ptft_dist.finetune.squad_metric import best_over_golds


@dataclass
class Answer:
    text: str
    start: int  # character offsets into the context; -1 when no span was found
    end: int
    score: float  # start + end logit of the span (-inf: none)
    null_score: float  # lowest [CLS] start + end logit over the windows

    @property
    def null_diff(self) -> float:
        return self.null_score - self.score


def features_of(example_of: np.ndarray, n_examples: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n_examples)]
    for f, e in enumerate(example_of):
        out[int(e)].append(f)
    return out


def best_answer(context: str, feats: Sequence[int], outputs: Sequence[np.ndarray], offsets: Sequence[list],
                n_best: int, max_len: int) -> Answer:
    """The best span of one question over all its windows."""
    best = Answer("", -1, -1, -math.inf, math.inf)
    for f in feats:
        start_logits, end_logits = outputs[f][:, 0], outputs[f][:, 1]
        best.null_score = min(best.null_score, float(start_logits[0] + end_logits[0]))
        offs = offsets[f]
        for s in np.argsort(-start_logits, kind="stable")[:n_best]:
            for e in np.argsort(-end_logits, kind="stable")[:n_best]:
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_len:
                    continue
                score = float(start_logits[s] + end_logits[e])
                if score > best.score:
                    a, b = offs[s][0], offs[e][1]
                    best = Answer(context[a:b], a, b, score, best.null_score)
    return best


def answers(split: QASplit, enc: Encoded, outputs: Sequence[np.ndarray], n_best: int, max_len: int) -> list[Answer]:
    return [best_answer(split.contexts[i], feats, outputs, enc.offsets, n_best, max_len)
            for i, feats in enumerate(features_of(enc.example_of, len(split)))]


def tune_null_threshold(diffs: Sequence[float], span_f1: Sequence[float], unanswerable: Sequence[bool]) -> float:
    """The threshold t (answer "" when diff > t) with the highest total F1 over the split.

    Starting from "every question unanswered", questions are answered in increasing order of their
    diff; ties flip together. ``span_f1[i]``: F1 of question i's best span."""
    order = np.argsort(np.asarray(diffs, dtype=np.float64), kind="stable")
    finite = [d for d in diffs if math.isfinite(d)]
    best_t = (min(finite) if finite else 0.0) - 1.0
    score = best = float(sum(unanswerable))
    for k, i in enumerate(order):
        if not math.isfinite(diffs[i]):
            break
        score += span_f1[i] - (1.0 if unanswerable[i] else 0.0)
        last_of_tie = k + 1 == len(order) or diffs[order[k + 1]] != diffs[i]
        if last_of_tie and score > best:
            best, best_t = score, float(diffs[i])
    return best_t


def qa_metrics(split: QASplit, enc: Encoded, outputs: Sequence[np.ndarray], n_best: int, max_len: int,
               no_answer: bool, null_threshold: Optional[float] = None) -> dict[str, float]:
    """Exact match and F1 (SQuAD, in [0, 1]); with unanswerable questions also F1 on the answerable
    ones, the share of unanswerable ones answered "", and the threshold (tuned here when not given)."""
    preds = answers(split, enc, outputs, n_best, max_len)
    golds = [[t for t, _ in a] for a in split.answers]
    span_scores = [best_over_golds(p.text, g) for p, g in zip(preds, golds)]
    if not no_answer:
        em, f1 = (np.mean([s[i] for s in span_scores]) if span_scores else 0.0 for i in (0, 1))
        return {"f1": float(f1), "exact_match": float(em)}
    unanswerable = [not g for g in golds]
    diffs = [p.null_diff for p in preds]
    if null_threshold is None:
        null_threshold = tune_null_threshold(diffs, [s[1] for s in span_scores], unanswerable)
    scores = [best_over_golds("", g) if d > null_threshold else s for d, g, s in zip(diffs, golds, span_scores)]
    has = [i for i, u in enumerate(unanswerable) if not u]
    none = [i for i, u in enumerate(unanswerable) if u]
    return {"f1": float(np.mean([s[1] for s in scores])), "exact_match": float(np.mean([s[0] for s in scores])),
            "has_answer_f1": float(np.mean([scores[i][1] for i in has])) if has else 0.0,
            "no_answer_accuracy": float(np.mean([scores[i][0] for i in none])) if none else 0.0,
            "null_threshold": float(null_threshold)}


# --------------------------------------------------------------------------- ptft predict


def predict_answers(ex: Any, chunk: Sequence[tuple[str, Optional[str]]],
                    forward: Callable[[dict], torch.Tensor]) -> Iterator[dict]:
    """``ptft predict`` rows for (question, context) inputs: answer text, character offsets into the
    context, score (start + end logit); "" with null offsets when the model judges it unanswerable."""
    for question, context in chunk:
        if context is None:
            raise UserError("ptft predict: an extractive QA model reads question<TAB>context lines; got a line "
                            f"without a TAB: {question[:60]!r}")
    split = QASplit([str(i) for i in range(len(chunk))], [q for q, _ in chunk], [c or "" for _, c in chunk],
                    [[] for _ in chunk], "input")
    stride = int(ex.extra.get("doc_stride", min(128, ex.max_seq_len // 4)))
    enc = encode_qa(ex.tokenizer, split, ex.max_seq_len, stride)
    outputs: list[np.ndarray] = []
    with torch.no_grad():
        for b in batches(enc, np.arange(len(enc)), 32, ex.tokenizer.pad_token_id):
            outputs.extend(forward(b).float().cpu().numpy())
    outputs = [o[:len(ids)] for o, ids in zip(outputs, enc.input_ids)]
    threshold = ex.extra.get("null_threshold")
    for a in answers(split, enc, outputs, int(ex.extra.get("n_best", 20)), int(ex.extra.get("max_answer_length", 30))):
        if a.start < 0 or (threshold is not None and a.null_diff > threshold):
            yield {"answer": "", "start": None, "end": None, "score": round(a.null_score, 6), "no_answer": True}
        else:
            yield {"answer": a.text, "start": a.start, "end": a.end, "score": round(a.score, 6), "no_answer": False}
