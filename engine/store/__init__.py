"""Bastion's SQLite store: the database, its migrations, stored conversations, and their search."""

from __future__ import annotations

from engine.store.conversations import Conversation, ConversationStore, Message
from engine.store.db import DB_FILENAME, Database
from engine.store.search import SearchHit

__all__ = [
    "DB_FILENAME",
    "Conversation",
    "ConversationStore",
    "Database",
    "Message",
    "SearchHit",
]
