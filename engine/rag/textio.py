"""Opening text files of unknown encoding and reading them in bounded blocks of whole lines."""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

# Text is decoded and handed on in blocks of about this many characters, so a 200 MB log
# costs a few MB of memory, not the file's size twice over (bytes plus str).
BLOCK_CHARS = 1 << 20
# A line longer than this (minified code, one-line JSON) is cut rather than held whole.
_MAX_LINE_CHARS = BLOCK_CHARS
# Encoding and binary detection look at the start of the file only.
_SAMPLE_BYTES = 64 * 1024
# More than this share of control characters (or undecodable bytes) means "not text".
_MAX_CONTROL_SHARE = 0.05

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE: its BOM starts the same way
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Control characters that have no place in text; keeps \t \n \f \r and ESC.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\ufffd]")
_CONTROL_BYTES = bytes([*range(0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])


def open_text(raw: BinaryIO) -> io.TextIOWrapper | None:
    """A decoding reader over ``raw``; never fails on bad bytes once an encoding is chosen.

    Returns:
        The reader, positioned at the start; None when ``raw`` holds binary data, not text.
    """
    sample = raw.read(_SAMPLE_BYTES)
    encoding = _detect_encoding(sample, complete=len(sample) < _SAMPLE_BYTES)
    if encoding is None:
        return None
    raw.seek(0)
    # newline=None: "\r\n" and lone "\r" count as one line break, as editors show them.
    return io.TextIOWrapper(raw, encoding=encoding, errors=_LEGACY_FALLBACK, newline=None)


def _decode_as_cp1252(error: UnicodeError) -> tuple[str, int]:
    """Read bytes the chosen encoding rejects as Windows-1252, the usual culprit.

    The encoding is chosen from the first 64 KB; a UTF-8 file with a stray Latin-1 "é"
    further on keeps its "é" instead of getting "\ufffd". Unmapped bytes still become "\ufffd".
    """
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return error.object[error.start : error.end].decode("cp1252", "replace"), error.end


# Registered once, when this module is first imported.
_LEGACY_FALLBACK = "bastion.cp1252"
codecs.register_error(_LEGACY_FALLBACK, _decode_as_cp1252)


def _detect_encoding(sample: bytes, complete: bool) -> str | None:
    """The encoding of a file that starts with ``sample``; None for binary data."""
    for bom, name in _BOMS:
        if sample.startswith(bom):
            return name
    if b"\x00" in sample:
        utf16 = _utf16_without_bom(sample)
        if utf16 is None:
            return None
        name = utf16
    else:
        # Control bytes never occur inside the characters of an ASCII-compatible encoding
        # (even the CJK ones), so counting them in the raw bytes catches binary data that a
        # multi-byte code page would happily "decode".
        controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
        if controls > _MAX_CONTROL_SHARE * len(sample):
            return None
        try:
            # Incremental, so a character cut at the end of the sample is not an error.
            codecs.getincrementaldecoder("utf-8")().decode(sample, final=complete)
            name = "utf-8"
        except UnicodeDecodeError:
            legacy = _guess_legacy_encoding(sample)
            if legacy is None:
                return None
            name = legacy
    decoded = sample.decode(name, errors="replace")
    if len(CONTROL_CHARS.findall(decoded)) > _MAX_CONTROL_SHARE * max(len(decoded), 1):
        return None
    return name


def _utf16_without_bom(sample: bytes) -> str | None:
    # Mostly-ASCII UTF-16 has a zero in every other byte; binary formats have zeros anywhere.
    half = max(len(sample) // 2, 1)
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    if odd > 0.3 * half and even < 0.02 * half:
        return "utf-16-le"
    if even > 0.3 * half and odd < 0.02 * half:
        return "utf-16-be"
    return None


def _guess_legacy_encoding(sample: bytes) -> str | None:
    from charset_normalizer import from_bytes

    results = from_bytes(sample)
    best = results.best()
    if best is None:
        return None
    # On short Western European samples charset-normalizer often ranks a Baltic or Central
    # European code page first although Windows-1252 reads just as cleanly; 1252 is by far
    # the most common legacy encoding, so it wins a near tie.
    for result in results:
        if result.encoding in ("cp1252", "latin_1") and result.chaos <= best.chaos + 0.1:
            return "cp1252"
    return best.encoding


def text_blocks(reader: io.TextIOWrapper, check: Callable[[], None]) -> Iterator[tuple[int, str]]:
    """Whole lines in blocks of about ``BLOCK_CHARS``: (number of the first line, text).

    Args:
        reader: the text to read, from its start.
        check: called before each block is read; raises ``Cancelled`` to stop.
    """
    line = 1
    carry = ""
    while True:
        check()
        block = reader.read(BLOCK_CHARS)
        if not block:
            break
        text = carry + block if carry else block
        cut = text.rfind("\n")
        if cut < 0:
            carry = text
            if len(carry) > _MAX_LINE_CHARS:  # the line goes on; its number stays the same
                yield line, carry
                carry = ""
            continue
        yield line, text[:cut]
        line += text.count("\n", 0, cut) + 1
        carry = text[cut + 1 :]
    if carry:
        yield line, carry
