"""Document cleaning and quality filters: pure functions of the text, applied to every document.

``clean_document`` is the entry point the prepare step calls per document; it normalises the text
(mojibake, Unicode form, invisible characters, whitespace) and then either keeps it or names the
filter that dropped it, so the prepare report can count drops per reason.

Speed matters (every byte of the corpus passes through here), so the per-character work is done by
C-level ``str`` methods and precompiled regexes, and ftfy, the slow part, only runs on the lines it
would change.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import defaultdict
from itertools import chain

import ftfy
from ftfy.badness import is_bad
from ftfy.chardata import CHARMAP_ENCODINGS

from ptft_dist.config import CleanConfig

__all__ = ["REASONS", "clean_document", "normalize_text", "quality_reason"]

#: Every value :func:`quality_reason` can return (besides None).
REASONS = ("too_short", "too_long", "low_alpha", "repeated_lines")

# Only the encoding repairs: no HTML unescaping, quote uncurling, ligature or width folding (those
# change legitimate text), and no normalisation or line-break handling (done below, once).
_FTFY_CONFIG = ftfy.TextFixerConfig(
    unescape_html=False,
    uncurl_quotes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    fix_line_breaks=False,
    normalization=None,
    explain=False,
)


def _code_points_by_category() -> dict[str, list[int]]:
    """Control, format, separator and mark code points by general category, in one scan (~30 ms).

    Planes 2-13 hold only letters and unassigned code points, so they are skipped.
    """
    out: dict[str, list[int]] = defaultdict(list)
    for cp in chain(range(0x20000), range(0xE0000, 0xE1000)):
        category = unicodedata.category(chr(cp))
        if category[0] in "CZM":
            out[category].append(cp)
    return out


def _char_class(code_points: list[int]) -> str:
    """A regex character-class body matching the sorted ``code_points``, as ranges."""
    parts = []
    start = prev = code_points[0]
    for cp in [*code_points[1:], -1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
        start = prev = cp
    return "".join(parts)


def _mojibake_hint() -> re.Pattern[str]:
    """A cheap pre-filter for ftfy's own (slow) ``is_bad`` test: a whole UTF-8 multi-byte sequence
    (lead byte, then 1-3 continuation bytes) as the single-byte codecs that ftfy undoes decode it,
    or Â/Ã then a space (a lost 0xA0). Mojibake that ftfy can decode contains such a sequence."""

    def decoded(first: int, last: int) -> str:
        chars = set()
        for encoding in CHARMAP_ENCODINGS:
            chars.update(bytes(range(first, last + 1)).decode(encoding, errors="ignore"))
        return "[" + _char_class(sorted(map(ord, chars))) + "]"

    cont = decoded(0x80, 0xBF)[:-1] + "\ufffd]"  # U+FFFD: a continuation byte lost on the way
    lead2, lead3, lead4 = decoded(0xC2, 0xDF), decoded(0xE0, 0xEF), decoded(0xF0, 0xF4)
    return re.compile(f"{lead2}{cont}|{lead3}{cont}{{2}}|{lead4}{cont}{{3}}|[\u00c2\u00c3] ")


_MOJIBAKE_HINT = _mojibake_hint()
# What ftfy repairs besides mojibake: C1 controls (as Windows-1252), ANSI escapes, surrogate pairs.
_FTFY_OTHER = re.compile("[\x1b\x80-\x9f\ud800-\udfff]")

# Invisible characters (controls, format characters, lone surrogates) are dropped; the ones that
# separate words become a space or a line break instead, so that dropping them does not glue words.
# ZWNJ/ZWJ stay: they are spelling in Persian and Indic scripts, and join emoji sequences.
_BY_CATEGORY = _code_points_by_category()
_TRANSLATE: dict[int, str | None] = {
    **dict.fromkeys(_BY_CATEGORY["Cc"] + _BY_CATEGORY["Cf"] + _BY_CATEGORY["Cs"]),
    **dict.fromkeys(_BY_CATEGORY["Zs"], " "),
    **dict.fromkeys(map(ord, "\t\x1c\x1d\x1e\x1f"), " "),
    **dict.fromkeys(map(ord, "\v\f\r\x85\u2028"), "\n"),
    0x2029: "\n\n",  # paragraph separator: keep the paragraph boundary
}
_TRANSLATE = {cp: to for cp, to in _TRANSLATE.items() if chr(cp) not in "\n \u200c\u200d"}
_ODD_CHARS = re.compile("[" + _char_class(sorted(_TRANSLATE)) + "]")

_MULTI_SPACE = re.compile(" {2,}")
_MULTI_NEWLINE = re.compile("\n{3,}")

# Characters that are neither letters (or combining marks, which Indic and other scripts need to
# spell words) nor whitespace: digits, punctuation, symbols.
_MARKS = sorted(_BY_CATEGORY["Mn"] + _BY_CATEGORY["Mc"] + _BY_CATEGORY["Me"])
_NON_ALPHA = re.compile(r"[^\w\s" + _char_class(_MARKS) + r"]|[\d_]")
del _BY_CATEGORY, _MARKS
# The same counts for ASCII text (most of a typical corpus) via str.translate's ASCII fast path.
_ASCII_SPACE = "".join(c for c in map(chr, range(128)) if c.isspace())
_DELETE_SPACE = str.maketrans("", "", _ASCII_SPACE)
_DELETE_ALPHA_AND_SPACE = str.maketrans("", "", string.ascii_letters + _ASCII_SPACE)


def _needs_ftfy(line: str) -> bool:
    """Would ftfy change ``line``? The answer ftfy's own gate gives, with a cheap pre-filter first."""
    return bool(_FTFY_OTHER.search(line)) or bool(_MOJIBAKE_HINT.search(line) and is_bad(line))


def _fix_mojibake(text: str) -> str:
    if text.isascii() and "\x1b" not in text:  # mojibake needs non-ASCII; ESC: ANSI escapes for ftfy
        return text
    if not (_FTFY_OTHER.search(text) or _MOJIBAKE_HINT.search(text)):
        return text
    # ftfy works line by line too; only the lines it would change pay for it.
    return "\n".join(ftfy.fix_text(line, _FTFY_CONFIG) if _needs_ftfy(line) else line for line in text.split("\n"))


def normalize_text(text: str, fix_mojibake: bool = True) -> str:
    """Repair mojibake, NFC-normalise, drop invisible characters and tidy whitespace.

    Line breaks survive (one ``\\n`` per line, a blank line between paragraphs) because sentence
    splitting and the txt document boundary rely on them; everything else that is whitespace
    becomes a single space, and lines lose leading and trailing spaces.
    """
    if fix_mojibake:
        text = _fix_mojibake(text)
    text = text.replace("\r\n", "\n")
    if text.isascii() or _ODD_CHARS.search(text):  # translate is fast on ASCII, slow otherwise
        text = text.translate(_TRANSLATE)
    text = unicodedata.normalize("NFC", text)  # after the drops, which can expose composable pairs
    if "  " in text:
        text = _MULTI_SPACE.sub(" ", text)
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    if "\n\n\n" in text:
        text = _MULTI_NEWLINE.sub("\n\n", text)
    return text.strip()


def _alpha_ratio(text: str) -> float:
    if text.isascii():
        non_space = len(text.translate(_DELETE_SPACE))
        non_alpha = len(text.translate(_DELETE_ALPHA_AND_SPACE))
    else:
        non_space = sum(map(len, text.split()))
        non_alpha = len(_NON_ALPHA.findall(text))
    return (non_space - non_alpha) / non_space if non_space else 0.0


def _repeated_line_ratio(text: str) -> float:
    lines = [line for line in (raw.strip() for raw in text.split("\n")) if line]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def quality_reason(text: str, cfg: CleanConfig) -> str | None:
    """None if ``text`` passes every filter, else the first failing reason (see :data:`REASONS`).

    Cheap checks run first; the reason keys are stable because the prepare report counts them.
    """
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if _alpha_ratio(text) < cfg.min_alpha_ratio:
        return "low_alpha"
    if _repeated_line_ratio(text) > cfg.max_repeated_line_ratio:
        return "repeated_lines"
    return None


def clean_document(text: str, cfg: CleanConfig) -> tuple[str | None, str | None]:
    """Normalise, then filter: ``(clean_text, None)`` to keep the document, ``(None, reason)`` to drop it."""
    text = normalize_text(text, fix_mojibake=cfg.fix_mojibake)
    reason = quality_reason(text, cfg)
    return (None, reason) if reason else (text, None)
