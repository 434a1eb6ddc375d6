"""Document loaders on real files: PDFs, encodings, Markdown, HTML, DOCX, damage and size."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from engine.errors import Cancelled
from engine.jobs import JobContext
from engine.rag import pdfpages
from engine.rag.loaders import DocumentError, Section, detect_kind, load_document
from tests.pdfgen import write_pdf

PAGE_LINES = [
    [f"Page one line {k}: the quick brown fox jumps over the lazy dog." for k in range(3)],
    [f"Page two line {k}: sphinx of black quartz, judge my vow." for k in range(3)],
    [f"Page three line {k}: pack my box with five dozen liquor jugs." for k in range(3)],
]


def failure(path: Path) -> DocumentError:
    with pytest.raises(DocumentError) as info:
        list(load_document(path))
    return info.value


def test_detect_kind_by_extension_and_name() -> None:
    assert detect_kind(Path("a/Report.PDF")) == "pdf"
    assert detect_kind(Path("notes.md")) == "markdown"
    assert detect_kind(Path("page.htm")) == "html"
    assert detect_kind(Path("letter.docx")) == "docx"
    assert detect_kind(Path("data.csv")) == "text"
    assert detect_kind(Path("main.rs")) == "code"
    assert detect_kind(Path("Makefile")) == "code"
    assert detect_kind(Path("photo.jpg")) is None
    assert detect_kind(Path("old.doc")) is None


def test_pdf_pages_are_kept_apart(tmp_path: Path) -> None:
    sections = list(load_document(write_pdf(tmp_path / "three.pdf", PAGE_LINES)))
    assert {s.page for s in sections} == {1, 2, 3}
    for section in sections:
        assert section.line_start is None
        words = {1: "Page one", 2: "Page two", 3: "Page three"}
        others = [w for p, w in words.items() if p != section.page]
        assert words[section.page or 0] in section.text
        assert not any(w in section.text for w in others)
    assert "line 2: pack my box" in sections[-1].text


def test_pdfium_and_pypdf_read_the_same_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_pdf(tmp_path / "three.pdf", PAGE_LINES)
    calls: list[int] = []
    real = pdfpages._pdfium_page_text

    def pdfium_page(document: object, index: int) -> str | None:
        calls.append(index)
        return real(document, index)

    monkeypatch.setattr(pdfpages, "_pdfium_page_text", pdfium_page)
    by_pdfium = [(s.page, s.text) for s in load_document(path)]
    assert calls == [0, 1, 2]  # PDFium read every page
    monkeypatch.setattr(pdfpages, "_pdfium_document", lambda raw: None)
    by_pypdf = [(s.page, s.text) for s in load_document(path)]
    assert by_pdfium == by_pypdf


def test_a_page_pdfium_cannot_read_is_read_by_pypdf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_pdf(tmp_path / "three.pdf", PAGE_LINES)
    real = pdfpages._pdfium_page_text
    monkeypatch.setattr(
        pdfpages, "_pdfium_page_text", lambda doc, i: None if i == 1 else real(doc, i)
    )
    sections = list(load_document(path))
    assert {s.page for s in sections} == {1, 2, 3}
    assert any("Page two" in s.text for s in sections if s.page == 2)


def test_encrypted_pdf_fails(tmp_path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    plain = write_pdf(tmp_path / "plain.pdf", PAGE_LINES)
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password="secret", owner_password="owner")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as f:
        writer.write(f)
    error = failure(locked)
    assert error.state == "failed"
    assert "encrypted" in error.message and "password" in error.message


def test_pdf_with_only_an_owner_password_is_read(tmp_path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(write_pdf(tmp_path / "p.pdf", PAGE_LINES)))
    writer.encrypt(user_password="", owner_password="owner")
    path = tmp_path / "no-edit.pdf"
    with path.open("wb") as f:
        writer.write(f)
    assert [s.page for s in load_document(path)] == [1, 2, 3]


def test_corrupt_pdf_fails(tmp_path: Path) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\n" + random.Random(1).randbytes(3000))
    error = failure(path)
    assert error.state == "failed"
    assert error.message.startswith("corrupt PDF")


def test_pdf_without_text_layer_fails(tmp_path: Path) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(3):
        writer.add_blank_page(612, 792)
    path = tmp_path / "scanned.pdf"
    with path.open("wb") as f:
        writer.write(f)
    error = failure(path)
    assert error.state == "failed"
    assert "no text layer" in error.message


def test_zero_byte_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").touch()
    error = failure(tmp_path / "empty.txt")
    assert (error.state, error.message) == ("skipped", "empty file")


def test_whitespace_only_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "blank.md").write_text("\n   \n\t\n")
    assert failure(tmp_path / "blank.md").state == "skipped"


def test_unsupported_type_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    error = failure(tmp_path / "photo.jpg")
    assert error.state == "skipped"
    assert ".jpg" in error.message


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 50,  # NUL bytes
        random.Random(0).randbytes(20_000).replace(b"\x00", b"\x01"),  # no NUL, no text
    ],
    ids=["nul-bytes", "noise"],
)
def test_binary_data_named_txt_fails(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "disguised.txt"
    path.write_bytes(data)
    error = failure(path)
    assert error.state == "failed"
    assert "binary" in error.message


def test_latin1_text_is_decoded(tmp_path: Path) -> None:
    text = "Le café est très bon. Über alles, naïve façade, déjà vu. Grüße aus München.\n"
    path = tmp_path / "latin1.txt"
    path.write_bytes((text * 3).encode("latin-1"))
    (section,) = load_document(path)
    assert "café" in section.text and "Über" in section.text and "façade" in section.text
    assert (section.line_start, section.line_end) == (1, 3)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-8-sig"])
def test_utf16_and_bom_text_is_decoded(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "wide.txt"
    path.write_bytes("Grüße aus Köln\nzweite Zeile: 東京\r\ndritte\n".encode(encoding))
    (section,) = load_document(path)
    assert section.text == "Grüße aus Köln\nzweite Zeile: 東京\ndritte"
    assert (section.line_start, section.line_end) == (1, 3)


def test_stray_latin1_after_the_sample_does_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "mostly.txt"
    ascii_start = b"plain ascii line\n" * 5000  # longer than the encoding sample
    path.write_bytes(ascii_start + b"caf\xe9 cr\xe8me \x81\n" + "naïve\n".encode())
    sections = list(load_document(path))
    assert sections[-1].text.endswith("café crème \ufffd\nnaïve")
    assert sections[-1].line_end == 5002


def test_permission_denied_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("classified\n")

    # Tests run as root, which reads a chmod 000 file anyway: make opening fail instead.
    def deny(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", deny)
    error = failure(path)
    assert (error.state, error.message) == ("failed", "cannot read: permission denied")


def test_missing_file_fails(tmp_path: Path) -> None:
    error = failure(tmp_path / "gone.pdf")
    assert (error.state, error.message) == ("failed", "file not found")


def test_unicode_file_name_and_markdown_headings(tmp_path: Path) -> None:
    path = tmp_path / "résumé 日本.md"
    path.write_text(
        "---\ntitle: CV\n---\nIntro line.\n\n# Experience\n\nWorked at ACME.\n"
        "```sh\n# not a heading\n```\n\nSkills\n------\n\nPython, SQL.\n## Languages ##\nFrench\n",
        encoding="utf-8",
    )
    sections = list(load_document(path))
    assert [(s.heading, s.line_start, s.line_end) for s in sections] == [
        (None, 1, 4),
        ("Experience", 6, 11),
        ("Experience › Skills", 13, 16),  # a setext "---" underline is level 2
        ("Experience › Languages", 17, 18),  # a level-2 heading closes the other
    ]
    assert "# not a heading" in sections[1].text
    assert sections[3].text == "## Languages ##\nFrench"


def test_html_drops_script_and_style_and_keeps_headings(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(
        "<html><head><title>Manual</title><style>body { color: red }</style></head><body>"
        "<script>var secret = 1;</script><p>Before &amp; after.</p>"
        "<h1>Setup</h1><p>Install the <b>tool</b>.</p><h2>Usage</h2><ul><li>run</li>"
        "<li>stop</li></ul></body></html>",
        encoding="utf-8",
    )
    sections = list(load_document(path))
    # Each part carries its heading path: the page's title, then the headings above it.
    assert [s.heading for s in sections] == ["Manual", "Manual › Setup", "Manual › Setup › Usage"]
    assert sections[0].text == "Before & after."
    assert sections[1].text == "Setup\nInstall the tool."
    assert sections[2].text == "Usage\nrun\nstop"
    assert not any("secret" in s.text or "color" in s.text for s in sections)


def test_docx_headings_and_paragraphs(tmp_path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_paragraph("Preamble paragraph.")
    document.add_heading("Warranty", level=1)
    document.add_paragraph("Two years from purchase.")
    document.add_paragraph("Keep the receipt.")
    document.add_heading("Claims", level=2)
    document.add_paragraph("Call the shop.")
    document.add_heading("Returns", level=1)
    document.add_paragraph("Within 30 days.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "Part", "Years"
    path = tmp_path / "manual.docx"
    document.save(str(path))
    sections = list(load_document(path))
    # Each part carries its heading path, as in HTML.
    assert [s.heading for s in sections] == [None, "Warranty", "Warranty › Claims", "Returns"]
    assert sections[0].text == "Preamble paragraph."
    assert sections[1].text == "Warranty\nTwo years from purchase.\nKeep the receipt."
    assert sections[3].text == "Returns\nWithin 30 days.\nPart | Years"


def test_corrupt_docx_fails(tmp_path: Path) -> None:
    path = tmp_path / "broken.docx"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    error = failure(path)
    assert error.state == "failed" and "corrupt DOCX" in error.message


def test_cancel_stops_between_pages(tmp_path: Path) -> None:
    ctx = JobContext()
    pdf = write_pdf(tmp_path / "three.pdf", PAGE_LINES)
    sections = load_document(pdf, ctx.check_cancelled)
    assert next(sections).page == 1
    ctx.cancel()
    with pytest.raises(Cancelled):
        next(sections)


@pytest.mark.slow
def test_large_text_file_is_streamed(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    line = "2024-05-01 12:00:00 INFO worker handled request id=%07d in 12 ms\n"
    n_lines = 3_000_000  # about 203 MB: the size the issue names
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, n_lines, 50_000):
            f.write("".join(line % i for i in range(start, start + 50_000)))
    assert path.stat().st_size > 200_000_000

    tracemalloc.start()
    try:
        last: Section | None = None
        sections = 0
        for section in load_document(path):
            sections += 1
            last = section
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32_000_000, f"peak {peak / 1e6:.1f} MB"
    assert sections > 20
    assert last is not None
    assert last.line_end == n_lines
    assert last.text.endswith(f"id={n_lines - 1:07d} in 12 ms")
    assert last.text.count("\n") == (last.line_end or 0) - (last.line_start or 0)


def test_html_skips_page_furniture_and_keeps_the_heading_path(tmp_path: Path) -> None:
    path = tmp_path / "node42.html"
    path.write_text(
        "<html><head><title>Fit</title></head><body>"
        '<div class="navigation"><a href="n43.html">Next: Fontpath</a> <b>Up:</b> '
        "<div>nested <div>deeper</div></div> Set-show</div>"
        "<nav><a>Home</a></nav>"
        '<h2>Fit</h2><img class="nav" src="x.png"><p>The set fit command controls fit.</p>'
        "<h3>Quiet</h3><p>No output.</p><h2>Limits</h2><p>Bounds.</p>"
        '<div role="navigation">Previous: Errorbars</div><footer>Generated</footer>'
        "</body></html>",
        encoding="utf-8",
    )
    sections = list(load_document(path))
    text = "\n".join(s.text for s in sections)
    for furniture in ("Next", "Fontpath", "Set-show", "nested", "deeper", "Home", "Errorbars",
                      "Generated"):  # fmt: skip
        assert furniture not in text
    assert [(s.heading, s.text) for s in sections] == [
        ("Fit", "Fit\nThe set fit command controls fit."),  # the title and the h2, said once
        ("Fit › Quiet", "Quiet\nNo output."),
        ("Fit › Limits", "Limits\nBounds."),  # a new h2 ends the h3 above it
    ]


def test_keyword_index_of_an_older_database_is_rebuilt_stemmed() -> None:
    """m008: chunks indexed before it are found by another form of their words."""
    import sqlite3

    from engine.store.migrations import MIGRATIONS, apply_migrations

    conn = sqlite3.connect(":memory:", isolation_level=None)
    names = [name for name, _sql in MIGRATIONS]
    before = MIGRATIONS[: names.index("m008_chunks_fts_stemmed")]
    apply_migrations(conn, before)  # a database as the version before m008 left it
    conn.execute("INSERT INTO collections (name, embedder, created_at) VALUES ('c', 'e', 'now')")
    conn.execute(
        "INSERT INTO documents (collection_id, path, state, updated_at) "
        "VALUES (1, '/m.html', 'indexed', 'now')"
    )
    conn.execute(
        "INSERT INTO chunks (document_id, ordinal, text, heading, text_hash) "
        "VALUES (1, 0, 'The plot command draws curves.', 'Plotting › Curves', 'h')"
    )
    query = "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ?"
    assert conn.execute(query, ("plots",)).fetchall() == []  # not stemmed yet
    apply_migrations(conn)
    assert conn.execute(query, ("plots",)).fetchall() == [(1,)]  # "plots" finds "plot"
    assert conn.execute(query, ("curve",)).fetchall() == [(1,)]
    conn.execute("DELETE FROM chunks")  # the triggers were made again too
    assert conn.execute(query, ("plot",)).fetchall() == []


def test_the_embedder_reads_the_heading_path_with_the_text() -> None:
    from engine.rag.reading import embedded_text

    assert embedded_text("It takes three values.", "Fit › Limits") == (
        "Fit › Limits\nIt takes three values."
    )
    assert embedded_text("A PDF page.", None) == "A PDF page."


def test_pdf_pages_carry_the_heading_path_of_the_outline(tmp_path: Path) -> None:
    from pypdf import PdfWriter

    pages = [[f"Text of page {n} about valves and pumps."] * 3 for n in range(1, 6)]
    writer = PdfWriter(clone_from=write_pdf(tmp_path / "plain.pdf", pages))
    writer.add_metadata({"/Title": "Pump Manual"})
    chapter = writer.add_outline_item(title="2 Valves", page_number=1)  # begins on page 2
    writer.add_outline_item(title="Torque", page_number=3, parent=chapter)  # page 4
    writer.add_outline_item(title="3 Pumps", page_number=4)  # page 5
    path = tmp_path / "manual.pdf"
    with path.open("wb") as fh:
        writer.write(fh)
    headings = {s.page: s.heading for s in load_document(path)}
    assert headings == {
        1: "Pump Manual",  # before any bookmark: the title alone
        2: "Pump Manual › 2 Valves",
        3: "Pump Manual › 2 Valves",
        4: "Pump Manual › 2 Valves › Torque",
        5: "Pump Manual › 3 Pumps",
    }
