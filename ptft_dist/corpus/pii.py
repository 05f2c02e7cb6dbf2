"""PII scrubbing: replace personal identifiers with typed placeholders ("[EMAIL]", "[PHONE]", ...).

Typed placeholders keep the sentence structure (a model still learns that an e-mail address goes
there) while the identifier itself never reaches the corpus. Precision matters as much as recall:
numbers, dates, versions and prices are the bulk of digit runs in real text and must survive, so
every pattern is anchored at token boundaries and checked (Luhn, mod-97, octet ranges, digit counts)
before it is replaced.

The types run one after the other, in order of precedence: a placeholder contains no digits, so a
later type can never match inside an earlier one's replacement. Every pattern starts only at a
token boundary, and none can split a run of characters in more than one way, so the cost stays
linear in the text length (tests/test_pii.py times pathological inputs).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import NamedTuple

from ptft_dist.config import PIIConfig

__all__ = ["PLACEHOLDERS", "scrub_pii"]

#: Count key → placeholder, in the order the types are scrubbed.
PLACEHOLDERS = {
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "credit_card": "[CREDIT_CARD]",
    "ssn": "[SSN]",
    "ip": "[IP]",
    "phone": "[PHONE]",
}

# Performance: Python's regex engine skips ahead in C to the first possible character when a
# pattern starts with a character set or literal, but tries every position when it starts with an
# assertion. So the patterns below consume their first character, then look behind it (width 2).

_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w%+-][\w.%+-]{0,63}"  # local part; starting only where a run starts keeps it linear
    r"@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,24}(?![\w-])"
)

# ISO 13616 registry: IBAN length per country. The length makes the pattern exact, so a number
# written after an IBAN is not swallowed into it, and most "two letters, two digits" codes fail.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def _iban_pattern() -> re.Pattern[str]:
    """Country code, check digits, then that country's BBAN length in groups of 4 (spaces optional).

    Upper case only: IBANs are printed that way, and it keeps the scan fast on lower-case prose.
    """
    by_length: dict[int, list[str]] = {}
    for country, length in _IBAN_LENGTHS.items():
        by_length.setdefault(length, []).append(country)
    branches = []
    for length, countries in sorted(by_length.items()):
        groups, rest = divmod(length - 4, 4)
        bban = f"(?: ?[A-Z0-9]{{4}}){{{groups}}}" + (f" ?[A-Z0-9]{{{rest}}}" if rest else "")
        branches.append(f"(?<={'|'.join(countries)})[0-9]{{2}}{bban}")
    return re.compile(rf"[A-Z](?<![\w-][A-Z])[A-Z](?:{'|'.join(branches)})(?![\w-])")


_IBAN = _iban_pattern()

# 13-19 digits, either unbroken or in the groupings cards are printed with (4-4-4-4[-3], 4-6-5,
# 4-6-4, 4-4-4-1..4), one consistent separator. The first digit is a card network's (2-6), which
# also keeps ISBN-13s (978/979) out. Arbitrary grouping would turn tables of small numbers into cards.
_CARD = re.compile(
    r"[2-6](?<![\w.,-][2-6])\d{3}"
    r"(?:\d{9,15}"
    r"|(?P<s>[ -])\d{4}(?P=s)\d{4}(?P=s)\d{1,4}(?:(?P=s)\d{3})?"
    r"|(?P<t>[ -])\d{6}(?P=t)\d{4,5})"
    r"(?!\w|[.,-]\d)"
)

# Area 000, 666 and 900-999, group 00 and serial 0000 are never issued.
_SSN = re.compile(r"[0-8](?<![\w-][0-8])\d\d(?<!000)(?<!666)-(?!00)\d\d-(?!0000)\d{4}(?![\w-])")

# Not next to a letter, digit or another ".number", nor after a version comparison: 1.2.3.4.5,
# v1.2.3.4 and pkg>=1.2.0.0 are versions.
_IPV4 = re.compile(r"\d(?<![\w.]\d)(?<![<>~!=]=\d)\d{0,2}(?:\.\d{1,3}){3}(?!\.?\w)")
# A candidate with a colon near its start; the ipaddress module decides (12:30:45 and MACs fail).
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])(?=[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:]{1,38}(?:\.\d{1,3}){0,3}(?![\w:])"
)

# International: "+" (or "00") and a country code, then groups split by space, dot, dash or an
# area code in parentheses. Groups always follow a separator (or ")"), so digits split one way only.
_PHONE_INTL = re.compile(
    r"(?:\+(?<![\w+]\+)|0(?<![\w+.,]0)(?<!\d[ .-]0)0)[1-9]\d*(?:[ .-]?\(\d{1,5}\)\d*)?(?:[ .-]\d+){0,7}(?!\w|[.,-]\d)"
)
# North American, one consistent separator: (555) 123-4567, 555-123-4567, 555.123.4567, with or
# without a leading 1 (1-800-555-0199, 1 (555) 123-4567).
_PHONE_NANP = re.compile(
    r"""[(1-9](?<![\w+.,/-][(1-9])
    (?: (?<=\()[2-9]\d\d\)\ ?                           # (555)
      | (?<=1)[ .-]?\([2-9]\d\d\)\ ?                    # 1 (555)
      | (?:(?<=1)[ .-][2-9]|(?<=[2-9]))\d\d(?P<s>[.-])  # 555- or 1-555-
    )
    \d{3}(?(s)(?P=s)|[.-])\d{4}(?!\w|[.,/-]\d)""",
    re.VERBOSE,
)
# National with a trunk 0: 020 7946 0958, 01 23 45 67 89 (3+ groups, one consistent separator).
# Like "00" above, not right after another number: the tail of a digit grouping is not a phone.
_PHONE_TRUNK = re.compile(
    r"0(?<![\w+.,/-]0)(?<!\d[ .-]0)[1-9]\d{0,3}(?P<s>[ .-])\d{2,4}(?:(?P=s)\d{2,4}){1,3}(?!\w|[.,/-]\d)"
)
# After "00" the national number drops its trunk 0: "0044 0532 0130" is not a phone number.
_ZERO_AFTER_COUNTRY = re.compile(r"00\d+[ .-]0")


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _luhn_ok(text: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(_digits(text))):
        d = int(char) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, read letters as 10-35, mod 97 == 1."""
    compact = text.replace(" ", "")
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def _ipv4_ok(text: str) -> bool:
    return all(int(octet) <= 255 and (octet == "0" or octet[0] != "0") for octet in text.split("."))


def _ipv6_ok(text: str) -> bool:
    if not any(c.isdigit() for c in text):  # reST "be::", C++ "a::b", "::" are not addresses
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _intl_phone_ok(text: str) -> bool:
    if text.startswith("+"):
        return 8 <= len(_digits(text)) <= 15  # E.164 allows at most 15 digits
    return 8 <= len(_digits(text)) - 2 <= 15 and not _ZERO_AFTER_COUNTRY.match(text)


def _trunk_phone_ok(text: str) -> bool:
    return 10 <= len(_digits(text)) <= 11


def _always(_: str) -> bool:
    return True


class _Detector(NamedTuple):
    pattern: re.Pattern[str]
    check: Callable[[str], bool] = _always  # validates a match; a rejected match is left as it is
    needs: str = ""  # a substring every match contains: without it the text is not scanned


# (PIIConfig flag, count key, detectors), in order of precedence.
_RULES: list[tuple[str, str, list[_Detector]]] = [
    ("email", "email", [_Detector(_EMAIL, needs="@")]),
    ("iban", "iban", [_Detector(_IBAN, _iban_ok)]),
    ("credit_card", "credit_card", [_Detector(_CARD, _luhn_ok)]),
    ("us_ssn", "ssn", [_Detector(_SSN, needs="-")]),
    # v6 first: ::ffff:192.0.2.1 contains a v4 address
    ("ip", "ip", [_Detector(_IPV6, _ipv6_ok, needs=":"), _Detector(_IPV4, _ipv4_ok, needs=".")]),
    (
        "phone",
        "phone",
        [_Detector(_PHONE_INTL, _intl_phone_ok), _Detector(_PHONE_NANP), _Detector(_PHONE_TRUNK, _trunk_phone_ok)],
    ),
]


def _replace(text: str, detector: _Detector, placeholder: str) -> tuple[str, int]:
    if detector.needs not in text:
        return text, 0
    count = 0

    def substitute(match: re.Match[str]) -> str:
        nonlocal count
        if not detector.check(match.group()):
            return match.group()
        count += 1
        return placeholder

    return detector.pattern.sub(substitute, text), count


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """Replace e-mail addresses, IBANs, card numbers, US SSNs, IP addresses and phone numbers.

    Returns the scrubbed text and how many of each type were replaced (only types with a hit).
    """
    counts: dict[str, int] = {}
    if not cfg.enabled:
        return text, counts
    for flag, key, detectors in _RULES:
        if not getattr(cfg, flag):
            continue
        for detector in detectors:
            text, n = _replace(text, detector, PLACEHOLDERS[key])
            if n:
                counts[key] = counts.get(key, 0) + n
    return text, counts
