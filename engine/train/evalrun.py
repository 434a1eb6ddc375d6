"""``bastion eval run``: models answer a golden set; scores, intervals, and a report.

Every model answers every item greedily (temperature 0, seed 0: the same answers on a
rerun), through the same stateless path as the server, grounded in a collection when one
is named. The report (Markdown, and HTML with a bar chart of each metric's mean and 95 %
interval per model) lists every item's answers and, for two or more models, where the
first two differ most. With a judge model, each model after the first is also compared
with the first by that model, pairwise (``engine.train.judge``).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.chat.templates import ChatMessage
from engine.errors import InvalidInput
from engine.jobs import JobContext
from engine.models.runtime import SamplingParams
from engine.paths import atomic_write_bytes
from engine.train.golden import METRICS, GoldenSet, mean_with_interval, score
from engine.train.judge import Judge, compare, record

MAX_TOKENS = 256
Answer = Callable[[str, list[ChatMessage], SamplingParams, JobContext], tuple[str, list[Any]]]


@dataclass
class EvalRun:
    """Answers and scores of each model on each item, and the means with intervals."""

    set_path: str
    collection: str | None
    models: list[str]
    items: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, dict[str, dict[str, float] | None]] = field(default_factory=dict)
    report_md: str | None = None
    report_html: str | None = None
    # {"model", "baseline", "records": {model: {"wins", "losses", "ties", "rate", ...}}}
    judge: dict[str, Any] | None = None

    def to_public(self) -> dict[str, Any]:
        return {
            "set": self.set_path,
            "collection": self.collection,
            "models": {
                m: {k: (v["mean"] if v else None) for k, v in self.summary[m].items()}
                | {"intervals": self.summary[m]}
                for m in self.models
            },
            "items": self.items,
            "judge": self.judge,
            "report": {"markdown": self.report_md, "html": self.report_html},
        }


def run_eval(
    golden: GoldenSet,
    models: list[str],
    answer: Answer,
    ctx: JobContext,
    *,
    set_path: str,
    collection: str | None = None,
    judge: Judge | None = None,
    judge_model: str | None = None,
) -> EvalRun:
    """Ask every model every item (``answer`` gives the text and its citations); with
    ``judge``, compare each model after the first with the first, pairwise."""
    if golden.bad_lines:
        first = golden.bad_lines[0]
        raise InvalidInput(
            f"{len(golden.bad_lines)} bad line(s) in {set_path}; line {first.line}: {first.error}",
            hint="`bastion eval run --json` lists them all",
        )
    if not models:
        raise InvalidInput("name at least one model with -m")
    run = EvalRun(set_path, collection, list(models))
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
    if judge is not None and len(models) < 2:
        raise InvalidInput("a judge compares models: name at least two with -m")
    comparisons = (len(models) - 1) * len(golden.items) if judge is not None else 0
    total, done = len(models) * len(golden.items) + comparisons, 0
    rows: dict[int, dict[str, Any]] = {}
    for model in models:
        for item in golden.items:
            ctx.check_cancelled()
            messages = [ChatMessage(role, content) for role, content in item.messages]
            text, citations = answer(model, messages, sampling, ctx)
            row = rows.setdefault(
                item.line,
                {
                    "line": item.line,
                    "question": item.question,
                    "reference": item.reference,
                    "answers": {},
                },
            )
            row["answers"][model] = {
                "text": text,
                "citations": citations,
                "scores": score(text, item, citations),
            }
            done += 1
            ctx.report(done, total, "answers")
    run.items = [rows[item.line] for item in golden.items]
    if judge is not None:
        baseline = models[0]
        verdicts: dict[str, list[str]] = {}
        for model in models[1:]:
            verdicts[model] = []
            for row in run.items:
                ctx.check_cancelled()
                found = compare(
                    judge,
                    row["question"],
                    row["reference"],
                    row["answers"][baseline]["text"],
                    row["answers"][model]["text"],
                )
                row.setdefault("judge", {})[model] = found
                verdicts[model].append(found["verdict"])
                done += 1
                ctx.report(done, total, "judging")
        run.judge = {
            "model": judge_model,
            "baseline": baseline,
            "records": {m: record(v) for m, v in verdicts.items()},
        }
    for model in models:
        run.summary[model] = {
            metric: mean_with_interval(
                [
                    s
                    for row in run.items
                    if (s := row["answers"][model]["scores"][metric]) is not None
                ]
            )
            for metric in METRICS
        }
    return run


def _differences(run: EvalRun) -> list[tuple[float, dict[str, Any]]]:
    """Items by how much the first two models' F1 (else ROUGE-L, must_include) differ."""
    if len(run.models) < 2:
        return []
    a, b = run.models[:2]
    found = []
    for row in run.items:
        for metric in ("f1", "rouge_l", "must_include", "citation"):
            x, y = row["answers"][a]["scores"][metric], row["answers"][b]["scores"][metric]
            if x is not None and y is not None:
                found.append((y - x, row))
                break
    return sorted(found, key=lambda pair: -abs(pair[0]))


def _cell(value: dict[str, float] | None) -> str:
    return (
        "–" if value is None else f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
    )


def markdown(run: EvalRun) -> str:
    lines = [
        f"# Evaluation of {', '.join(run.models)}",
        "",
        f"Set: `{run.set_path}` ({len(run.items)} items)"
        + (f", grounded in the collection `{run.collection}`" if run.collection else "")
        + ". Greedy answers (temperature 0, seed 0). Means with 95 % bootstrap intervals.",
        "",
        "| model | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for model in run.models:
        lines.append(
            f"| {model} | " + " | ".join(_cell(run.summary[model][m]) for m in METRICS) + " |"
        )
    if run.judge is not None:
        lines += [
            "",
            f"## Pairwise judge: {run.judge['model']}",
            "",
            f"Each model against {run.judge['baseline']}, both orders asked; a side wins only "
            "when both orders pick it, a tie counts half.",
            "",
            "| model | wins | losses | ties | win rate [95 % interval] |",
            "|---|---|---|---|---|",
        ]
        for model, rec in run.judge["records"].items():
            lines.append(
                f"| {model} | {rec['wins']} | {rec['losses']} | {rec['ties']} | "
                f"{rec['rate']:.3f} [{rec['low']:.3f}, {rec['high']:.3f}] |"
            )
    diffs = _differences(run)
    if diffs:
        a, b = run.models[:2]
        lines += [
            "",
            f"## Where {b} differs most from {a}",
            "",
            "| line | question | change | " + a + " | " + b + " |",
            "|---|---|---|---|---|",
        ]
        for delta, row in diffs[:20]:
            lines.append(
                f"| {row['line']} | {_md(row['question'])} | {delta:+.2f} | "
                f"{_md(row['answers'][a]['text'])} | {_md(row['answers'][b]['text'])} |"
            )
    lines += ["", "## Every item", ""]
    for row in run.items:
        lines.append(
            f"**{row['line']}. {_md(row['question'])}**"
            + (f" — reference: {_md(row['reference'])}" if row["reference"] else "")
        )
        for model in run.models:
            lines.append(f"- {model}: {_md(row['answers'][model]['text'])}")
        lines.append("")
    return "\n".join(lines)


def _md(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")[:300]


def html_report(run: EvalRun) -> str:
    """The same report as a page, with one bar chart per metric (mean and interval)."""
    charts = []
    width, bar, gap = 360, 18, 8
    for metric in METRICS:
        values = [(m, run.summary[m][metric]) for m in run.models]
        if all(v is None for _, v in values):
            continue
        height = len(values) * (bar + gap) + 24
        parts = [
            f'<svg width="{width + 160}" height="{height}" role="img" '
            f'aria-label="{metric}"><text x="0" y="14" font-weight="bold">{metric}</text>'
        ]
        for i, (model, value) in enumerate(values):
            y = 24 + i * (bar + gap)
            parts.append(f'<text x="0" y="{y + 13}">{html.escape(model[:18])}</text>')
            if value is None:
                continue
            x0 = 150
            parts.append(
                f'<rect x="{x0}" y="{y}" width="{value["mean"] * width:.1f}" '
                f'height="{bar}" fill="#4a7bd0"/>'
            )
            lo, hi = x0 + value["low"] * width, x0 + value["high"] * width
            mid = y + bar / 2
            parts.append(
                f'<line x1="{lo:.1f}" y1="{mid}" x2="{hi:.1f}" y2="{mid}" '
                'stroke="#222" stroke-width="2"/>'
            )
        parts.append("</svg>")
        charts.append("".join(parts))
    body = html.escape(markdown(run)).replace("\n", "<br>\n")
    return (
        "<!doctype html><meta charset='utf-8'><title>Bastion evaluation</title>"
        "<body style='font-family:sans-serif;max-width:1100px'>"
        + "".join(f"<div>{c}</div>" for c in charts)
        + f"<div style='white-space:normal'>{body}</div></body>"
    )


def write_reports(run: EvalRun, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    md, page = folder / "report.md", folder / "report.html"
    atomic_write_bytes(md, markdown(run).encode("utf-8"))
    atomic_write_bytes(page, html_report(run).encode("utf-8"))
    run.report_md, run.report_html = str(md), str(page)
