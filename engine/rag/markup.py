"""Cutting marked-up documents (Markdown, HTML, Word) into parts at their headings."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING, NamedTuple

from engine.rag.textio import BLOCK_CHARS

if TYPE_CHECKING:
    from docx.document import Document as DocxDocument
    from docx.table import Table

# HTML and DOCX parts are cut at about this size so that no part holds a whole book.
_SECTION_CHARS = 64 * 1024
# Only this much of a heading's or page title's text is kept for the heading (the loader
# cuts it to 200): an <h1> that never closes would otherwise capture the rest of the page.
_MAX_CAPTURE_CHARS = 1000
# HTMLParser holds back everything after an unclosed comment, <script> or tag, waiting for
# its end, and scans that backlog again on every block: an unclosed "<!--" at the top of a
# 200 MB page would hold all of it. Inline data-URI images make tags of several MB in real
# pages; a construct longer than this ends the page's reading with a clear error instead.
MAX_HTML_MARKUP_CHARS = 32_000_000
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


class Outline:
    """The headings in force, as a path: a heading of level n closes those of level n and
    deeper (a document's title is level 0, Markdown's ``#`` and Word's "Heading 1" level 1)."""

    def __init__(self) -> None:
        self._open: list[tuple[int, str]] = []

    def enter(self, level: int, title: str) -> str | None:
        """The heading path after a heading of ``level`` named ``title``."""
        self._open = [(lv, t) for lv, t in self._open if lv < level]
        if title:
            self._open.append((level, title))
        return HEADING_SEPARATOR.join(t for _, t in self._open) or None


@dataclass
class _MarkdownState:
    heading: str | None = None
    fence: str | None = None
    front_matter: bool = False
    outline: Outline = field(default_factory=Outline)


def markdown_parts(blocks: Iterable[tuple[int, str]]) -> Iterator[Part]:
    """Markdown cut at its headings, from blocks of whole lines (as ``text_blocks`` reads).

    A heading inside a code fence or the YAML front matter is no heading.
    """
    state = _MarkdownState()
    for first_line, text in blocks:
        if first_line == 1 and text.startswith("---"):
            state.front_matter = True  # YAML front matter: its "---" and "#" are no headings
        start, start_line = 0, first_line
        for cut, level, title in _markdown_headings(text, state):
            yield Part(text[start:cut], state.heading, start_line)
            start_line += text.count("\n", start, cut)
            start, state.heading = cut, state.outline.enter(level, title)
        yield Part(text[start:], state.heading, start_line)


def _markdown_headings(text: str, state: _MarkdownState) -> Iterator[tuple[int, int, str]]:
    """(offset where a heading's line starts, level, heading) for each heading in ``text``."""
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
            yield m.start(), len(m["hashes"]), (m["title"] or "").strip()
        elif m.start() > 0:  # setext: the line above is the heading, if it is a paragraph
            above = text.rfind("\n", 0, m.start() - 1) + 1
            title = text[above : m.start() - 1].strip()
            if title and not title.startswith(("#", ">", "-", "*", "|")):
                yield above, 1 if m["setext"].startswith("=") else 2, title


# --- HTML ------------------------------------------------------------------------------

_HTML_SKIP = frozenset({"script", "style", "noscript", "template", "svg", "math"})
_HTML_BLOCK = frozenset(
    # A word list: as a set literal the formatter would put each of the 29 tags on a line.
    """p div br li ul ol dl dt dd tr table section article header footer nav aside main
    blockquote pre hr figure figcaption form address details summary caption body""".split()  # noqa: SIM905
)
_HTML_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
# Page furniture repeated on every page of a manual (navigation bars, breadcrumbs, side
# bars, footers): its words ("Next", "Up", "Index", the neighbours' titles) would match
# every query a little and dilute every passage's vector. Elements with these tags, an
# ARIA navigation role, or one of these words among their class or id tokens are skipped.
_HTML_FURNITURE_TAGS = frozenset({"nav", "footer"})
_HTML_FURNITURE_NAMES = frozenset(
    """navigation navbar nav navheader navfooter sidebar sphinxsidebar related breadcrumb
    breadcrumbs footer""".split()  # noqa: SIM905
)
# Between the parts of a heading path: "Manual › Plotting › Styles".
HEADING_SEPARATOR = " › "


class MarkupTooLong(Exception):
    """An HTML comment, script or tag that does not end within ``limit`` characters."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"HTML markup longer than {limit} characters")
        self.limit = limit


class _HtmlText(HTMLParser):
    """Visible text of an HTML page, cut into parts at headings."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ready: list[Part] = []
        self._parts: list[str] = []
        self._size = 0
        self._heading: str | None = None
        self._title: str | None = None  # the page's <title>
        self._path: dict[int, str] = {}  # the headings above the text now, by level
        self._skip = 0
        self._furniture: list[str] = []  # the skipped furniture element and its nesting
        self._capture_level = 0
        self._capture: list[str] | None = None  # the text of the heading or title being read
        self._captured = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._furniture:
            if tag == self._furniture[0]:
                self._furniture.append(tag)
            return
        if _is_furniture(tag, attrs):
            self._furniture.append(tag)
            return
        if tag in _HTML_SKIP:
            self._skip += 1
        elif tag in _HTML_HEADINGS:
            self.flush()
            self._capture, self._captured = [], 0
            self._capture_level = int(tag[1])
        elif tag == "title":
            self._in_title, self._capture, self._captured = True, [], 0
        elif tag in _HTML_BLOCK:
            self._break()
        elif tag in ("td", "th"):
            self._parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if self._furniture:
            if tag == self._furniture[0]:
                self._furniture.pop()
            return
        if tag in _HTML_SKIP:
            self._skip = max(self._skip - 1, 0)
        elif (tag in _HTML_HEADINGS or tag == "title") and self._capture is not None:
            title = " ".join("".join(self._capture).split())
            if title and tag == "title":
                self._title = title
            elif title:
                level = self._capture_level
                self._path = {k: v for k, v in self._path.items() if k < level}
                self._path[level] = title
            self._heading = self._heading_path()
            self._capture, self._in_title = None, False
            self._break()
        elif tag in _HTML_BLOCK:
            self._break()

    def handle_data(self, data: str) -> None:
        if self._skip or self._furniture:
            return
        if self._capture is not None and self._captured < _MAX_CAPTURE_CHARS:
            self._capture.append(data[: _MAX_CAPTURE_CHARS - self._captured])
            self._captured += len(self._capture[-1])
        if self._in_title:
            return  # the title names the page; it is not part of its text
        self._parts.append(data)
        self._size += len(data)
        if self._size > _SECTION_CHARS:
            self._cut()

    def _heading_path(self) -> str | None:
        """The page's title, then each heading above the text (a repeat said once)."""
        parts: list[str] = []
        for name in (self._title, *(self._path[k] for k in sorted(self._path))):
            if name and (not parts or parts[-1].casefold() != name.casefold()):
                parts.append(name)
        return HEADING_SEPARATOR.join(parts) or None

    def parse_html_declaration(self, i: int) -> int:
        # "<![" that is not a well-formed marked section makes the standard library raise
        # AssertionError (quoting the page). Browsers read any "<![" in HTML content as a
        # bogus comment that ends at the next ">", and so does this parser.
        if self.rawdata.startswith("<![", i):
            return self.parse_bogus_comment(i)
        return super().parse_html_declaration(i)

    def _break(self) -> None:
        self._parts.append("\n")
        if self._size > _SECTION_CHARS:
            self.flush()

    def _cut(self) -> None:
        """Close parts of about 64 KB at line breaks (or spaces) inside one run of text.

        Text inside one <pre>, or a page without block tags, has no tag to cut at: as one
        part, an 18 MB log in a <pre> was tokenized in one call and peaked at 800 MB (the
        same text as .txt: 57 MB; cut here: 13 MB), and 19 MB of words with no block tag at
        3.2 GB. Whole lines are kept together wherever a line is short enough.
        """
        text = "".join(self._parts)
        start = 0
        while len(text) - start > _SECTION_CHARS:
            end = start + _SECTION_CHARS
            cut = text.rfind("\n", start + 1, end)
            if cut < 0:
                cut = text.rfind(" ", start + 1, end)
            if cut < 0:
                cut = end  # one "word" of 64 KB (base64, minified code): cut anywhere
            self._emit(text[start:cut])
            start = cut
        self._parts, self._size = [text[start:]], len(text) - start

    def flush(self) -> None:
        """Close the current part (at a heading, a size limit or the end)."""
        text = "".join(self._parts)
        self._parts, self._size = [], 0
        self._emit(text)

    def _emit(self, raw: str) -> None:
        text = re.sub(r"[ \t\r\f\v]+", " ", raw)
        text = re.sub(r" ?\n[\s]*", "\n", text).strip()
        if text:
            self.ready.append(Part(text, self._heading))


# Only these can be furniture (never <body>, <main> or a void element such as <img>,
# whose end tag never comes).
_HTML_CONTAINERS = frozenset(
    ["div", "nav", "footer", "ul", "ol", "table", "section", "aside", "header", "span", "p"]
)


def _is_furniture(tag: str, attrs: list[tuple[str, str | None]]) -> bool:
    if tag in _HTML_FURNITURE_TAGS:
        return True
    if tag not in _HTML_CONTAINERS:
        return False
    for name, value in attrs:
        if not value:
            continue
        if name == "role" and value.lower() == "navigation":
            return True
        if name in ("class", "id") and any(
            token in _HTML_FURNITURE_NAMES for token in value.lower().split()
        ):
            return True
    return False


def html_parts(reader: io.TextIOWrapper, check: Callable[[], None]) -> Iterator[Part]:
    """The visible text of an HTML page, cut at headings and at about 64 KB.

    Args:
        reader: the page's text, from its start.
        check: called before each block is read; raises ``Cancelled`` to stop.

    Raises:
        MarkupTooLong: a comment, script or tag runs on past ``MAX_HTML_MARKUP_CHARS``.
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
        # What the parser holds back is an unfinished comment, script or tag (plus at most a
        # character reference cut by the block's end).
        if len(parser.rawdata) > MAX_HTML_MARKUP_CHARS:
            raise MarkupTooLong(MAX_HTML_MARKUP_CHARS)
    parser.close()
    parser.flush()
    yield from parser.ready


# --- DOCX ------------------------------------------------------------------------------


def docx_parts(document: DocxDocument, check: Callable[[], None]) -> Iterator[Part]:
    """The paragraphs and tables of a Word document, cut at headings and at about 64 KB.

    Each paragraph and each table cell is read once, whatever the style sheet or the
    merged cells: the walk is linear in the document's size.

    Args:
        document: the opened document.
        check: called every 100 paragraphs or tables; raises ``Cancelled`` to stop.
    """
    from docx.table import Table

    style_names = _paragraph_style_names(document)
    default_style = style_names.get(None, "")
    heading: str | None = None
    outline = Outline()
    parts: list[str] = []
    size = 0
    for i, block in enumerate(document.iter_inner_content()):
        if i % 100 == 0:
            check()
        if isinstance(block, Table):
            text = "\n".join(_table_rows(block))
        else:
            text = block.text.strip()
            # Paragraph.style looks the id up in the whole style sheet, twice when the
            # paragraph has none: 1.2 ms a paragraph with Word's 164 default styles; 58,000
            # paragraphs took 129 s, 6.5 s with the map. The id is the paragraph's own.
            style = style_names.get(block._p.style, default_style)
            if text and (style.startswith("Heading") or style == "Title"):
                yield Part("\n".join(parts), heading)
                heading, parts, size = outline.enter(_docx_level(style), text), [], 0
        if text.strip():
            parts.append(text)
            size += len(text)
        if size > _SECTION_CHARS:
            yield Part("\n".join(parts), heading)
            parts, size = [], 0
    yield Part("\n".join(parts), heading)


def _docx_level(style: str) -> int:
    """ "Title" is level 0, "Heading 2" level 2; a heading style without a number, 1."""
    if style == "Title":
        return 0
    digits = style.removeprefix("Heading").strip()
    return int(digits) if digits.isdigit() else 1


def _paragraph_style_names(document: DocxDocument) -> dict[str | None, str]:
    """Paragraph style id -> name as python-docx shows it; None -> the default style's name.

    As ``Paragraph.style`` resolves it: the first style with an id counts, and an id that
    is missing or names a style of another type (character, table) means the default.
    """
    from docx.enum.style import WD_STYLE_TYPE

    styles = document.styles
    names: dict[str | None, str] = {}
    seen: set[str] = set()
    for style in styles:
        if style.style_id in seen:
            continue
        seen.add(style.style_id)
        if style.type == WD_STYLE_TYPE.PARAGRAPH:
            names[style.style_id] = style.name or ""
    default = styles.default(WD_STYLE_TYPE.PARAGRAPH)
    names[None] = (default.name or "") if default is not None else ""
    return names


def _table_rows(table: Table) -> Iterator[str]:
    """Each row of a table as "cell | cell", a merged cell's text in each row it spans.

    python-docx's ``row.cells`` finds the top of a vertically merged cell by walking up
    one row at a time, recursively: quadratic in the rows it spans (600 rows: 12 s), a
    RecursionError past about 1,000, and a ValueError when the first row says "continue".
    Here the text of each grid column is carried down from the row above instead.
    """
    above: dict[int, str] = {}
    for tr in table._tbl.tr_lst:
        row: dict[int, str] = {}
        cells: list[str] = []
        offset = tr.grid_before
        for tc in tr.tc_lst:
            if tc.vMerge == "continue":
                text = above.get(offset, "")
            else:
                text = " ".join("\n".join(p.text for p in tc.p_lst).split())
            row[offset] = text
            offset += tc.grid_span
            if not cells or cells[-1] != text:  # neighbours that read the same, written once
                cells.append(text)
        above = row
        yield " | ".join(cells)
