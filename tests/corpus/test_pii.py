"""PII scrubbing: every kind is found in real sentences, and ordinary numbers survive."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable

import pytest

from ptft_dist.config import PIIConfig
from ptft_dist.corpus.pii import PLACEHOLDERS, scrub_pii

CFG = PIIConfig()

# (count key, sentence, expected output)
DETECTED = [
    ("email", "Write to john.doe@example.com for details.", "Write to [EMAIL] for details."),
    ("email", "Contact: <a.b+news@mail.sub.example.co.uk>", "Contact: <[EMAIL]>"),
    ("email", "josé.garcía@correo.es respondió", "[EMAIL] respondió"),
    ("email", "Reports go to ops-team_42@corp-mail.io.", "Reports go to [EMAIL]."),
    ("iban", "Please pay to DE89 3704 0044 0532 0130 00 by Friday.", "Please pay to [IBAN] by Friday."),
    ("iban", "IBAN: GB82WEST12345698765432", "IBAN: [IBAN]"),
    ("iban", "Konto FR14 2004 1010 0505 0001 3M02 606, merci.", "Konto [IBAN], merci."),
    ("iban", "(NL91 ABNA 0417 1643 00)", "([IBAN])"),
    ("iban", "CH93 0076 2011 6238 5295 7 and then 1234", "[IBAN] and then 1234"),  # length is exact
    ("credit_card", "My card is 4111 1111 1111 1111, exp 12/25.", "My card is [CREDIT_CARD], exp 12/25."),
    ("credit_card", "Charged to 5555-5555-5555-4444 today", "Charged to [CREDIT_CARD] today"),
    ("credit_card", "Amex 3782 822463 10005 on file", "Amex [CREDIT_CARD] on file"),
    ("credit_card", "number=6011111111111117.", "number=[CREDIT_CARD]."),
    ("credit_card", "JCB 3530111333300000", "JCB [CREDIT_CARD]"),
    ("ssn", "His SSN is 123-45-6789.", "His SSN is [SSN]."),
    ("ssn", "SSN: 078-05-1120 (the Woolworth card)", "SSN: [SSN] (the Woolworth card)"),
    ("ip", "Connect to 192.168.0.1.", "Connect to [IP]."),
    ("ip", "from 10.0.0.255:8080 and 8.8.8.8", "from [IP]:8080 and [IP]"),
    ("ip", "server 2001:db8:85a3::8a2e:370:7334 is down", "server [IP] is down"),
    ("ip", "loopback ::1 and fe80::1ff:fe23:4567:890a", "loopback [IP] and [IP]"),
    ("ip", "mapped ::ffff:192.0.2.128 here", "mapped [IP] here"),  # one address, not v6 + v4
    ("ip", "full 2001:0db8:0000:0000:0000:ff00:0042:8329", "full [IP]"),
    ("phone", "Call +44 20 7946 0958 now", "Call [PHONE] now"),
    ("phone", "Call +1 (555) 123-4567.", "Call [PHONE]."),
    ("phone", "Office: (555) 123-4567", "Office: [PHONE]"),
    ("phone", "cell 555-123-4567 or 555.987.6543", "cell [PHONE] or [PHONE]"),
    ("phone", "Berlin +49 30 123456.", "Berlin [PHONE]."),
    ("phone", "Dial 0044 20 7946 0958 from abroad", "Dial [PHONE] from abroad"),
    ("phone", "Paris +33 1 23 45 67 89", "Paris [PHONE]"),
    ("phone", "Toll free 1-800-555-0199!", "Toll free [PHONE]!"),
    ("phone", "London 020 7946 0958, Paris 01 23 45 67 89", "London [PHONE], Paris [PHONE]"),
    ("phone", "UK +44 (0) 20 7946 0958", "UK [PHONE]"),
]


@pytest.mark.parametrize(("key", "text", "expected"), DETECTED)
def test_detected(key: str, text: str, expected: str) -> None:
    out, counts = scrub_pii(text, CFG)
    assert out == expected
    assert counts == {key: expected.count(PLACEHOLDERS[key])}


ORDINARY = [
    "The answer is 42.",
    "Population: 1,000,000 people",
    "pi is about 3.14159",
    "In 2023 the committee met.",
    "Released on 2023-10-05 at 12:30.",
    "Dates: 05/10/2023 and 10.05.2023",
    "Timestamp 2023-10-05T12:30:45Z",
    "Install v1.2.3 or Python 3.11.7",
    "Version 1.2.3.4.5 and build v1.2.3.4",
    "requires brotli>=1.2.0.0 and numpy==1.26.4",
    "It costs $1,299.99 or €45 or 1.299,00 €",
    "Growth of 4.5% and 12 %",
    "ISBN 978-3-16-148410-0 and 9780306406157",
    "See pp. 123-145.",
    "The final score was 3-1.",
    "Beverly Hills 90210",
    "Call 123-4567 or 555-1234",
    "Room 12, floor 3, seat 45",
    "Temperatures of -3.5 to +5 degrees",
    "ratio 1:2:3 and John 3:16",
    "C++ std::vector and reST be:: blocks",
    "MAC 00:1A:2B:3C:4D:5E",
    "Order 12345678 shipped",
    "Invalid card 4111 1111 1111 1112",
    "Invalid IBAN DE89 3704 0044 0532 0130 01",
    "Octet 256.1.1.1 is not an address",
    "Numbers 10 20 30 40 50 60 70 80",
    "Scores: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
    "Email me at john dot doe, or via @handle",
    "Matrix 1e-10 and 6.02e23",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_content_survives(text: str) -> None:
    assert scrub_pii(text, CFG) == (text, {})


@pytest.mark.parametrize(
    ("valid", "invalid"),
    [
        ("4111 1111 1111 1111", "4111 1111 1111 1112"),
        ("4012888888881881", "4012888888881882"),
        ("3782 822463 10005", "3782 822463 10006"),
    ],
)
def test_card_needs_luhn(valid: str, invalid: str) -> None:
    assert scrub_pii(f"card {valid} ok", CFG) == ("card [CREDIT_CARD] ok", {"credit_card": 1})
    assert scrub_pii(f"card {invalid} ok", CFG) == (f"card {invalid} ok", {})


@pytest.mark.parametrize(
    ("valid", "invalid"),
    [
        ("DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 01"),
        ("GB82 WEST 1234 5698 7654 32", "GB83 WEST 1234 5698 7654 32"),
        ("BE68539007547034", "BE68539007547035"),
    ],
)
def test_iban_needs_mod97(valid: str, invalid: str) -> None:
    assert scrub_pii(f"to {valid}.", CFG) == ("to [IBAN].", {"iban": 1})
    assert scrub_pii(f"to {invalid}.", CFG) == (f"to {invalid}.", {})


@pytest.mark.parametrize("ssn", ["000-12-3456", "666-12-3456", "912-34-5678", "123-00-4567", "123-45-0000"])
def test_never_issued_ssns_are_left(ssn: str) -> None:
    assert scrub_pii(f"SSN {ssn}", CFG) == (f"SSN {ssn}", {})


@pytest.mark.parametrize("text", ["1.2.3", "999.1.1.1", "01.02.03.04", "1.2.3.4.5", "12:30:45", "1:2:3:4:5:6:7:8:9"])
def test_not_ip_addresses(text: str) -> None:
    assert scrub_pii(f"see {text} here", CFG) == (f"see {text} here", {})


def test_precedence_gives_one_placeholder_per_item() -> None:
    text = "mail 4111111111111111@example.com, IBAN DE89370400440532013000, ip ::ffff:10.0.0.1"
    out, counts = scrub_pii(text, CFG)
    assert out == "mail [EMAIL], IBAN [IBAN], ip [IP]"
    assert counts == {"email": 1, "iban": 1, "ip": 1}


def test_counts_every_kind() -> None:
    text = (
        "a@b.org c@d.net DE89 3704 0044 0532 0130 00 4111 1111 1111 1111 123-45-6789 "
        "1.2.3.4 ::1 +44 20 7946 0958 (555) 123-4567 555-123-4567"
    )
    out, counts = scrub_pii(text, CFG)
    assert counts == {"email": 2, "iban": 1, "credit_card": 1, "ssn": 1, "ip": 2, "phone": 3}
    assert not any(c.isdigit() for c in out)


FLAGS = {
    "email": ("email", "x user@example.com x"),
    "iban": ("iban", "x DE89 3704 0044 0532 0130 00 x"),
    "credit_card": ("credit_card", "x 4111 1111 1111 1111 x"),
    "us_ssn": ("ssn", "x 123-45-6789 x"),
    "ip": ("ip", "x 192.168.1.1 2001:db8::1 x"),
    "phone": ("phone", "x +44 20 7946 0958 x"),
}


@pytest.mark.parametrize("flag", FLAGS)
def test_each_kind_can_be_turned_off(flag: str) -> None:
    key, sample = FLAGS[flag]
    others = " ".join(s for f, (_, s) in FLAGS.items() if f != flag)
    out, counts = scrub_pii(f"{sample} | {others}", dataclasses.replace(CFG, **{flag: False}))
    assert out.startswith(sample + " | ")
    assert key not in counts
    assert set(counts) == {k for f, (k, _) in FLAGS.items() if f != flag}


def test_disabled_returns_text_unchanged() -> None:
    text = "user@example.com 4111 1111 1111 1111 +44 20 7946 0958"
    assert scrub_pii(text, PIIConfig(enabled=False)) == (text, {})


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: "".join(rng.choices("0123456789 ", k=1_000_000)),
        lambda rng: "1" * 300_000,
        lambda rng: "1 " * 150_000,
        lambda rng: "+1 " * 50_000,
        lambda rng: "a." * 150_000 + "@x",
        lambda rng: "x@" + "a." * 150_000,
        lambda rng: "1:" * 150_000,
    ],
    ids=["digits-and-spaces-1MB", "digits", "spaced-digits", "plus-ones", "dotted-local", "dotted-domain", "colons"],
)
def test_no_catastrophic_backtracking(make: Callable[[random.Random], str]) -> None:
    text = make(random.Random(0))
    start = time.perf_counter()
    scrub_pii(text, CFG)
    assert time.perf_counter() - start < 2.0
