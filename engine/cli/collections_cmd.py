"""``bastion collections`` and ``bastion search``: document collections and retrieval."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import click

from engine.cli.common import cancel_on_signals, get_engine, json_option
from engine.cli.output import emit_json, note, table
from engine.cli.progress import ProgressBar
from engine.jobs import JobContext

if TYPE_CHECKING:
    from engine.rag.collections import Collection
    from engine.rag.indexer import IndexReport


# Control characters are legal in file names (a newline, a tab); in a table or a note they
# would break the line, so they are shown escaped there. JSON carries them as they are.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _collection_json(collection: Collection, summary: dict[str, int]) -> dict[str, object]:
    return {
        "name": collection.name,
        "embedder": collection.embedder,
        "created_at": collection.created_at,
        **summary,
    }


def _finish(report: IndexReport, as_json: bool, seen: dict[str, int]) -> None:
    if as_json:
        emit_json(report.to_public())
    else:
        note(
            f"{report.indexed} indexed, {report.unchanged} unchanged, {report.skipped} skipped, "
            f"{len(report.failed)} failed, {report.removed} removed; {report.chunks} chunks "
            f"written in {report.seconds:.1f} s"
        )
        for path, error in report.failed:
            note(f"  failed: {_one_line(path)}: {error}")
        for path in report.missing_sources:
            note(f"  missing: {_one_line(path)} (its documents were kept)")
    if report.cancelled:
        note("[cancelled: what was indexed is kept; run the same command again to resume]")
        raise SystemExit(128 + seen.get("signal", 2))


def _run_job(as_json: bool, fn: object) -> None:
    from collections.abc import Callable

    assert callable(fn)
    run: Callable[[JobContext], IndexReport] = fn
    bar = ProgressBar("files")
    job = JobContext(on_progress=bar)
    with cancel_on_signals(job) as seen:
        try:
            report = run(job)
        finally:
            bar.close()
    _finish(report, as_json, seen)


@click.group("collections")
def collections_group() -> None:
    """Document collections: add files and folders, then ask with -c NAME."""


@collections_group.command("create")
@click.argument("name")
@click.option(
    "--embedder", help="all-minilm-l6-v2 (default) or a local sentence-transformers folder."
)
@json_option
def create(name: str, embedder: str | None, as_json: bool) -> None:
    """Create an empty collection."""
    docs = get_engine().documents
    collection = docs.create(name, embedder)
    if as_json:
        emit_json(_collection_json(collection, docs.summary(collection)))
    else:
        click.echo(f"Created collection {collection.name} (embedder {collection.embedder})")


@collections_group.command("add")
@click.argument("name")
@click.argument("paths", nargs=-1, required=True)
@click.option("--include", multiple=True, help="Only files matching this pattern (repeatable).")
@click.option(
    "--exclude", multiple=True, help="Leave out files matching this pattern (repeatable)."
)
@json_option
def add(
    name: str,
    paths: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    as_json: bool,
) -> None:
    """Add files or folders (recursively) and index them."""
    docs = get_engine().documents
    _run_job(as_json, lambda job: docs.add(name, list(paths), job, include, exclude))


@collections_group.command("sync")
@click.argument("name")
@json_option
def sync(name: str, as_json: bool) -> None:
    """Re-index what changed and drop what was deleted."""
    docs = get_engine().documents
    _run_job(as_json, lambda job: docs.sync(name, job))


@collections_group.command("set")
@click.argument("name")
@click.option("--embedder", required=True, help="The new embedder; everything is re-embedded.")
@json_option
def set_embedder(name: str, embedder: str, as_json: bool) -> None:
    """Switch a collection's embedder (re-embeds its documents)."""
    docs = get_engine().documents
    _run_job(as_json, lambda job: docs.set_embedder(name, embedder, job))


@collections_group.command("status")
@click.argument("name")
@json_option
def status(name: str, as_json: bool) -> None:
    """Per-file state of a collection."""
    collection, summary, documents = get_engine().documents.status(name)
    if as_json:
        emit_json(
            {**_collection_json(collection, summary), "files": [d.to_public() for d in documents]}
        )
        return
    click.echo(
        f"{collection.name}: {summary['files']} files, {summary['indexed']} indexed, "
        f"{summary['pending']} pending, {summary['failed']} failed, "
        f"{summary['skipped']} skipped, {summary['chunks']} chunks"
    )
    if summary["outdated"]:
        note(
            f"{collection.name} was cut into passages by an older Bastion; "
            f"`bastion collections sync {collection.name}` indexes it again for better search"
        )
    table(
        ["STATE", "CHUNKS", "PATH", "ERROR"],
        [[d.state, d.chunk_count, _one_line(d.path), _one_line(d.error or "")] for d in documents],
    )


@collections_group.command("list")
@json_option
def list_collections(as_json: bool) -> None:
    """List collections."""
    items = get_engine().documents.all()
    if as_json:
        emit_json([_collection_json(c, s) for c, s in items])
        return
    if not items:
        click.echo("No collections. Create one with: bastion collections create NAME")
        return
    table(
        ["NAME", "FILES", "INDEXED", "CHUNKS", "EMBEDDER"],
        [[c.name, s["files"], s["indexed"], s["chunks"], c.embedder] for c, s in items],
    )


@collections_group.command("remove")
@click.argument("name")
@json_option
def remove(name: str, as_json: bool) -> None:
    """Remove a collection and its index (your files are not touched)."""
    collection = get_engine().documents.remove(name)
    if as_json:
        emit_json({"name": collection.name, "removed": True})
    else:
        click.echo(f"Removed collection {collection.name}")


@click.command("search")
@click.argument("name")
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option(
    "--mode", type=click.Choice(["hybrid", "dense", "keyword"]), default="hybrid", show_default=True
)
@json_option
def search(name: str, query: str, k: int, mode: str, as_json: bool) -> None:
    """Retrieve the passages of a collection that best match QUERY."""
    results = get_engine().documents.search(name, query, k, mode)
    if as_json:
        emit_json([r.to_public() for r in results])
        return
    if not results:
        click.echo("No matches.")
    for n, r in enumerate(results, 1):
        where = (
            f"page {r.chunk.page}"
            if r.chunk.page
            else (f"lines {r.chunk.line_start}-{r.chunk.line_end}" if r.chunk.line_start else "")
        )
        click.echo(f"[{n}] {_one_line(r.chunk.path)} {where} (score {r.score:.4f})")
        click.echo("    " + " ".join(r.chunk.text.split())[:300])
