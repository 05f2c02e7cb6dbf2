"""Extractive QA data: SQuAD v1.1/v2.0 JSON or flat JSONL read and checked, and long contexts cut into
overlapping windows (features) with the answer mapped to token positions.

* SQuAD JSON: ``{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers":
  [{"text", "answer_start"}], "is_impossible"}]}]}]}``; v2.0's unanswerable questions have no answers.
* JSONL: one question per line, ``context``, ``question``, ``answers`` as ``{"text": [...],
  "answer_start": [...]}`` (the Hugging Face ``squad`` layout) or a list of ``{text, answer_start}``;
  ``id`` optional.

An answer whose ``answer_start`` does not point at its text is an error naming the example
(``finetune.bad_answers=fail``) or is dropped and counted (``skip``; a question left without answers
is dropped too, it was not meant to be unanswerable). A context longer than ``max_seq_len`` is cut
into windows that share ``finetune.doc_stride`` tokens; a question so long that no context window
with that overlap fits is an error naming the example (docs/design.md, guarantee 7). A training
window that does not contain its answer (or an unanswerable question) points at [CLS].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptft_dist.config import FinetuneConfig
from ptft_dist.corpus.inputs import InputError
from ptft_dist.finetune.batches import Encoded


@dataclass
class QASplit:
    """Questions of one split, each with its context and gold answers (text, start char)."""

    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[tuple[str, int]]]
    path: str
    answers_skipped: int = 0
    examples_skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Reader:
    path: str
    bad_answers: str
    split: QASplit = field(init=False)

    def __post_init__(self) -> None:
        self.split = QASplit([], [], [], [], self.path)

    def add(self, qid: str, question: str, context: str, answers: list[tuple[str, int]], where: str) -> None:
        good = []
        for text, start in answers:
            if context[start:start + len(text)] == text and text:
                good.append((text, start))
                continue
            if self.bad_answers == "fail":
                found = context[start:start + len(text)] if 0 <= start < len(context) else "(outside the context)"
                raise InputError(f"{where}: answer_start={start} does not point at the answer {text!r} (the context "
                                 f"there reads {found!r}); fix it or set finetune.bad_answers=skip")
            self.split.answers_skipped += 1
        if answers and not good:  # every answer was bad: it is not an unanswerable question
            self.split.examples_skipped += 1
            return
        s = self.split
        s.ids.append(qid), s.questions.append(question), s.contexts.append(context), s.answers.append(good)


def _answers(raw: Any, where: str) -> list[tuple[str, int]]:
    if isinstance(raw, dict):  # {"text": [...], "answer_start": [...]}
        texts, starts = raw.get("text", []), raw.get("answer_start", [])
        if len(texts) != len(starts):
            raise InputError(f"{where}: answers has {len(texts)} text(s) but {len(starts)} answer_start(s)")
        raw = [{"text": t, "answer_start": a} for t, a in zip(texts, starts)]
    if not isinstance(raw, list):
        raise InputError(f"{where}: answers must be a list of {{text, answer_start}} or {{text: [...], answer_start: [...]}}")
    out = []
    for a in raw:
        if not isinstance(a, dict) or "text" not in a or "answer_start" not in a:
            raise InputError(f"{where}: an answer needs text and answer_start (found {a!r})")
        try:
            out.append((str(a["text"]), int(a["answer_start"])))
        except (TypeError, ValueError):
            raise InputError(f"{where}: answer_start {a['answer_start']!r} is not an integer") from None
    return out


def _read_squad_json(data: dict, reader: _Reader) -> None:
    for article in data.get("data", []):
        for p, para in enumerate(article.get("paragraphs", [])):
            context = str(para.get("context", ""))
            for q in para.get("qas", []):
                qid = str(q.get("id", f"{article.get('title', '?')}/{p}/{len(reader.split)}"))
                where = f"{reader.path}: question id {qid}"
                answers = [] if q.get("is_impossible") else _answers(q.get("answers", []), where)
                reader.add(qid, str(q.get("question", "")), context, answers, where)


def _read_jsonl(text: str, reader: _Reader) -> None:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{reader.path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or not {"context", "question", "answers"} <= set(rec):
            keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            hint = "; set finetune.task_type=token_classification" if isinstance(rec, dict) and "tokens" in rec else ""
            raise InputError(f"{where}: an extractive QA record needs context, question and answers (found: {keys}){hint}")
        qid = str(rec.get("id", n))
        reader.add(qid, str(rec["question"]), str(rec["context"]), _answers(rec["answers"], f"{where} (id {qid})"), f"{where} (id {qid})")


def read_qa_file(path: str, bad_answers: str) -> QASplit:
    if "://" not in path and not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    import fsspec

    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    reader = _Reader(path, bad_answers)
    stripped = text.lstrip()
    if stripped.startswith("{") and '"data"' in stripped[:2000] and "\n{" not in stripped.strip():
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not a SQuAD JSON file ({exc.msg} at line {exc.lineno})") from None
        _read_squad_json(data, reader)
    else:
        _read_jsonl(text, reader)
    return reader.split


def load_qa_splits(cfg: FinetuneConfig) -> tuple[dict[str, QASplit], dict]:
    """Train/validation/test splits and what reading them decided (raises InputError)."""
    if cfg.hf_dataset:
        raise InputError("finetune.hf_dataset: extractive_qa reads SQuAD JSON or JSONL files (finetune.train_file, "
                         "validation_file, test_file)")
    paths = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    missing = [f"finetune.{s}_file" for s, p in paths.items() if not p]
    if missing:
        raise InputError(f"{', '.join(missing)}: required for extractive_qa (questions on one context must not "
                         f"land in two splits)")
    splits = {s: read_qa_file(str(p), cfg.bad_answers) for s, p in paths.items()}
    for name, sp in splits.items():
        if not len(sp):
            raise InputError(f"{sp.path}: the {name} split has no questions")
    if cfg.max_train_samples and len(splits["train"]) > cfg.max_train_samples:
        tr = splits["train"]
        keep = np.sort(np.random.default_rng(cfg.split_seed).permutation(len(tr))[:cfg.max_train_samples])
        splits["train"] = QASplit([tr.ids[i] for i in keep], [tr.questions[i] for i in keep],
                                  [tr.contexts[i] for i in keep], [tr.answers[i] for i in keep], tr.path,
                                  tr.answers_skipped, tr.examples_skipped)
    info = {"no_answer": any(not a for sp in splits.values() for a in sp.answers),
            "answers_skipped": {n: sp.answers_skipped for n, sp in splits.items() if sp.answers_skipped},
            "examples_skipped": {n: sp.examples_skipped for n, sp in splits.items() if sp.examples_skipped}}
    return splits, info


# --------------------------------------------------------------------------- windows


def check_question_room(tokenizer: Any, split: QASplit, max_seq_len: int, stride: int) -> None:
    """Every question must leave a context window longer than the stride: [CLS] Q [SEP] C [SEP]."""
    lengths = [len(x) for x in tokenizer(split.questions, add_special_tokens=False)["input_ids"]]
    for i, n in enumerate(lengths):
        room = max_seq_len - n - 3
        if room <= stride:
            raise InputError(f"{split.path}: question id {split.ids[i]} is {n} tokens: with finetune.max_seq_len="
                             f"{max_seq_len} a context window has {max(room, 0)} tokens, not more than "
                             f"finetune.doc_stride={stride}; raise max_seq_len or lower doc_stride")


def answer_positions(offsets: list, answer: tuple[str, int]) -> tuple[int, int]:
    """Token (start, end) of the answer inside one window; (0, 0) ([CLS]) when it is not all inside."""
    text, start_char = answer
    end_char = start_char + len(text)
    ctx = [k for k, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return 0, 0
    start = next(k for k in ctx if offsets[k][1] > start_char)
    end = next(k for k in reversed(ctx) if offsets[k][0] < end_char)
    return start, end


def encode_qa(tokenizer: Any, split: QASplit, max_seq_len: int, stride: int, train: bool = False) -> Encoded:
    """[CLS] question [SEP] context window [SEP] features; ``train`` adds the answer positions of the
    first gold answer (``start_positions`` / ``end_positions``)."""
    if not len(split):
        return Encoded([], [], offsets=[], example_of=np.zeros(0, dtype=np.int64))
    check_question_room(tokenizer, split, max_seq_len, stride)
    enc = tokenizer(split.questions, split.contexts, truncation="only_second", max_length=max_seq_len,
                    stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding=False,
                    return_token_type_ids=True, return_attention_mask=False)
    example_of = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
    offsets = []
    for f in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(f)
        offsets.append([tuple(o) if seq[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][f])])
    out = Encoded(enc["input_ids"], enc["token_type_ids"], offsets=offsets, example_of=example_of)
    if train:
        pos = [answer_positions(offsets[f], split.answers[e][0]) if split.answers[e] else (0, 0)
               for f, e in enumerate(example_of)]
        out.targets["start_positions"] = [p[0] for p in pos]
        out.targets["end_positions"] = [p[1] for p in pos]
    return out


def answers_outside_windows(split: QASplit, enc: Encoded) -> int:
    """Answerable questions whose first answer lies whole in none of their windows (an answer longer
    than a window): they train as unanswerable and are counted, not crashed on."""
    inside = np.zeros(len(split), dtype=bool)
    for f, e in enumerate(enc.example_of):
        if split.answers[e] and answer_positions(enc.offsets[f], split.answers[e][0]) != (0, 0):
            inside[e] = True
    return int(sum(1 for e in range(len(split)) if split.answers[e] and not inside[e]))
