"""The one error tree of the engine: what each edge shows, and with which exit code.

User-facing errors carry a message that is safe to show (no document text, no prompt)
and an optional hint. Edges translate once: the CLI prints one line and exits with
``exit_code``; the GUI shows a non-modal message. Anything that is not a
``BastionError`` is a bug and gets a traceback in the log.
"""

from __future__ import annotations


class BastionError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InvalidInput(BastionError):
    """The user asked for something that cannot be done as asked (exit code 2)."""

    exit_code = 2


class NotFound(InvalidInput):
    """A named thing (model, conversation, file) does not exist."""


class AlreadyExists(InvalidInput):
    """A new thing would take a name that is already used."""


class InvalidModelFile(InvalidInput):
    """A file is not a usable GGUF model."""


class ContextOverflow(InvalidInput):
    """A prompt does not fit in the model's context window, even alone."""


class OperationFailed(BastionError):
    """The request was valid but could not be carried out (exit code 1)."""


class EnvironmentFault(OperationFailed):
    """The machine is in the way: disk full, unwritable folder, database locked, no memory."""


class ModelLoadError(OperationFailed):
    """llama.cpp refused to load a model that passed validation."""


class ModelCrashed(OperationFailed):
    """The model host process died (a native crash, an abort, the OOM killer).

    The message names how it ended; the next request starts a fresh host.
    ``conversation_id`` is set when a chat answer was cut short (it keeps the partial one).
    """

    def __init__(
        self, message: str, hint: str | None = None, conversation_id: int | None = None
    ) -> None:
        super().__init__(message, hint)
        self.conversation_id = conversation_id


class NetworkBlocked(BastionError, ConnectionRefusedError):
    """An outbound connection was refused by the privacy guard.

    Also a ``ConnectionRefusedError`` so that libraries which retry or fall back on
    connection errors treat it as one instead of crashing on an unknown exception.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        BastionError.__init__(self, message, hint)


class Cancelled(Exception):
    """A job was cancelled by the user. Every edge treats it as a normal end."""
