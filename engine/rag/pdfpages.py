"""A PDF's pages for indexing: each page's text, and each page's heading path from the outline.

The file is opened and checked by pypdf first (``loaders.open_pdf``: encryption, damage);
these read it page by page.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from engine.rag.markup import HEADING_SEPARATOR

if TYPE_CHECKING:
    from pypdf import PdfReader

log = logging.getLogger(__name__)


def page_texts(
    raw: BinaryIO, reader: PdfReader, n_pages: int, check: Callable[[], None]
) -> Iterator[str | None]:
    """Each page's text in order, None for a page that could not be read.

    PDFium (pypdfium2) reads the text where it opens the file: on the PDF manuals of
    bench/bench_rag_quality.py it extracted 770,000 characters in 0.6 s where pypdf took
    7.1 s, the same text but for line ends. pypdf reads a file PDFium cannot open, and
    every page PDFium fails on. pypdf still opens every PDF first (encryption, damage,
    the outline): its errors are the ones users see.
    """
    document = _pdfium_document(raw)
    try:
        for index in range(n_pages):
            check()
            text = None
            if document is not None:
                text = _pdfium_page_text(document, index)
            if text is None:
                try:
                    text = str(reader.pages[index].extract_text())
                except Exception as exc:  # one damaged page should not cost the document
                    # The type only: a parser's message can quote the document (never logged).
                    log.warning("PDF page %d could not be read (%s)", index + 1, type(exc).__name__)
            yield text
    finally:
        if document is not None:
            with _PDFIUM_LOCK:
                document.close()


# PDFium is not thread-safe: every call into it holds this lock (indexing runs on worker
# threads, and two collections can be indexed at once).
_PDFIUM_LOCK = threading.Lock()


def _pdfium_document(raw: BinaryIO) -> Any:
    """The file opened in PDFium, or None (not installed, not a named file, or refused)."""
    name = getattr(raw, "name", None)
    if not isinstance(name, str) or not os.path.isfile(name):
        return None
    try:
        import pypdfium2
    except ImportError:
        return None
    try:
        with _PDFIUM_LOCK:
            return pypdfium2.PdfDocument(name)
    except Exception as exc:  # pypdf reads it instead
        log.info("PDFium cannot open a PDF (%s); pypdf reads it", type(exc).__name__)
        return None


def _pdfium_page_text(document: Any, index: int) -> str | None:
    try:
        with _PDFIUM_LOCK:
            page = document[index]
            try:
                textpage = page.get_textpage()
                try:
                    return str(textpage.get_text_range())
                finally:
                    textpage.close()
            finally:
                page.close()
    except Exception as exc:  # pypdf tries the page
        log.info("PDFium cannot read PDF page %d (%s)", index + 1, type(exc).__name__)
        return None


def pdf_headings(reader: PdfReader, n_pages: int) -> list[str | None]:
    """Each page's heading path from the PDF's outline (its bookmarks): the document's
    title, then the chapter and sections in force on that page. None where the PDF has no
    outline and no title; a damaged outline is ignored (the pages are what matter)."""
    title = None
    with contextlib.suppress(Exception):
        title = " ".join(str(reader.metadata.title or "").split()) or None  # type: ignore[union-attr]
    starts: list[tuple[int, int, str]] = []  # (page index, order, path)

    def walk(items: list[Any], above: list[str]) -> None:
        last: list[str] = above
        for item in items:
            if isinstance(item, list):
                walk(item, last)
                continue
            name = " ".join(str(getattr(item, "title", "") or "").split())
            if not name:
                continue
            last = [*above, name]
            page = reader.get_destination_page_number(item)
            if page is not None and 0 <= page < n_pages:
                starts.append((page, len(starts), HEADING_SEPARATOR.join(last)))

    try:
        walk(list(reader.outline), [title] if title else [])
    except Exception as exc:  # a parser's own fault in the bookmarks
        log.warning("PDF outline could not be read (%s)", type(exc).__name__)
        starts.clear()
    headings: list[str | None] = []
    ordered = sorted(starts)
    current, i = title, 0
    for page in range(n_pages):
        while i < len(ordered) and ordered[i][0] <= page:
            current = ordered[i][2]  # the last section that begins on or before the page
            i += 1
        headings.append(current)
    return headings
