"""Synthetic token classification and extractive QA data sets a tiny random model can learn.

NER: sentences of filler words with person / city / company names inserted; a name's tag follows
from its words (a gazetteer), so a model that learned word identity tags them right, and one that
learned nothing finds no entity (F1 0). QA: contexts of filler sentences with one "the code is
VALUE" sentence; the question asks for the code; the answer is the value (a word that only appears
as an answer). Unanswerable questions (SQuAD v2) have no code sentence in their context.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from ptft_dist.config import TokenizerConfig

PER = [["john", "smith"], ["mary", "jones"], ["ada"], ["alan", "turing"], ["grace"], ["linus"]]
LOC = [["paris"], ["new", "york"], ["berlin"], ["tokyo"], ["rio"]]
ORG = [["acme", "corp"], ["globex"], ["initech"], ["umbrella", "inc"]]
FILL = ["the", "a", "visited", "met", "with", "and", "in", "from", "works", "for", "said", "today", "yesterday",
        "went", "to", "saw", "near", "at", "big", "small", "old", "new", "report", "team", "city", "office"]
ENTITIES = {"PER": PER, "LOC": LOC, "ORG": ORG}
VALUES = ["red", "blue", "green", "amber", "violet", "silver", "orange", "indigo"]
QFILL = ["it", "was", "quiet", "morning", "people", "walked", "by", "river", "there", "many", "birds", "sang",
         "sun", "rose", "slowly", "over", "hills", "market", "opened", "early"]


def ner_sentence(rng: random.Random, scheme: str = "IOB2") -> tuple[list[str], list[str]]:
    words: list[str] = []
    tags: list[str] = []
    for _ in range(rng.randint(1, 3)):
        for _ in range(rng.randint(1, 3)):
            words.append(rng.choice(FILL))
            tags.append("O")
        typ = rng.choice(sorted(ENTITIES))
        name = rng.choice(ENTITIES[typ])
        words.extend(name)
        if scheme == "IOBES":
            tags.extend([f"S-{typ}"] if len(name) == 1 else [f"B-{typ}"] + [f"I-{typ}"] * (len(name) - 2) + [f"E-{typ}"])
        else:
            tags.extend([f"B-{typ}"] + [f"I-{typ}"] * (len(name) - 1))
    words.append(rng.choice(FILL))
    tags.append("O")
    return words, tags


def write_conll(path: Path, n: int, seed: int, scheme: str = "IOB2", docstart: bool = True) -> Path:
    """Three columns (word, POS placeholder, tag), a -DOCSTART- line and blank lines between sentences."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O", ""] if docstart else []
    for _ in range(n):
        words, tags = ner_sentence(rng, scheme)
        lines.extend(f"{w} NN {t}" for w, t in zip(words, tags))
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ner_jsonl(path: Path, n: int, seed: int, scheme: str = "IOB2") -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words, tags = ner_sentence(rng, scheme)
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    return path


def qa_example(rng: random.Random, answerable: bool = True) -> dict:
    """A context of 4-8 filler sentences, one of them "the code is VALUE" when answerable."""
    sentences = [" ".join(rng.choice(QFILL) for _ in range(rng.randint(3, 7))) + "." for _ in range(rng.randint(4, 8))]
    answers = {"text": [], "answer_start": []}
    if answerable:
        value = rng.choice(VALUES)
        k = rng.randrange(len(sentences) + 1)
        sentences.insert(k, f"the code is {value}.")
        context = " ".join(sentences)
        start = context.index(f"the code is {value}.") + len("the code is ")
        answers = {"text": [value], "answer_start": [start]}
    else:
        context = " ".join(sentences)
    return {"context": context, "question": "what is the code?", "answers": answers}


def qa_examples(n: int, seed: int, unanswerable: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"q{seed}-{i}", **qa_example(rng, rng.random() >= unanswerable)} for i in range(n)]


def write_qa_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def write_squad_json(path: Path, examples: list[dict]) -> Path:
    """SQuAD v2.0 layout: one paragraph per example, ``is_impossible`` for unanswerable ones."""
    paragraphs = []
    for e in examples:
        answers = [{"text": t, "answer_start": s} for t, s in zip(e["answers"]["text"], e["answers"]["answer_start"])]
        paragraphs.append({"context": e["context"], "qas": [{"id": e["id"], "question": e["question"],
                                                             "answers": answers, "is_impossible": not answers}]})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "synthetic", "paragraphs": paragraphs}]}))
    return path


def train_tokenizer(out: Path, seed: int = 0, extra: tuple[str, ...] = ()) -> Path:
    """A WordPiece tokenizer over both tasks' words (every name and value is a whole piece), and
    the ``extra`` texts'."""
    from ptft_dist.corpus.tokenizer import train_wordpiece

    rng = random.Random(seed)
    texts = [" ".join(ner_sentence(rng)[0]) for _ in range(400)] + [qa_example(rng)["context"] for _ in range(200)]
    texts += ["what is the code?"] * 10 + list(extra)
    train_wordpiece(texts, out, TokenizerConfig(vocab_size=300, min_frequency=1))
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
