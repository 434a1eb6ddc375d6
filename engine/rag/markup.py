"""Cutting marked-up documents (Markdown, HTML, Word) into parts at their headings."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.rag.textio import BLOCK_CHARS

if TYPE_CHECKING:
    from docx.document import Document as DocxDocument

# HTML and DOCX parts are cut at about this size so that no part holds a whole book.
_SECTION_CHARS = 64 * 1024
# One Markdown line that matters for structure: a code fence, an ATX heading, or a setext
# underline (whose heading is the line above it).
_MD_LINE = re.compile(
    r"^ {0,3}(?:(?P<fence>```|~~~)[^\n]*"
    r"|(?P<hashes>#{1,6})(?:[ \t]+(?P<title>[^\n]*?))?[ \t]*#*[ \t]*"
    r"|(?P<setext>=+|-+)[ \t]*)$",
    re.MULTILINE,
)


class Part(NamedTuple):
    """A run of a document's text under one heading, blank edges and all.

    ``first_line`` is the 1-based line of the file that ``text`` starts on, for formats
    read line by line (Markdown); None otherwise. ``text`` may be blank.
    """

    text: str
    heading: str | None
    first_line: int | None = None


# --- Markdown --------------------------------------------------------------------------


@dataclass
class _MarkdownState:
    heading: str | None = None
    fence: str | None = None
    front_matter: bool = False


def markdown_parts(blocks: Iterable[tuple[int, str]]) -> Iterator[Part]:
    """Markdown cut at its headings, from blocks of whole lines (as ``text_blocks`` reads).

    A heading inside a code fence or the YAML front matter is no heading.
    """
    state = _MarkdownState()
    for first_line, text in blocks:
        if first_line == 1 and text.startswith("---"):
            state.front_matter = True  # YAML front matter: its "---" and "#" are no headings
        start, start_line = 0, first_line
        for cut, title in _markdown_headings(text, state):
            yield Part(text[start:cut], state.heading, start_line)
            start_line += text.count("\n", start, cut)
            start, state.heading = cut, title
        yield Part(text[start:], state.heading, start_line)


def _markdown_headings(text: str, state: _MarkdownState) -> Iterator[tuple[int, str]]:
    """(offset where a heading's line starts, heading) for each heading in ``text``."""
    for m in _MD_LINE.finditer(text):
        if m["fence"]:
            if state.fence is None:
                state.fence = m["fence"]
            elif state.fence == m["fence"]:
                state.fence = None
        elif state.fence is not None:
            continue
        elif state.front_matter:
            if m["setext"] and m.start() > 0:
                state.front_matter = False
        elif m["hashes"]:
            yield m.start(), (m["title"] or "").strip()
        elif m.start() > 0:  # setext: the line above is the heading, if it is a paragraph
            above = text.rfind("\n", 0, m.start() - 1) + 1
            title = text[above : m.start() - 1].strip()
            if title and not title.startswith(("#", ">", "-", "*", "|")):
                yield above, title


# --- HTML ------------------------------------------------------------------------------

_HTML_SKIP = frozenset({"script", "style", "noscript", "template", "svg", "math"})
_HTML_BLOCK = frozenset(
    # A word list: as a set literal the formatter would put each of the 29 tags on a line.
    """p div br li ul ol dl dt dd tr table section article header footer nav aside main
    blockquote pre hr figure figcaption form address details summary caption body""".split()  # noqa: SIM905
)
_HTML_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})


class _HtmlText(HTMLParser):
    """Visible text of an HTML page, cut into parts at headings."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ready: list[Part] = []
        self._parts: list[str] = []
        self._size = 0
        self._heading: str | None = None
        self._skip = 0
        self._capture: list[str] | None = None  # the text of the heading or title being read
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HTML_SKIP:
            self._skip += 1
        elif tag in _HTML_HEADINGS:
            self.flush()
            self._capture = []
        elif tag == "title":
            self._in_title, self._capture = True, []
        elif tag in _HTML_BLOCK:
            self._break()
        elif tag in ("td", "th"):
            self._parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_SKIP:
            self._skip = max(self._skip - 1, 0)
        elif (tag in _HTML_HEADINGS or tag == "title") and self._capture is not None:
            title = " ".join("".join(self._capture).split())
            if title and (tag != "title" or self._heading is None):
                self._heading = title
            self._capture, self._in_title = None, False
            self._break()
        elif tag in _HTML_BLOCK:
            self._break()

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._capture is not None:
            self._capture.append(data)
        if self._in_title:
            return  # the title names the page; it is not part of its text
        self._parts.append(data)
        self._size += len(data)

    def _break(self) -> None:
        self._parts.append("\n")
        if self._size > _SECTION_CHARS:
            self.flush()

    def flush(self) -> None:
        """Close the current part (at a heading, a size limit or the end)."""
        text = re.sub(r"[ \t\r\f\v]+", " ", "".join(self._parts))
        text = re.sub(r" ?\n[\s]*", "\n", text).strip()
        self._parts, self._size = [], 0
        if text:
            self.ready.append(Part(text, self._heading))


def html_parts(reader: io.TextIOWrapper, check: Callable[[], None]) -> Iterator[Part]:
    """The visible text of an HTML page, cut at headings and at about 64 KB.

    Args:
        reader: the page's text, from its start.
        check: called before each block is read; raises ``Cancelled`` to stop.
    """
    parser = _HtmlText()
    while True:
        check()
        block = reader.read(BLOCK_CHARS)
        if not block:
            break
        parser.feed(block)
        yield from parser.ready
        parser.ready.clear()
    parser.close()
    parser.flush()
    yield from parser.ready


# --- DOCX ------------------------------------------------------------------------------


def docx_parts(document: DocxDocument, check: Callable[[], None]) -> Iterator[Part]:
    """The paragraphs and tables of a Word document, cut at headings and at about 64 KB.

    Args:
        document: the opened document.
        check: called every 100 paragraphs or tables; raises ``Cancelled`` to stop.
    """
    from docx.table import Table

    heading: str | None = None
    parts: list[str] = []
    size = 0
    for i, block in enumerate(document.iter_inner_content()):
        if i % 100 == 0:
            check()
        if isinstance(block, Table):
            text = "\n".join(_table_row(row) for row in block.rows)
        else:
            text = block.text.strip()
            style = block.style.name if block.style is not None else ""
            if text and (style.startswith("Heading") or style == "Title"):
                yield Part("\n".join(parts), heading)
                heading, parts, size = text, [], 0
        if text.strip():
            parts.append(text)
            size += len(text)
        if size > _SECTION_CHARS:
            yield Part("\n".join(parts), heading)
            parts, size = [], 0
    yield Part("\n".join(parts), heading)


def _table_row(row: Any) -> str:
    cells: list[str] = []
    for cell in row.cells:
        text = " ".join(cell.text.split())
        if not cells or cells[-1] != text:  # a merged cell repeats in every column it spans
            cells.append(text)
    return " | ".join(cells)
