"""Reading documents (PDF, text, code, Markdown, HTML, DOCX) into text sections with provenance."""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

from engine.errors import BastionError
from engine.rag.markup import (
    MAX_HTML_MARKUP_CHARS,
    MarkupTooLong,
    Part,
    docx_parts,
    html_parts,
    markdown_parts,
)
from engine.rag.pdfpages import page_texts, pdf_headings
from engine.rag.textio import BLOCK_CHARS, CONTROL_CHARS, open_text, text_blocks
from engine.units import human_size

if TYPE_CHECKING:
    from docx.document import Document as DocxDocument
    from pypdf import PdfReader

log = logging.getLogger(__name__)

DocumentState = Literal["failed", "skipped"]

# A scanned PDF yields no text, or a stamp and a page number per page; a real text layer
# yields hundreds of letters per page. Below this average per page there is nothing to index.
_MIN_PDF_LETTERS_PER_PAGE = 8

# No section is longer than this, whatever the format: a longer one (a PDF page of a
# log dump, a Word paragraph of a whole book) is cut at line breaks, or at spaces. Chunking
# tokenizes a section in one batch, at about 45 bytes of memory per character: an 18 MB
# section (a log in one HTML <pre>) peaked at 800 MB, the same text in 1 MB sections at
# 57 MB. Text files are read in blocks of this size already.
MAX_SECTION_CHARS = BLOCK_CHARS
# A heading longer than this is cut (with "…"): it is stored with every chunk under it.
_MAX_HEADING_CHARS = 200

# python-docx unpacks every part of a DOCX into memory and parses its XML parts into a
# tree of about 10 (Word's own markup) to 22 (empty paragraphs) times their size: 30 MB of
# Word-like XML (58,000 paragraphs, some 4,000 pages) peaked at 314 MB, 16 MB of empty
# paragraphs at 363 MB. Sizes are checked in the zip's directory before anything is
# unpacked; pictures and other binary parts stay bytes and count toward the total only.
DOCX_MAX_XML_BYTES = 32_000_000
DOCX_MAX_UNPACKED_BYTES = 256_000_000
# Word's XML packs 4 to 25 times; a part that unpacks to more than 100 times its packed
# size is a decompression bomb (Apache POI's ZipSecureFile draws the line at the same ratio):
# the 96 KB file holding 20 MB of paragraphs that took 357 MB to open. Parts under 1 MB
# are exempt: they cannot cost much whatever their ratio.
DOCX_MAX_RATIO = 100
_DOCX_RATIO_GRACE = 1_000_000


def _table(kind: str, extensions: str) -> dict[str, str]:
    return dict.fromkeys(extensions.split(), kind)


_KINDS: dict[str, str] = {
    **_table("pdf", ".pdf"),
    **_table("docx", ".docx"),
    **_table("markdown", ".md .markdown .mdown .mkd .mdx"),
    **_table("html", ".html .htm .xhtml"),
    **_table("text", ".txt .text .rst .csv .tsv .log .tex .org .adoc .asciidoc .srt .vtt .bib"),
    **_table(
        "code",
        """.py .pyi .js .mjs .cjs .jsx .ts .tsx .java .kt .kts .scala .groovy .gradle
        .c .h .cc .cpp .cxx .hpp .hh .cs .go .rs .rb .php .pl .pm .swift .m .mm .r .jl .lua
        .dart .sh .bash .zsh .fish .ps1 .bat .cmd .sql .json .jsonl .yaml .yml .toml .ini
        .cfg .conf .properties .xml .css .scss .less .vue .svelte .proto .graphql .cmake .mk
        .el .clj .ex .exs .erl .hs .ml .fs .vb .asm .s .f90 .tf .nix .zig .sol""",
    ),
}
# Files that are text by name rather than by extension.
_NAMES = {**_table("code", "makefile dockerfile"), **_table("text", "readme license changelog")}

_LEADING_BLANK_LINES = re.compile(r"(?:[ \t\f\v]*\n)+")
_LETTER = re.compile(r"[^\W_]")


@dataclass(frozen=True)
class Section:
    """A run of a document's text and where it came from.

    For text-like formats ``text`` is exactly lines ``line_start``..``line_end`` (1-based,
    inclusive) of the file joined by "\\n", so the line of any offset in ``text`` is
    ``line_start`` plus the newlines before it; only a line longer than
    ``MAX_SECTION_CHARS`` is cut between sections. ``page`` is 1-based and set for PDFs only.
    """

    text: str
    page: int | None = None
    line_start: int | None = None
    line_end: int | None = None
    heading: str | None = None


class DocumentError(BastionError):
    """A document cannot be indexed, with a message the user reads in the file list.

    ``state`` is "failed" when the file is broken or unreadable and "skipped" when nothing
    is wrong with it but there is nothing to take from it (unsupported type, empty).
    """

    def __init__(
        self, message: str, state: DocumentState = "failed", hint: str | None = None
    ) -> None:
        super().__init__(message, hint)
        self.state: DocumentState = state


def detect_kind(path: Path) -> str | None:
    """Tell how a file would be read, from its name.

    Returns:
        "pdf", "markdown", "html", "docx", "text" or "code"; None when unsupported.
    """
    return _KINDS.get(path.suffix.lower()) or (
        None if path.suffix else _NAMES.get(path.name.lower())
    )


def load_document(
    path: Path, check_cancelled: Callable[[], None] | None = None
) -> Iterator[Section]:
    """Read a document lazily, section by section, keeping pages, lines and headings.

    Large files are streamed, so memory stays bounded whatever the file's size. A PDF
    section never holds text of two pages. No section is longer than ``MAX_SECTION_CHARS``;
    a DOCX whose parts unpack past ``DOCX_MAX_XML_BYTES`` or ``DOCX_MAX_UNPACKED_BYTES``,
    or more than ``DOCX_MAX_RATIO`` times their packed size, fails before it is unpacked.

    Args:
        path: the file to read; its kind comes from ``detect_kind``.
        check_cancelled: called between pages and blocks; raises ``Cancelled`` to stop.

    Raises:
        DocumentError: the file cannot be indexed; ``state`` tells failed from skipped.
        Cancelled: from ``check_cancelled``.
    """
    check = check_cancelled or _not_cancelled
    try:
        info = path.stat()
    except OSError as exc:
        raise _read_error(exc) from exc
    if not path.is_file():
        raise DocumentError("not a regular file")
    kind = detect_kind(path)
    if kind is None:
        raise DocumentError(f"unsupported file type ({path.suffix or 'no extension'})", "skipped")
    if info.st_size == 0:
        raise DocumentError("empty file", "skipped")
    yielded = 0
    try:
        with path.open("rb") as raw:
            if kind == "pdf":
                sections = _pdf_sections(raw, check)
            elif kind == "docx":
                sections = _sections(docx_parts(_open_docx(raw), check))
            elif kind == "html":
                sections = _html_sections(_open_text(raw), check)
            else:
                blocks = text_blocks(_open_text(raw), check)
                if kind == "markdown":
                    sections = _sections(markdown_parts(blocks))
                else:
                    sections = _sections(Part(text, None, line) for line, text in blocks)
            for section in sections:
                yielded += 1
                yield section
    except OSError as exc:
        raise _read_error(exc) from exc
    if not yielded:
        raise DocumentError("no text in the file", "skipped")


def _not_cancelled() -> None:
    return None


def _read_error(exc: OSError) -> DocumentError:
    if isinstance(exc, FileNotFoundError):
        return DocumentError("file not found")
    if isinstance(exc, PermissionError):
        return DocumentError("cannot read: permission denied")
    return DocumentError(f"cannot read: {(exc.strerror or type(exc).__name__).lower()}")


def _section(
    text: str, first_line: int | None, heading: str | None = None, page: int | None = None
) -> list[Section]:
    """The sections of ``text`` without blank edges, cut at ``MAX_SECTION_CHARS``.

    None if nothing is left; more than one only for text longer than the limit.
    """
    if heading is not None and len(heading) > _MAX_HEADING_CHARS:
        cut = heading.rfind(" ", 0, _MAX_HEADING_CHARS)
        heading = heading[: cut if cut > _MAX_HEADING_CHARS // 2 else _MAX_HEADING_CHARS]
        heading = heading.rstrip() + "…"
    sections: list[Section] = []
    while True:
        lead = _LEADING_BLANK_LINES.match(text)
        if lead:
            text = text[lead.end() :]
            if first_line is not None:
                first_line += lead.group().count("\n")
        rest = ""
        if len(text) > MAX_SECTION_CHARS:
            # At the last line break in the window (a text format's section stays whole
            # lines), else the last space; the rest starts on the line the cut falls in.
            cut = text.rfind("\n", 1, MAX_SECTION_CHARS)
            if cut > 0:
                text, rest = text[:cut], text[cut:]
            else:
                cut = text.rfind(" ", 1, MAX_SECTION_CHARS)
                if cut > 0:
                    text, rest = text[:cut], text[cut + 1 :]
                else:  # a 1 MB "word": anywhere will do
                    text, rest = text[:MAX_SECTION_CHARS], text[MAX_SECTION_CHARS:]
        piece = text.rstrip()
        if piece:
            last_line = None if first_line is None else first_line + piece.count("\n")
            sections.append(Section(piece, page, first_line, last_line, heading))
        if not rest:
            return sections
        if first_line is not None:
            first_line += text.count("\n")
        text = rest


def split_section(section: Section) -> list[Section]:
    """``section`` itself, or, when longer than ``MAX_SECTION_CHARS``, its cut pieces.

    The pieces keep the page and heading; their line ranges are those of their text.
    """
    if len(section.text) <= MAX_SECTION_CHARS:
        return [section]
    return _section(section.text, section.line_start, section.heading, section.page)


def _sections(parts: Iterable[Part]) -> Iterator[Section]:
    for part in parts:
        yield from _section(part.text, part.first_line, part.heading)


def _html_sections(reader: io.TextIOWrapper, check: Callable[[], None]) -> Iterator[Section]:
    try:
        yield from _sections(html_parts(reader, check))
    except MarkupTooLong as exc:
        raise DocumentError(
            "HTML has a comment, script or tag that does not end within "
            f"{human_size(MAX_HTML_MARKUP_CHARS)} (the limit)",
        ) from exc


def _open_text(raw: BinaryIO) -> io.TextIOWrapper:
    reader = open_text(raw)
    if reader is None:
        raise DocumentError("binary data, not text")
    return reader


def _open_docx(raw: BinaryIO) -> DocxDocument:
    import docx

    _check_docx_sizes(raw)
    raw.seek(0)
    try:
        return docx.Document(raw)
    except Exception as exc:  # zipfile, lxml and KeyError failures on damaged packages
        raise DocumentError("corrupt DOCX: not a readable Word document") from exc


def _check_docx_sizes(raw: BinaryIO) -> None:
    """Refuse a DOCX that would unpack too large, before python-docx unpacks anything.

    The sizes come from the zip's central directory, and then each part is inflated in
    64 KB steps and thrown away: a part that holds more than its recorded size fails its
    checksum after at most that size. ``ZipFile.read``, which python-docx uses, inflates a
    whole part in one call before it cuts it to the recorded size: a part that claimed
    1 KB and held 200 MB took 400 MB that way.
    """
    too_large = "save it as PDF or plain text, or split it, and add that"
    try:
        with zipfile.ZipFile(raw) as package:
            parts = package.infolist()
            xml = sum(p.file_size for p in parts if p.filename.lower().endswith(_XML_PARTS))
            if xml > DOCX_MAX_XML_BYTES:
                raise DocumentError(
                    f"DOCX too large: its text unpacks to {human_size(xml)} "
                    f"(the limit is {human_size(DOCX_MAX_XML_BYTES)})",
                    hint=too_large,
                )
            total = sum(p.file_size for p in parts)
            if total > DOCX_MAX_UNPACKED_BYTES:
                raise DocumentError(
                    f"DOCX too large: it unpacks to {human_size(total)} "
                    f"(the limit is {human_size(DOCX_MAX_UNPACKED_BYTES)})",
                    hint=too_large,
                )
            for p in parts:
                if p.file_size > max(_DOCX_RATIO_GRACE, DOCX_MAX_RATIO * p.compress_size):
                    raise DocumentError(
                        "DOCX refused as a decompression bomb: a part unpacks to "
                        f"{p.file_size // max(p.compress_size, 1)} times its packed size "
                        f"(the limit is {DOCX_MAX_RATIO})"
                    )
            for p in parts:
                with package.open(p) as part:
                    while part.read(1 << 16):
                        pass
    except (DocumentError, OSError):
        raise
    except Exception as exc:  # BadZipFile (a checksum that fails after the recorded size,
        # too), zlib.error, EOFError, NotImplementedError for an unknown compression method
        raise DocumentError("corrupt DOCX: not a readable Word document") from exc


# Parts python-docx parses as XML; other parts (pictures, fonts) stay bytes.
_XML_PARTS = (".xml", ".rels")


# --- PDF -------------------------------------------------------------------------------


def open_pdf(source: str | BinaryIO, *, parser_message: bool = True) -> tuple[PdfReader, int]:
    """A PDF opened for reading, and its number of pages.

    Many PDFs are "encrypted" only against editing, with an empty user password: those
    are decrypted.

    Args:
        source: the file's path, or the file opened in binary mode.
        parser_message: name a damaged file's fault by pypdf's message, shortened (the file
            list's "corrupt PDF: ..."); False names only its type, for errors shown where
            parser text is not quoted (the source viewer).

    Raises:
        DocumentError: the PDF is encrypted with a password, its cipher needs a missing
            library, or pypdf cannot read it.
    """
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(source)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except DependencyError as exc:
                raise DocumentError(
                    "encrypted PDF: its cipher needs the 'cryptography' package"
                ) from exc
            if opened == PasswordType.NOT_DECRYPTED:
                raise DocumentError(
                    "encrypted PDF: Bastion cannot read it without the password",
                    hint="save a copy without the password and add that",
                )
        return reader, len(reader.pages)
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises many types (ValueError, KeyError...) on damage
        fault = _short(exc) if parser_message else type(exc).__name__
        raise DocumentError(f"corrupt PDF: {fault}") from exc


def _pdf_sections(raw: BinaryIO, check: Callable[[], None]) -> Iterator[Section]:
    reader, n_pages = open_pdf(raw)
    if n_pages == 0:
        raise DocumentError("corrupt PDF: it has no pages")

    # Pages are held back until the document has shown enough text to have a text layer,
    # so a scanned PDF yields nothing before its error. With real text that is a page or two.
    headings = pdf_headings(reader, n_pages)
    needed = _MIN_PDF_LETTERS_PER_PAGE * n_pages
    letters = 0
    held: list[Section] = []
    bad_pages = 0
    for number, extracted in enumerate(page_texts(raw, reader, n_pages, check), 1):
        if extracted is None:
            bad_pages += 1
            continue
        text = CONTROL_CHARS.sub("", extracted).replace("\r\n", "\n").replace("\r", "\n")
        found = _section(text, None, headings[number - 1], page=number)
        if letters >= needed:
            yield from found
            continue
        letters += sum(len(_LETTER.findall(section.text)) for section in found)
        held.extend(found)
        if letters >= needed:
            yield from held
            held.clear()
    if letters >= needed:
        if bad_pages:
            log.warning("%d of %d PDF pages could not be read", bad_pages, n_pages)
        return
    if bad_pages == n_pages:
        raise DocumentError("corrupt PDF: no page could be read")
    raise DocumentError(
        "PDF has no text layer (scanned?); OCR is not supported yet",
        hint="an OCR tool such as ocrmypdf can make a searchable copy",
    )


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]
