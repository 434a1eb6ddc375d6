"""The fine-tune's report: a Markdown page and its loss curve (SVG), next to the adapter.

The curve is drawn here as plain SVG (no plotting library to install): training loss per
step as a line, validation loss before and after as points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from engine.paths import atomic_write_bytes

_W, _H, _PAD = 640, 320, 48


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train points, validation points)`` as (step, loss) from ``metrics.jsonl``."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("loss") is not None:
                train[int(record["step"])] = float(record["loss"])
            if record.get("eval_loss") is not None:
                val[int(record["step"])] = float(record["eval_loss"])
    return sorted(train.items()), sorted(val.items())


def loss_svg(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]]) -> str:
    """An SVG line chart of the losses."""
    points = list(train) + list(val)
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}"></svg>'
    max_step = max(1, *(s for s, _ in points))
    losses = [v for _, v in points if math.isfinite(v)] or [0.0]
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(step: int, loss: float) -> tuple[float, float]:
        x = _PAD + (_W - 2 * _PAD) * step / max_step
        y = _H - _PAD - (_H - 2 * _PAD) * (loss - lo) / (hi - lo)
        return round(x, 1), round(y, 1)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_W}" height="{_H}" fill="white"/>',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#444"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#444"/>',
        f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle">step</text>',
        f'<text x="14" y="{_H / 2}" transform="rotate(-90 14 {_H / 2})" '
        'text-anchor="middle">loss</text>',
    ]
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        _, y = xy(0, value)
        parts.append(
            f'<text x="{_PAD - 4}" y="{y + 4}" text-anchor="end">{value:.2f}</text>'
            f'<line x1="{_PAD}" y1="{y}" x2="{_W - _PAD}" y2="{y}" stroke="#ddd"/>'
        )
    parts.append(f'<text x="{_W - _PAD}" y="{_H - _PAD + 16}" text-anchor="end">{max_step}</text>')
    if train:
        line = " ".join(f"{x},{y}" for x, y in (xy(s, v) for s, v in train if math.isfinite(v)))
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for step, value in val:
        x, y = xy(step, value)
        parts.append(f'<circle cx="{x}" cy="{y}" r="5" fill="#d62728"/>')
    parts.append(
        f'<text x="{_W - _PAD}" y="{_PAD - 20}" text-anchor="end">'
        '<tspan fill="#1f77b4">— training loss</tspan>  '
        '<tspan fill="#d62728">● validation loss</tspan></text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _cell(text: str | None, limit: int = 300) -> str:
    if text is None:
        return ""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return escape(text).replace("|", "\\|")


def _number(value: Any, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def write_report(folder: Path, summary: dict[str, Any]) -> Path:
    """Write ``report.md`` and ``loss.svg`` in ``folder``; returns the report's path."""
    train, val = read_metrics(folder / "metrics.jsonl")
    atomic_write_bytes(folder / "loss.svg", loss_svg(train, val).encode())
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss_after")
    ppl = [None if v is None else math.exp(min(v, 50)) for v in (before, after)]
    hp = summary.get("hyperparameters", {})
    lines = [
        f"# Fine-tune `{summary['model']}`",
        "",
        f"Base `{summary['base']}`"
        + (
            f" · continued from `{summary['continued_from']}`"
            if summary.get("continued_from")
            else ""
        )
        + f" · backend {summary['backend']} on {summary.get('device')} "
        f"({summary.get('backend_reason', '')}) · {summary.get('created', '')}",
        "",
        "## Results",
        "",
        "| measure | before | after |",
        "|---|---|---|",
        f"| validation loss | {_number(before)} | {_number(after)} |",
        f"| validation perplexity | {_number(ppl[0], '.2f')} | {_number(ppl[1], '.2f')} |",
        "",
        f"Final training loss {_number(summary.get('train_loss'))}; "
        f"{summary.get('steps')} steps in {_number(summary.get('train_seconds'), '.1f')} s "
        f"at {_number(summary.get('tokens_per_second'), '.0f')} tokens/s.",
        "",
        "![loss curve](loss.svg)",
        "",
        "## Data",
        "",
    ]
    data = summary.get("data", {})
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in data.items()]
    lines += ["", "## Hyperparameters", "", "| name | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in hp.items()]
    comparisons = summary.get("comparisons") or []
    lines += ["", "## Held-out prompts: base and fine-tune side by side", ""]
    if comparisons:
        lines += ["| prompt | expected | base | fine-tune |", "|---|---|---|---|"]
        lines += [
            f"| {_cell(c['prompt'])} | {_cell(c.get('expected'))} | {_cell(c['base'])} "
            f"| {_cell(c['fine_tuned'])} |"
            for c in comparisons
        ]
    else:
        lines.append(summary.get("comparisons_note") or "No held-out chat prompts.")
    golden = summary.get("golden")
    if golden:
        metrics = [
            k
            for k in ("exact_match", "f1", "rouge_l", "bleu", "must_include", "citation")
            if any(golden["models"][m].get(k) is not None for m in golden["models"])
        ]
        lines += [
            "",
            f"## Golden set: `{golden['against']}` and this fine-tune",
            "",
            f"Set `{golden['set']}`; greedy answers. Full report: `{golden.get('report')}`.",
            "",
            "| model | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        lines += [
            f"| {model} | " + " | ".join(_number(scores.get(k)) for k in metrics) + " |"
            for model, scores in golden["models"].items()
        ]
    lines += [
        "",
        "## Files",
        "",
        f"- llama.cpp adapter: `{summary['adapter']}`",
        f"- PEFT adapter (safetensors): `{summary.get('adapter_dir')}`",
    ]
    if summary.get("merged_dir"):
        lines.append(f"- merged model: `{summary['merged_dir']}`")
    path = folder / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
