"""Finding personal data in text and replacing it with typed placeholders such as ``<EMAIL>``.

Detection is by regular expression plus a checksum or a parser wherever the datum has one,
because a redactor that fires on every long number ruins the training data it protects:

- ``EMAIL``: ``local@domain.tld`` (plus-addressing and sub-domains included);
- ``IBAN``: country code, check digits and BBAN, compact or in groups of four, of the
  country's registered length (any 15–34 for countries not in the table), mod-97 valid;
- ``CARD``: 13–19 digits, alone or in groups of 3–6 split by spaces or dashes, that pass
  the Luhn check and start with 2–6 (the major-industry digits of payment cards; this
  also rules out ISBN-13s, which start with 9);
- ``NATIONAL_ID``: US social security numbers ``AAA-GG-SSSS`` (never area 000, 666 or
  9xx, group 00 or serial 0000); only the dashed form, since bare nine-digit runs are
  mostly something else;
- ``IP``: IPv4 dotted quads with octets up to 255 and no leading zeros (so ``1.2.3.4`` is
  an address; version numbers with fewer or more parts are not), and IPv6 candidates
  that hold a decimal digit, confirmed by ``ipaddress`` (not ``std::map`` or ``abc::def``);
- ``PHONE``: ``+CC`` international numbers, North American ``(555) 123-4567``,
  ``555-123-4567`` and ``555.123.4567``, and trunk-prefix national forms such as
  ``020 7946 0958`` or ``030/1234567`` (10 digits or more, so that ZIP+4 codes stay);
  7–15 digits in all. Dates and times never match: no rule takes ``:``, and numbers
  that touch a ``-``, ``/`` or ``.`` on their outside are left alone.
- ``PERSON``: only through a named-entity model, and none ships with Bastion yet, so
  **names are not redacted**; ``person_detector_available()`` says so and
  ``set_person_detector`` is the hook for one.

The rules run in the order of ``KINDS``, each on the output of the one before, so a datum
is replaced once: e-mails go first (they hold digits and dots), IBANs and cards before
phone numbers so that a card is never half-eaten as a phone.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable

from engine.errors import InvalidInput

KINDS: tuple[str, ...] = ("EMAIL", "IBAN", "CARD", "NATIONAL_ID", "IP", "PHONE", "PERSON")

PersonDetector = Callable[[str], list[tuple[int, int]]]
"""Returns the ``(start, end)`` character spans of person names in a text."""

_person_detector: PersonDetector | None = None

_EMAIL = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}"
    r"(?:(?: [A-Z0-9]{4})+(?: [A-Z0-9]{1,3})?|[A-Z0-9]{11,30})(?![A-Za-z0-9])"
)
_CARD = re.compile(r"(?<![\w+.,/-])\d(?:[ -]?\d){12,18}(?!\w|[.,/-]\d)")
_CARD_GROUP = re.compile(r"[ -]")
_SSN = re.compile(r"(?<![\w./-])(?!000|666|9)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\w|[./-]\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f.]*(?:%\w+)?(?![\w:])")
_PHONE = re.compile(
    # International: +CC, then groups (one may be in parentheses, like "(0)20").
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){1,6}(?!\w|[./-]\d)"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-555-123-4567.
    r"|(?<![\w+./-])(?:1[ .-])?(?:\(\d{3}\) ?\d{3}[ .-]|\d{3}-\d{3}-|\d{3}\.\d{3}\.)\d{4}"
    r"(?!\w|[./-]\d)"
    # National with a trunk 0: 020 7946 0958, 030 1234567, 030/1234567, 01 23 45 67 89.
    # One separator throughout, so that "05/01/2024 12 30" is not read as one number, and
    # not the tail of a longer run of groups ("DE89 3704 0044 0532 …", a broken IBAN).
    r"|(?P<trunk>(?<![\w+./-])(?<!\d )0\d{1,4}([ /-])\d{2,8}(?:\2\d{2,8}){0,3}(?!\w|[./-]\d))"
)
_DIGIT = re.compile(r"\d")

# ISO 13616 registered IBAN lengths by country.
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def person_detector_available() -> bool:
    """Whether person names can be redacted: only when a detector has been set.

    No offline named-entity model ships with Bastion today, so this is False and
    ``<PERSON>`` never appears: names stay in the text.
    """
    return _person_detector is not None


def set_person_detector(detector: PersonDetector | None) -> None:
    """Install (or with None remove) the function that finds person names."""
    global _person_detector  # noqa: PLW0603 - one process-wide hook, like a plugin slot
    _person_detector = detector


def redact(text: str, kinds: frozenset[str] | None = None) -> tuple[str, Counter[str]]:
    """Replace each personal datum in ``text`` with its typed placeholder.

    Args:
        text: any text.
        kinds: the types to look for (a subset of ``KINDS``); None means all of them.

    Returns:
        The redacted text and how many data of each type were replaced.

    Raises:
        InvalidInput: ``kinds`` names a type that does not exist.
    """
    wanted = _check_kinds(kinds)
    counts: Counter[str] = Counter()
    has_digit = _DIGIT.search(text) is not None
    if "EMAIL" in wanted and "@" in text:
        text = _EMAIL.sub(_counted("EMAIL", counts), text)
    if has_digit:
        if "IBAN" in wanted:
            text = _IBAN.sub(lambda m: _replace_iban(m, counts), text)
        if "CARD" in wanted:
            text = _CARD.sub(_checked("CARD", _is_card, counts), text)
        if "NATIONAL_ID" in wanted and "-" in text:
            text = _SSN.sub(_counted("NATIONAL_ID", counts), text)
        if "IP" in wanted:
            # IPv6 first: "::ffff:192.0.2.1" is one address, not IPv4 with a prefix. An
            # IPv6 address without any decimal digit ("abc::def") is far more often a C++
            # or Rust path than an address, so only text with digits is looked at.
            if ":" in text:
                text = _IPV6.sub(lambda m: _replace_ipv6(m, counts), text)
            if "." in text:
                text = _IPV4.sub(_counted("IP", counts), text)
        if "PHONE" in wanted:
            text = _PHONE.sub(lambda m: _replace_phone(m, counts), text)
    if "PERSON" in wanted and _person_detector is not None:
        text = _replace_spans(text, _person_detector(text), "PERSON", counts)
    return text, counts


def scan(text: str, kinds: frozenset[str] | None = None) -> Counter[str]:
    """Count the personal data in ``text`` by type, as ``redact`` would replace them."""
    return redact(text, kinds)[1]


def scan_all(texts: Iterable[str], kinds: frozenset[str] | None = None) -> Counter[str]:
    """Total counts over many texts, e.g. every turn of a dataset."""
    total: Counter[str] = Counter()
    for text in texts:
        total.update(scan(text, kinds))
    return total


def _check_kinds(kinds: frozenset[str] | None) -> frozenset[str]:
    if kinds is None:
        return frozenset(KINDS)
    unknown = sorted(kinds.difference(KINDS))
    if unknown:
        raise InvalidInput(
            f"unknown personal data type(s): {', '.join(unknown)}", hint=f"use {', '.join(KINDS)}"
        )
    return kinds


def _counted(kind: str, counts: Counter[str]) -> Callable[[re.Match[str]], str]:
    placeholder = f"<{kind}>"

    def replace(_: re.Match[str]) -> str:
        counts[kind] += 1
        return placeholder

    return replace


def _checked(
    kind: str, valid: Callable[[str], bool], counts: Counter[str]
) -> Callable[[re.Match[str]], str]:
    placeholder = f"<{kind}>"

    def replace(match: re.Match[str]) -> str:
        if not valid(match.group()):
            return match.group()
        counts[kind] += 1
        return placeholder

    return replace


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn (mod 10) check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    groups = _CARD_GROUP.split(candidate)
    if len(groups) > 1 and not all(3 <= len(g) <= 6 for g in groups):
        return False  # "1 2 3 4 …" or a phone's short groups, not a card's layout
    digits = "".join(groups)
    return digits[0] in "23456" and luhn_valid(digits)


def iban_valid(compact: str) -> bool:
    """Whether a compact upper-case IBAN has a valid length and mod-97 checksum."""
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _replace_iban(match: re.Match[str], counts: Counter[str]) -> str:
    found = match.group()
    compact = found.replace(" ", "")
    end = len(found)
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) > expected:
        # A grouped IBAN followed by another group ("… 0130 00 1234"): cut at its length,
        # but only where a space ends it, never inside a group.
        seen = 0
        for index, ch in enumerate(found):
            if ch != " ":
                seen += 1
            if seen == expected:
                end = index + 1
                break
        if end < len(found) and found[end] != " ":
            return found
        compact = compact[:expected]
    if not iban_valid(compact):
        return found
    counts["IBAN"] += 1
    return "<IBAN>" + found[end:]


def _replace_ipv6(match: re.Match[str], counts: Counter[str]) -> str:
    found = match.group()
    candidate = found.rstrip(".")  # the full stop of a sentence
    tail = found[len(candidate) :]
    address = candidate.split("%", 1)[0]
    if address.count(":") < 2 or not any(ch.isdigit() for ch in address):
        return found  # "::" alone, or a hex-only "abc::def" (see ``redact``)
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return found
    counts["IP"] += 1
    return "<IP>" + tail


def _replace_phone(match: re.Match[str], counts: Counter[str]) -> str:
    found = match.group()
    digits = sum(ch.isdigit() for ch in found)
    least = 10 if match.group("trunk") else 7
    if not least <= digits <= 15:
        return found
    counts["PHONE"] += 1
    return "<PHONE>"


def _replace_spans(text: str, spans: list[tuple[int, int]], kind: str, counts: Counter[str]) -> str:
    parts: list[str] = []
    last = 0
    for start, end in sorted(spans):
        if start < last or start >= end:
            continue  # overlapping or empty spans from the detector
        parts.append(text[last:start])
        parts.append(f"<{kind}>")
        counts[kind] += 1
        last = end
    parts.append(text[last:])
    return "".join(parts)
