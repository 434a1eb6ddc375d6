"""The "nothing relevant" gate weighs the fused evidence, not the dense score alone."""

from __future__ import annotations

from pathlib import Path

from engine.rag.grounding import (
    MIN_RELEVANCE,
    NAME_LOGIT,
    UNKNOWN_TO_REFUSE,
    ground,
    topic_words,
)
from engine.rag.passages import StoredChunk
from engine.rag.retrieval import SearchResult

INDEXED = {"indexed": 1, "pending": 0}


def _result(
    text: str, dense: float | None, keyword_rank: int | None, judged: float | None = None
) -> SearchResult:
    chunk = StoredChunk(1, 1, "/docs/guide.html", 0, text, None, None, None, "Guide › Options")
    return SearchResult(chunk, 0.02, dense, None if dense is None else 1, keyword_rank, judged)


def test_a_close_passage_is_evidence() -> None:
    grounding = ground("docs", "how do I draw a key", [_result("The key.", 0.6, None)], INDEXED)
    assert grounding.canned_answer is None


def test_a_strong_keyword_hit_is_evidence_when_the_dense_score_is_low() -> None:
    # An identifier the embedder does not know: the keyword index finds it first, whole.
    text = "set zyxcorner2 mode applies the zyx corner interpolation to each facet."
    question = "what does zyxcorner2 interpolation do to facets?"
    low = MIN_RELEVANCE / 2
    assert ground("docs", question, [_result(text, low, 1)], INDEXED).canned_answer is None


def test_a_weak_keyword_hit_is_not_evidence() -> None:
    # Found by keyword search, but holding one of the question's four content words.
    low = MIN_RELEVANCE / 2
    results = [_result("Interpolation of colours.", low, 1)]
    grounding = ground("docs", "price of commercial interpolation licence", results, INDEXED)
    assert grounding.canned_answer is not None
    assert grounding.citations  # the closest passages are still shown


def test_a_question_about_what_the_documents_never_mention_is_refused_by_name() -> None:
    close = [_result("Export the graph to many formats.", 0.6, 1)]
    question = "export the graph to an Excel xlsx workbook"
    unknown = ["excel", "xlsx", "workbook"]
    grounding = ground("docs", question, close, INDEXED, unknown)
    assert grounding.canned_answer is not None
    assert "never mention “excel”, “xlsx”, “workbook”" in grounding.canned_answer
    assert grounding.citations  # the closest passages are still shown


def test_one_unknown_word_is_allowed_a_typo_or_the_users_own_word() -> None:
    assert UNKNOWN_TO_REFUSE == 2
    close = [_result("Plot the data with steps.", 0.6, 1)]
    question = "draw the data as a staircase line"
    assert ground("docs", question, close, INDEXED, ["staircase"]).canned_answer is None


def test_one_name_the_documents_lack_is_refused_when_no_passage_reads_as_an_answer() -> None:
    question = "plot curves from a PostgreSQL table"
    unread = [_result("Plot the curves from the data.", 0.6, 1, NAME_LOGIT - 1.9)]
    grounding = ground("docs", question, unread, INDEXED, ["postgresql"], [], ["postgresql"])
    assert grounding.canned_answer is not None
    assert "never mention “postgresql”, and none of the passages below reads as an answer" in (
        grounding.canned_answer
    )
    assert grounding.citations
    # A passage the cross-encoder reads as relevant: the name is the user's short form.
    read = [_result("Plot the curves from the data.", 0.6, 1, NAME_LOGIT + 1.6)]
    assert (
        ground("docs", question, read, INDEXED, ["postgresql"], [], ["postgresql"]).canned_answer
        is None
    )
    # An ordinary word of the language is left to the count of unknown words.
    question = "draw the data as a staircase line"
    assert ground("docs", question, unread, INDEXED, ["staircase"]).canned_answer is None
    # Without the cross-encoder's reading (not installed) the name rule does not apply.
    bare = [_result("Plot the curves from the data.", 0.6, 1)]
    assert (
        ground("docs", question, bare, INDEXED, ["postgresql"], [], ["postgresql"]).canned_answer
        is None
    )


def test_topic_words_leave_out_stopwords_numbers_and_short_bits() -> None:
    assert topic_words("Explain how to plot 2024-03-01 dates in x11 and x11?") == [
        "plot",
        "dates",
        "x11",
    ]


def test_words_rare_in_the_collection_and_absent_from_the_passages_count_as_unknown() -> None:
    close = [_result("Plot the curves from the data.", 0.6, 1)]
    question = "plot curves from a PostgreSQL database query"
    grounding = ground("docs", question, close, INDEXED, ["postgresql"], ["database"])
    assert grounding.canned_answer is not None
    assert "never mention “postgresql” and mention “database” only elsewhere" in (
        grounding.canned_answer
    )
    # One such word alone is allowed, as one unknown word is.
    assert ground("docs", question, close, INDEXED, [], ["database"]).canned_answer is None


def test_the_gate_counts_words_in_a_real_collection(engine: object, tmp_path: Path) -> None:
    from engine import Engine, JobContext

    assert isinstance(engine, Engine)
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in {
        "plotting.md": "# Plotting\n\nThe plot command draws curves and lines from data files, "
        "with a style for the points and one for the lines between them.",
        "colours.md": "# Colours\n\nThe palette maps values to colours. A small database of "
        "named colours ships with the program.",
        "filters.md": "# Filters\n\nType a query in the search box to filter the list of "
        "recent windows.",
    }.items():
        (docs / name).write_text(text, encoding="utf-8")
    engine.documents.create("docs")
    engine.documents.add("docs", [str(docs)], JobContext())
    store = engine.documents.store
    collection = store.get("docs")
    words = ["database", "colours", "postgresql", "plotting"]
    counts = store.passages.word_counts(collection, words, 1)
    assert counts == {"database": 1, "colours": 1, "postgresql": 0, "plotting": 1}
    # Counted up to cap + 1.
    assert store.passages.word_counts(collection, ["the"], 1) == {"the": 2}

    # The best passage is the plotting one: "database" and "query" are rare and elsewhere.
    refused = engine.documents.ground("docs", "plot curves from a PostgreSQL database query", 1)
    assert refused.canned_answer is not None and "“postgresql”" in refused.canned_answer
    assert "“query”" in refused.canned_answer and refused.citations
    # Rare words that are in the passages found are evidence, not gaps.
    answered = engine.documents.ground("docs", "plot curves and points from data files", 1)
    assert answered.canned_answer is None, answered.canned_answer

    # One name the documents lack, and the plotting passage does not read as an answer.
    refused = engine.documents.ground("docs", "draw curves from PostgreSQL", 1)
    assert refused.canned_answer is not None and "none of the passages" in refused.canned_answer
    # One name the documents lack, but the passage found answers it.
    question = "draw lines between points with a plotting style in gnuplot"
    answered = engine.documents.ground("docs", question, 1)
    assert answered.canned_answer is None, answered.canned_answer
