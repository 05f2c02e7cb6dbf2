"""Document cleaning and quality filters: pure functions of the text, applied to every document.

``clean_document`` is the entry point the prepare step calls per document; it normalises the text
(mojibake, Unicode form, invisible characters, whitespace) and then either keeps it or names the
filter that dropped it, so the prepare report can count drops per reason.

Speed matters (every byte of the corpus passes through here), so the per-character work is done by
C-level ``str`` methods and precompiled regexes; ftfy, the slow part, only sees the lines that
could hold mojibake at all.
"""

from __future__ import annotations

import re
import unicodedata
from itertools import chain

import ftfy
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


def _code_points(categories: tuple[str, ...]) -> list[int]:
    """Code points of the given general categories. Planes 2-13 hold only letters, so skip them."""
    scan = chain(range(0x20000), range(0xE0000, 0xE1000))
    return [cp for cp in scan if unicodedata.category(chr(cp)) in categories]


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
    """Where ftfy could change anything: a UTF-8 lead byte followed by a continuation byte as some
    single-byte codec decodes them (or the lead then a space, a lost 0xA0), C1 controls, ESC, or
    surrogates. A superset of what ftfy repairs, so skipping lines without a hit changes nothing."""
    branches = [r"[\x1b\x80-\x9f\ud800-\udfff]", "[\u00c2\u00c3] "]
    for encoding in CHARMAP_ENCODINGS:
        lead = sorted(map(ord, set(bytes(range(0xC2, 0xF5)).decode(encoding, errors="ignore"))))
        cont = sorted(map(ord, set(bytes(range(0x80, 0xC0)).decode(encoding, errors="ignore"))))
        branches.append(f"[{_char_class(lead)}][{_char_class(cont)}]")
    return re.compile("|".join(branches))


_MOJIBAKE_HINT = _mojibake_hint()

# Invisible characters (controls, format characters, lone surrogates) are dropped; the ones that
# separate words become a space or a line break instead, so that dropping them does not glue words.
# ZWNJ/ZWJ stay: they are spelling in Persian and Indic scripts, and join emoji sequences.
_TRANSLATE: dict[int, str | None] = dict.fromkeys(_code_points(("Cc", "Cf", "Cs")))
_TRANSLATE.update(dict.fromkeys(_code_points(("Zs",)), " "))
_TRANSLATE.update(dict.fromkeys(map(ord, "\t\x1c\x1d\x1e\x1f"), " "))
_TRANSLATE.update(dict.fromkeys(map(ord, "\v\f\r\x85\u2028"), "\n"))
_TRANSLATE[0x2029] = "\n\n"  # paragraph separator: keep the paragraph boundary
for _keep in "\n \u200c\u200d":
    del _TRANSLATE[ord(_keep)]
_ODD_CHARS = re.compile("[" + _char_class(sorted(_TRANSLATE)) + "]")

_MULTI_SPACE = re.compile(" {2,}")
_MULTI_NEWLINE = re.compile("\n{3,}")

# Characters that are neither letters (or combining marks, which Indic and other scripts need to
# spell words) nor whitespace: digits, punctuation, symbols.
_NON_ALPHA = re.compile(r"[^\w\s" + _char_class(_code_points(("Mn", "Mc", "Me"))) + r"]|[\d_]")


def _fix_mojibake(text: str) -> str:
    if not _MOJIBAKE_HINT.search(text):
        return text
    return "\n".join(
        ftfy.fix_text(line, _FTFY_CONFIG) if _MOJIBAKE_HINT.search(line) else line for line in text.split("\n")
    )


def normalize_text(text: str, fix_mojibake: bool = True) -> str:
    """Repair mojibake, NFC-normalise, drop invisible characters and tidy whitespace.

    Line breaks survive (one ``\\n`` per line, a blank line between paragraphs) because sentence
    splitting and the txt document boundary rely on them; everything else that is whitespace
    becomes a single space, and lines lose leading and trailing spaces.
    """
    if fix_mojibake:
        text = _fix_mojibake(text)
    text = text.replace("\r\n", "\n")
    if _ODD_CHARS.search(text):
        text = text.translate(_TRANSLATE)
    text = unicodedata.normalize("NFC", text)  # after the drops, which can expose composable pairs
    if "  " in text:
        text = _MULTI_SPACE.sub(" ", text)
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    if "\n\n\n" in text:
        text = _MULTI_NEWLINE.sub("\n\n", text)
    return text.strip()


def _alpha_ratio(text: str) -> float:
    non_space = sum(map(len, text.split()))
    if non_space == 0:
        return 0.0
    return (non_space - len(_NON_ALPHA.findall(text))) / non_space


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
