"""``bastion eval``: measuring retrieval quality on questions with known sources."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import get_engine, json_option
from engine.cli.output import emit_json, table


@click.group("eval")
def eval_group() -> None:
    """Evaluate retrieval quality."""


@eval_group.command("retrieval")
@click.option("-c", "--collection", required=True, help="The collection to evaluate.")
@click.option(
    "--qa",
    "qa_path",
    required=True,
    type=click.Path(path_type=Path),
    help='JSONL lines of {"question", "file", "page"?}.',
)
@json_option
def retrieval(collection: str, qa_path: Path, as_json: bool) -> None:
    """hit@1, hit@5, MRR@10 and nDCG@10 for dense, keyword and hybrid search."""
    evaluation = get_engine().documents.evaluate(collection, qa_path)
    if as_json:
        emit_json(evaluation.to_public())
        return
    report = evaluation.modes
    metrics = ["hit@1", "hit@5", "mrr@10", "ndcg@10"]
    table(
        ["MODE", *metrics],
        [
            [mode, *(f"{report[mode][m]:.3f}" for m in metrics)]
            for mode in ("dense", "keyword", "hybrid")
        ],
    )
    click.echo(f"{evaluation.questions} questions")
