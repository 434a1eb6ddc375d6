"""``bastion history``: stored conversations, searched and exported."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import get_engine, json_option
from engine.cli.output import emit_json, table
from engine.paths import atomic_write_bytes


@click.group("history")
def history_group() -> None:
    """Stored conversations."""


@history_group.command("list")
@click.option("--limit", type=click.IntRange(1), help="Show at most this many.")
@json_option
def list_conversations(limit: int | None, as_json: bool) -> None:
    """List conversations, most recent first."""
    items = get_engine().list_conversations(limit)
    if as_json:
        emit_json([c.to_dict() for c in items])
        return
    if not items:
        click.echo("No conversations yet. Start one with: bastion chat")
        return
    table(
        ["ID", "UPDATED", "MODEL", "MESSAGES", "TITLE"],
        [
            [
                c.id,
                c.updated_at[:16].replace("T", " "),
                c.model or "-",
                c.message_count,
                c.title or "",
            ]
            for c in items
        ],
    )


@history_group.command("show")
@click.argument("conversation_id", type=int)
@json_option
def show(conversation_id: int, as_json: bool) -> None:
    """Show one conversation."""
    conversation, messages = get_engine().get_conversation(conversation_id)
    if as_json:
        emit_json({**conversation.to_dict(), "messages": [m.to_dict() for m in messages]})
        return
    click.echo(f"# {conversation.title or '(untitled)'}  [{conversation.id}, {conversation.model}]")
    if conversation.system_prompt:
        click.echo(f"system: {conversation.system_prompt}")
    for m in messages:
        mark = " [interrupted]" if m.interrupted else ""
        mark += {1: " [good]", -1: " [bad]"}.get(m.rating, "")
        click.echo(f"\n{m.role} (message {m.id}){mark}:\n{m.content}")
        if m.correction:
            click.echo(f"corrected by you:\n{m.correction}")


@history_group.command("search")
@click.argument("text")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@json_option
def search(text: str, limit: int, as_json: bool) -> None:
    """Full-text search over every message."""
    hits = get_engine().search_history(text, limit)
    if as_json:
        emit_json([h.__dict__ for h in hits])
        return
    if not hits:
        click.echo("No matches.")
        return
    table(
        ["CONVERSATION", "ROLE", "SNIPPET", "TITLE"],
        [
            [h.conversation_id, h.role, " ".join(h.snippet.split()), h.conversation_title or ""]
            for h in hits
        ],
    )


@history_group.command("export")
@click.argument("conversation_id", type=int)
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write to a file.")
def export(conversation_id: int, fmt: str, output: Path | None) -> None:
    """Export a conversation as Markdown or JSON."""
    text = get_engine().export_conversation(conversation_id, fmt)
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
    else:
        atomic_write_bytes(output, text.encode("utf-8"))
        click.echo(f"Wrote {output}", err=True)


@history_group.command("delete")
@click.argument("conversation_id", type=int)
def delete(conversation_id: int) -> None:
    """Delete a conversation and its messages."""
    engine = get_engine()
    engine.conversations.get(conversation_id)  # NotFound before anything changes
    engine.conversations.delete(conversation_id)
    click.echo(f"Deleted conversation {conversation_id}", err=True)


@history_group.command("rate")
@click.argument("message_id", type=int)
@click.argument("rating", type=click.Choice(["up", "down", "clear"]))
def rate(message_id: int, rating: str) -> None:
    """Thumbs up or down on an answer (kept as fine-tuning feedback)."""
    get_engine().rate_message(message_id, {"up": 1, "down": -1, "clear": 0}[rating])
    click.echo(f"Rated message {message_id}: {rating}", err=True)


@history_group.command("correct")
@click.argument("message_id", type=int)
@click.argument("text", required=False)
@click.option("--file", "path", type=click.Path(path_type=Path), help="Read the text from a file.")
@click.option("--clear", is_flag=True, help="Remove the correction.")
def correct(message_id: int, text: str | None, path: Path | None, clear: bool) -> None:
    """Keep a better answer beside the model's own (both are kept; the corrected one
    becomes training data with `bastion dataset from-feedback`)."""
    from engine.errors import InvalidInput

    if (text is not None) + (path is not None) + clear != 1:
        raise InvalidInput("give the corrected TEXT, or --file, or --clear")
    if path is not None:
        from engine.train.golden import read_text_file

        text = read_text_file(path)
    if not clear and not (text or "").strip():
        raise InvalidInput("the corrected answer is empty", hint="use --clear to remove one")
    get_engine().correct_message(message_id, None if clear else text)
    click.echo(f"{'Cleared' if clear else 'Kept'} the correction of message {message_id}", err=True)
