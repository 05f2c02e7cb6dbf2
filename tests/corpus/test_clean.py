"""Document cleaning: mojibake repair, invisible characters, whitespace, quality filters."""

from __future__ import annotations

import time

import ftfy
import pytest
from ftfy.chardata import CHARMAP_ENCODINGS

from ptft_dist.config import CleanConfig
from ptft_dist.corpus import clean
from ptft_dist.corpus.clean import REASONS, clean_document, normalize_text, quality_reason

SAMPLE = "Zwölf Boxkämpfer jagen “Viktor” quer über den großen Deich — Привет, Ελληνικά, 東京"

# --------------------------------------------------------------------------- mojibake


@pytest.mark.parametrize(
    ("broken", "fixed"),
    [
        ("cafÃ©", "café"),
        ("donâ€™t", "don’t"),
        ("naÃ¯ve rÃ©sumÃ©", "naïve résumé"),
        ("Ã©tÃ©", "été"),
        ("voilÃ le travail", "voilà le travail"),  # 0xA0 that became a plain space
        ("РџСЂРёРІРµС‚", "Привет"),  # UTF-8 read as Windows-1251
        ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "The Mona Lisa doesn’t have eyebrows."),  # twice
        ("\x93quoted\x94", "“quoted”"),  # C1 controls are Windows-1252 punctuation
        ("\x1b[31mred\x1b[0m alert", "red alert"),  # ANSI terminal escapes
    ],
)
def test_mojibake_is_repaired(broken: str, fixed: str) -> None:
    assert normalize_text(broken) == fixed


@pytest.mark.parametrize("encoding", CHARMAP_ENCODINGS)
def test_mojibake_from_every_single_byte_codec_is_repaired(encoding: str) -> None:
    assert normalize_text(SAMPLE.encode("utf-8").decode(encoding)) == SAMPLE


def test_mojibake_repair_can_be_turned_off() -> None:
    assert normalize_text("cafÃ©", fix_mojibake=False) == "cafÃ©"
    text, reason = clean_document("cafÃ© " * 20, CleanConfig(fix_mojibake=False, min_chars=10))
    assert reason is None and text is not None and "Ã©" in text


@pytest.mark.parametrize(
    "text",
    [
        SAMPLE,
        "“curly” ‘quotes’ stay curly",
        "ﬁne ligatures and ＦＵＬＬＷＩＤＴＨ stay",
        "&amp; HTML entities stay &lt;as written&gt;",
        "Łódź, Dvořák, Ærøskøbing, İstanbul, São Paulo, IRMÃ E MÃE, Å være",
        "Съешь же ещё этих мягких «французских» булок, да выпей же чаю.",
        "Τάχιστη αλώπηξ βαφής ψημένη γη — ½ € ™ © 😀 👨\u200d👩\u200d👧",
        "می\u200cخواهم",  # Persian: ZWNJ is spelling
    ],
)
def test_clean_text_is_unchanged(text: str) -> None:
    assert normalize_text(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "cafÃ© and donâ€™t\nclean line Привет\nРџСЂРёРІРµС‚ «ok»",
        "Ã\xa0 la carte, mixed with “real” quotes and Ã¼ber",
        "ZwГ¶lf BoxkГ¤mpfer\nZw√∂lf Boxk√§mpfer\nZw├╢lf",
        "lossy â€\ufffd sequence and Ã?",
    ],
)
def test_line_prefilter_agrees_with_running_ftfy_on_everything(text: str) -> None:
    full = normalize_text(ftfy.fix_text(text, clean._FTFY_CONFIG), fix_mojibake=False)
    assert normalize_text(text) == full


# --------------------------------------------------------------------------- characters


def test_nfc() -> None:
    assert normalize_text("cafe\u0301") == "caf\u00e9"
    assert normalize_text("e\u200b\u0301") == "\u00e9"  # composable once the invisible char is gone


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\x00b\x07c\x7fd", "abcd"),
        ("zero\u200bwidth", "zerowidth"),
        ("\ufeffbyte order mark", "byte order mark"),
        ("soft\u00adhyphen", "softhyphen"),
        ("left\u200eto\u200fright", "lefttoright"),
        ("unit\x1fseparator", "unit separator"),  # separators become spaces, not glue
    ],
)
def test_invisible_characters_are_dropped(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_surrogates_never_survive() -> None:
    assert normalize_text("pair \ud83d\ude00") == "pair \U0001f600"  # ftfy joins a split pair
    assert normalize_text("lone\ud800one") == "lone\ufffdone"  # ftfy marks the loss
    assert normalize_text("lone\ud800one", fix_mojibake=False) == "loneone"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\tb", "a b"),
        ("a\u00a0b\u2003c\u3000d\u202fe", "a b c d e"),
        ("many     spaces", "many spaces"),
        ("trailing   \nand leading\n   spaces", "trailing\nand leading\nspaces"),
        ("windows\r\nlines\rold mac", "windows\nlines\nold mac"),
        ("one\n\nblank line", "one\n\nblank line"),
        ("para\n\n\n\n\nbreak", "para\n\nbreak"),
        ("spaces only\n   \n \t \nline", "spaces only\n\nline"),
        ("page\fbreak", "page\nbreak"),
        ("line\u2028separator", "line\nseparator"),
        ("paragraph\u2029separator", "paragraph\n\nseparator"),
        ("  \n\n  surrounded  \n\n ", "surrounded"),
        ("", ""),
    ],
)
def test_whitespace(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_normalize_is_idempotent() -> None:
    text = " cafÃ©\t\tand\u00a0more\r\n\r\n\r\n\x00next  \u200b para\u2029end "
    once = normalize_text(text)
    assert normalize_text(once) == once


# --------------------------------------------------------------------------- quality

CFG = CleanConfig(min_chars=20, max_chars=200, min_alpha_ratio=0.6, max_repeated_line_ratio=0.3)
GOOD = "A perfectly ordinary paragraph of English prose."


def test_good_document_passes() -> None:
    assert quality_reason(GOOD, CFG) is None
    assert clean_document("  " + GOOD + "\x00 ", CFG) == (GOOD, None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("too short", "too_short"),
        ("x" * 19, "too_short"),
        ("word " * 41, "too_long"),
        ("1234 5678 9012 3456 7890 !!! ??? --- +++", "low_alpha"),
        ("| 12 | 34 | 56 |\n| 78 | 90 | ab |", "low_alpha"),
        ("Home\nAbout us\nHome\nHome\nContact\nHome", "repeated_lines"),
    ],
)
def test_each_reason(text: str, reason: str) -> None:
    assert reason in REASONS
    assert quality_reason(text, CFG) == reason
    assert clean_document(text, CFG) == (None, reason)


def test_length_bounds_are_inclusive() -> None:
    assert quality_reason("x" * 20, CFG) is None
    assert quality_reason("x" * 200, CFG) is None
    assert quality_reason("x" * 201, CFG) == "too_long"


def test_length_is_checked_after_normalization() -> None:
    assert clean_document("short" + " " * 50, CFG) == (None, "too_short")


@pytest.mark.parametrize(
    "text",
    [
        "हिन्दी भारत की एक प्रमुख भाषा है और यह देवनागरी लिपि में लिखी जाती है",  # vowel signs are marks
        "東京は日本の首都であり、世界最大の都市圏の一つです。",
        "Съешь же ещё этих мягких французских булок, да выпей же чаю.",
    ],
)
def test_other_scripts_count_as_alphabetic(text: str) -> None:
    assert quality_reason(text, CFG) is None


def test_alpha_ratio_ignores_whitespace() -> None:
    # 30 letters, 10 digits: 0.75 however much whitespace surrounds them
    text = "abcde fghij klmno pqrst uvwxy zabcd 12345 67890"
    assert quality_reason(text, CFG) is None
    assert quality_reason(text.replace(" ", "\n\n"), CFG) is None
    assert quality_reason(text, CleanConfig(min_chars=1, min_alpha_ratio=0.76)) == "low_alpha"


def test_repeated_lines_threshold_and_blank_lines() -> None:
    lines = ["Line number one here", "Line number two here", "Line number three", "Line number one here"]
    text = "\n\n\n".join(lines)  # blank lines are not lines that repeat
    assert quality_reason(text, CleanConfig(min_chars=1, max_repeated_line_ratio=0.25)) is None
    assert quality_reason(text, CleanConfig(min_chars=1, max_repeated_line_ratio=0.24)) == "repeated_lines"


def test_order_of_reasons_is_cheapest_first() -> None:
    assert quality_reason("1 2 3", CFG) == "too_short"  # also low_alpha


def test_fast_enough() -> None:
    doc = (SAMPLE + " 2023, 4.5%.\n" + GOOD + "\n\n") * 7000  # ~1.2 MB, non-ASCII
    cfg = CleanConfig(max_chars=10**7)
    start = time.perf_counter()
    text, reason = clean_document(doc, cfg)
    clean_document(doc.encode("ascii", "ignore").decode(), cfg)
    assert time.perf_counter() - start < 2.0
    assert reason == "repeated_lines" and text is None
