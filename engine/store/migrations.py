"""Append-only, named schema migrations of ``bastion.db``, recorded in a ``migrations`` table.

NEVER EDIT A SHIPPED MIGRATION. Users' databases already ran it, and they will never run
it again: a change to an existing entry only reaches fresh installs and splits the world
into two schemas. To change the schema, append a new ``(name, sql)`` entry at the end
of ``MIGRATIONS`` (``m003_...``) that alters what is there.
"""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from typing import Final

logger = logging.getLogger(__name__)

Migration = tuple[str, str]

M001_CONVERSATIONS: Final = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT,
    model TEXT,
    system_prompt TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    ttft_ms REAL,
    duration_ms REAL,
    tokens_per_second REAL,
    interrupted INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);

CREATE INDEX messages_conversation_id ON messages(conversation_id);

-- External-content index: the text lives once, in messages; the triggers keep the index
-- in step. remove_diacritics 2 lets "cafe" find "café".
CREATE VIRTUAL TABLE messages_fts USING fts5(
    content,
    content='messages',
    content_rowid='id',
    tokenize='unicode61 remove_diacritics 2'
);

CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;

CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;

CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages
WHEN old.content IS NOT new.content BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
"""

M002_MODELS: Final = """
CREATE TABLE models (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    arch TEXT,
    quant TEXT,
    params INTEGER,
    context_length INTEGER,
    size_bytes INTEGER,
    chat_template TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    base TEXT,
    adapter TEXT,
    settings TEXT NOT NULL DEFAULT '{}',
    builtin INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
"""

# Document collections. SQLite is the source of truth: documents with their state, chunks
# with provenance, and vectors (float16, keyed by embedder and chunk text so identical text
# is embedded once). The FAISS files under collections/<id>/ are a cache of these rows.
M003_COLLECTIONS: Final = """
CREATE TABLE collections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    embedder TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);

CREATE TABLE collection_sources (
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    include TEXT NOT NULL DEFAULT '[]',
    exclude TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (collection_id, path)
);

CREATE TABLE documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    content_hash TEXT,
    state TEXT NOT NULL CHECK (state IN ('pending', 'indexed', 'failed', 'skipped')),
    error TEXT,
    chunk_count INTEGER NOT NULL DEFAULT 0,
    pages INTEGER,
    updated_at TEXT NOT NULL,
    UNIQUE (collection_id, path)
);

CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    page INTEGER,
    line_start INTEGER,
    line_end INTEGER,
    heading TEXT,
    text_hash TEXT NOT NULL,
    UNIQUE (document_id, ordinal)
);
CREATE INDEX chunks_text_hash ON chunks(text_hash);

CREATE TABLE embeddings (
    embedder TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (embedder, text_hash)
) WITHOUT ROWID;

CREATE VIRTUAL TABLE chunks_fts USING fts5(
    text, heading, content='chunks', content_rowid='id',
    tokenize='unicode61 remove_diacritics 2'
);

CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.id, new.text, new.heading);
END;

CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text, heading)
    VALUES ('delete', old.id, old.text, old.heading);
END;
"""

# Answers from a collection keep the sources they cited.
M004_MESSAGE_CITATIONS: Final = """
ALTER TABLE messages ADD COLUMN citations TEXT;
"""

# Fine-tuning runs: one row per model name being (or having been) trained. The run's
# files (spec, encoded data, checkpoints, adapter, report) are in ``run_dir``.
M005_TRAINING_RUNS: Final = """
CREATE TABLE training_runs (
    name TEXT PRIMARY KEY,
    base TEXT NOT NULL,
    base_source TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'stopped', 'failed', 'done')),
    run_dir TEXT NOT NULL,
    pid INTEGER,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    error TEXT,
    result TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""

# Thumbs up (1) or down (-1) on an answer; NULL while not rated. Kept with the message so
# that rated answers can later be exported as fine-tuning (preference) data.
M006_MESSAGE_RATING: Final = """
ALTER TABLE messages ADD COLUMN rating INTEGER;
"""

# Vectors follow the content of the embedder's model files, not the name of its folder:
# replacing the model in a folder must re-embed, never reuse vectors of the old one (wrong
# results, or another dimension). ``model_key`` is the content hash of the model that made
# a vector; ``embedder_key`` the one a collection's chunks and vectors were made with. Rows
# from before have NULL keys: the engine checks a sample of them against the model on the
# collection's next use and keeps them (same model) or re-indexes.
M007_EMBEDDER_CONTENT_KEYS: Final = """
ALTER TABLE embeddings ADD COLUMN model_key TEXT;
ALTER TABLE collections ADD COLUMN embedder_key TEXT;
"""

# Keyword search matches word forms: "plotting" finds "plot", "keys" finds "key" (the
# Porter stemmer over the same Unicode tokenizer). Users ask in their own words, not the
# manual's. The index is rebuilt from the chunks (its content table), in this migration.
M008_CHUNKS_FTS_STEMMED: Final = """
DROP TRIGGER chunks_fts_insert;
DROP TRIGGER chunks_fts_delete;
DROP TABLE chunks_fts;

CREATE VIRTUAL TABLE chunks_fts USING fts5(
    text, heading, content='chunks', content_rowid='id',
    tokenize='porter unicode61 remove_diacritics 2'
);

CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.id, new.text, new.heading);
END;

CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text, heading)
    VALUES ('delete', old.id, old.text, old.heading);
END;

INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild');
"""

# API keys of the OpenAI-compatible server (engine.server.keys): a salted HMAC of each key,
# never the key; its first characters (``prefix``) find the row and name it in lists.
M009_API_KEYS: Final = """
CREATE TABLE api_keys (
    name TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    models TEXT,
    created_at TEXT NOT NULL,
    last_used_at TEXT
);
CREATE INDEX api_keys_prefix ON api_keys(prefix);
"""

# Models served elsewhere (engine.models.remote): {"url", "model", "key_secret"} as JSON;
# NULL for the GGUF files of this machine.
M010_REMOTE_MODELS: Final = """
ALTER TABLE models ADD COLUMN remote TEXT;
"""

# Feedback that becomes training data (engine.store.feedback): an answer's correction
# (the user's better text; the model's own stays in ``content``) and when the answer was
# last rated or corrected; and the user's picks between two unlabelled answers.
M011_FEEDBACK: Final = """
ALTER TABLE messages ADD COLUMN correction TEXT;
ALTER TABLE messages ADD COLUMN feedback_at TEXT;
CREATE TABLE ab_votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    messages TEXT NOT NULL,
    model_a TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie'))
);
CREATE INDEX ab_votes_created ON ab_votes(created_at);
"""

# The version of the readers and chunker that cut a collection's chunks
# (``engine.rag.chunking.CHUNKER_VERSION``); NULL: cut before versions were kept (version 1).
# A collection whose version is not the current one is cut again by its next sync.
M012_CHUNKER_VERSION: Final = """
ALTER TABLE collections ADD COLUMN chunker_version INTEGER;
"""

# Append only. See the module docstring.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    ("m001_conversations", M001_CONVERSATIONS),
    ("m002_models", M002_MODELS),
    ("m003_collections", M003_COLLECTIONS),
    ("m004_message_citations", M004_MESSAGE_CITATIONS),
    ("m005_training_runs", M005_TRAINING_RUNS),
    ("m006_message_rating", M006_MESSAGE_RATING),
    ("m007_embedder_content_keys", M007_EMBEDDER_CONTENT_KEYS),
    ("m008_chunks_fts_stemmed", M008_CHUNKS_FTS_STEMMED),
    ("m009_api_keys", M009_API_KEYS),
    ("m010_remote_models", M010_REMOTE_MODELS),
    ("m011_feedback", M011_FEEDBACK),
    ("m012_chunker_version", M012_CHUNKER_VERSION),
)

_CREATE_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT)"
)


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements, keeping trigger bodies whole.

    ``executescript`` cannot be used: it commits any open transaction first, which
    would break the ``BEGIN IMMEDIATE`` that makes migrating safe between processes.

    Args:
        sql: Several SQL statements separated by semicolons.

    Returns:
        Each complete statement, in order.
    """
    statements: list[str] = []
    buffer = ""
    for piece in sql.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()[:80]!r}")
    return statements


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names of the migrations recorded in the database, in the order they were applied."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'"
    ).fetchone()
    if exists is None:
        return []
    rows = conn.execute("SELECT name FROM migrations ORDER BY rowid").fetchall()
    return [str(row[0]) for row in rows]


def pending_migrations(
    conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[str]:
    """Names of the migrations not yet applied to the database."""
    done = set(applied_migrations(conn))
    return [name for name, _ in migrations if name not in done]


def apply_migrations(
    conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[str]:
    """Apply the pending migrations, in order, in one ``BEGIN IMMEDIATE`` transaction.

    Two processes opening a fresh database at the same moment both see migrations
    pending; the write lock lets one in at a time, and the list is read again inside
    the transaction, so the second finds nothing left to do.

    Args:
        conn: A connection in autocommit mode (``isolation_level=None``) with no open
            transaction.
        migrations: The migrations to apply; the default is Bastion's schema.

    Returns:
        The names applied by this call (empty when the database was up to date).
    """
    # Cheap read first: an up-to-date database never takes the write lock on open.
    if not pending_migrations(conn, migrations):
        _warn_about_unknown(conn, migrations)
        return []
    applied: list[str] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CREATE_TABLE)
        for name in pending_migrations(conn, migrations):
            sql = dict(migrations)[name]
            for statement in split_statements(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                (name, datetime.now(UTC).isoformat(timespec="microseconds")),
            )
            applied.append(name)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    for name in applied:
        logger.info("applied migration %s", name)
    return applied


def _warn_about_unknown(conn: sqlite3.Connection, migrations: tuple[Migration, ...]) -> None:
    """Log when the database was migrated by a newer Bastion than this one."""
    known = {name for name, _ in migrations}
    unknown = [name for name in applied_migrations(conn) if name not in known]
    if unknown:
        logger.warning(
            "the database has migrations this version does not know (%s); "
            "it was last opened by a newer Bastion",
            ", ".join(unknown),
        )
