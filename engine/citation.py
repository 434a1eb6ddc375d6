"""``Citation``: where a part of an answer from documents comes from, for every client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Citation:
    """Source ``[n]`` of an answer: the file, its page or lines, and the passage used."""

    n: int
    path: str
    page: int | None = None  # 1-based, for paged sources (PDF)
    snippet: str = ""
    score: float = 0.0
    line_start: int | None = None
    line_end: int | None = None

    def to_public(self) -> dict[str, Any]:
        """The citation as JSON (``chat --json``, the database, the server)."""
        return {
            "n": self.n,
            "path": self.path,
            "page": self.page,
            "snippet": self.snippet,
            "score": self.score,
            "line_start": self.line_start,
            "line_end": self.line_end,
        }

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> Citation:
        """A citation from its JSON (unknown keys ignored: a newer version may add some)."""
        return cls(
            n=int(data.get("n", 0)),
            path=str(data.get("path", "")),
            page=data.get("page"),
            snippet=str(data.get("snippet", "")),
            score=float(data.get("score", 0.0)),
            line_start=data.get("line_start"),
            line_end=data.get("line_end"),
        )
