"""``bastion eval``: measuring retrieval quality on questions with known sources."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import get_engine, json_option
from engine.cli.output import emit_json, table


@click.group("eval")
def eval_group() -> None:
    """Evaluate models on golden sets, and retrieval quality."""


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


@eval_group.command("run")
@click.option(
    "--set",
    "set_path",
    required=True,
    type=click.Path(path_type=Path),
    help='JSONL: {"prompt"|"messages", "reference"?, "must_include"?, "file"?, "page"?}',
)
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    required=True,
    help="A model to evaluate (repeat for several).",
)
@click.option("-c", "--collection", help="Answer from this collection's documents.")
@click.option(
    "--judge",
    help="A model that compares each model after the first with the first, pairwise.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for report.md and report.html (default: <home>/evals/<time>).",
)
@json_option
def run(
    set_path: Path,
    models: tuple[str, ...],
    collection: str | None,
    judge: str | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Score models on a golden set: exact match, token F1, ROUGE-L, BLEU, required phrases
    and citations, with 95 % bootstrap intervals, and optionally a pairwise judge; writes
    a Markdown and an HTML report."""
    from engine.cli.common import cancel_on_signals
    from engine.cli.progress import ProgressBar
    from engine.errors import InvalidInput
    from engine.jobs import JobContext
    from engine.train.golden import METRICS

    engine = get_engine()
    golden = engine.check_golden_set(set_path)
    if golden.bad_lines:
        if as_json:
            emit_json({"bad_lines": [{"line": b.line, "error": b.error} for b in golden.bad_lines]})
            raise SystemExit(2)
        first = golden.bad_lines[0]
        raise InvalidInput(
            f"{len(golden.bad_lines)} bad line(s) in {set_path}; line {first.line}: {first.error}"
        )
    bar = ProgressBar("answers")
    job = JobContext(on_progress=bar)
    with cancel_on_signals(job):
        try:
            result = engine.evaluate(
                set_path, list(models), collection=collection, out=out, ctx=job, judge=judge
            )
        finally:
            bar.close()
    if as_json:
        emit_json(result.to_public())
        return
    shown = [m for m in METRICS if any(result.summary[x][m] for x in result.models)]
    table(
        ["MODEL", *shown],
        [
            [
                model,
                *(
                    f"{v['mean']:.3f} [{v['low']:.2f}-{v['high']:.2f}]"
                    if (v := result.summary[model][m])
                    else "-"
                    for m in shown
                ),
            ]
            for model in result.models
        ],
    )
    if result.judge is not None:
        click.echo(f"\nJudge {result.judge['model']} against {result.judge['baseline']}:")
        for model, rec in result.judge["records"].items():
            click.echo(
                f"  {model}: {rec['wins']} wins, {rec['losses']} losses, {rec['ties']} ties; "
                f"win rate {rec['rate']:.2f} [{rec['low']:.2f}-{rec['high']:.2f}]"
            )
    click.echo(f"\nReport: {result.report_md}\n        {result.report_html}")


@eval_group.command("perplexity")
@click.option("-m", "--model", "model_id", required=True, help="The model to score with.")
@click.option(
    "--text", "text_path", required=True, type=click.Path(path_type=Path), help="A UTF-8 text file."
)
@json_option
def perplexity(model_id: str, text_path: Path, as_json: bool) -> None:
    """The model's perplexity on a text (lower: the text is less surprising to it)."""
    result = get_engine().perplexity(model_id, text_path)
    if as_json:
        emit_json(result)
        return
    click.echo(
        f"{result['model']}: perplexity {result['perplexity']:.2f} "
        f"({result['mean_nll']:.3f} nats per token over {result['tokens']} tokens)"
    )


@eval_group.command("votes")
@json_option
def votes(as_json: bool) -> None:
    """Win rates of models in blind A/B votes (a tie counts half), with 95 % intervals."""
    rates = get_engine().win_rates()
    if as_json:
        emit_json([r.to_public() for r in rates])
        return
    if not rates:
        click.echo("No A/B votes yet: compare two models on the desktop's Compare page.")
        return
    table(
        ["MODEL", "VOTES", "WINS", "LOSSES", "TIES", "WIN RATE"],
        [
            [r.model, r.votes, r.wins, r.losses, r.ties, f"{r.rate:.2f} [{r.low:.2f}-{r.high:.2f}]"]
            for r in rates
        ],
    )
