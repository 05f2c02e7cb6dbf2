"""Token classification on word pieces: tags aligned to pieces for training, piece predictions read
back per word for metrics, and entities with character offsets for ``ptft predict``.

Alignment (``finetune.label_subwords``): ``first`` labels the first piece of each word and gives
the others -100 (ignored by the loss); ``all`` gives every piece its word's tag (an inside piece of
a ``B-X``/``S-X``/``E-X`` word gets ``I-X``, so a word split in pieces is not taught as several entities; the first piece keeps the word's tag). Metrics always read the first piece of each word: the
predictions are per *word*, the unit the gold tags are written in, whatever the alignment; words cut
off by ``max_seq_len`` count as predicted ``O`` (the scores describe the whole split, not the part
that fitted). Entity-level precision/recall/F1 are seqeval's (default, conlleval-compatible mode);
``accuracy`` is the share of words tagged right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from ptft_dist.finetune.batches import Encoded
from ptft_dist.finetune.token_data import TokenSplit

IGNORE = -100


def inside_tag(tag: str) -> str:
    """The tag of a non-first piece of a word tagged ``tag`` (``label_subwords=all``): inside its entity."""
    return tag if tag == "O" or tag[1:2] != "-" else f"I-{tag[2:]}"


def piece_labels(word_ids: Sequence[Optional[int]], tags: np.ndarray, mode: str, names: Sequence[str] = ()) -> list[int]:
    """Per-piece label ids for one encoded sentence (specials and, for ``first``, inner pieces: -100)."""
    ids = {n: i for i, n in enumerate(names)}
    out = []
    for k, w in enumerate(word_ids):
        if w is None:
            out.append(IGNORE)
        elif k == 0 or word_ids[k - 1] != w:
            out.append(int(tags[w]))
        elif mode == "all":
            out.append(ids.get(inside_tag(names[int(tags[w])]), int(tags[w])))
        else:
            out.append(IGNORE)
    return out


def encode_words(tokenizer: Any, split: TokenSplit, max_seq_len: int, mode: Optional[str] = None,
                 names: Sequence[str] = ()) -> Encoded:
    """[CLS] pieces of the words [SEP], truncated; ``mode`` (first | all) adds per-piece training labels."""
    if not len(split):
        return Encoded([], [])
    enc = tokenizer(split.tokens, is_split_into_words=True, truncation=True, max_length=max_seq_len,
                    padding=False, return_attention_mask=False, return_token_type_ids=True)
    word_ids = [enc.word_ids(i) for i in range(len(split))]
    out = Encoded(enc["input_ids"], enc["token_type_ids"], word_ids=word_ids)
    if mode is not None:
        out.targets["labels"] = [piece_labels(w, t, mode, names) for w, t in zip(word_ids, split.tags)]
    return out


def first_piece_index(word_ids: Sequence[Optional[int]], n_words: int) -> np.ndarray:
    """Index of each word's first piece; -1 for a word truncated away."""
    first = np.full(n_words, -1, dtype=np.int64)
    for k, w in enumerate(word_ids):
        if w is not None and first[w] < 0:
            first[w] = k
    return first


def word_logits(piece_logits: np.ndarray, word_ids: Sequence[Optional[int]], n_words: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of each word's first piece (zeros where truncated) and the mask of words that fitted."""
    first = first_piece_index(word_ids, n_words)
    covered = first >= 0
    out = np.zeros((n_words, piece_logits.shape[-1]), dtype=np.float32)
    out[covered] = piece_logits[first[covered]]
    return out, covered


def token_metrics(split: TokenSplit, enc: Encoded, outputs: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, float]:
    """Entity precision/recall/F1 (seqeval), word accuracy and the mean cross-entropy of the words that
    fitted; ``outputs[i]`` is sentence i's piece logits."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    o = list(names).index("O") if "O" in names else 0
    y_true, y_pred, losses = [], [], []
    correct = total = 0
    truncated = 0
    for i, gold in enumerate(split.tags):
        logits, covered = word_logits(outputs[i], enc.word_ids[i], len(gold))
        pred = np.where(covered, logits.argmax(-1), o)
        truncated += int((~covered).sum())
        correct += int((pred == gold).sum())
        total += len(gold)
        y_true.append([names[t] for t in gold])
        y_pred.append([names[t] for t in pred])
        if covered.any():
            lg = torch.as_tensor(logits[covered], dtype=torch.float64)
            losses.append(torch.nn.functional.cross_entropy(lg, torch.as_tensor(gold[covered]), reduction="sum"))
    n_covered = total - truncated
    return {
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "accuracy": correct / total if total else 0.0,
        "loss": float(sum(losses)) / n_covered if n_covered else 0.0,
        "words_truncated": truncated,
    }


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of every entity, as seqeval reads a tag sequence."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [(t, s, e) for t, s, e in get_entities(list(tags))]


def predict_entities(text: str, word_ids: Sequence[Optional[int]], offsets: Sequence[tuple[int, int]],
                     piece_logits: np.ndarray, names: Sequence[str]) -> dict:
    """``ptft predict``'s row for one text: words (as the tokenizer splits them) and their tags, and
    the entities with character offsets into ``text`` and the mean probability of their words."""
    n_words = max((w for w in word_ids if w is not None), default=-1) + 1
    logits, covered = word_logits(piece_logits, word_ids, n_words)
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()
    tags = [names[int(p)] if c else "O" for p, c in zip(probs.argmax(-1), covered)]
    spans = [[None, None] for _ in range(n_words)]
    for k, w in enumerate(word_ids):
        if w is not None:
            a, b = offsets[k]
            spans[w][0] = a if spans[w][0] is None else min(spans[w][0], a)
            spans[w][1] = b if spans[w][1] is None else max(spans[w][1], b)
    out = []
    for typ, s, e in entities(tags):
        start, end = spans[s][0], spans[e][1]
        score = float(np.mean([probs[w].max() for w in range(s, e + 1)]))
        out.append({"type": typ, "text": text[start:end], "start": start, "end": end, "score": round(score, 6)})
    return {"entities": out, "words": [text[a:b] for a, b in spans], "tags": tags}
