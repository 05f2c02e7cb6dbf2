"""Fine-tuning data: labelled examples from CSV/TSV/JSONL files or a HF dataset, with column mapping.

Splits are given, or made from the train file by a fixed-seed hash (80/10/10), so every machine
and rank sees the same split. Labels are mapped to ids from the train split only; a label that
appears only in validation/test is an error, not a silently new class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ptft_dist.config import FinetuneConfig
from ptft_dist.corpus.inputs import InputError

SPLITS = ("train", "validation", "test")


@dataclass
class Split:
    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray  # int64 class ids, or float32 targets for regression

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    splits: dict[str, Split]
    label_names: list[str] = field(default_factory=list)  # id -> original label (classification)
    empty_skipped: dict[str, int] = field(default_factory=dict)  # split -> examples dropped for an empty text
    warnings: list[str] = field(default_factory=list)  # splits whose metrics mean little (one class)
    info: dict = field(default_factory=dict)  # what the task's reader decided (tag scheme, no-answer examples, ...)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 1


def _read_table(path: str, cfg: FinetuneConfig) -> dict[str, list]:
    """Columns of a CSV/TSV/JSONL file (local or fsspec URL) as lists."""
    import datasets

    name = path.lower()
    for comp in (".gz", ".zst", ".bz2", ".xz"):
        name = name.removesuffix(comp)
    if name.endswith(".tsv"):
        kind, kwargs = "csv", {"delimiter": "\t"}
    elif name.endswith(".csv"):
        kind, kwargs = "csv", {}
    elif name.endswith((".jsonl", ".json")):
        kind, kwargs = "json", {}
    elif name.endswith(".parquet"):
        kind, kwargs = "parquet", {}
    else:
        raise InputError(f"{path}: unsupported task file type (use .csv, .tsv, .jsonl, .json, .parquet)")
    if "://" not in path and not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train", **kwargs)
    except Exception as exc:
        if _has_no_rows(path, kind):
            return {}
        raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    return ds.to_dict()


def _hf_splits(cfg: FinetuneConfig) -> dict[str, dict[str, list]]:
    import datasets

    from ptft_dist.corpus.inputs import parse_hf_spec

    name, config, _ = parse_hf_spec(cfg.hf_dataset if cfg.hf_dataset.startswith("hf:") else f"hf:{cfg.hf_dataset}")
    try:
        dd = datasets.load_from_disk(name) if Path(name, "dataset_dict.json").exists() else datasets.load_dataset(name, config)
    except Exception as exc:
        raise InputError(f"finetune.hf_dataset: cannot load {cfg.hf_dataset} ({exc})") from None
    return {s: dd[s].to_dict() for s in SPLITS if s in dd}


def _columns(table: dict[str, list], where: str, cfg: FinetuneConfig) -> tuple[list[str], list[str] | None, list]:
    needed = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for col in needed:
        if col not in table:
            raise InputError(f"{where}: no column '{col}' (columns: {', '.join(table)}); "
                             f"set finetune.text_column / text_pair_column / label_column{_task_hint(table)}")
    texts = [str(t) if t is not None else "" for t in table[cfg.text_column]]
    pairs = [str(t) if t is not None else "" for t in table[cfg.text_pair_column]] if cfg.text_pair_column else None
    return texts, pairs, table[cfg.label_column]


def _task_hint(table: dict) -> str:
    """A file of another task type's shape: say so (a task_type/data mismatch is the likely cause)."""
    cols = set(table)
    if {"tokens", "tags"} <= cols or {"tokens", "ner_tags"} <= cols:
        return "; the file looks like token classification data: set finetune.task_type=token_classification"
    if {"context", "question"} <= cols or "data" in cols:
        return "; the file looks like extractive QA data: set finetune.task_type=extractive_qa"
    return ""


def _hash_split(texts: list[str], seed: int) -> np.ndarray:
    """0/1/2 = train/validation/test per example, 80/10/10 by a fixed-seed hash of the text."""
    out = np.empty(len(texts), dtype=np.int8)
    for i, t in enumerate(texts):
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{i}:{t}".encode(), digest_size=8).digest(), "little") % 10
        out[i] = 0 if h < 8 else (1 if h == 8 else 2)
    return out


Columns = tuple[str, list[str], Optional[list[str]], list]  # where, texts, pairs, raw labels


def load_task(cfg: FinetuneConfig) -> TaskData:
    """The train/validation/test splits of ``cfg``'s task, labels as ids (raises InputError)."""
    raw = _read_splits(cfg)
    if "train" not in raw:
        raise InputError("finetune.train_file: required (or finetune.hf_dataset with a train split)")
    for split, (where, table) in raw.items():
        if not any(len(v) for v in table.values()):
            raise InputError(f"{where}: the {split} split has no examples")
    columns = {s: (where, *_columns(t, where, cfg)) for s, (where, t) in raw.items()}
    skipped = _drop_empty_texts(columns, cfg)
    carved = [s for s in ("validation", "test") if s not in columns]
    _carve_missing_splits(columns, cfg.split_seed)
    _check_carved(columns, carved)
    _subsample_train(columns, cfg.max_train_samples, cfg.split_seed)
    task = _encode_labels(columns, cfg)
    task.empty_skipped = skipped
    task.warnings = [w for split, (where, *_) in columns.items() if (w := _one_class_warning(task, split, where))]
    return task


def _has_no_rows(path: str, kind: str) -> bool:
    """A local table file with nothing but (at most) a header line: the datasets reader fails on it."""
    if "://" in path or path.lower().endswith((".gz", ".zst", ".bz2", ".xz", ".parquet")):
        return False
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return False
    return len(lines) <= (1 if kind == "csv" else 0)


def _is_empty(text: str, pair: Optional[str]) -> bool:
    return not text.strip() and (pair is None or not pair.strip())


def _drop_empty_texts(columns: dict[str, Columns], cfg: FinetuneConfig) -> dict[str, int]:
    """Examples without any text carry nothing but a label: skipped and counted per split; a split
    of nothing else is refused (its metrics would describe the label prior, not the model)."""
    skipped = {}
    for split, cols in list(columns.items()):
        where, texts, pairs, labels = cols
        keep = np.asarray([not _is_empty(t, pairs[i] if pairs else None) for i, t in enumerate(texts)], dtype=bool)
        if not keep.any():
            raise InputError(f"{where}: the {split} split has no non-empty text (all {len(texts)} rows are empty in "
                             f"column '{cfg.text_column}'); check finetune.text_column")
        _check_labels_present(where, split, labels, cfg)
        if not keep.all():
            skipped[split] = int((~keep).sum())
            columns[split] = _take(cols, np.flatnonzero(keep))
    return skipped


def _check_labels_present(where: str, split: str, labels: list, cfg: FinetuneConfig) -> None:
    missing = [i for i, x in enumerate(labels) if x is None or (isinstance(x, float) and x != x)]
    if missing:
        raise InputError(f"{where}: {len(missing)} row(s) of the {split} split have no value in label column "
                         f"'{cfg.label_column}' (first: data row {missing[0] + 1})")


def _check_carved(columns: dict[str, Columns], carved: list[str]) -> None:
    where, n = columns["train"][0], len(columns["train"][1]) + sum(len(columns[s][1]) for s in carved)
    for split in carved:
        if not columns[split][1]:
            raise InputError(f"{where}: the {split} split is empty: {n} examples are too few to carve one out "
                             f"(about 10% go to each of validation and test); give finetune.{split}_file")


def _one_class_warning(task: TaskData, split: str, where: str) -> str:
    """A validation/test split of one class (or one regression target): its numbers mean little."""
    if split == "train":
        return ""
    values = np.unique(task.splits[split].labels)
    if len(values) != 1:
        return ""
    if task.label_names:
        return (f"{where}: the {split} split has one class only ({task.label_names[int(values[0])]!r}): accuracy "
                f"can reach 1.0 by always predicting it; give a {split} split with examples of every class")
    return f"{where}: every target of the {split} split is {float(values[0])}: correlations are undefined there"


def _read_splits(cfg: FinetuneConfig) -> dict[str, tuple[str, dict[str, list]]]:
    if cfg.hf_dataset:
        return {s: (f"{cfg.hf_dataset}[{s}]", t) for s, t in _hf_splits(cfg).items()}
    raw = {}
    for split, path in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file)):
        if path:
            raw[split] = (path, _read_table(path, cfg))
    return raw


def _take(cols: Columns, idx: np.ndarray) -> Columns:
    where, texts, pairs, labels = cols
    return where, [texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None, [labels[i] for i in idx]


def _carve_missing_splits(columns: dict[str, Columns], seed: int) -> None:
    """Missing validation/test splits come out of train (a fixed-seed hash); train keeps the rest."""
    missing = [s for s in ("validation", "test") if s not in columns]
    if not missing:
        return
    train = columns["train"]
    assign = _hash_split(train[1], seed)
    codes = {"train": [0] + [SPLITS.index(s) for s in ("validation", "test") if s not in missing]}
    codes.update({s: [SPLITS.index(s)] for s in missing})
    for split, wanted in codes.items():
        columns[split] = _take(train, np.flatnonzero(np.isin(assign, wanted)))


def _subsample_train(columns: dict[str, Columns], n: int, seed: int) -> None:
    """``finetune.max_train_samples``: a fixed-seed subset, in original order, cut before the labels
    are numbered (so the label set is that of the examples trained on)."""
    if n and len(columns["train"][1]) > n:
        idx = np.sort(np.random.default_rng(seed).permutation(len(columns["train"][1]))[:n])
        columns["train"] = _take(columns["train"], idx)


def _encode_labels(columns: dict[str, Columns], cfg: FinetuneConfig) -> TaskData:
    splits: dict[str, Split] = {}
    if cfg.task_type == "regression":
        for split, (where, texts, pairs, labels) in columns.items():
            try:
                y = np.asarray(labels, dtype=np.float32)
            except (TypeError, ValueError):
                raise InputError(f"{where}: label column '{cfg.label_column}' is not numeric") from None
            splits[split] = Split(texts, pairs, y)
        return TaskData(splits)
    train_labels = columns["train"][3]
    names = sorted({str(x) for x in train_labels}, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    if len(names) < 2:
        raise InputError(f"{columns['train'][0]}: fewer than two label values in the train split ({names})")
    ids = {n: i for i, n in enumerate(names)}
    for split, (where, texts, pairs, labels) in columns.items():
        unseen = sorted({str(x) for x in labels} - set(ids))
        if unseen:
            raise InputError(f"{where}: label(s) {unseen[:5]} never appear in the train split (labels: {names})")
        splits[split] = Split(texts, pairs, np.asarray([ids[str(x)] for x in labels], dtype=np.int64))
    return TaskData(splits, names)
