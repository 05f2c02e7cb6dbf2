"""Token classification data (NER, POS, chunking): words and their tags, read from CoNLL-style column
files or JSONL, checked against the tag scheme before anything trains.

* CoNLL: one word per line, whitespace-separated columns (``finetune.conll_token_column``,
  ``finetune.conll_tag_column``), a blank line between sentences, ``-DOCSTART-`` lines ignored.
  Every line of a file has the column count of its first word line.
* JSONL (``.jsonl``/``.json``): one sentence per line, ``finetune.tokens_column`` and
  ``finetune.tags_column`` lists of equal length.

Tags follow IOB2 (= BIO: every entity starts with ``B-``) or IOBES (``finetune.tag_scheme``; auto:
IOBES when the train split has an ``E-``/``S-`` tag). A tag outside the scheme or a sequence it
forbids (``I-PER`` after ``O`` in IOB2, an unfinished ``B-`` in IOBES) is an error naming file,
line and tag: a silently repaired tag would train the model on something the user did not write
(docs/design.md, guarantee 7). Tag ids come from the train split; a tag only in validation/test is
an error, as for classification labels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptft_dist.config import FinetuneConfig
from ptft_dist.corpus.inputs import InputError

JSON_SUFFIXES = (".jsonl", ".json")
TAG_RE = re.compile(r"^([BIES])-(.+)$")
SCHEME_PREFIXES = {"IOB2": "BI", "IOBES": "BIES"}


@dataclass
class TokenSplit:
    """Sentences of one split: words, tag ids, and where each word came from (for messages)."""

    tokens: list[list[str]]
    tags: list[np.ndarray]  # int64 tag ids, one per word
    lines: list[list[int]]  # line of each word in ``path`` (JSONL: the record's line for every word)
    path: str

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class RawSplit:
    path: str
    tokens: list[list[str]]
    tags: list[list[str]]
    lines: list[list[int]]


# --------------------------------------------------------------------------- reading


def read_conll(path: str, token_col: int, tag_col: int) -> RawSplit:
    """Sentences of a CoNLL column file; a line whose column count differs from the file's first word
    line is an error naming file:line."""
    raw = RawSplit(path, [], [], [])
    words: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    width = 0

    def flush() -> None:
        if words:
            raw.tokens.append(list(words))
            raw.tags.append(list(tags))
            raw.lines.append(list(lines))
            words.clear(), tags.clear(), lines.clear()

    for n, line in enumerate(_text(path).splitlines(), 1):
        cols = line.split()
        if not cols:
            flush()
            continue
        if cols[0] == "-DOCSTART-":
            flush()
            continue
        if not width:
            width = len(cols)
            _check_columns(path, n, width, token_col, tag_col)
        if len(cols) != width:
            raise InputError(f"{path}:{n}: {len(cols)} column(s), but the file's first word line has {width} "
                             f"(one word per line, whitespace-separated columns)")
        words.append(cols[token_col])
        tags.append(cols[tag_col])
        lines.append(n)
    flush()
    return raw


def _check_columns(path: str, n: int, width: int, token_col: int, tag_col: int) -> None:
    for key, col in (("conll_token_column", token_col), ("conll_tag_column", tag_col)):
        if not -width <= col < width:
            raise InputError(f"{path}:{n}: finetune.{key}={col}, but the line has {width} column(s)")
    if width < 2 or token_col % width == tag_col % width:
        raise InputError(f"{path}:{n}: a CoNLL line needs a word column and a different tag column "
                         f"(found {width} column(s); finetune.conll_token_column={token_col}, conll_tag_column={tag_col})")


def read_jsonl(path: str, tokens_key: str, tags_key: str) -> RawSplit:
    """Sentences of a JSONL file: ``tokens`` and ``tags`` lists of equal length per line."""
    raw = RawSplit(path, [], [], [])
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or tokens_key not in rec or tags_key not in rec:
            keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise InputError(f"{path}:{n}: needs '{tokens_key}' and '{tags_key}' lists (found: {keys}); "
                             f"set finetune.tokens_column / tags_column")
        words, tags = rec[tokens_key], rec[tags_key]
        if not isinstance(words, list) or not isinstance(tags, list):
            raise InputError(f"{path}:{n}: '{tokens_key}' and '{tags_key}' must be lists")
        if len(words) != len(tags):
            raise InputError(f"{path}:{n}: {len(words)} tokens but {len(tags)} tags")
        if words:
            raw.tokens.append([str(w) for w in words])
            raw.tags.append([str(t) for t in tags])
            raw.lines.append([n] * len(words))
    return raw


def _text(path: str) -> str:
    if "://" not in path and not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    import fsspec

    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def read_split(path: str, cfg: FinetuneConfig) -> RawSplit:
    name = path.lower()
    for comp in (".gz", ".zst", ".bz2", ".xz"):
        name = name.removesuffix(comp)
    if name.endswith(JSON_SUFFIXES):
        return read_jsonl(path, cfg.tokens_column, cfg.tags_column)
    return read_conll(path, cfg.conll_token_column, cfg.conll_tag_column)


# --------------------------------------------------------------------------- tag scheme


def resolve_scheme(scheme: str, train_tags: list[list[str]]) -> str:
    """IOB2 (BIO is its other name) or IOBES; auto: IOBES when an E-/S- tag appears in train."""
    if scheme == "BIO":
        return "IOB2"
    if scheme != "auto":
        return scheme
    return "IOBES" if any(t[:2] in ("E-", "S-") for sent in train_tags for t in sent) else "IOB2"


def check_sentence(tags: list[str], scheme: str, where: list[str]) -> None:
    """Every tag of the scheme, every transition it allows; ``where[j]`` locates word j."""
    prefixes = SCHEME_PREFIXES[scheme]
    prev_open = ""  # the entity type a B-/I- left open (IOBES: must continue; IOB2: may continue)
    for j, tag in enumerate(tags):
        m = TAG_RE.match(tag)
        if tag != "O" and (not m or m.group(1) not in prefixes):
            allowed = "O, " + ", ".join(f"{p}-TYPE" for p in prefixes)
            raise InputError(f"{where[j]}: tag {tag!r} is not an {scheme} tag ({allowed}); set finetune.tag_scheme")
        kind, typ = (m.group(1), m.group(2)) if m else ("O", "")
        continues = kind in ("I", "E")
        if continues and prev_open != typ:
            before = f"after {tags[j - 1]!r}" if j else "at the start of a sentence"
            raise InputError(f"{where[j]}: tag {tag!r} {before}: an {scheme} entity starts with "
                             f"{'B-' if scheme == 'IOB2' else 'B- or S-'}{typ} (finetune.tag_scheme={scheme})")
        if scheme == "IOBES" and prev_open and not continues:
            raise InputError(f"{where[j]}: tag {tag!r} after {tags[j - 1]!r}: an IOBES entity ends with E-{prev_open}")
        prev_open = typ if kind in ("B", "I") else ""
    if scheme == "IOBES" and prev_open:
        raise InputError(f"{where[len(tags) - 1]}: the sentence ends inside an entity ({tags[-1]!r}): an IOBES entity ends "
                         f"with E-{prev_open}")


def _check_split(raw: RawSplit, scheme: str) -> None:
    for tags, lines in zip(raw.tags, raw.lines):
        check_sentence(tags, scheme, [f"{raw.path}:{n}" for n in lines])


# --------------------------------------------------------------------------- the task


def load_token_splits(cfg: FinetuneConfig) -> tuple[dict[str, TokenSplit], list[str], str]:
    """The splits (tag ids), the tag names (id order) and the resolved scheme (raises InputError)."""
    paths = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    if cfg.hf_dataset:
        raise InputError("finetune.hf_dataset: token_classification reads CoNLL or JSONL files (finetune.train_file, "
                         "validation_file, test_file)")
    missing = [f"finetune.{s}_file" for s, p in paths.items() if not p]
    if missing:
        raise InputError(f"{', '.join(missing)}: required for token_classification (no split is carved out of "
                         f"train: sentences of one document would land in two splits)")
    raw = {s: read_split(str(p), cfg) for s, p in paths.items()}
    for split, r in raw.items():
        if not r.tokens:
            raise InputError(f"{r.path}: the {split} split has no sentences")
    scheme = resolve_scheme(cfg.tag_scheme, raw["train"].tags)
    for r in raw.values():
        _check_split(r, scheme)
    if cfg.max_train_samples and len(raw["train"].tokens) > cfg.max_train_samples:
        keep = np.sort(np.random.default_rng(cfg.split_seed).permutation(len(raw["train"].tokens))[:cfg.max_train_samples])
        r = raw["train"]
        raw["train"] = RawSplit(r.path, [r.tokens[i] for i in keep], [r.tags[i] for i in keep], [r.lines[i] for i in keep])
    names = sorted({t for sent in raw["train"].tags for t in sent}, key=lambda t: (t != "O", t[2:], t))
    if len(names) < 2:
        raise InputError(f"{raw['train'].path}: fewer than two tags in the train split ({names})")
    ids = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, r in raw.items():
        for tags, lines in zip(r.tags, r.lines):
            for tag, n in zip(tags, lines):
                if tag not in ids:
                    raise InputError(f"{r.path}:{n}: tag {tag!r} never appears in the train split (tags: {names})")
        splits[split] = TokenSplit(r.tokens, [np.asarray([ids[t] for t in s], dtype=np.int64) for s in r.tags],
                                   r.lines, r.path)
    return splits, names, scheme
