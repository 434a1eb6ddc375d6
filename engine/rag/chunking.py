"""Splitting document sections into embedder-sized chunks that keep their page and lines.

Sections are cut into units (lines; long lines into sentences; over-long sentences into
words), every unit is counted once with the embedder's own tokenizer, in batches, and the
units are packed greedily; a chunk ends early rather than cut a sentence that would fit
whole into the next one. A chunk's size is the sum of its units' counts: that is exact
for WordPiece (BERT) and any tokenizer that splits on whitespace before it looks up
pieces, because units are cut at whitespace (only a run of thousands of characters without
any is cut where it must be).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import OperationFailed
from engine.rag.loaders import Section, split_section

TokenCounter = Callable[[list[str]], list[int]]
"""Counts the tokens of each text of a batch, without special tokens."""

# What a collection's chunks are: the readers (HTML without page furniture, heading paths
# of HTML, Markdown, DOCX and PDF outlines) and the packing below. Bump it whenever a change
# makes the same file give other chunks: a collection cut by an older version is cut again
# by its next sync (``Documents.sync``), as searching it would miss what the change brings.
# A collection from before versions (NULL in the database) was cut by version 1: no heading
# paths, page furniture kept, 40 pieces of overlap.
CHUNKER_VERSION = 2

# all-MiniLM-L6-v2 reads at most 256 word pieces, [CLS] and [SEP] included, and silently
# drops the rest; it was trained on passages of at most 128 pieces. 200 stays clear of the
# cut (whatever the embedder adds) and is a paragraph or so, about 150 English words: long
# enough to carry an answer with its context, short enough that one topic dominates the
# vector. 20 pieces of overlap (10 %), about the last sentence of the previous chunk, keep
# a sentence that straddles a boundary findable from either side. Measured on the two real
# sets of bench/bench_rag_quality.py (overlap 40 / 20 / 10 / 0): gnuplot hit@1 0.700 /
# 0.750 / 0.750 / 0.725, MRR@10 0.796 / 0.836 / 0.829 / 0.817; PDF manuals equal (0.800,
# 0.859-0.862); and a tenth fewer tokens to embed than at 40.
DEFAULT_MAX_TOKENS = 200
DEFAULT_OVERLAP_TOKENS = 20

# Lines up to this many characters are units as they are (PDF lines, code); longer ones
# (paragraphs written on one line: Markdown, HTML, DOCX) are cut into sentences.
_LONG_LINE = 240
# Far above any chunk size in characters; longer units are cut before they are counted.
_MAX_UNIT_CHARS = 2000
_LINE = re.compile(r"[^\n]+")
_WORD = re.compile(r"\S+")
# The end of a sentence: terminal punctuation and closing quotes or brackets, then
# whitespace; CJK full stops need no space after them.
_SENTENCE_END = re.compile(r"(?:[.!?…]+[\"'”’)\]]*(?=\s)|[。！？]+[」』”’）)]*)\s*")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document sized for the embedder, with what a citation needs."""

    text: str
    page: int | None
    line_start: int | None
    line_end: int | None
    heading: str | None
    ordinal: int  # position within the document, from 0


class _Source:
    """A section's text and the offsets of its newlines, to turn offsets into lines."""

    __slots__ = ("line_start", "newlines", "text")

    def __init__(self, section: Section) -> None:
        self.text = section.text
        self.line_start = section.line_start
        self.newlines = (
            [m.start() for m in re.finditer("\n", self.text)] if self.line_start is not None else []
        )

    def line_at(self, offset: int) -> int | None:
        if self.line_start is None:
            return None
        return self.line_start + bisect.bisect_left(self.newlines, offset)


@dataclass(slots=True)
class _Piece:
    """``source.text[start:end]``, which is ``tokens`` tokens long."""

    source: _Source
    start: int
    end: int
    tokens: int


def chunk_sections(
    sections: Iterable[Section],
    count_tokens: TokenCounter,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> Iterator[Chunk]:
    """Pack sections into chunks of at most ``max_tokens`` tokens, lazily.

    A chunk starts with up to ``overlap_tokens`` tokens from the end of the previous one.
    A chunk never spans two pages or two headings, and no overlap is carried across them.
    Its line range is the range of lines its text comes from. Memory is bounded by the
    longest section, and a section longer than ``loaders.MAX_SECTION_CHARS`` is taken in
    pieces of that size (the tokenizer costs about 45 bytes per character of a batch).

    Args:
        sections: from ``load_document``, in document order.
        count_tokens: counts the tokens of each text of a batch, without special tokens.
        max_tokens: the most tokens in a chunk.
        overlap_tokens: the most tokens repeated from the previous chunk.

    Raises:
        ValueError: ``max_tokens`` is below 1, or the overlap is not below it.
    """
    if max_tokens < 1 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"bad chunk sizes: max {max_tokens}, overlap {overlap_tokens}")
    packer = _Packer(count_tokens, max_tokens, overlap_tokens)
    for section in sections:
        for piece in split_section(section):
            if piece.text.strip():
                yield from packer.add(piece)
    yield from packer.flush(carry=False)


class _Packer:
    """The chunk being filled, and what to do when the next piece does not fit."""

    def __init__(self, count: TokenCounter, max_tokens: int, overlap_tokens: int) -> None:
        self.count = count
        self.max = max_tokens
        self.overlap = overlap_tokens
        # Units longer than this are cut into words, so that the overlap always fits before them.
        self.room = max_tokens - overlap_tokens
        self.pieces: list[_Piece] = []
        self.tokens = 0
        self.fresh = False  # holds more than the overlap carried from the previous chunk
        self.key: tuple[int | None, str | None] | None = None
        self.ordinal = 0

    def add(self, section: Section) -> Iterator[Chunk]:
        key = (section.page, section.heading)
        if key != self.key:
            yield from self.flush(carry=False)
            self.key = key
        for part in self._pieces(_Source(section)):
            if self.tokens + part.tokens > self.max:
                yield from self.flush(carry=True)
                while self.pieces and self.tokens + part.tokens > self.max:
                    self.tokens -= self.pieces.pop(0).tokens
            self.pieces.append(part)
            self.tokens += part.tokens
            self.fresh = True

    def flush(self, carry: bool) -> Iterator[Chunk]:
        """Emit the current chunk if it has new text; keep its tail when ``carry``."""
        if self.fresh:
            yield self._chunk()
            self.ordinal += 1
        self.pieces = self._tail() if carry else []
        self.tokens = sum(p.tokens for p in self.pieces)
        self.fresh = False

    def _chunk(self) -> Chunk:
        parts: list[str] = []
        prev: _Piece | None = None
        for p in self.pieces:
            if prev is not None:
                if p.source is prev.source:
                    gap = p.source.text[prev.end : p.start]
                    newlines = gap.count("\n")
                    parts.append("\n\n" if newlines > 1 else "\n" if newlines else gap[:1])
                else:
                    parts.append("\n")
            parts.append(p.source.text[p.start : p.end])
            prev = p
        first, last = self.pieces[0], self.pieces[-1]
        page, heading = self.key or (None, None)
        return Chunk(
            text="".join(parts),
            page=page,
            line_start=first.source.line_at(first.start),
            line_end=last.source.line_at(last.end - 1),
            heading=heading,
            ordinal=self.ordinal,
        )

    def _tail(self) -> list[_Piece]:
        """The last pieces of the chunk that fit in the overlap, cut at a word if need be."""
        if not self.overlap or not self.pieces:
            return []
        tail: list[_Piece] = []
        total = 0
        for p in reversed(self.pieces):
            if total + p.tokens > self.overlap:
                break
            tail.append(p)
            total += p.tokens
        if not tail:  # the last unit alone is longer than the overlap: take its last words
            last = self.pieces[-1]
            text = last.source.text
            words = [m.span() for m in _WORD.finditer(text, last.start, last.end)]
            words = words[-self.overlap :]  # every word is a token at least
            counts = self.count([text[a:b] for a, b in words])
            start = None
            for (a, _), n in zip(reversed(words), reversed(counts), strict=True):
                if total + n > self.overlap:
                    break
                start, total = a, total + n
            if start is not None:
                tail.append(_Piece(last.source, start, last.end, total))
        tail.reverse()
        return tail

    def _pieces(self, source: _Source) -> list[_Piece]:
        """The section's units, counted; a unit too long to follow the overlap as its words.

        Two calls of the counter per section, whatever its size: one for the units, one
        for the words of all the long units.
        """
        text = source.text
        spans = _units(text)
        counts = self.count([text[a:b] for a, b in spans])
        long_units = {
            i: [m.span() for m in _WORD.finditer(text, a, b)]
            for i, ((a, b), n) in enumerate(zip(spans, counts, strict=True))
            if n > self.room
        }
        words = [span for unit in long_units.values() for span in unit]
        word_counts = iter(self.count([text[a:b] for a, b in words]) if words else [])
        pieces: list[_Piece] = []
        for i, ((a, b), n) in enumerate(zip(spans, counts, strict=True)):
            if i not in long_units:
                pieces.append(_Piece(source, a, b, n))
                continue
            for wa, wb in long_units[i]:
                for start, end, tokens in self._halve(text, wa, wb, next(word_counts)):
                    pieces.append(_Piece(source, start, end, tokens))
        return pieces

    def _halve(self, text: str, a: int, b: int, n: int) -> list[tuple[int, int, int]]:
        """A "word" too long for a chunk (a URL, base64, a formula) cut in halves until it fits."""
        if n <= self.room or b - a <= 1:
            return [(a, b, n)]
        mid = (a + b) // 2
        left, right = self.count([text[a:mid], text[mid:b]])
        return self._halve(text, a, mid, left) + self._halve(text, mid, b, right)


def _units(text: str) -> list[tuple[int, int]]:
    """Spans of the lines of ``text``, long lines cut after each sentence, without edges."""
    spans: list[tuple[int, int]] = []
    for m in _LINE.finditer(text):
        line = m.group()
        lead = len(line) - len(line.lstrip())
        if lead == len(line):
            continue
        a, b = m.start() + lead, m.end() - (len(line) - len(line.rstrip()))
        if b - a > _LONG_LINE:
            for s in _SENTENCE_END.finditer(text, a, b):
                _add_unit(spans, text, a, s.start() + len(s.group().rstrip()))
                a = s.end()
        if a < b:
            _add_unit(spans, text, a, b)
    return spans


def _add_unit(spans: list[tuple[int, int]], text: str, a: int, b: int) -> None:
    # A unit this long is cut now, at a space where there is one, so that no single batch
    # holds a megabyte of minified code or a page-long run-on sentence.
    while b - a > _MAX_UNIT_CHARS:
        cut = text.rfind(" ", a + 1, a + _MAX_UNIT_CHARS)
        cut = cut if cut > a else a + _MAX_UNIT_CHARS
        spans.append((a, cut))
        a = cut
        while a < b and text[a].isspace():
            a += 1
    if a < b:
        spans.append((a, b))


def wordpiece_counter(tokenizer_path: Path) -> TokenCounter:
    """A batch token counter from a Hugging Face fast tokenizer.

    Uses the ``tokenizers`` library directly (no transformers import). Counts leave out
    special tokens and are not truncated, whatever the tokenizer file says.

    Args:
        tokenizer_path: a model folder holding ``tokenizer.json``, or that file itself.

    Raises:
        OperationFailed: the tokenizer cannot be loaded.
    """
    from tokenizers import Tokenizer

    file = tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for missing or bad files
        raise OperationFailed(
            f"cannot load the tokenizer {file}", hint="reinstall the embedder model"
        ) from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    return count
