"""Full-text search of stored messages: FTS5 queries, a substring fallback, snippets."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from typing import Final

from engine.errors import InvalidInput
from engine.store.db import Database

# Marks around matched words in SearchHit.snippet; the CLI and GUI restyle them.
SNIPPET_START: Final = "["
SNIPPET_END: Final = "]"
SNIPPET_ELLIPSIS: Final = "…"
_SNIPPET_TOKENS: Final = 16
_SNIPPET_CONTEXT_CHARS: Final = 40

# Far more different words than anyone types to find a message: a bound, so that a pasted
# document fails with a clear message instead of a scan with thousands of patterns.
MAX_SEARCH_WORDS: Final = 4096

# Scripts written without spaces between words. FTS5's unicode61 tokenizer makes a whole
# run of them one token, so "日本" would not find "日本語を話す"; such terms are also
# looked up as plain substrings.
_UNSPACED_SCRIPT: Final = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
)

# Half of a surrogate pair: never a character of UTF-8 text (see ``search_terms``).
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class SearchHit:
    """A message that matched a search, with a snippet marking the matched words."""

    conversation_id: int
    conversation_title: str | None
    message_id: int
    role: str
    snippet: str
    created_at: str


def search_terms(text: str) -> list[str]:
    """The distinct whitespace-separated words of what a user typed, in order.

    NUL counts as a space: FTS5 reads its query as a C string, so a NUL inside a phrase
    ends the query mid-string ("unterminated string"), and no stored message can hold
    one as part of a word anyway.

    Raises:
        InvalidInput: The text is empty or blank, holds more than ``MAX_SEARCH_WORDS``
            different words, or is not valid Unicode (bytes that were not UTF-8 reach
            Python as lone surrogates, e.g. from a command-line argument).
    """
    bad = _LONE_SURROGATE.search(text)
    if bad is not None:
        code = ord(bad.group())
        # 0xDC80-0xDCFF is how Python carries an undecodable byte (surrogateescape).
        what = (
            f"the byte 0x{code - 0xDC00:02X}"
            if 0xDC80 <= code <= 0xDCFF
            else f"half of a surrogate pair (U+{code:04X})"
        )
        raise InvalidInput(
            f"the search text is not valid UTF-8: it holds {what}",
            hint="check that the terminal's encoding is UTF-8",
        )
    terms = list(dict.fromkeys(text.replace("\x00", " ").split()))
    if not terms:
        raise InvalidInput("the search text is empty", hint="give one or more words to look for")
    if len(terms) > MAX_SEARCH_WORDS:
        raise InvalidInput(
            f"the search text has {len(terms):,} different words; at most "
            f"{MAX_SEARCH_WORDS:,} are searched",
            hint="search for a few words that the message holds",
        )
    return terms


def fts_query(text: str) -> str:
    """Turn what a user typed into an FTS5 query that cannot be a syntax error.

    Each whitespace-separated term becomes a quoted phrase (inner quotes doubled), so
    operators (``AND``, ``NEAR``, ``*``, ``col:``) are searched as words; the terms
    are ANDed.

    Raises:
        InvalidInput: As ``search_terms``.
    """
    return _phrases(search_terms(text))


def _phrases(terms: list[str]) -> str:
    return " ".join(fts_phrase(term) for term in terms)


def fts_phrase(term: str) -> str:
    """``term`` as an FTS5 phrase that matches it alone (quoted, its quotes doubled)."""
    return '"' + term.replace('"', '""') + '"'


def search_messages(db: Database, text: str, limit: int) -> list[SearchHit]:
    """Messages containing every word of ``text``, best match (bm25) first.

    Any text is safe: words are searched literally, never as FTS5 syntax. Words in
    scripts written without spaces (Chinese, Japanese, Thai…) are also matched as
    substrings; those hits come after the ranked ones, newest first.

    Args:
        db: The open database (migrations applied).
        text: What the user typed.
        limit: At most this many hits.

    Raises:
        InvalidInput: As ``search_terms``: empty text, too many words, or text that is
            not valid UTF-8.
    """
    terms = search_terms(text)
    query = _phrases(terms)
    rows = db.query(
        "SELECT m.conversation_id, c.title, m.id, m.role, m.created_at,"
        " snippet(messages_fts, 0, ?, ?, ?, ?) AS snippet"
        " FROM messages_fts"
        " JOIN messages m ON m.id = messages_fts.rowid"
        " JOIN conversations c ON c.id = m.conversation_id"
        " WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?",
        (SNIPPET_START, SNIPPET_END, SNIPPET_ELLIPSIS, _SNIPPET_TOKENS, query, limit),
    )
    hits = [_hit(row, row[5]) for row in rows]
    if len(hits) < limit and _UNSPACED_SCRIPT.search(text):
        seen = {hit.message_id for hit in hits}
        hits += [hit for hit in _substring_search(db, terms, limit) if hit.message_id not in seen][
            : limit - len(hits)
        ]
    return hits


def _substring_search(db: Database, terms: list[str], limit: int) -> list[SearchHit]:
    # A full scan with LIKE: fine for a personal history, and only for these scripts. The
    # patterns travel as one JSON array, so any number of words is one condition: ANDing
    # one LIKE per word fails past 1,000 words ("Expression tree is too large").
    patterns = ["%" + re.sub(r"([\\%_])", r"\\\1", term) + "%" for term in terms]
    rows = db.query(
        "SELECT m.conversation_id, c.title, m.id, m.role, m.created_at, m.content"
        " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE NOT EXISTS (SELECT 1 FROM json_each(?) AS p"
        " WHERE m.content NOT LIKE p.value ESCAPE '\\')"
        " ORDER BY m.id DESC LIMIT ?",
        (json.dumps(patterns), limit),
    )
    return [_hit(row, _substring_snippet(row[5], terms[0])) for row in rows]


def _hit(row: sqlite3.Row, snippet: str) -> SearchHit:
    """A hit from a row of (conversation id, title, message id, role, created_at, ...)."""
    return SearchHit(
        conversation_id=row[0],
        conversation_title=row[1],
        message_id=row[2],
        role=row[3],
        created_at=row[4],
        snippet=snippet,
    )


def _substring_snippet(content: str, term: str) -> str:
    """A snippet like FTS5's, around the first occurrence of ``term``."""
    at = content.lower().find(term.lower())
    if at < 0:  # matched through LIKE's ASCII case folding only; show the start
        return content[: 2 * _SNIPPET_CONTEXT_CHARS]
    start = max(at - _SNIPPET_CONTEXT_CHARS, 0)
    end = min(at + len(term) + _SNIPPET_CONTEXT_CHARS, len(content))
    return (
        (SNIPPET_ELLIPSIS if start > 0 else "")
        + content[start:at]
        + SNIPPET_START
        + content[at : at + len(term)]
        + SNIPPET_END
        + content[at + len(term) : end]
        + (SNIPPET_ELLIPSIS if end < len(content) else "")
    )
