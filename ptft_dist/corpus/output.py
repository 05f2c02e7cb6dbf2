"""The output directory of ``ptft prepare``: when it may be claimed, resumed or overwritten, which
files in it prepare wrote (the only ones ``--overwrite`` removes), and which files of an input
folder must never be read back as input (docs/design.md, guarantee 9; docs/refusals.md).

A directory is prepare's when it holds a ptft ``manifest.json`` (a finished corpus) or
``.prepare/state.json`` (a run in progress or crashed). Inside it, prepare writes only:
``manifest.json``, ``prepare_report.json``, ``resolved_config.yaml``, ``.prepare/``, the shard
files ``train|validation/shard-NNNNN-NNNNN.bin`` and the tokenizer files in ``tokenizer/``
(plus fsutil's hidden temporary names while writing them). Anything else is the user's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ptft_dist.corpus.format import MANIFEST_NAME, SPLITS, TOKENIZER_DIR
from ptft_dist.corpus.report import REPORT_NAME, WORK_DIR
from ptft_dist.errors import UserError
from ptft_dist.fsutil import is_within, remove_tree, write_json_atomic
from ptft_dist.log import get_logger

log = get_logger("prepare")

STATE = "state.json"  # .prepare/state.json: the inputs and settings of the run that owns the directory
RESOLVED = "resolved_config.yaml"
TOP_FILES = (MANIFEST_NAME, REPORT_NAME, RESOLVED, "resolved_config.tmp")  # .tmp: save_resolved's
OWNED_NAMES = (MANIFEST_NAME, REPORT_NAME, RESOLVED, TOKENIZER_DIR, *SPLITS, WORK_DIR)
_SHARD = re.compile(r"shard-\d{5}-\d{5}\.bin\Z")  # format.ShardWriter's names
_TEMP = re.compile(r"\A\..+\.tmp-\d+-[0-9a-f]{8}\Z")  # fsutil.temp_name
# What save_pretrained writes for a (fast) BERT-family tokenizer, trained or adopted.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                             "added_tokens.json", "chat_template.jinja", "chat_template.json"})
_SHOW = 5  # names listed in a message before "+N more"


class OutputError(UserError, ValueError):
    """An output directory prepare must not use as asked; the message says why and what to do."""


def is_prepared_corpus(path: Path) -> bool:
    """``path`` holds a manifest written by ``ptft prepare`` (not any file named manifest.json)."""
    try:
        data = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("created_by") == "ptft prepare" and "splits" in data


def _state(out: Path) -> dict | None:
    try:
        return json.loads((out / WORK_DIR / STATE).read_text())
    except (OSError, ValueError):
        return None


def is_prepare_output(out: Path) -> bool:
    return is_prepared_corpus(out) or (out / WORK_DIR / STATE).is_file()


def _names(paths: list[Path], root: Path) -> str:
    shown = ", ".join(str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in paths[:_SHOW])
    return shown + (f" (+{len(paths) - _SHOW} more)" if len(paths) > _SHOW else "")


# --------------------------------------------------------------------------- what prepare wrote


def _is_ours(folder: str, entry: Path) -> bool:
    if entry.is_symlink() or not entry.is_file():
        return False
    if _TEMP.match(entry.name):
        return True
    return entry.name in TOKENIZER_FILES if folder == TOKENIZER_DIR else bool(_SHARD.match(entry.name))


def written_by_prepare(out: Path) -> tuple[list[Path], list[Path]]:
    """(files prepare wrote, paths it did not) among the names prepare uses in ``out``.
    ``.prepare/`` counts as prepare's as a whole and is in neither list."""
    ours: list[Path] = []
    foreign: list[Path] = []
    for entry in sorted(out.iterdir()):
        if entry.name in TOP_FILES or _TEMP.match(entry.name):
            (ours if entry.is_file() and not entry.is_symlink() else foreign).append(entry)
    work = out / WORK_DIR
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        foreign.append(work)
    for folder in (TOKENIZER_DIR, *SPLITS):
        d = out / folder
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            foreign.append(d)
        elif d.is_dir():
            for entry in sorted(d.iterdir()):
                (ours if _is_ours(folder, entry) else foreign).append(entry)
    return ours, foreign


def _clear_previous(out: Path, fingerprint: dict) -> None:
    """``--overwrite`` of prepare's own directory: remove what it wrote, nothing else.

    The new state file is written first, so an interrupted removal still leaves a directory that
    is recognisably prepare's (the next run resumes or overwrites it again)."""
    ours, foreign = written_by_prepare(out)
    if foreign:
        raise OutputError(f"{out}: --overwrite removes only what ptft prepare wrote, and {_names(foreign, out)} "
                          f"{'was' if len(foreign) == 1 else 'were'} not written by it: move "
                          f"{'it' if len(foreign) == 1 else 'them'} away first (nothing was removed)")
    write_json_atomic(out / WORK_DIR / STATE, fingerprint)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the old corpus is invisible before any shard goes
    for entry in (out / WORK_DIR).iterdir():
        if entry.name != STATE:
            remove_tree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for p in ours:
        p.unlink(missing_ok=True)
    for folder in (TOKENIZER_DIR, *SPLITS):
        if (out / folder).is_dir() and not any((out / folder).iterdir()):
            (out / folder).rmdir()
    log.info(f"--overwrite: removed {len(ours)} file(s) of the previous prepare in {out}")


# --------------------------------------------------------------------------- claiming the directory


def _check_creatable(out: Path) -> None:
    """A path below an existing file cannot become a directory: say so instead of a traceback."""
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent.is_file() else "exists and is not a directory"
                raise OutputError(f"{out}: cannot be the output directory: {parent} {what}")
            return


def _start(out: Path, fingerprint: dict) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / WORK_DIR / STATE, fingerprint)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output directory ({exc.strerror or exc})") from None


def claim_output(out: Path, fingerprint: dict, overwrite: bool) -> bool:
    """Decide between fresh start, resume and refusal before anything is written. True: resuming."""
    _check_creatable(out)
    if not out.exists():
        _start(out, fingerprint)
        return False
    if is_prepare_output(out):
        if overwrite:
            _clear_previous(out, fingerprint)
            return False
        if is_prepared_corpus(out):
            raise OutputError(f"{out}: already holds a finished corpus; pass --overwrite to replace it")
        if _state(out) != fingerprint:
            raise OutputError(f"{out}: holds an unfinished prepare of other inputs or settings; "
                              "pass --overwrite to start over")
        return True
    clashes = [out / n for n in OWNED_NAMES if (out / n).exists() or (out / n).is_symlink()]
    if clashes:
        raise OutputError(f"{out}: holds {_names(clashes, out)}, which no ptft prepare wrote (there is no "
                          f"{MANIFEST_NAME} or {WORK_DIR}/ of a previous run); prepare never replaces what it "
                          "did not write: choose a new output directory or move them away")
    if not overwrite and any(out.iterdir()):
        raise OutputError(f"{out}: output directory exists and is not empty; pass --overwrite to write "
                          "the corpus beside its files")
    _start(out, fingerprint)
    return False


# --------------------------------------------------------------------------- inputs against the output


class InputScreen:
    """Why a local input file must not be read by a prepare writing to ``output``: it lies in the
    output, in a ptft work directory, or in a corpus ptft prepare made (reading those back would
    feed a corpus into itself, and a folder input that holds the output would grow with every run)."""

    def __init__(self, output: Path | None):
        self.output = output
        self._corpus: dict[Path, bool] = {}

    def _in_corpus(self, folder: Path) -> bool:
        if folder not in self._corpus:
            self._corpus[folder] = is_prepared_corpus(folder)
        return self._corpus[folder]

    def reason(self, path: Path) -> str | None:
        path = path.resolve()
        if self.output is not None and is_within(path, self.output):
            return f"inside the output directory {self.output}"
        for folder in [path, *path.parents]:
            if folder.name == WORK_DIR:
                return f"inside {folder}, a ptft prepare work directory"
            if self._in_corpus(folder):
                return f"part of {folder}, a corpus made by ptft prepare (it reads raw text)"
        return None

    def keep(self, spec: str, root: Path, paths: list[str]) -> list[str]:
        """The files of a folder or pattern (``root``: where it starts) that may be read; the others
        are logged. ``root`` itself in a forbidden place refuses the whole input."""
        why = self.reason(root)
        if why:
            raise OutputError(f"{spec}: will not read it as input: {why}")
        kept, skipped = [], []
        for p in paths:
            (skipped if self.reason(Path(p)) else kept).append(p)
        if skipped:
            shown = ", ".join(Path(p).name for p in skipped[:_SHOW])
            log.info(f"{spec}: skipped {len(skipped)} file(s) of ptft's own output or prepared corpora "
                     f"({shown}{' ...' if len(skipped) > _SHOW else ''})")
        return kept
