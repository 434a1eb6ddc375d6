"""Bastion's SQLite store: the database, its migrations, and stored conversations."""

from __future__ import annotations

from engine.store.conversations import Conversation, ConversationStore, Message, SearchHit
from engine.store.db import DB_FILENAME, Database

__all__ = [
    "DB_FILENAME",
    "Conversation",
    "ConversationStore",
    "Database",
    "Message",
    "SearchHit",
]
