"""Stored conversations: messages, progressive saving of answers, titles, export."""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

from engine.citation import Citation
from engine.errors import InvalidInput, NotFound
from engine.store.db import Database
from engine.store.search import (
    SNIPPET_ELLIPSIS,
    SNIPPET_END,
    SNIPPET_START,
    SearchHit,
    fts_query,
    search_messages,
)

# SearchHit, fts_query and the snippet marks moved to engine.store.search; they are
# re-exported so imports from this module keep working.
__all__ = [
    "EXPORT_FORMATS",
    "RATINGS",
    "ROLES",
    "SNIPPET_ELLIPSIS",
    "SNIPPET_END",
    "SNIPPET_START",
    "TITLE_MAX_CHARS",
    "Clock",
    "Conversation",
    "ConversationStore",
    "Message",
    "SearchHit",
    "fts_query",
    "title_from",
]

ROLES: Final = ("system", "user", "assistant")
EXPORT_FORMATS: Final = ("md", "json")
TITLE_MAX_CHARS: Final = 60

_HISTORY_HINT: Final = "run `bastion history list` to see the stored conversations"

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Conversation:
    """A stored conversation, with the number of its messages."""

    id: int
    title: str | None
    model: str | None
    system_prompt: str | None
    created_at: str
    updated_at: str
    message_count: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Message:
    """One message; ``interrupted`` is True while an answer is streaming or if it was cut off."""

    id: int
    conversation_id: int
    role: str
    content: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_ms: float | None
    duration_ms: float | None
    tokens_per_second: float | None
    interrupted: bool
    created_at: str
    citations: tuple[Citation, ...] = ()  # sources of an answer from documents
    rating: int = 0  # the user's thumbs on an answer: 1 up, -1 down, 0 not rated
    correction: str | None = None  # the user's better text for an answer (content stays)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


_CONVERSATION_SELECT: Final = """
SELECT c.id, c.title, c.model, c.system_prompt, c.created_at, c.updated_at,
       (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count
FROM conversations c
"""

_MESSAGE_COLUMNS: Final = (
    "id, conversation_id, role, content, model, prompt_tokens, completion_tokens, "
    "ttft_ms, duration_ms, tokens_per_second, interrupted, created_at, citations, rating, "
    "correction"
)
RATINGS: Final = (-1, 0, 1)


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        title=row["title"],
        model=row["model"],
        system_prompt=row["system_prompt"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        message_count=row["message_count"],
    )


def _message(row: sqlite3.Row) -> Message:
    values = dict(zip(row.keys(), tuple(row), strict=True))
    values["interrupted"] = bool(values["interrupted"])
    values["citations"] = tuple(
        Citation.from_public(c) for c in (json.loads(values["citations"] or "null") or ())
    )
    values["rating"] = values["rating"] or 0
    return Message(**values)


def title_from(text: str) -> str | None:
    """A conversation title made from a message: its first line, at most 60 characters.

    Returns:
        The title, or None when the text has no visible characters.
    """
    for raw_line in text.splitlines():
        line = " ".join(raw_line.split())
        if line:
            if len(line) <= TITLE_MAX_CHARS:
                return line
            return line[: TITLE_MAX_CHARS - 1].rstrip() + "…"
    return None


class ConversationStore:
    """Conversations and their messages in ``bastion.db``.

    Timestamps are ISO-8601 UTC strings. ``updated_at`` moves when a message is added,
    so ``list()`` shows the conversations with the latest activity first.
    """

    def __init__(self, db: Database, clock: Clock = _utc_now) -> None:
        """Wrap an open database.

        Args:
            db: The open database (migrations applied).
            clock: Gives the current UTC time; tests pass a fake to order events.
        """
        self._db = db
        self._clock = clock

    def _now(self) -> str:
        return self._clock().astimezone(UTC).isoformat(timespec="microseconds")

    def create(
        self, model: str | None, system_prompt: str | None = None, title: str | None = None
    ) -> Conversation:
        """Start a conversation.

        Args:
            model: Id of the model it is held with, if known.
            system_prompt: The system prompt in effect, if any.
            title: A title; when empty, the first user message gives one.

        Returns:
            The new conversation.
        """
        now = self._now()
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO conversations (title, model, system_prompt, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (title, model, system_prompt, now, now),
            )
            new_id = int(cursor.lastrowid or 0)
        return self.get(new_id)

    def get(self, conversation_id: int) -> Conversation:
        """One conversation by id.

        Raises:
            NotFound: No conversation has this id.
        """
        row = self._db.query_one(_CONVERSATION_SELECT + " WHERE c.id = ?", (conversation_id,))
        if row is None:
            raise NotFound(f"no conversation {conversation_id}", hint=_HISTORY_HINT)
        return _conversation(row)

    def list(self, limit: int | None = None) -> builtins.list[Conversation]:
        """Conversations with the latest activity first.

        Args:
            limit: At most this many; all when None.
        """
        rows = self._db.query(
            _CONVERSATION_SELECT + " ORDER BY c.updated_at DESC, c.id DESC LIMIT ?",
            (-1 if limit is None else max(limit, 0),),
        )
        return [_conversation(row) for row in rows]

    def messages(self, conversation_id: int) -> builtins.list[Message]:
        """A conversation's messages, oldest first.

        Raises:
            NotFound: No conversation has this id.
        """
        rows = self._db.query(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        )
        if not rows:
            self.get(conversation_id)  # raises NotFound unless it merely has no messages
        return [_message(row) for row in rows]

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        ttft_ms: float | None = None,
        duration_ms: float | None = None,
        tokens_per_second: float | None = None,
        interrupted: bool = False,
    ) -> Message:
        """Append a message, bump the conversation's ``updated_at``, and title it if untitled.

        Args:
            conversation_id: The conversation.
            role: ``system``, ``user`` or ``assistant``.
            content: The text.
            model: Id of the model that wrote an answer.
            prompt_tokens: Tokens of the prompt that produced an answer.
            completion_tokens: Tokens of the answer.
            ttft_ms: Milliseconds until the first token.
            duration_ms: Milliseconds the answer took.
            tokens_per_second: Generation speed.
            interrupted: True for an answer still streaming or cut off.

        Returns:
            The stored message.

        Raises:
            InvalidInput: The role is not one of ``ROLES``.
            NotFound: No conversation has this id.
        """
        if role not in ROLES:
            raise InvalidInput(
                f"unknown message role {role!r}", hint="use system, user or assistant"
            )
        now = self._now()
        with self._db.transaction() as conn:
            bumped = conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
            if bumped.rowcount == 0:
                raise NotFound(f"no conversation {conversation_id}", hint=_HISTORY_HINT)
            cursor = conn.execute(
                "INSERT INTO messages (conversation_id, role, content, model, prompt_tokens,"
                " completion_tokens, ttft_ms, duration_ms, tokens_per_second, interrupted,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation_id,
                    role,
                    content,
                    model,
                    prompt_tokens,
                    completion_tokens,
                    ttft_ms,
                    duration_ms,
                    tokens_per_second,
                    int(interrupted),
                    now,
                ),
            )
            title = title_from(content) if role == "user" else None
            if title is not None:
                conn.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND COALESCE(title, '') = ''",
                    (title, conversation_id),
                )
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (cursor.lastrowid,)
            ).fetchone()
        return _message(row)

    def update_message(
        self,
        message_id: int,
        *,
        content: str,
        completion_tokens: int | None = None,
        ttft_ms: float | None = None,
        duration_ms: float | None = None,
        tokens_per_second: float | None = None,
        interrupted: bool,
    ) -> None:
        """Overwrite a message's text while it streams, and its figures when it ends.

        One ``UPDATE`` in one short transaction, cheap enough to call twice a second.
        The figures left at None keep their stored value.

        Raises:
            NotFound: No message has this id.
        """
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE messages SET content = ?,"
                " completion_tokens = COALESCE(?, completion_tokens),"
                " ttft_ms = COALESCE(?, ttft_ms), duration_ms = COALESCE(?, duration_ms),"
                " tokens_per_second = COALESCE(?, tokens_per_second), interrupted = ?"
                " WHERE id = ?",
                (
                    content,
                    completion_tokens,
                    ttft_ms,
                    duration_ms,
                    tokens_per_second,
                    int(interrupted),
                    message_id,
                ),
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no message {message_id}")

    def set_citations(self, message_id: int, citations: builtins.list[dict[str, Any]]) -> None:
        """Keep the sources an answer from documents was given (and may cite)."""
        self._db.execute(
            "UPDATE messages SET citations = ? WHERE id = ?",
            (json.dumps(citations, ensure_ascii=False), message_id),
        )

    def set_rating(self, message_id: int, rating: int) -> None:
        """Keep the user's thumbs up (1) or down (-1) on an answer; 0 clears it.

        A cleared rating is stored as NULL, so "rated" is ``rating IS NOT NULL`` for
        whoever builds a preference dataset from the table.

        Raises:
            InvalidInput: ``rating`` is not -1, 0 or 1, or the message is not an answer.
            NotFound: No message has this id.
        """
        if isinstance(rating, bool) or rating not in RATINGS:
            raise InvalidInput(f"invalid rating {rating!r}", hint="use 1 (up), -1 (down) or 0")
        self._set_feedback(message_id, "rating", rating or None, "rated")

    def set_correction(self, message_id: int, text: str | None) -> None:
        """Keep the user's corrected text of an answer beside the model's own; ``None`` or
        blank text removes it. A corrected answer is training data (``dataset
        from-feedback``) whatever its thumbs.

        Raises:
            InvalidInput: the message is not an answer.
            NotFound: No message has this id.
        """
        value = text if text is not None and text.strip() else None
        self._set_feedback(message_id, "correction", value, "corrected")

    def _set_feedback(self, message_id: int, column: str, value: object, verb: str) -> None:
        """Set ``column`` (rating or correction) of an answer and when it was given."""
        with self._db.transaction() as conn:
            row = conn.execute("SELECT role FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise NotFound(f"no message {message_id}")
            if row[0] != "assistant":
                raise InvalidInput(
                    f"message {message_id} is a {row[0]} message", hint=f"only answers are {verb}"
                )
            conn.execute(
                f"UPDATE messages SET {column} = ?, feedback_at = ? WHERE id = ?",
                (value, self._now(), message_id),
            )

    def rename(self, conversation_id: int, title: str) -> None:
        """Set a conversation's title (``updated_at`` is left alone: it tracks messages).

        Raises:
            NotFound: No conversation has this id.
        """
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id)
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no conversation {conversation_id}", hint=_HISTORY_HINT)

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and its messages (and their search entries).

        Raises:
            NotFound: No conversation has this id.
        """
        with self._db.transaction() as conn:
            cursor = conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            if cursor.rowcount == 0:
                raise NotFound(f"no conversation {conversation_id}", hint=_HISTORY_HINT)

    def search(self, text: str, limit: int = 50) -> builtins.list[SearchHit]:
        """Messages containing every word of ``text``, best match (bm25) first.

        Any text is safe: words are searched literally, never as FTS5 syntax. Words in
        scripts written without spaces (Chinese, Japanese, Thai…) are also matched as
        substrings; those hits come after the ranked ones, newest first.

        Args:
            text: What the user typed.
            limit: At most this many hits.

        Raises:
            InvalidInput: The text is empty or blank, has more than ``MAX_SEARCH_WORDS``
                different words, or is not valid UTF-8 (see ``search_terms``).
        """
        return search_messages(self._db, text, limit)

    def export(self, conversation_id: int, fmt: str) -> str:
        """A conversation as Markdown (``md``) or one JSON object (``json``).

        Raises:
            InvalidInput: ``fmt`` is not ``md`` or ``json``.
            NotFound: No conversation has this id.
        """
        if fmt not in EXPORT_FORMATS:
            raise InvalidInput(f"unknown export format {fmt!r}", hint="use md or json")
        conversation = self.get(conversation_id)
        messages = self.messages(conversation_id)
        if fmt == "json":
            document = conversation.to_dict()
            document["messages"] = [message.to_dict() for message in messages]
            return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        return _markdown(conversation, messages)


def _markdown(conversation: Conversation, messages: builtins.list[Message]) -> str:
    title = conversation.title or f"Conversation {conversation.id}"
    meta = [f"conversation {conversation.id}", f"created {conversation.created_at}"]
    if conversation.model:
        meta.insert(1, f"model {conversation.model}")
    lines = [f"# {title}", "", "*" + " · ".join(meta) + "*", ""]
    if conversation.system_prompt:
        lines += ["**System prompt:**", "", conversation.system_prompt, ""]
    for message in messages:
        lines += [f"### {message.role.capitalize()}", ""]
        notes = []
        if message.model:
            notes.append(f"*{message.model}*")
        if message.interrupted:
            notes.append("*(interrupted)*")
        if notes:
            lines += [" ".join(notes), ""]
        lines += [message.content, ""]
        if message.correction:
            lines += ["*Corrected by the user:*", "", message.correction, ""]
    return "\n".join(lines)
