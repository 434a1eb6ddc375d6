"""Reading documents (PDF, text, code, Markdown, HTML, DOCX) into text sections with provenance."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

from engine.errors import BastionError
from engine.rag.markup import Part, docx_parts, html_parts, markdown_parts
from engine.rag.textio import CONTROL_CHARS, open_text, text_blocks

if TYPE_CHECKING:
    from docx.document import Document as DocxDocument

log = logging.getLogger(__name__)

DocumentState = Literal["failed", "skipped"]

# A scanned PDF yields no text, or a stamp and a page number per page; a real text layer
# yields hundreds of letters per page. Below this average per page there is nothing to index.
_MIN_PDF_LETTERS_PER_PAGE = 8


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
    ``line_start`` plus the newlines before it. ``page`` is 1-based and set for PDFs only.
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
    section never holds text of two pages.

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
                sections = _sections(html_parts(_open_text(raw), check))
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
    """The section of ``text`` without its blank edges: one, or none if nothing is left."""
    lead = _LEADING_BLANK_LINES.match(text)
    if lead:
        text = text[lead.end() :]
        if first_line is not None:
            first_line += lead.group().count("\n")
    text = text.rstrip()
    if not text:
        return []
    last_line = None if first_line is None else first_line + text.count("\n")
    return [Section(text, page, first_line, last_line, heading)]


def _sections(parts: Iterable[Part]) -> Iterator[Section]:
    for part in parts:
        yield from _section(part.text, part.first_line, part.heading)


def _open_text(raw: BinaryIO) -> io.TextIOWrapper:
    reader = open_text(raw)
    if reader is None:
        raise DocumentError("binary data, not text")
    return reader


def _open_docx(raw: BinaryIO) -> DocxDocument:
    import docx

    try:
        return docx.Document(raw)
    except Exception as exc:  # zipfile, lxml and KeyError failures on damaged packages
        raise DocumentError("corrupt DOCX: not a readable Word document") from exc


# --- PDF -------------------------------------------------------------------------------


def _pdf_sections(raw: BinaryIO, check: Callable[[], None]) -> Iterator[Section]:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(raw)
        if reader.is_encrypted:
            # Many PDFs are "encrypted" only against editing, with an empty user password.
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
        n_pages = len(reader.pages)
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises many types (ValueError, KeyError...) on damage
        raise DocumentError(f"corrupt PDF: {_short(exc)}") from exc
    if n_pages == 0:
        raise DocumentError("corrupt PDF: it has no pages")

    # Pages are held back until the document has shown enough text to have a text layer,
    # so a scanned PDF yields nothing before its error. With real text that is a page or two.
    needed = _MIN_PDF_LETTERS_PER_PAGE * n_pages
    letters = 0
    held: list[Section] = []
    bad_pages = 0
    for number in range(1, n_pages + 1):
        check()
        try:
            text = reader.pages[number - 1].extract_text()
        except Exception as exc:  # one damaged page should not cost the whole document
            bad_pages += 1
            log.warning("PDF page %d could not be read: %s", number, _short(exc))
            continue
        text = CONTROL_CHARS.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
        found = _section(text, None, page=number)
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
