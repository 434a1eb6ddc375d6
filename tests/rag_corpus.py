"""A small generated corpus with planted facts, and questions that know where the facts are."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.pdfgen import write_pdf

FILLER = [
    "Lighthouses were built along dangerous coasts to warn ships of rocks and shoals.",
    "Keepers trimmed the wicks, wound the clockwork and polished the great lenses nightly.",
    "Fog signals, from bells to diaphones, warned sailors when the light could not be seen.",
    "The Fresnel lens gathered light from a single lamp into a beam visible for miles.",
    "Supply boats brought oil, food and letters to the keepers a few times each season.",
    "Automation in the twentieth century replaced most resident keepers with machines.",
    "Storms could cut off a rock station for weeks, and keepers kept careful logbooks.",
    "Daymarks, the painted stripes and bands, told sailors which tower they were seeing.",
]

# (file, page or None, the fact, a question whose answer is the fact)
FACTS = [
    (
        "manual.pdf",
        2,
        "The Zephyrion valve must be torqued to exactly 42 newton metres.",
        "How tightly must the Zephyrion valve be torqued?",
    ),
    (
        "manual.pdf",
        4,
        "The backup generator access code is ORCHID-7731.",
        "What is the access code of the backup generator?",
    ),
    (
        "notes/history.md",
        None,
        "Bastion Point lighthouse was first lit in 1871 by keeper Elin Maro.",
        "Who first lit the Bastion Point lighthouse?",
    ),
    (
        "notes/recipes.txt",
        None,
        "The secret ingredient of the harbour stew is smoked paprika.",
        "What is the secret ingredient of the harbour stew?",
    ),
    (
        "guide.pdf",
        3,
        "Quarterly inspections of the lamp room require a signed checklist form Q-17.",
        "Which form is needed for the quarterly lamp room inspection?",
    ),
]


def _filler(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def make_corpus(root: Path, seed: int = 7) -> Path:
    """Write the corpus under ``root`` and return the QA file (JSONL)."""
    rng = random.Random(seed)
    (root / "notes").mkdir(parents=True, exist_ok=True)
    for name, pages in (("manual.pdf", 5), ("guide.pdf", 4)):
        content = []
        for page in range(1, pages + 1):
            lines = _filler(rng, 12)
            for file, fact_page, fact, _ in FACTS:
                if file == name and fact_page == page:
                    lines.insert(5, fact)
            content.append(lines)
        write_pdf(root / name, content)
    history = [
        "# History of the station",
        "",
        *_filler(rng, 6),
        "",
        "## The first light",
        "",
        FACTS[2][2],
        *_filler(rng, 4),
    ]
    (root / "notes" / "history.md").write_text("\n".join(history) + "\n", encoding="utf-8")
    recipes = [*_filler(rng, 5), FACTS[3][2], *_filler(rng, 5)]
    (root / "notes" / "recipes.txt").write_text("\n".join(recipes) + "\n", encoding="latin-1")
    # Junk that must be left out.
    (root / ".hidden.txt").write_text("hidden file\n")
    (root / "notes" / "__pycache__").mkdir(exist_ok=True)
    (root / "notes" / "__pycache__" / "x.txt").write_text("cache\n")
    (root / "notes" / "~$lock.docx").write_bytes(b"lock")
    qa = root.parent / "qa.jsonl"
    with qa.open("w", encoding="utf-8") as fh:
        for file, page, _fact, question in FACTS:
            item = {"question": question, "file": file}
            if page is not None:
                item["page"] = page
            fh.write(json.dumps(item) + "\n")
    return qa
