"""``bastion chat``: one answer, or an interactive session, streamed to the terminal."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

import click

from engine.cli.common import cancel_on_signals, get_engine, json_option
from engine.cli.output import emit_json, note
from engine.errors import BastionError, Cancelled, ModelCrashed
from engine.jobs import JobContext

if TYPE_CHECKING:
    from engine.chat.session import ChatResult
    from engine.models.runtime import SamplingParams

HELP_TEXT = (
    "Commands: /new starts a new conversation, /exit (or Ctrl-D) quits. Ctrl-C stops an answer."
)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@click.command("chat")
@click.argument("prompt", required=False)
@click.option("-m", "--model", "model_id", help="Model id (default: the default model).")
@click.option("-c", "--collection", help="Answer from this document collection, with citations.")
@click.option("--system", help="System prompt.")
@click.option("--conversation", "conversation_id", type=int, help="Continue this conversation.")
@click.option("--max-tokens", type=click.IntRange(1, 1_000_000), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0, 5.0), default=0.7, show_default=True)
@click.option("--seed", type=int, help="Random seed, for repeatable answers.")
@json_option
def chat(
    prompt: str | None,
    model_id: str | None,
    collection: str | None,
    system: str | None,
    conversation_id: int | None,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    as_json: bool,
) -> None:
    """Chat with a local model: one answer when PROMPT is given ('-' reads stdin),
    an interactive session otherwise."""
    from engine.chat.session import ChatRequest
    from engine.models.runtime import SamplingParams

    if prompt == "-":
        prompt = sys.stdin.read()
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    engine = get_engine()
    # The model process starts (about 0.2 s) while this one reads the conversation and
    # renders the prompt.
    engine.start_model_host()
    if prompt is None:
        if as_json:
            raise click.UsageError("--json needs a PROMPT (the interactive chat prints text)")
        _interactive(model_id, system, conversation_id, sampling, collection)
        return
    request = ChatRequest(prompt, model_id, conversation_id, system, sampling, collection)
    job = JobContext()
    streamed: list[str] = []

    def show(text: str) -> None:
        streamed.append(text)
        _write(text)

    with cancel_on_signals(job) as seen:
        try:
            result = engine.chat(
                request,
                job,
                on_text=None if as_json else show,
                on_notice=lambda msg: note(f"bastion: note: {msg}"),
            )
        except Cancelled:
            raise SystemExit(128 + seen.get("signal", 2)) from None
        except BastionError:
            if streamed:  # the error's line comes after the partial answer, not inside it
                _write("\n")
            raise
    if as_json:
        emit_json(result.to_json())
    else:
        _write("\n")
        _show_citations(result)
    if result.interrupted:
        note(f"[interrupted: the partial answer is kept in conversation {result.conversation_id}]")
        raise SystemExit(128 + seen.get("signal", 2))


def _show_citations(result: ChatResult) -> None:
    """Sources under an answer from documents: number, file, page or lines, snippet."""
    for c in result.citations:
        if c.page:
            where = f"p. {c.page}"
        elif c.line_start:
            where = f"lines {c.line_start}-{c.line_end}"
        else:
            where = ""
        _write(f"  [{c.n}] {c.path} {where}\n      {c.snippet[:160]}\n")


def _interactive(
    model_id: str | None,
    system: str | None,
    conversation_id: int | None,
    sampling: SamplingParams,
    collection: str | None,
) -> None:
    from engine.chat.session import ChatRequest

    engine = get_engine()
    if collection is not None:
        engine.documents.get(collection)  # an unknown name fails before the model loads
    if conversation_id is not None:
        conversation = engine.conversations.get(conversation_id)
        model_id = model_id or conversation.model
    note("loading model...")
    entry, load_s = engine.load_model(model_id)
    note(f"{entry.id} ready ({load_s:.1f} s). {HELP_TEXT}")
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 -- line editing and history for input()
    while True:
        try:
            line = input("you> ")
        except EOFError:
            note("")
            return
        except KeyboardInterrupt:
            note("\n(Ctrl-D or /exit quits)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/help":
            note(HELP_TEXT)
            continue
        if text == "/new":
            conversation_id = None
            note("(new conversation)")
            continue
        job = JobContext()
        request = ChatRequest(text, entry.id, conversation_id, system, sampling, collection)
        _write(f"{entry.id}> ")
        with cancel_on_signals(job):
            try:
                result = engine.chat(
                    request, job, on_text=_write, on_notice=lambda msg: note(f"\n(note: {msg})")
                )
            except Cancelled:
                note("\n[stopped]")
                continue
            except ModelCrashed as exc:  # the next question starts a fresh model process
                note(f"\n[{exc}]")
                continue
        _write("\n")
        _show_citations(result)
        conversation_id = result.conversation_id
        if result.interrupted:
            note("[stopped: the partial answer is kept]")
        elif result.stop_reason in ("length", "context"):
            note(
                f"[answer cut at {result.completion_tokens} tokens: "
                f"{'--max-tokens' if result.stop_reason == 'length' else 'context full'}]"
            )
        system = None  # the conversation keeps its system prompt
