"""Personal-data redaction: a labeled set with precision and recall, placeholders, hooks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from engine.errors import InvalidInput
from engine.train import pii
from engine.train.pii import (
    iban_valid,
    luhn_valid,
    person_detector_available,
    redact,
    scan,
    scan_all,
    set_person_detector,
)

# Each positive holds exactly one datum of the labeled type.
POSITIVES: list[tuple[str, str]] = [
    ("Contact: jane.doe@example.com", "EMAIL"),
    ("john+newsletter@mail.example.co.uk wrote back", "EMAIL"),
    ("Send it to a.b-c_d@sub.domain.org.", "EMAIL"),
    ("From: <first.last@company.io>", "EMAIL"),
    ("mail X_Y%z@uni-bonn.de now", "EMAIL"),
    ("reply to support123@help.example.net, thanks", "EMAIL"),
    ("card 4111 1111 1111 1111", "CARD"),
    ("5555-5555-5555-4444", "CARD"),
    ("Amex 3782 822463 10005", "CARD"),
    ("paid with 6011111111111117.", "CARD"),
    ("4012888888881881 is on file", "CARD"),
    ("JCB: 3530 1113 3330 0000", "CARD"),
    ("old visa 4222222222222", "CARD"),
    ("MC 5105 1051 0510 5100 exp 04/27", "CARD"),
    ("IBAN DE89 3704 0044 0532 0130 00", "IBAN"),
    ("GB82WEST12345698765432", "IBAN"),
    ("FR14 2004 1010 0505 0001 3M02 606", "IBAN"),
    ("to NL91ABNA0417164300 please", "IBAN"),
    ("ES91 2100 0418 4502 0005 1332", "IBAN"),
    ("IT60 X054 2811 1010 0000 0123 456", "IBAN"),
    ("BE68 5390 0754 7034 and more", "IBAN"),
    ("CH93 0076 2011 6238 5295 7", "IBAN"),
    ("Konto: NO93 8601 1117 947", "IBAN"),
    ("server at 192.168.1.10", "IP"),
    ("ping 8.8.8.8.", "IP"),
    ("from 10.0.0.255 to the gateway", "IP"),
    ("IPv6 2001:db8::8a2e:370:7334", "IP"),
    ("loopback ::1 is local", "IP"),
    ("link fe80::1ff:fe23:4567:890a%eth0 up", "IP"),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "IP"),
    ("SSN 078-05-1120", "NATIONAL_ID"),
    ("ssn: 123-45-6789.", "NATIONAL_ID"),
    ("her number is 219-09-9999", "NATIONAL_ID"),
    ("call (555) 123-4567", "PHONE"),
    ("555-123-4567", "PHONE"),
    ("555.123.4567 (office)", "PHONE"),
    ("+1 555 123 4567", "PHONE"),
    ("London +44 20 7946 0958", "PHONE"),
    ("Berlin +49 30 1234567", "PHONE"),
    ("Paris +33 1 23 45 67 89", "PHONE"),
    ("UK 020 7946 0958", "PHONE"),
    ("Büro 030/1234567", "PHONE"),
    ("toll free +1-800-555-0199", "PHONE"),
    ("dial 1-800-555-0199", "PHONE"),
    ("+44 (0)20 7946 0958", "PHONE"),
]

# None of these holds personal data.
NEGATIVES: list[str] = [
    "The meeting is on 2024-05-01.",
    "at 10:30:45 UTC",
    "Released version 2.0.1 today",
    "upgrade to v3.12.4",
    "It costs $1,299.99",
    "Total: €45.50",
    "Order #A-2024-00017 shipped",
    "order id 20240501-0042",
    "ISBN 978-3-16-148410-0",
    "ISBN-13: 9780306406157",
    "random 1234567890123456",
    "ref 4111111111111112",
    "invoice 5555 5555 5555 4445",
    "DE89 3704 0044 0532 0130 01",
    "GB82WEST12345698765433",
    "FR14 2004 1010 0505 0001 3M02 607",
    "SSN 000-12-3456",
    "666-12-3456",
    "900-12-3456",
    "123-00-4567",
    "123-45-0000",
    "IP 256.1.1.1 is invalid",
    "1.2.3 is a version",
    "999.999.999.999",
    "times 12:30 and 23:59",
    "dated 05/01/2024",
    "dated 01.02.2024 at 14:00",
    "ZIP 02134-1234",
    "MAC 00:1A:2B:3C:4D:5E",
    "C++ std::vector<int>",
    "score 100 to 2000 points",
    "population 8,336,817",
    "The years 1999 and 2024",
    "pi is 3.14159265358979",
    "ping @username on the forum",
    "Call me at 5pm",
    "room 404, floor 3",
    "range 10-20-30",
    "coordinates 48.8566, 2.3522",
    "commit a3f5c9e1b2d4",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "version 1.2.3.4.5 build",
    "aspect 16:9:4",
    "dates 05/01/2024 12 30",
    "serial 9783161484100 in stock",
    "Rust paths abc::def and cafe::bad",
    "Windows 10.0.19041.1 build",
]


def test_the_labeled_set_is_big_enough() -> None:
    assert len(POSITIVES) >= 40
    assert len(NEGATIVES) >= 40
    assert {kind for _, kind in POSITIVES} == {
        "EMAIL",
        "CARD",
        "IBAN",
        "IP",
        "NATIONAL_ID",
        "PHONE",
    }


def precision_recall() -> tuple[float, float, list[str]]:
    """Precision and recall over the labeled set, and what went wrong, for the report."""
    true_pos = false_pos = 0
    misses: list[str] = []
    for text, kind in POSITIVES:
        found = scan(text)
        if found[kind] == 1:
            true_pos += 1
        else:
            misses.append(f"missed {kind}: {text!r} -> {dict(found)}")
        wrong = sum(found.values()) - min(found[kind], 1)
        if wrong:
            false_pos += wrong
            misses.append(f"extra in {text!r}: {dict(found)}")
    for text in NEGATIVES:
        found = scan(text)
        if found:
            false_pos += sum(found.values())
            misses.append(f"false positive {text!r}: {dict(found)}")
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    return precision, true_pos / len(POSITIVES), misses


def test_precision_and_recall_on_the_labeled_set() -> None:
    precision, recall, misses = precision_recall()
    assert precision >= 0.95, misses
    assert recall >= 0.95, misses


@pytest.mark.parametrize(("text", "kind"), POSITIVES)
def test_each_positive_is_replaced_by_its_placeholder(text: str, kind: str) -> None:
    redacted, counts = redact(text)
    assert f"<{kind}>" in redacted
    assert counts == Counter({kind: 1})


def test_redaction_keeps_the_text_around_the_data() -> None:
    text = (
        "Mail jo+x@a.example.org or call +44 20 7946 0958; card 4111-1111-1111-1111, "
        "IBAN DE89 3704 0044 0532 0130 00, host 10.1.2.3, SSN 078-05-1120, on 2024-05-01."
    )
    redacted, counts = redact(text)
    assert redacted == (
        "Mail <EMAIL> or call <PHONE>; card <CARD>, IBAN <IBAN>, host <IP>, "
        "SSN <NATIONAL_ID>, on 2024-05-01."
    )
    assert counts == Counter(EMAIL=1, PHONE=1, CARD=1, IBAN=1, IP=1, NATIONAL_ID=1)
    assert scan(text) == counts


def test_a_card_is_not_eaten_by_the_phone_rule() -> None:
    assert redact("pay 4111 1111 1111 1111 now")[0] == "pay <CARD> now"
    assert redact("+1 555 123 4567 / 5555 5555 5555 4444")[0] == "<PHONE> / <CARD>"


def test_an_iban_followed_by_more_digits_is_cut_at_its_length() -> None:
    assert redact("BE68 5390 0754 7034 1234")[0] == "<IBAN> 1234"


def test_kinds_limit_what_is_redacted() -> None:
    text = "a@b.example.com 10.0.0.1"
    assert redact(text, frozenset({"IP"})) == ("a@b.example.com <IP>", Counter(IP=1))
    with pytest.raises(InvalidInput, match="unknown personal data type"):
        redact(text, frozenset({"NAME"}))


def test_names_are_not_redacted_without_a_detector() -> None:
    assert not person_detector_available()
    assert redact("Alice Smith wrote this") == ("Alice Smith wrote this", Counter())


@pytest.fixture
def person_hook() -> Iterator[None]:
    set_person_detector(lambda text: [(0, 11)] if text.startswith("Alice Smith") else [])
    try:
        yield
    finally:
        set_person_detector(None)


@pytest.mark.usefixtures("person_hook")
def test_a_person_detector_hook_redacts_names() -> None:
    assert person_detector_available()
    assert redact("Alice Smith wrote this") == ("<PERSON> wrote this", Counter(PERSON=1))


def test_scan_all_sums_counts() -> None:
    assert scan_all(["a@b.example.com", "x", "c@d.example.com 8.8.4.4"]) == Counter(EMAIL=2, IP=1)


def test_checksums() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("DE89370400440532013000")
    assert not iban_valid("DE89370400440532013001")
    assert not iban_valid("DE8937040044053201300")  # one character short for Germany


def test_placeholders_are_the_contract_ones() -> None:
    assert set(pii.KINDS) == {"EMAIL", "PHONE", "CARD", "IBAN", "IP", "NATIONAL_ID", "PERSON"}
